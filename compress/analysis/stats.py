"""Layer statistics of the papers' tables (n, N_c, C_s, size fractions, label counts) and the
signal-to-noise ratios of Eqs. (1)-(4), Boolean and field versions (Fig. 2)."""

from __future__ import annotations

import math

import numpy as np
import torch

from compress.analysis.clusters import CHUNK_BYTES, cluster_mask, cluster_sizes, filter_chunks
from compress.analysis.result import LayerStats

__all__ = ["layer_stats", "label_snr", "snr_estimates", "find_plateau", "snr_sums_zero", "snr_sums_add",
           "snr_sums_add_rows", "snr_from_sums"]


def layer_stats(cluster_ids: torch.Tensor, noise: torch.Tensor) -> LayerStats:
    """Averages over one tap's filters. n and N_c average over filters with at least one cluster;
    filters without any are counted apart. C_s averages over all clusters of the tap."""
    ids = torch.as_tensor(cluster_ids)
    c, k = ids.shape
    n_clusters = ids.max(1).values + 1  # (C,)
    has = n_clusters > 0
    # cluster sizes: count labels per (filter, cluster id)
    valid = ids >= 0
    flat = (torch.arange(c).view(-1, 1) * k + ids.clamp_min(0))[valid]
    sizes = torch.bincount(flat, minlength=c * k).view(c, k)
    sizes = sizes[sizes > 0]
    hist = torch.bincount(sizes, minlength=k + 1)[1:].double()
    total = hist.sum()
    return LayerStats(
        noise=float(noise[has].double().mean()) if has.any() else 0.0,
        clusters_per_filter=float(n_clusters[has].double().mean()) if has.any() else 0.0,
        cluster_size=float(sizes.double().mean()) if sizes.numel() else 0.0,
        size_fractions=(hist / total).tolist() if total > 0 else [0.0] * k,
        filters_without_cluster=int((~has).sum()),
        label_counts=valid.sum(0).tolist(),
    )


_SNR_PARTS = ("signal", "noise_internal", "noise_external")


def label_snr(clipped: torch.Tensor, fields: torch.Tensor, cluster_ids: torch.Tensor,
              budget: int = CHUNK_BYTES) -> dict[str, dict[str, torch.Tensor]]:
    """Per-label signal, internal and external noise over a tap's filters (Fig. 2).

    Boolean version: ``signal[i]`` counts the filters with label i in a cluster (the diagonal of
    the summed clipped matrices); ``noise_internal[i]`` counts the off-diagonal ones of row i
    inside clusters and ``noise_external[i]`` the ones of row i outside every cluster, both
    divided by the K - 1 other labels, so that they compare with the signal on one competing
    output as in Eqs. (2)-(3). Field version: the same positions, summing the raw fields
    instead of ones. Computed in chunks of filters of at most ``budget`` bytes of temporaries.
    """
    clipped, fields, ids = torch.as_tensor(np.asarray(clipped)), torch.as_tensor(fields), torch.as_tensor(cluster_ids)
    c, k = ids.shape
    sums = snr_sums_zero(k)
    for part in filter_chunks(c, 24 * k * k, budget):
        snr_sums_add(sums, clipped[part].bool(), fields[part], ids[part])
    return snr_from_sums(sums, k)


def snr_sums_zero(k: int) -> dict[str, dict[str, torch.Tensor]]:
    """Empty accumulators for :func:`snr_sums_add`."""
    return {kind: {name: torch.zeros(k, dtype=torch.float64) for name in _SNR_PARTS} for kind in ("boolean", "field")}


