"""Layer statistics of the papers' tables (n, N_c, C_s, size fractions, label counts) and the
signal-to-noise ratios of Eqs. (1)-(4), Boolean and field versions (Fig. 2)."""

from __future__ import annotations

import torch

from compress.analysis.clusters import cluster_mask
from compress.analysis.result import LayerStats

__all__ = ["layer_stats", "label_snr", "snr_estimates", "find_plateau"]


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


def label_snr(clipped: torch.Tensor, fields: torch.Tensor, cluster_ids: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """Per-label signal, internal and external noise over a tap's filters (Fig. 2).

    Boolean version: ``signal[i]`` counts the filters with label i in a cluster (the diagonal of
    the summed clipped matrices); ``noise_internal[i]`` counts the off-diagonal ones of row i
    inside clusters and ``noise_external[i]`` the ones of row i outside every cluster, both
    divided by the K - 1 other labels, so that they compare with the signal on one competing
    output as in Eqs. (2)-(3). Field version: the same positions, summing the raw fields
    instead of ones.
    """
    inside = cluster_mask(cluster_ids)
    k = clipped.shape[1]
    eye = torch.eye(k, dtype=torch.bool)
    masks = {"signal": inside & eye, "noise_internal": inside & ~eye, "noise_external": clipped & ~inside}
    scale = {"signal": 1.0, "noise_internal": 1.0 / max(k - 1, 1), "noise_external": 1.0 / max(k - 1, 1)}
    return {
        "boolean": {name: m.double().sum((0, 2)) * scale[name] for name, m in masks.items()},
        "field": {name: (fields.double() * m).sum((0, 2)) * scale[name] for name, m in masks.items()},
    }


def snr_estimates(stats: LayerStats, n_filters: int, num_labels: int) -> dict[str, float]:
    """The papers' Eqs. (1)-(4) from the layer averages."""
    cs, nc, n = stats.cluster_size, stats.clusters_per_filter, stats.noise
    signal = cs * nc * n_filters / num_labels
    noise_i = (cs - 1) / max(num_labels - 1, 1) * signal
    noise_e = n * n_filters / num_labels**2
    inf = float("inf")
    return {"signal": signal, "noise_internal": noise_i, "noise_external": noise_e,
            "snr_internal": signal / noise_i if noise_i > 0 else inf,
            "snr_external": signal / noise_e if noise_e > 0 else inf}


def find_plateau(accuracies: list[float], tolerance_points: float = 0.5) -> int:
    """Index of the earliest tap whose accuracy is within ``tolerance_points`` (percentage points)
    of the best."""
    if not accuracies:
        raise ValueError("no accuracies to find a plateau in")
    best = max(accuracies)
    return next(i for i, a in enumerate(accuracies) if a >= best - tolerance_points / 100.0 - 1e-12)
