"""``trim``: cut the network after a tap; the tap's trained probe becomes the head."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compress.compression.trim import trim_at, trim_report
from compress.recipe.state import RunState
from compress.recipe.step import CheckContext, Step, register_step
from compress.training import evaluate

__all__ = ["Trim", "trim"]


def trim(state: RunState, tap: str) -> dict[str, Any]:
    """Cut ``state.model`` after the analysed ``tap`` (a name, ``plateau`` or ``last``)."""
    tap = state.resolve_tap(tap)
    analysis = state.tap_analysis(tap)
    before = copy.deepcopy(state.model)
    trim_at(state.model, tap, torch.as_tensor(analysis.probe_weight))
    names = [t.name for t in state.analysis.taps]
    state.analysis.taps = state.analysis.taps[: names.index(tap) + 1]
    info = trim_report(before, state.model, tap)
    info["probe_accuracy"] = analysis.accuracy
    info["accuracy_before_finetune"] = evaluate(state.model, state.bundle)
    return info


@register_step("trim")
@dataclass(frozen=True)
class Trim(Step):
    """Cut the network after a tap: the layers after it go and the tap's probe becomes the head.

    Attributes:
        tap: plateau (the first tap within the plateau tolerance of the best), last, or a tap name.
    """

    tap: str = "plateau"

    def check(self, ctx: CheckContext) -> None:
        if self.tap not in ("plateau", "last"):
            ctx.require_modules("tap", [self.tap])

    def run(self, state: RunState, folder: Path) -> dict[str, Any]:
        return trim(state, self.tap)
