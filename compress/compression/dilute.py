"""Filter dilution by label coverage: pick the filters of a conv layer that keep every label covered
and balanced, remove the others with Torch-Pruning, replay it.

A label is *covered* by a filter when it belongs to one of that filter's clusters (a label sits in
at most one cluster per filter, so its cluster count in a layer is the number of filters covering
it). What the first paper did (Tzach et al., Discussion): it removed about 150 of the 512 filters
of VGG-16 layer 13 *at random* and kept the accuracy, and it names equal label coverage (Fig. 5B:
each label appears in about the same number of clusters) as the condition that held. It did not
choose filters by coverage. Choosing them so that coverage stays met and balanced is this
toolkit's own criterion, built on that observation: :func:`select_filters` keeps such a set,
:func:`dilute` removes the rest for real and records a replayable ``prune`` transform, and
:class:`ClusterCoverageImportance` lets Torch-Pruning's pruners use the same criterion on many
layers at once. :func:`dilute_by_coverage` with ``criterion="random"`` removes filters at random
instead (the paper's procedure, as a control), reporting the coverage that results.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch_pruning as tp

from compress.analysis.result import AnalysisResult, TapAnalysis
from compress.errors import UserError, unknown_name
from compress.models.transforms import record_transform, register_transform
from compress.models.introspect import input_size_of

__all__ = ["filter_scores", "coverage", "rank_filters", "select_filters", "dilution_report", "find_tap_conv",
           "dilute", "dilute_by_coverage", "record_pruning", "replay_pruning", "ClusterCoverageImportance"]

ArrayLike = np.ndarray | torch.Tensor | Sequence
_L1 = tp.importance.GroupMagnitudeImportance(p=1)  # default fallback of ClusterCoverageImportance (stateless)


def _membership(cluster_ids: ArrayLike) -> torch.Tensor:
    """(C, K) bool: label k is in one of filter c's clusters."""
    return torch.as_tensor(np.asarray(cluster_ids)) >= 0


def filter_scores(tap: TapAnalysis) -> torch.Tensor:
    """Quality of each filter of a tap: strong in-cluster fields, few noise ones.

    ``strength_c`` is the sum of the raw fields ``fields[c, i, j]`` over label pairs ``(i, j)`` in
    the same cluster of filter ``c`` (the diagonal blocks the clusters are made of), divided by its
    largest value in the layer so that it lies in [0, 1]. The score is
    ``strength_c / (1 + noise_c / K)``: one noise one per label halves it. Filters without a cluster
    score -1, below every filter that covers a label.

    Returns:
        (C,) float64 scores, higher is better.
    """
    ids = torch.as_tensor(np.asarray(tap.cluster_ids)).long()
    k = ids.shape[1]
    if tap.fields is not None:
        fields = torch.as_tensor(np.asarray(tap.fields), dtype=torch.float64)
        same = (ids[:, :, None] == ids[:, None, :]) & (ids[:, :, None] >= 0)
        strength = (fields * same).sum(dim=(1, 2)).clamp(min=0)
    else:  # fields not kept (large K): the artifact holds the same in-cluster sums
        strength = torch.as_tensor(np.asarray(tap.cluster_fields), dtype=torch.float64).clamp(min=0)
    strength = strength / strength.max().clamp(min=1e-12)
    noise = torch.as_tensor(np.asarray(tap.noise), dtype=torch.float64)
    score = strength / (1.0 + noise / k)
    return score.masked_fill(~(ids >= 0).any(dim=1), -1.0)


def coverage(cluster_ids: ArrayLike, kept: Sequence[int]) -> torch.Tensor:
    """(K,) number of kept filters whose clusters contain each label."""
    member = _membership(cluster_ids)
    return member[torch.as_tensor(list(kept), dtype=torch.long)].sum(dim=0)


def _greedy_order(member: torch.Tensor, scores: torch.Tensor, quota: torch.Tensor, n_picks: int,
                  fill: bool) -> list[int]:
    """Greedy balanced set cover; returns filter indices in pick order.

    Each pick takes the filter with the largest ``gain = sum over its labels of max(level - cov, 0)``,
    ties by score: while some label is below its quota the level is the quota (labels furthest
    below it weigh most); afterwards (only if ``fill``) it is the current highest coverage, so the
    least-covered labels are topped up first and a balanced layer is filled by score.
    """
    c = member.shape[0]
    m = member.to(torch.float64)
    # rank-normalised scores in [0, 0.5): exact tie-break because gains are integers
    tie = torch.argsort(torch.argsort(torch.as_tensor(scores, dtype=torch.float64), stable=True)).double() / (2 * c)
    quota = quota.to(torch.float64)
    cov = torch.zeros(member.shape[1], dtype=torch.float64)
    picked = torch.zeros(c, dtype=torch.bool)
    order: list[int] = []
    for _ in range(min(n_picks, c)):
        if bool((cov < quota).any()):
            level = quota
        elif fill:
            level = cov.max().expand_as(cov)
        else:
            break
        key = (m @ (level - cov).clamp(min=0) + tie).masked_fill(picked, -float("inf"))
        best = int(key.argmax())
        picked[best] = True
        cov += m[best]
        order.append(best)
    return order


