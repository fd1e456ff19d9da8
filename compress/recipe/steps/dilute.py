"""``dilute``: remove filters of one conv layer while every label stays covered by clusters."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch.nn as nn

from compress.compression.dilute import dilute_by_coverage, find_tap_conv
from compress import checks
from compress.errors import OptionError, UserError
from compress.models import resolve_taps
from compress.recipe.state import RunState
from compress.recipe.step import CheckContext, Step, register_step
from compress.training import evaluate

__all__ = ["Dilute"]


@register_step("dilute")
@dataclass(frozen=True)
class Dilute(Step):
    """Remove filters of a conv layer while every label stays in at least ``min_coverage`` clusters.

    Choosing the filters by label coverage is this toolkit's criterion: the first paper removed
    about 150 of VGG-16's 512 layer-13 filters at random and observed that equal label coverage
    held; criterion random repeats that as a control.

    Attributes:
        layer: the conv layer to dilute (default: the last conv before ``tap``).
        tap: the analysed tap whose clusters decide (plateau, last or a tap name).
        target: filters to keep: a count (350), a fraction of the layer (0.7), or auto (the fewest
            filters that keep every label covered min_coverage times).
        min_coverage: clusters every label must stay in.
        round_to: keep a multiple of this many filters (rounded up), for faster conv kernels.
        criterion: coverage (keep the filters that keep every label covered, balanced, preferring
            low-noise, high-field filters; this toolkit's own rule) or random (keep target filters
            drawn at random with seed, the first paper's removal, as a control; needs a count or
            fraction target; the report shows the coverage left).
        seed: the random draw of criterion random.
    """

    layer: str | None = None
    tap: str = "plateau"
    target: int | float | Literal["auto"] = "auto"
    min_coverage: int = 1
    round_to: int | None = None
    criterion: Literal["coverage", "random"] = "coverage"
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.target, float) and not 0 < self.target < 1:
            raise UserError(f"dilute.target {self.target} must be a count, a fraction in (0, 1) or 'auto'")
        if isinstance(self.target, int) and self.target < 1:
            raise UserError(f"dilute.target {self.target} must be a count of at least 1, a fraction in (0, 1) or 'auto'")
        if self.round_to is not None and self.round_to < 1:
            raise UserError(f"dilute.round_to {self.round_to} must be a positive number of filters (e.g. 8)")
        if self.min_coverage < 1:
            raise UserError(f"dilute.min_coverage {self.min_coverage} must be at least 1")
        if self.criterion == "random" and self.target == "auto":
            raise OptionError("target", "'auto' is the coverage criterion's (the fewest filters that keep every label "
                                        "covered); criterion random needs a count (350) or a fraction (0.7)")
        checks.seed("seed", self.seed)

    def check(self, ctx: CheckContext) -> None:
        if self.tap not in ("plateau", "last"):
            ctx.require_modules("tap", [self.tap])
        if self.layer is not None:
            ctx.require_modules("layer", [self.layer])
        if not isinstance(self.target, int):
            return
        model = ctx.model
        if self.layer is not None:
            layers = [self.layer]
        elif self.tap not in ("plateau", "last"):
            layers = [find_tap_conv(model, self.tap)]
        else:  # the widest layer a plateau (or last) tap can have: known only after the analysis
            taps = resolve_taps(model, ctx.recipe.analysis.taps, ctx.input_size)
            layers = [find_tap_conv(model, t) for t in (taps[-1:] if self.tap == "last" else taps)]
        if not isinstance(model.get_submodule(layers[0]), nn.Conv2d):
            raise ctx.fail("layer", f"{layers[0]!r} is a {type(model.get_submodule(layers[0])).__name__}, not a Conv2d")
        widths = {name: getattr(model.get_submodule(name), "out_channels", 0) for name in layers}
        widest = max(widths, key=widths.get)
        if self.target > widths[widest]:
            which = f"layer {widest}" if len(layers) == 1 else f"the widest layer a plateau tap can have ({widest})"
            raise ctx.fail("target", f"{self.target} is larger than {which} with {widths[widest]} filters; choose "
                                     f"1..{widths[widest]}, a fraction in (0, 1) or 'auto'")

    def run(self, state: RunState, folder: Path) -> dict[str, Any]:
        tap = state.resolve_tap(self.tap)
        layer = self.layer or find_tap_conv(state.model, tap)
        for t in state.analysis.taps:
            if find_tap_conv(state.model, t.name) == layer:
                state.tap_analysis(t.name)
        width = state.model.get_submodule(layer).out_channels
        target = self.target
        if target == "auto":
            target = None
        elif isinstance(target, float):
            target = max(1, round(target * width))
        try:
            _, info = dilute_by_coverage(state.model, state.analysis, layer=self.layer, tap=tap, target=target,
                                         min_coverage=self.min_coverage, round_to=self.round_to,
                                         criterion=self.criterion, seed=self.seed)
        except UserError as e:
            raise UserError(f"dilute.layer {layer!r} (the conv of dilute.tap {tap!r}): {e}; set dilute.layer or "
                            f"dilute.tap to another conv or tap") from None
        info["accuracy_before_finetune"] = evaluate(state.model, state.bundle)
        names = [n for n, _ in state.model.named_modules()]  # every tap at or after the conv has other filters now
        pos = names.index(layer)
        state.stale |= {t.name for t in state.analysis.taps if names.index(t.name) > pos}
        return info