def snr_sums_add(sums: dict, clipped: torch.Tensor, fields: torch.Tensor,
                 cluster_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Add one chunk of filters to the per-label sums of :func:`label_snr` (unscaled).

    Args:
        sums: accumulators from :func:`snr_sums_zero`, updated in place.
        clipped: (c, K, K) bool.
        fields: (c, K, K) raw fields.
        cluster_ids: (c, K) cluster index per label.

    Returns:
        (c,) float64, each filter's raw fields summed inside its clusters (signal + internal),
        and (c,) int64, its noise (ones of ``clipped`` outside the clusters).
    """
    ids = torch.as_tensor(cluster_ids)
    member = ids >= 0
    inside = cluster_mask(ids)
    outside = clipped & ~inside
    in_rows = inside.sum(2)
    out_rows = outside.sum(2)
    sums["boolean"]["signal"] += member.sum(0)
    sums["boolean"]["noise_internal"] += (in_rows - member.long()).sum(0)
    sums["boolean"]["noise_external"] += out_rows.sum(0)
    fields = fields.double()
    diag = torch.where(member, fields.diagonal(dim1=1, dim2=2), 0.0)
    in_fields = torch.where(inside, fields, 0.0).sum(2)
    sums["field"]["signal"] += diag.sum(0)
    sums["field"]["noise_internal"] += (in_fields - diag).sum(0)
    sums["field"]["noise_external"] += torch.where(outside, fields, 0.0).sum((0, 2))
    return in_fields.sum(1), out_rows.sum(1)


def snr_sums_add_rows(sums: dict, cluster_ids: torch.Tensor, row_ones: torch.Tensor, row_fields: torch.Tensor,
                      diag_fields: torch.Tensor, cluster_fields: torch.Tensor) -> torch.Tensor:
    """:func:`snr_sums_add` from (c, K) row summaries instead of the (c, K, K) matrices.

    Valid for clusters found on the same clipped matrices (every cluster is then an all-ones
    block of them), so that a label's ones outside its cluster are its row's ones minus its
    cluster's size.

    Args:
        sums: accumulators from :func:`snr_sums_zero`, updated in place.
        cluster_ids: (c, K) cluster index per label, -1 for none.
        row_ones: (c, K) ones per row of the clipped matrices.
        row_fields: (c, K) raw fields summed over the ones of each row.
        diag_fields: (c, K) the raw fields on the diagonal.
        cluster_fields: (c, K) raw fields of each row summed over the label's cluster (0 outside clusters).

    Returns:
        (c,) int64 noise of each filter.
    """
    ids = torch.as_tensor(cluster_ids)
    member = ids >= 0
    size = cluster_sizes(ids)
    outside = row_ones.long() - size
    sums["boolean"]["signal"] += member.sum(0)
    sums["boolean"]["noise_internal"] += (size - member.long()).sum(0)
    sums["boolean"]["noise_external"] += outside.sum(0)
    diag = torch.where(member, diag_fields.double(), 0.0)
    sums["field"]["signal"] += diag.sum(0)
    sums["field"]["noise_internal"] += (cluster_fields - diag).sum(0)
    sums["field"]["noise_external"] += (row_fields - cluster_fields).sum(0)
    return outside.sum(1)


def snr_from_sums(sums: dict, k: int) -> dict[str, dict[str, torch.Tensor]]:
    """The result of :func:`label_snr` from its sums: noise divided by the K - 1 competing labels."""
    scale = {"signal": 1.0, "noise_internal": 1.0 / max(k - 1, 1), "noise_external": 1.0 / max(k - 1, 1)}
    return {kind: {name: v * scale[name] for name, v in parts.items()} for kind, parts in sums.items()}


def snr_estimates(stats: LayerStats, n_filters: int, num_labels: int) -> dict[str, float]:
    """The second paper's Eqs. (1)-(4) from the layer averages.

    Eq. (1), the signal, is "the average appearance number of each label in the clusters of the
    layer": the mean of ``stats.label_counts``. The paper writes it ``C_s N_c N_f / N_l``, which
    equals that mean only when every filter has a cluster: ``N_c`` averages over the filters that
    have one, so multiplying it by all ``N_f`` filters would overcount by the filters without
    any. Eqs. (2)-(4) follow from it: ``noise_I = (C_s - 1) / (N_l - 1) * signal``,
    ``noise_E = n N_f / N_l^2`` (``n`` the mean noise of the filters with a cluster), and
    ``SNR_I``, ``SNR_E`` their ratios to the signal.
    """
    cs, n = stats.cluster_size, stats.noise
    counts = stats.label_counts
    signal = float(sum(counts)) / num_labels if num_labels else 0.0
    noise_i = (cs - 1) / max(num_labels - 1, 1) * signal
    noise_e = n * n_filters / num_labels**2
    inf = float("inf")
    return {"signal": signal, "noise_internal": noise_i, "noise_external": noise_e,
            "snr_internal": signal / noise_i if noise_i > 0 else inf,
            "snr_external": signal / noise_e if noise_e > 0 else inf}


def find_plateau(accuracies: list[float], tolerance_points: float = 0.5, reference: float | None = None) -> int:
    """Index of the earliest tap whose accuracy is within ``tolerance_points`` (percentage points)
    of ``reference`` (``plateau_reference: model``: the whole model's accuracy), or of the best
    tap when ``reference`` is None or no tap comes that close to it (``best_probe``)."""
    if not accuracies:
        raise ValueError("no accuracies to find a plateau in")
    best = max(accuracies)
    if reference is not None and math.isfinite(reference) and best >= reference - tolerance_points / 100.0 - 1e-12:
        best = reference
    return next(i for i, a in enumerate(accuracies) if a >= best - tolerance_points / 100.0 - 1e-12)
