"""Prune channels of a whole network with any importance criterion, to a FLOPs or a parameter
target or at a per-layer ratio, so that a mechanism-guided model and the standard criteria meet at
equal budgets.

:func:`prune_to_target` bisects ``BasePruner``'s pruning ratio on copies of the model until the
pruned copy's FLOPs (fvcore, as ``compress bench`` counts them) or parameter count is within a
tolerance of the target, then prunes the model itself once at that ratio (:func:`prune_once`) and
records the pruning as a replayable ``prune`` transform
(:func:`compress.compression.dilute.record_pruning`), so the result saves and reloads without
pickling modules. Any ``tp.importance.Importance`` works; the named criteria (Torch-Pruning's
standard ones and ``coverage``) are in the registry of :mod:`compress.compression.importance`.
"""

from __future__ import annotations

import copy
from typing import Any, Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from compress.compression.dilute import record_pruning
from compress.compression.importance import WithFallback, make_criterion, needs_gradients
from compress.data import DataBundle, iterate_batches
from compress.errors import UserError, unknown_name
from compress.models.introspect import count_flops, count_params, input_size_of

__all__ = ["WithFallback", "make_importance", "needs_gradients", "accumulate_gradients", "count_metric",
           "classifier_paths", "layer_widths", "prune_at_ratio", "prune_once", "prune_to_target"]


def make_importance(name: str) -> tp.importance.Importance:
    """A fresh importance of a criterion that needs neither the model nor its analysis, by its short
    name (``l1``, ``l2``, ``taylor``, ``bn-scale``, ``bn-scale-only``, ``random``); kept for older
    callers, :func:`compress.compression.importance.make_criterion` is the general form."""
    return make_criterion(name)