def _quota(member: torch.Tensor, min_coverage: int, warn: bool) -> torch.Tensor:
    total = member.sum(dim=0)
    short = torch.nonzero(total < min_coverage).flatten().tolist()
    if short and warn:
        warnings.warn(f"labels {short} appear in fewer than {min_coverage} clusters of the whole layer "
                      f"({total[short].tolist()}); their coverage quota is capped at what exists", stacklevel=3)
    return total.clamp(max=min_coverage)


def rank_filters(cluster_ids: ArrayLike, scores: ArrayLike | None = None, *, min_coverage: int = 1) -> list[int]:
    """Every filter in the order the greedy cover of :func:`select_filters` would keep them.

    Keeping the first ``m`` gives ``select_filters(..., target=m)`` (quotas capped silently).
    """
    member = _membership(cluster_ids)
    scores = torch.zeros(member.shape[0]) if scores is None else torch.as_tensor(np.asarray(scores))
    return _greedy_order(member, scores, _quota(member, min_coverage, warn=False), member.shape[0], fill=True)


def select_filters(cluster_ids: ArrayLike, scores: ArrayLike | None = None, *, target: int | None = None,
                   min_coverage: int = 1, layer: str = "the layer") -> list[int]:
    """Choose the filters to keep so that every label stays in at least ``min_coverage`` clusters.

    A greedy balanced set cover (see :func:`_greedy_order`), one batched tensor step per pick.
    A label found in fewer than ``min_coverage`` clusters of the whole layer has its quota capped at
    what exists (with a warning). When ``target`` is too small to meet every quota, the budget goes
    to the labels furthest below theirs (a warning says so; :func:`dilution_report` lists them).

    Args:
        cluster_ids: (C, K) cluster index of each label in each filter, -1 for none.
        scores: (C,) filter quality (e.g. :func:`filter_scores`), higher kept first on ties;
            ``None`` ranks by index.
        target: filters to keep; ``None`` keeps the fewest that meet every quota.
        min_coverage: clusters each label must stay in.
        layer: layer name used in messages.

    Returns:
        Sorted indices of the kept filters.
    """
    member = _membership(cluster_ids)
    c = member.shape[0]
    if min_coverage < 1:
        raise UserError(f"min_coverage must be at least 1, got {min_coverage}")
    if target is not None and target > c:
        raise UserError(f"dilution target {target} is larger than layer {layer} with {c} filters; "
                        f"choose 1..{c} filters, a fraction in (0, 1) or 'auto'")
    if target is not None and target < 1:
        raise UserError(f"dilution target must be at least 1 filter, got {target}")
    scores = torch.zeros(c) if scores is None else torch.as_tensor(np.asarray(scores))
    quota = _quota(member, min_coverage, warn=True)
    order = _greedy_order(member, scores, quota, c if target is None else target, fill=target is not None)
    if target is not None:
        below = torch.nonzero(member[order].sum(dim=0) < quota).flatten().tolist()
        if below:
            need = len(_greedy_order(member, scores, quota, c, fill=False))
            warnings.warn(f"dilution target {target} of {layer} leaves labels {below} below min_coverage "
                          f"{min_coverage}; the greedy cover needs {need} filters", stacklevel=2)
    return sorted(order)


