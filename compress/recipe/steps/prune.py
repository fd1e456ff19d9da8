"""``prune``: remove channels of every conv and linear layer with an importance criterion, to a
FLOPs or parameter budget or at a per-layer ratio (Torch-Pruning, recorded as a replayable transform)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch.nn as nn
import torch_pruning as tp

from compress.checks import seed as check_seed
from compress.compression.importance import get_criterion, list_criteria, make_criterion, needs_gradients
from compress.compression.prune import (accumulate_gradients, classifier_paths, count_metric, layer_widths,
                                        prune_once, prune_to_target)
from compress.errors import OptionError, UserError, unknown_name
from compress.models.introspect import match_modules
from compress.recipe.state import RunState
from compress.recipe.step import CheckContext, Step, register_step
from compress.training import evaluate

__all__ = ["Prune"]


@register_step("prune")
@dataclass(frozen=True)
class Prune(Step):
    """Prune channels of every conv and linear layer (the classifier's outputs stay) by a criterion.

    The pruned model is fine-tuned by a finetune step after this one; give it distill to fine-tune
    with the original (unpruned) model as teacher.

    Attributes:
        criterion: the importance criterion: l1, l2, taylor, bn-scale, bn-scale-only, random, or
            coverage (the clusters of every analysed tap).
        target: the fraction of the original to keep, in (0, 1) (of the FLOPs, parameters or
            channels: see metric).
        metric: flops or params (prune until the model has target times its FLOPs or parameters,
            within tolerance), or channels (remove 1 - target of every layer's channels).
        tolerance: accepted relative distance to a flops or params target (0.02: within 2 %).
        ignored: module paths (globs allowed) left unpruned; the classifier always is.
        round_to: keep every pruned width a multiple of this (e.g. 8, for faster kernels).
        allocation: uniform (the same ratio in every layer) or global (channels ranked over the
            whole network).
        min_coverage: coverage only: clusters every label must stay in before balance is pursued.
        gradient_batches: training batches whose gradients gradient criteria (taylor) read.
        seed: seed of the gradient batches and of the random criterion.
    """

    criterion: str = "l1"
    target: float = 0.5
    metric: Literal["flops", "params", "channels"] = "flops"
    tolerance: float = 0.02
    ignored: list[str] = field(default_factory=list)
    round_to: int | None = None
    allocation: Literal["uniform", "global"] = "uniform"
    min_coverage: int = 1
    gradient_batches: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.criterion not in list_criteria():
            raise OptionError("criterion", str(unknown_name("pruning criterion", self.criterion, list_criteria())))
        if not 0 < self.target < 1:
            raise OptionError("target", f"{self.target} must be the fraction of the original to keep, in (0, 1)")
        if not 0 < self.tolerance < 1:
            raise OptionError("tolerance", f"{self.tolerance} must be a relative distance in (0, 1), e.g. 0.02")
        if self.round_to is not None and self.round_to < 1:
            raise OptionError("round_to", f"{self.round_to} must be a positive number of channels (e.g. 8)")
        if self.allocation == "global" and get_criterion(self.criterion).per_layer:
            raise OptionError("allocation", f"global ranks channels over the whole network, but {self.criterion} "
                                            f"scores only rank them within a layer; use uniform")
        if self.min_coverage < 1:
            raise OptionError("min_coverage", f"{self.min_coverage} must be at least 1")
        if self.min_coverage != 1 and self.criterion != "coverage":
            raise OptionError("min_coverage", f"applies to the coverage criterion only, not {self.criterion}")
        if self.gradient_batches < 1:
            raise OptionError("gradient_batches", f"{self.gradient_batches} must be at least 1")
        check_seed("seed", self.seed)

    def check(self, ctx: CheckContext) -> None:
        if self.ignored:
            ctx.require_modules("ignored", self.ignored)
        if any(s.name == "afcc" for s in ctx.previous):
            raise UserError(f"{ctx.where}: cannot follow an afcc step (pruning would change the filters feeding "
                            f"AFCC's masked head); prune before afcc")

    def run(self, state: RunState, folder: Path) -> dict[str, Any]:
        model, size = state.model, tuple(state.bundle.input_size)
        ignored = self.ignored_paths(model)
        importance = self.importance(state)
        if needs_gradients(importance):
            accumulate_gradients(model, state.bundle, batches=self.gradient_batches, seed=self.seed)
        before = {"flops": count_metric(model, "flops", size), "params": count_metric(model, "params", size),
                  "widths": layer_widths(model)}
        common = dict(ignored=ignored, input_size=size, seed=self.seed, global_pruning=self.allocation == "global",
                      round_to=self.round_to)
        if self.metric == "channels":
            info = prune_once(model, importance, 1 - self.target, **common)
            pruned = [n for n in before["widths"] if not any(n == i or n.startswith(i + ".") for i in ignored)]
            info["value"] = sum(info["widths"][n] for n in pruned)
            achieved = info["value"] / max(1, sum(before["widths"][n] for n in pruned))
        else:
            info = prune_to_target(model, importance, self.target * before[self.metric], metric=self.metric,
                                   tol=self.tolerance, **common)
            info["trials"] = len(info["trials"])
            achieved = info["value"] / before[self.metric]
            if abs(info["relative_error"]) > self.tolerance:
                warnings.warn(f"prune: {self.metric} reached {achieved:.3f} of the original, not {self.target:g} "
                              f"within {self.tolerance:.0%} (coarse widths: round_to {self.round_to}, or too few "
                              f"channels)", stacklevel=2)
        state.stale |= {t.name for t in state.analysis.taps}
        info.update(criterion=self.criterion, metric=self.metric, target=self.target, achieved=achieved,
                    relative_error=(achieved - self.target) / self.target, ignored=ignored,
                    flops_before=before["flops"], params_before=before["params"], widths_before=before["widths"],
                    accuracy_before_finetune=evaluate(model, state.bundle))
        return info

    def importance(self, state: RunState) -> tp.importance.Importance:
        """A fresh importance of the criterion, for the current model (and analysis: the taps an
        earlier step changed are analysed again first)."""
        if not get_criterion(self.criterion).needs_analysis:
            return make_criterion(self.criterion, state.model, state.analysis)
        for t in list(state.analysis.taps):
            state.tap_analysis(t.name)
        options = {"min_coverage": self.min_coverage} if self.criterion == "coverage" else {}
        return make_criterion(self.criterion, state.model, state.analysis, **options)

    def ignored_paths(self, model: nn.Module) -> list[str]:
        """The module paths left unpruned: the classifier and those ``ignored`` matches."""
        try:
            chosen = match_modules(model, self.ignored, "layer to leave unpruned") if self.ignored else []
        except UserError as e:
            raise UserError(f"prune.ignored: {e}") from None
        return list(dict.fromkeys([*classifier_paths(model), *chosen]))
