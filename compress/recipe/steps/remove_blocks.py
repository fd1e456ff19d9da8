"""``remove_blocks``: keep the first blocks of stages and drop layers of stage models."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from compress.compression.blocks import drop_layers, list_stages, plateau_stages, remove_blocks
from compress.recipe.state import RunState
from compress.recipe.step import CheckContext, Step, register_step
from compress.training import evaluate

__all__ = ["RemoveBlocks"]


@register_step("remove_blocks")
@dataclass(frozen=True)
class RemoveBlocks(Step):
    """Keep the first blocks of stages and drop layers (the classifier is resized).

    Attributes:
        keep: blocks to keep per stage, e.g. {blocks.1: 1}, or auto (the stages the plateau says add nothing).
        drop: layers to replace by identity, e.g. [conv_head, bn2].
    """

    keep: dict[str, int] | Literal["auto"] = field(default_factory=dict)
    drop: list[str] = field(default_factory=list)

    def check(self, ctx: CheckContext) -> None:
        if isinstance(self.keep, dict):
            ctx.require_modules("keep", list(self.keep))
        ctx.require_modules("drop", self.drop)

    def run(self, state: RunState, folder: Path) -> dict[str, Any]:
        size = state.bundle.input_size
        before = list_stages(state.model)
        keep = plateau_stages(state.model, state.analysis) if self.keep == "auto" else dict(self.keep)
        if keep:
            remove_blocks(state.model, keep, size)
        if self.drop:
            drop_layers(state.model, self.drop, size)
        names = [n for n, _ in state.model.named_modules()]
        state.stale |= {t.name for t in state.analysis.taps}  # block indices and widths may have moved
        state.analysis.taps = [t for t in state.analysis.taps if t.name in names]
        return {"stages_before": before, "kept_blocks": keep, "dropped": list(self.drop),
                "stages_after": list_stages(state.model),
                "accuracy_before_finetune": evaluate(state.model, state.bundle)}