def dilution_report(cluster_ids: ArrayLike, kept: Sequence[int], layer: str, *,
                    min_coverage: int = 1) -> dict[str, Any]:
    """JSON-ready summary of a dilution: sizes, per-label coverage, balance and removed filters.

    ``balance_*`` is the coefficient of variation (std / mean) of the per-label coverage; 0 means
    every label is in equally many clusters.
    """
    member = _membership(cluster_ids)
    before = member.sum(dim=0).double()
    after = coverage(cluster_ids, kept).double()
    quota = before.clamp(max=min_coverage)

    def cv(x: torch.Tensor) -> float:
        return float(x.std(unbiased=False) / x.mean()) if float(x.mean()) > 0 else float("nan")

    kept_set = {int(i) for i in kept}
    below = torch.nonzero(after < quota).flatten().tolist()
    return {
        "layer": layer,
        "filters_before": int(member.shape[0]),
        "filters_after": len(kept_set),
        "coverage_before": before.long().tolist(),
        "coverage_after": after.long().tolist(),
        "min_coverage": int(after.min()),
        "min_coverage_required": min_coverage,
        "coverage_met": not below,
        "labels_below_quota": below,
        "balance_before": cv(before),
        "balance_after": cv(after),
        "removed": [i for i in range(member.shape[0]) if i not in kept_set],
    }


