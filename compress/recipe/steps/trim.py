"""``trim``: cut the network after a tap; the tap's trained probe becomes the head."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from compress.compression.trim import head_path, trim_model, trim_report
from compress.errors import OptionError, UserError
from compress.recipe.state import RunState
from compress.recipe.step import CheckContext, Step, register_step
from compress.recipe.steps.finetune import Finetune, finetune
from compress.training import evaluate

__all__ = ["Trim", "trim"]


def trim(state: RunState, tap: str, head: Literal["probe", "pool"] = "probe") -> dict[str, Any]:
    """Cut ``state.model`` after the analysed ``tap`` (a name, ``plateau`` or ``last``).

    The analysis keeps the taps up to the cut (the plateau becomes the cut tap when it was after it).
    """
    tap = state.resolve_tap(tap)
    analysis = state.tap_analysis(tap)
    before = copy.deepcopy(state.model)
    try:
        trim_model(state.model, tap, torch.as_tensor(analysis.probe_weight), head=head,
                   pool=state.analysis_config.tap_pool, input_size=state.bundle.input_size)
    except OptionError as e:
        raise UserError(f"trim.{e}") from None
    except UserError as e:
        raise UserError(f"trim.tap {tap!r}: {e}") from None
    names = [t.name for t in state.analysis.taps]
    state.analysis.taps = state.analysis.taps[: names.index(tap) + 1]
    kept = {t.name for t in state.analysis.taps}
    state.stale &= kept
    if state.analysis.plateau not in kept:
        state.analysis.plateau = tap
    info = trim_report(before, state.model, tap)
    info["head"] = head_path(state.model)
    info["head_kind"] = head
    info["probe_accuracy"] = analysis.accuracy
    info["accuracy_before_finetune"] = evaluate(state.model, state.bundle)
    return info


@register_step("trim")
@dataclass(frozen=True)
class Trim(Step):
    """Cut the network after a tap: the layers after it go and the tap's probe becomes the head.

    Works on any model with taps (own VGGs, timm, torchvision, registered models): the forward
    pass stops at the tap and every module after it is removed. The new head is head.out on the
    own VGGs and trim_head.out on every other model (name it in afcc.head, or leave afcc.head
    unset).

    Attributes:
        tap: plateau (the first tap within the plateau tolerance of the best), last, or a tap name.
        head: probe (the tap's trained probe, on the tap pooled as analysis.tap_pool did: the cut
            model reproduces the probe's accuracy) or pool (global average pooling and a linear
            layer initialised from the probe's weights summed over each filter's positions; give
            it a finetune).
        finetune: fine-tune the cut model right away (the options of the finetune step, distill
            included; none by default).
    """

    tap: str = "plateau"
    head: Literal["probe", "pool"] = "probe"
    finetune: Finetune | None = None

    all_ranks: ClassVar[bool] = True  # the fine-tuning; the cut itself is made on rank 0

    def check(self, ctx: CheckContext) -> None:
        if self.tap not in ("plateau", "last"):
            ctx.require_modules("tap", [self.tap])

    def run(self, state: RunState, folder: Path) -> dict[str, Any]:
        info = state.on_main(lambda: trim(state, self.tap, self.head))
        if self.finetune is not None:
            info["finetune"] = finetune(state, self.finetune, folder)
        return info
