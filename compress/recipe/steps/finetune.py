"""``finetune``: train the whole current model for a few epochs (AFCC masks are kept)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from compress.recipe.state import RunState
from compress.recipe.step import Step, register_step
from compress.training import TrainConfig, fit

__all__ = ["Finetune", "finetune"]


def finetune(state: RunState, cfg: TrainConfig, folder: Path) -> dict[str, Any]:
    """Fine-tune ``state.model`` with ``cfg`` (resumable in ``folder``), re-applying the run's masks;
    with ``cfg.distill`` (alpha above 0) the run's original model is the teacher."""
    distill = cfg.distill is not None and cfg.distill.alpha > 0
    history = fit(state.model, state.bundle, cfg, folder, resume=state.resume, progress=state.progress,
                  after_step=state.keeper(), teacher=state.teacher() if distill else None)
    key = f"{state.bundle.eval_split}_acc"
    return {"epochs": len(history), f"final_{key}": history[-1][key] if history else None}


@register_step("finetune")
@dataclass(frozen=True)
class Finetune(TrainConfig, Step):
    """Fine-tune the whole current model (masks from earlier AFCC steps are kept). Its options are
    those of training, with fine-tuning defaults.

    With distill, the run's original model is the teacher (loaded once and kept in memory, in
    eval mode): its logits on the same augmented batch soften the labels, e.g.
    ``finetune: {epochs: 4, distill: {temperature: 4, alpha: 0.9}}``. The same option works
    wherever a step fine-tunes (afcc.finetune, trim.finetune; a prune or dilute is fine-tuned by
    the finetune step after it).
    """

    epochs: int = 5
    lr: float = 0.005
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Literal["step", "cosine", "onecycle"] = "cosine"

    all_ranks: ClassVar[bool] = True  # DistributedDataParallel under torchrun

    def run(self, state: RunState, folder: Path) -> dict[str, Any]:
        return finetune(state, self, folder)