def accumulate_gradients(model: nn.Module, bundle: DataBundle, *, batches: int = 10, batch_size: int = 100,
                         seed: int = 0) -> nn.Module:
    """Sum the cross-entropy gradients of ``batches`` training batches into ``.grad`` (eval mode, so
    batch-norm statistics stay unchanged), for gradient-based criteria such as Taylor."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    gen = torch.Generator().manual_seed(seed)
    for i, (x, y) in enumerate(iterate_batches(bundle, bundle.train, batch_size, shuffle=True, generator=gen,
                                               device=device)):
        if i >= batches:
            break
        F.cross_entropy(model(x), y).backward()
    model.train(was)
    return model


def count_metric(model: nn.Module, metric: Literal["flops", "params"], input_size: Sequence[int]) -> int:
    """FLOPs of one image (fvcore, one multiply-add = 1) or the parameter count of ``model``."""
    if metric == "flops":
        return count_flops(model, input_size)
    if metric == "params":
        return count_params(model)
    raise unknown_name("pruning target metric", str(metric), ["flops", "params"])


def _copy_with_gradients(model: nn.Module) -> nn.Module:
    """A deep copy that also carries the gradients (``copy.deepcopy`` drops ``.grad``)."""
    twin = copy.deepcopy(model)
    for (_, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        if p.grad is not None:
            q.grad = p.grad.detach().clone()
    return twin


def classifier_paths(model: nn.Module) -> list[str]:
    """Module path of the model's classifier, which pruning leaves at full width (its outputs are
    the labels): ``get_classifier()`` where the model has one, else its last conv or linear layer."""
    named = list(model.named_modules())
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(classifier, (nn.Conv2d, nn.Linear)):
        return [n for n, m in named if m is classifier][:1]
    return [n for n, m in named if isinstance(m, (nn.Conv2d, nn.Linear))][-1:]


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output width of every conv (filters) and linear layer (units), by module path."""
    return {n: (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
            for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def prune_at_ratio(model: nn.Module, importance: tp.importance.Importance, ratio: float, *,
                   ignored: Sequence[str] = (), input_size: Sequence[int] | None = None, seed: int = 0,
                   global_pruning: bool = False, round_to: int | None = None) -> tp.pruner.BasePruner:
    """Prune ``model`` in place with one ``BasePruner`` step at ``ratio`` (channels removed per layer,
    or over the whole network with ``global_pruning``); the layers named in ``ignored`` keep their
    output channels; ``round_to`` keeps widths multiples of it (CPU kernels are faster on multiples
    of 8). Nothing is recorded: see :func:`prune_once`. Returns the pruner (its ``DG`` holds the
    pruning history)."""
    modules = dict(model.named_modules())
    missing = [n for n in ignored if n not in modules]
    if missing:
        raise unknown_name("layer to leave unpruned", missing[0], [n for n in modules if n])
    device = next(model.parameters()).device
    example = torch.randn(1, *input_size_of(model, input_size), device=device)
    was = model.training
    model.eval()  # tracing must not update batch-norm statistics
    try:
        pruner = tp.pruner.BasePruner(model, example, importance=importance, pruning_ratio=float(ratio),
                                      global_pruning=global_pruning, ignored_layers=[modules[n] for n in ignored],
                                      root_module_types=[nn.Conv2d, nn.Linear], round_to=round_to)
        torch.manual_seed(seed)  # RandomImportance draws from the global generator
        pruner.step()
    finally:
        model.train(was)
    return pruner


def prune_once(model: nn.Module, importance: tp.importance.Importance, ratio: float, *,
               ignored: Sequence[str] | None = None, input_size: Sequence[int] | None = None, seed: int = 0,
               global_pruning: bool = False, round_to: int | None = None) -> dict[str, Any]:
    """Prune ``model`` in place at ``ratio`` (:func:`prune_at_ratio`), record it as a replayable
    ``prune`` transform and clear the gradients.

    Args:
        model: the network (changed in place).
        importance: any Torch-Pruning importance.
        ratio: the fraction of channels removed per layer (or over the network with ``global_pruning``).
        ignored: module paths left unpruned (default: the classifier, :func:`classifier_paths`).
        input_size: (C, H, W); default the model's own.
        seed: seed of the pruning step (RandomImportance).
        global_pruning: rank channels over the whole network instead of per layer.
        round_to: keep every pruned width a multiple of this (``None``: any width).

    Returns:
        ``{"ratio", "flops", "params", "widths"}`` after pruning.
    """
    size = input_size_of(model, input_size)
    ignored = classifier_paths(model) if ignored is None else list(ignored)
    pruner = prune_at_ratio(model, importance, ratio, ignored=ignored, input_size=size, seed=seed,
                            global_pruning=global_pruning, round_to=round_to)
    record_pruning(model, pruner.DG, input_size=size)
    model.zero_grad(set_to_none=True)
    return {"ratio": float(ratio), "flops": count_metric(model, "flops", size),
            "params": count_metric(model, "params", size), "widths": layer_widths(model)}


def prune_to_target(model: nn.Module, importance: tp.importance.Importance, target: float, *,
                    metric: Literal["flops", "params"] = "flops", ignored: Sequence[str] | None = None,
                    input_size: Sequence[int] | None = None, tol: float = 0.02, max_ratio: float = 0.95,
                    max_trials: int = 24, seed: int = 0, global_pruning: bool = False,
                    round_to: int | None = None) -> dict[str, Any]:
    """Prune ``model`` in place so that its FLOPs or parameters come within ``tol`` of ``target``.

    Bisection on the pruning ratio: each trial prunes a copy (gradients included, for Taylor) and
    counts ``metric``; the ratio whose count is closest to ``target`` (the first within ``tol``)
    is then applied to ``model`` and recorded as a ``prune`` transform.

    Args:
        model: the network (changed in place); for gradient-based criteria call
            :func:`accumulate_gradients` on it first.
        importance: any Torch-Pruning importance (e.g. ``make_importance("l1")``).
        target: the FLOPs or parameter count to reach (absolute, not a fraction).
        metric: ``"flops"`` or ``"params"``.
        ignored: module paths left unpruned (default: the model's classifier, :func:`classifier_paths`).
        input_size: (C, H, W); default ``model.default_cfg["input_size"]``.
        tol: accepted relative distance to ``target``.
        max_ratio: largest pruning ratio tried.
        max_trials: bisection steps at most.
        seed: seed of every pruning step (RandomImportance).
        global_pruning: rank channels over the whole network instead of per layer.
        round_to: keep every pruned width a multiple of this (``None``: any width).

    Returns:
        ``{"metric", "target", "ratio", "value", "relative_error", "trials", "flops", "params",
        "widths"}``; ``widths`` maps each conv / linear layer to its output width after pruning.
    """
    size = input_size_of(model, input_size)
    ignored = classifier_paths(model) if ignored is None else list(ignored)
    start = count_metric(model, metric, size)
    if not 0 < target < start:
        raise UserError(f"{metric} target {target:,.0f} must lie between 0 and the model's {start:,}")
    if needs_gradients(importance) and not any(p.grad is not None for p in model.parameters()):
        raise UserError(f"{type(importance).__name__} needs gradients; call accumulate_gradients(model, bundle) first")
    lo, hi = 0.0, max_ratio
    best: tuple[float, float, int] | None = None  # (relative error, ratio, value)
    trials = []
    for _ in range(max_trials):
        ratio = (lo + hi) / 2
        twin = _copy_with_gradients(model)
        prune_at_ratio(twin, importance, ratio, ignored=ignored, input_size=size, seed=seed,
                       global_pruning=global_pruning, round_to=round_to)
        value = count_metric(twin, metric, size)
        err = (value - target) / target
        trials.append({"ratio": ratio, "value": value})
        if best is None or abs(err) < best[0]:
            best = (abs(err), ratio, value)
        if abs(err) <= tol:
            break
        lo, hi = (ratio, hi) if value > target else (lo, ratio)
    assert best is not None
    info = prune_once(model, importance, best[1], ignored=ignored, input_size=size, seed=seed,
                      global_pruning=global_pruning, round_to=round_to)
    value = info[metric]
    return {"metric": metric, "target": float(target), "ratio": best[1], "value": value,
            "relative_error": (value - target) / target, "trials": trials, "flops": info["flops"],
            "params": info["params"], "widths": info["widths"]}
