"""Importance criteria for channel pruning, by name: Torch-Pruning's standard ones and the
cluster-coverage criterion of the analysis.

A criterion is a factory registered under a short name; :func:`make_criterion` builds a fresh
``tp.importance.Importance`` from it. The ``prune`` recipe step and the benchmarks look criteria
up here, so a new one is a single decorated function (in a plug-in module too)::

    @register_criterion("fpgm")
    def fpgm(*, model=None, analysis=None):
        \"\"\"Geometric-median distance of each filter (Torch-Pruning's FPGM).\"\"\"
        return tp.importance.FPGMImportance()

The factory is called with keyword arguments only: ``model`` (the network to prune), ``analysis``
(its :class:`~compress.analysis.AnalysisResult`, or ``None`` where there is none) and the
criterion's own options.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch_pruning as tp

from compress.analysis.result import AnalysisResult
from compress.compression.dilute import ClusterCoverageImportance
from compress.errors import UserError, unknown_name

__all__ = ["Criterion", "register_criterion", "make_criterion", "get_criterion", "list_criteria", "WithFallback",
           "needs_gradients"]

Factory = Callable[..., tp.importance.Importance]


@dataclass(frozen=True)
class Criterion:
    """A registered importance criterion.

    Attributes:
        name: its short name (``l1``, ``coverage``, ...).
        factory: ``fn(*, model, analysis, **options) -> tp.importance.Importance``.
        needs_analysis: the factory reads the analysis (it must not be ``None``).
        per_layer: its scores only rank channels within one layer (e.g. ranks in (0, 1]), so
            ranking them over the whole network (global pruning) means nothing.
        summary: one line describing it (the factory's docstring).
    """

    name: str
    factory: Factory
    needs_analysis: bool = False
    per_layer: bool = False
    summary: str = ""


_CRITERIA: dict[str, Criterion] = {}


def register_criterion(name: str, *, needs_analysis: bool = False, per_layer: bool = False
                       ) -> Callable[[Factory], Factory]:
    """Register an importance factory under ``name``.

    Args:
        name: the criterion's short name, as recipes write it.
        needs_analysis: the factory needs the model's analysis.
        per_layer: the criterion's scores are only comparable within a layer (no global pruning).

    Raises:
        ValueError: ``name`` is already registered.
    """

    def deco(fn: Factory) -> Factory:
        if name in _CRITERIA:
            old = _CRITERIA[name].factory
            raise ValueError(f"pruning criterion {name!r} is already registered by "
                             f"{old.__module__}.{old.__qualname__}")
        summary = inspect.cleandoc(fn.__doc__ or "").split("\n\n")[0].replace("\n", " ")
        _CRITERIA[name] = Criterion(name, fn, needs_analysis, per_layer, summary)
        return fn

    return deco


def get_criterion(name: str) -> Criterion:
    """The registered criterion ``name``.

    Raises:
        UserError: no criterion has that name (the message lists the valid ones).
    """
    if name not in _CRITERIA:
        raise unknown_name("pruning criterion", name, _CRITERIA)
    return _CRITERIA[name]


def list_criteria() -> list[str]:
    """The names of every registered criterion, sorted."""
    return sorted(_CRITERIA)


def make_criterion(name: str, model: nn.Module | None = None, analysis: AnalysisResult | None = None,
                   **options: Any) -> tp.importance.Importance:
    """A fresh importance of criterion ``name``.

    Args:
        name: a registered criterion (see :func:`list_criteria`).
        model: the network that will be pruned (needed by criteria keyed by its layers).
        analysis: the model's analysis (needed by ``coverage``); ``None`` where there is none.
        **options: the criterion's own options (e.g. ``min_coverage`` of ``coverage``).

    Raises:
        UserError: an unknown criterion or option, or a criterion that needs the analysis without one.
    """
    criterion = get_criterion(name)
    if criterion.needs_analysis and analysis is None:
        raise UserError(f"pruning criterion {name!r} needs the model's analysis (cluster statistics per tap); "
                        f"analyse the model first or choose one of {', '.join(list_criteria())}")
    params = inspect.signature(criterion.factory).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        accepted = [n for n in params if n not in ("model", "analysis")]
        for key in options:
            if key not in accepted:
                raise unknown_name(f"option of pruning criterion {name!r}", key, accepted)
    return criterion.factory(model=model, analysis=analysis, **options)


class WithFallback(tp.importance.Importance):
    """``primary``'s scores, or ``fallback``'s for the groups ``primary`` cannot score (it returns
    ``None``: e.g. ``BNScaleImportance`` on a linear layer without batch-norm, which the pruner
    would otherwise leave at full width)."""

    def __init__(self, primary: tp.importance.Importance, fallback: tp.importance.Importance):
        self.primary, self.fallback = primary, fallback

    def __call__(self, group) -> torch.Tensor | None:
        imp = self.primary(group)
        return self.fallback(group) if imp is None else imp


_GRADIENT_TYPES = tuple(getattr(tp.importance, n) for n in ("GroupTaylorImportance", "GroupHessianImportance",
                                                            "OBDCImportance") if hasattr(tp.importance, n))


def needs_gradients(importance: tp.importance.Importance | None) -> bool:
    """Whether the criterion reads ``.grad`` (Taylor, Hessian, OBDC), its fallback included: run
    :func:`compress.compression.prune.accumulate_gradients` first. A custom importance says so
    with a true ``needs_gradients`` attribute."""
    if importance is None:
        return False
    if isinstance(importance, WithFallback):
        return needs_gradients(importance.primary) or needs_gradients(importance.fallback)
    if getattr(importance, "needs_gradients", False) is True or isinstance(importance, _GRADIENT_TYPES):
        return True
    fallback = getattr(importance, "fallback", None)  # e.g. ClusterCoverageImportance's
    return isinstance(fallback, tp.importance.Importance) and needs_gradients(fallback)


# ------------------------------------------------------------------------------- built-in criteria


@register_criterion("l1")
def _l1(*, model: nn.Module | None = None, analysis: AnalysisResult | None = None) -> tp.importance.Importance:
    """L1 norm of each channel's weights over its whole dependency group (Torch-Pruning)."""
    return tp.importance.GroupMagnitudeImportance(p=1)


@register_criterion("l2")
def _l2(*, model: nn.Module | None = None, analysis: AnalysisResult | None = None) -> tp.importance.Importance:
    """L2 norm of each channel's weights over its whole dependency group (Torch-Pruning)."""
    return tp.importance.GroupMagnitudeImportance(p=2)


@register_criterion("taylor")
def _taylor(*, model: nn.Module | None = None, analysis: AnalysisResult | None = None) -> tp.importance.Importance:
    """First-order Taylor estimate |weight x gradient| per channel (needs accumulated gradients)."""
    return tp.importance.GroupTaylorImportance()


@register_criterion("bn-scale")
def _bn_scale(*, model: nn.Module | None = None, analysis: AnalysisResult | None = None) -> tp.importance.Importance:
    """Batch-norm scale |gamma| where a batch-norm follows, L1 for the other layers (hidden FC)."""
    return WithFallback(tp.importance.BNScaleImportance(), tp.importance.GroupMagnitudeImportance(p=1))


@register_criterion("bn-scale-only")
def _bn_scale_only(*, model: nn.Module | None = None,
                   analysis: AnalysisResult | None = None) -> tp.importance.Importance:
    """Batch-norm scale |gamma| alone (layers without a batch-norm keep their width)."""
    return tp.importance.BNScaleImportance()


@register_criterion("random")
def _random(*, model: nn.Module | None = None, analysis: AnalysisResult | None = None) -> tp.importance.Importance:
    """Random scores (a control; seeded by the pruning seed)."""
    return tp.importance.RandomImportance()


@register_criterion("coverage", needs_analysis=True, per_layer=True)
def _coverage(*, model: nn.Module | None = None, analysis: AnalysisResult | None = None,
              min_coverage: int = 1) -> tp.importance.Importance:
    """Cluster coverage of the analysis: filters that keep every label covered rank first (L1 elsewhere)."""
    if model is None or analysis is None:
        raise UserError("pruning criterion 'coverage' needs the model and its analysis (cluster statistics per tap)")
    return ClusterCoverageImportance.from_analysis(model, analysis, min_coverage=min_coverage)