def _module(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        raise unknown_name("layer", name, [n for n, m in modules.items() if isinstance(m, nn.Conv2d)])
    return modules[name]


def find_tap_conv(model: nn.Module, tap: str) -> str:
    """Name of the last ``nn.Conv2d`` at or inside module ``tap``, or before it (the conv whose
    filters a tap sees; for a stage or block tap, the last conv registered inside it)."""
    names = [n for n, _ in model.named_modules() if n]
    if tap not in names:
        raise unknown_name("tap", tap, names)
    last = None
    inside = False
    for name, module in model.named_modules():
        if name == tap:
            inside = True
        elif inside and not name.startswith(tap + "."):
            break
        if isinstance(module, nn.Conv2d):
            last = name
    if last is None:
        raise UserError(f"no conv layer precedes tap {tap!r}")
    return last


def _build_graph(model: nn.Module, example_inputs: torch.Tensor) -> tp.DependencyGraph:
    """A dependency graph traced in eval mode (tracing must not update batch-norm statistics)."""
    training = model.training
    model.eval()
    try:
        return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    except (RuntimeError, ValueError, ZeroDivisionError, IndexError, KeyError, AttributeError) as e:
        if isinstance(e, UserError):
            raise
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise UserError(f"Torch-Pruning cannot build the dependency graph of {type(model).__name__} "
                        f"({type(e).__name__}: {first}); filters of this model cannot be removed") from None
    finally:
        model.train(training)


def record_pruning(model: nn.Module, graph: tp.DependencyGraph, input_size: Sequence[int] | None = None) -> dict:
    """Record the pruning done through ``graph`` (e.g. ``pruner.DG``) as a ``prune`` transform.

    The spec is ``{"kind": "prune", "input_size": [C, H, W], "history": [[module_name,
    is_out_channel_pruning, [indices]], ...]}``, Torch-Pruning's own history format; each entry's
    indices refer to the layer as it was when that entry was applied. The whole history of
    ``graph`` is recorded, so call this once per graph, after its last pruning step.
    """
    history = [[str(n), bool(out), [int(i) for i in idxs]] for n, out, idxs in graph.pruning_history()]
    spec = {"kind": "prune", "input_size": list(input_size_of(model, input_size)), "history": history}
    record_transform(model, spec)
    return spec


@register_transform("prune")
def replay_pruning(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Redo a recorded ``prune`` transform on a fresh model (its weights are loaded afterwards)."""
    size = list(input_size_of(model, spec.get("input_size")))
    device = next(model.parameters()).device
    graph = _build_graph(model, torch.randn(1, *size, device=device))
    graph.load_pruning_history(copy.deepcopy(spec["history"]))
    return model


def dilute(model: nn.Module, layer: str, keep: Sequence[int], example_inputs: torch.Tensor | None = None) -> nn.Module:
    """Remove every output channel of conv ``layer`` not in ``keep``, in place, and record it.

    Torch-Pruning's dependency graph removes the coupled batch-norm channels and the next conv's or
    linear layer's inputs (a flatten before a Linear removes each channel's H*W block).

    Args:
        model: the network (changed in place).
        layer: module path of an ``nn.Conv2d``.
        keep: filter indices to keep.
        example_inputs: a batch for tracing; by default random of ``model.default_cfg["input_size"]``.

    Returns:
        The same model, carrying a ``prune`` transform for :func:`compress.compression.serialize.save_model`.
    """
    conv = _module(model, layer)
    if not isinstance(conv, nn.Conv2d):
        raise UserError(f"layer {layer!r} is a {type(conv).__name__}, not a Conv2d")
    keep_set = {int(i) for i in keep}
    if not keep_set or min(keep_set) < 0 or max(keep_set) >= conv.out_channels:
        raise UserError(f"kept filters of {layer} must be a non-empty subset of 0..{conv.out_channels - 1}")
    removed = [i for i in range(conv.out_channels) if i not in keep_set]
    if not removed:
        return model
    if example_inputs is None:
        device = next(model.parameters()).device
        example_inputs = torch.randn(1, *list(input_size_of(model, None)), device=device)
    _remove_filters(copy.deepcopy(model), layer, removed, example_inputs, check=True)  # a failure leaves the model
    graph = _remove_filters(model, layer, removed, example_inputs)
    record_pruning(model, graph, input_size=list(example_inputs.shape[1:]))
    return model


def _remove_filters(model: nn.Module, layer: str, removed: list[int], example_inputs: torch.Tensor,
                    check: bool = False) -> tp.DependencyGraph:
    """Remove the ``removed`` filters of conv ``layer`` and their dependants (Torch-Pruning); with
    ``check``, also run the result once (Torch-Pruning can follow a reshape wrongly and leave layers
    that no longer fit, e.g. ConvNeXt's layer scales before a flattening head)."""
    graph = _build_graph(model, example_inputs)
    group = graph.get_pruning_group(model.get_submodule(layer), tp.prune_conv_out_channels, idxs=removed)
    if not graph.check_pruning_group(group):
        raise UserError(f"Torch-Pruning refuses to remove {len(removed)} filters of {layer}")
    group.prune()
    if check:
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(example_inputs)
        except RuntimeError as e:
            first = (str(e).strip().splitlines() or [""])[0][:160]
            raise UserError(f"removing filters of {layer} with Torch-Pruning leaves a model that does not run "
                            f"({first}); filters of this layer cannot be removed") from None
        finally:
            model.train(was)
    return graph


def round_up(count: int, multiple: int | None, limit: int) -> int:
    """``count`` rounded up to a multiple of ``multiple`` (``None``: unchanged), at most ``limit``."""
    if multiple is None:
        return count
    if multiple < 1:
        raise UserError(f"round_to must be a positive number of filters, got {multiple}")
    return min(limit, -(-count // multiple) * multiple)


def dilute_by_coverage(model: nn.Module, analysis: AnalysisResult, *, layer: str | None = None,
                       tap: str | None = None, target: int | None = None, min_coverage: int = 1,
                       round_to: int | None = None, example_inputs: torch.Tensor | None = None,
                       criterion: str = "coverage", seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """Select by coverage (or at random) and dilute one conv layer.

    Args:
        model: the analysed network (changed in place).
        analysis: its analysis; the layer's statistics come from the tap that conv feeds.
        layer: conv to dilute; default the last conv before ``tap``.
        tap: the analysed tap whose clusters decide when ``layer`` is not given (default: the plateau).
        target: filters to keep, or ``None`` for the fewest that keep coverage.
        min_coverage: clusters each label must stay in.
        round_to: keep a multiple of this many filters (the target, or the fewest that keep
            coverage, rounded up; at most the layer's width): onnxruntime's and cuDNN's conv
            kernels run faster on widths that are multiples of 8 or 16 than on the odd width
            between, so fewer FLOPs can otherwise mean no speed-up.
        example_inputs: tracing batch (see :func:`dilute`).
        criterion: coverage (this toolkit's selection, :func:`select_filters`) or random (keep
            ``target`` filters drawn uniformly with ``seed``: the first paper's random removal, a
            control; ``target`` is then required).
        seed: the seed of the random draw.

    Returns:
        ``(model, report)`` with the report of :func:`dilution_report`.

    Raises:
        UserError: the tap's channels are not the conv's filters (a tap that concatenates or
            reorders the outputs of several convs: dense blocks, Inception and Fire modules,
            mixed convs, channel shuffles).
    """
    taps = {find_tap_conv(model, t.name): t for t in reversed(analysis.taps)}
    if layer is None:
        layer = find_tap_conv(model, tap or analysis.plateau)
        taps[layer] = analysis.tap(tap or analysis.plateau)
    if layer not in taps:
        raise UserError(f"no analysed tap follows conv {layer!r}; analysed convs: {', '.join(sorted(taps))}")
    tap_a, conv = taps[layer], _module(model, layer)
    if tap_a.n_filters != conv.out_channels:
        raise UserError(f"tap {tap_a.name} has {tap_a.n_filters} channels but {layer}, the last conv before it, has "
                        f"{conv.out_channels} filters: the tap concatenates or reorders the outputs of several convs "
                        f"(dense blocks, Inception and Fire modules, mixed convs, channel shuffles), which dilution "
                        f"does not follow; dilute a tap whose channels are one conv's filters")
    if criterion == "random":
        if target is None:
            raise UserError("random dilution needs a target (a count or a fraction of the filters); 'auto' is the "
                            "coverage criterion's")
        if not 1 <= target <= conv.out_channels:
            raise UserError(f"dilution target {target} is outside 1..{conv.out_channels}, the filters of {layer}")
        count = round_up(target, round_to, conv.out_channels)
        gen = torch.Generator().manual_seed(int(seed))
        keep = sorted(torch.randperm(conv.out_channels, generator=gen)[:count].tolist())
    elif criterion == "coverage":
        scores = filter_scores(tap_a)
        keep = select_filters(tap_a.cluster_ids, scores, target=target, min_coverage=min_coverage, layer=layer)
        rounded = round_up(len(keep), round_to, conv.out_channels)
        if rounded != len(keep):
            keep = select_filters(tap_a.cluster_ids, scores, target=rounded, min_coverage=min_coverage, layer=layer)
    else:
        raise UserError(f"dilution criterion {criterion!r}: choose coverage or random")
    dilute(model, layer, keep, example_inputs)
    report = dilution_report(tap_a.cluster_ids, keep, layer, min_coverage=min_coverage)
    report["criterion"] = criterion
    if criterion == "random":
        report["seed"] = int(seed)
    if round_to is not None:
        report["round_to"] = round_to
    return model, report


class ClusterCoverageImportance(tp.importance.Importance):
    """Torch-Pruning importance from cluster coverage: filters picked early by the greedy cover rank high.

    For a group rooted at a conv with statistics, channel scores are ``(n - pick_rank) / n`` over
    the ``n`` filters still in the layer, from :func:`_greedy_order` run to the end (coverage
    quotas first, then balance, ties by score), so a pruner keeping ``m`` channels keeps the
    greedy's first ``m`` picks. Scores are ranks in (0, 1]: use local (per-layer) pruning.
    Channels already removed by earlier steps (``iterative_steps > 1``) are tracked through the
    pruner's dependency-graph history; statistics that do not match the layer's channel count are
    a :class:`~compress.errors.UserError`. Groups without statistics use ``fallback`` (by default the
    L1 magnitude, ``GroupMagnitudeImportance(p=1)``), or are skipped when it is ``None``.

    Args:
        stats: ``{conv name or module: TapAnalysis or (cluster_ids, scores)}``.
        min_coverage: clusters each label must stay in before balance is pursued.
        fallback: importance for groups without statistics.
    """

    def __init__(self, stats: Mapping[str | nn.Module, TapAnalysis | tuple[ArrayLike, ArrayLike]], *,
                 min_coverage: int = 1, fallback: tp.importance.Importance | None = _L1):
        self.stats = {k: (v.cluster_ids, filter_scores(v)) if isinstance(v, TapAnalysis) else v
                      for k, v in stats.items()}
        self.min_coverage = min_coverage
        self.fallback = fallback

    @classmethod
    def from_analysis(cls, model: nn.Module, analysis: AnalysisResult, **kwargs) -> ClusterCoverageImportance:
        """Statistics of every analysed tap, keyed by the conv that feeds it."""
        return cls({find_tap_conv(model, t.name): t for t in analysis.taps}, **kwargs)

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        dep, idxs = group[0]
        module, graph = dep.target.module, getattr(group, "_DG", None)
        name = graph._module2name.get(module) if graph is not None else None
        entry = self.stats.get(module, self.stats.get(name)) if name is not None else self.stats.get(module)
        if entry is None or not isinstance(module, nn.Conv2d) or dep.handler != tp.prune_conv_out_channels:
            return self.fallback(group) if self.fallback is not None else None
        alive = list(range(len(entry[0])))
        for n, out, removed in (graph.pruning_history() if graph is not None else []):
            if n == name and out:
                gone = {int(i) for i in removed}
                alive = [a for j, a in enumerate(alive) if j not in gone]
        if len(alive) != module.out_channels:
            raise UserError(f"coverage statistics of {name or module} describe {len(alive)} filters but the layer "
                            f"has {module.out_channels}")
        ids, scores = np.asarray(entry[0]), np.asarray(entry[1])
        order = rank_filters(ids[alive], scores[alive], min_coverage=self.min_coverage)
        n = len(alive)
        imp = torch.empty(n, dtype=torch.float32)
        imp[torch.as_tensor(order)] = (n - torch.arange(n, dtype=torch.float32)) / n
        return imp[torch.as_tensor([int(i) for i in idxs])]
