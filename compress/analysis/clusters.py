"""The papers' greedy diagonal clusters and the noise outside them, batched over filters.

Large stacks of matrices (K = 1,000 labels, thousands of filters) are processed in chunks of
filters, so that no temporary is larger than about :data:`CHUNK_BYTES`.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["find_clusters", "count_noise", "find_clusters_batched", "cluster_mask", "noise_batched",
           "cluster_sizes", "filter_chunks", "CHUNK_BYTES"]

CHUNK_BYTES = 64 * 2**20  # default size of the dense temporaries of one chunk of filters


def _as_bool_tensor(clipped) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(clipped)) if not isinstance(clipped, torch.Tensor) else clipped
    return t.bool()


def filter_chunks(n_filters: int, bytes_per_filter: int, budget: int = CHUNK_BYTES) -> list[slice]:
    """Consecutive slices of filters whose temporaries (``bytes_per_filter`` each) fit ``budget``."""
    step = max(1, int(budget) // max(int(bytes_per_filter), 1))
    return [slice(lo, min(n_filters, lo + step)) for lo in range(0, n_filters, step)]


def find_clusters_batched(clipped, budget: int = CHUNK_BYTES) -> torch.Tensor:
    """Greedy diagonal clusters of many clipped matrices at once.

    The procedure of the papers' supplement: walk the diagonal in label order; the first label
    with a one on the diagonal that is not yet in a cluster seeds a cluster; every later such
    label joins it if the enlarged set is still an all-ones square block; repeat with a new
    seed while labels with a diagonal one are left. The loops run over clusters and their
    members, never over filters: each step is one tensor operation over a chunk of filters.

    Args:
        clipped: (C, K, K) 0/1 matrices (row = true label, column = output unit).
        budget: bytes of temporaries per chunk of filters.

    Returns:
        (C, K) int64 cluster index of each label in each filter, in the order the clusters were
        found, or -1 for labels in no cluster.
    """
    m = _as_bool_tensor(clipped)
    if m.dim() != 3 or m.shape[1] != m.shape[2]:
        raise ValueError(f"expected (C, K, K) matrices, got shape {tuple(m.shape)}")
    c, k, _ = m.shape
    ids = torch.full((c, k), -1, dtype=torch.long)
    for part in filter_chunks(c, k * k + 64 * k, budget):
        ids[part] = torch.from_numpy(_greedy_clusters(m[part].numpy()))
    return ids


def _greedy_clusters(m: np.ndarray) -> np.ndarray:
    """:func:`find_clusters_batched` on one chunk of (c, K, K) bool matrices (numpy, whose fancy
    indexing and small operations cost less than torch's here).

    A label j can join the growing cluster when ``m[j, i] and m[i, j]`` for every member i, so
    one (c, K) mask of compatible labels is kept and narrowed by the row and the column of each
    new member; the next member is the first free compatible label after the last one (labels
    skipped before it stay incompatible, as the set only grows). Each round costs one step per
    member of the largest cluster it finds, not one per label.
    """
    c, k, _ = m.shape
    free = np.diagonal(m, axis1=1, axis2=2).copy()  # diagonal ones not yet in a cluster
    ids = np.full((c, k), -1, dtype=np.int64)
    next_id = np.zeros(c, dtype=np.int64)
    labels = np.arange(k)
    while True:
        rows = np.flatnonzero(free.any(1))
        if rows.size == 0:
            return ids
        free_rows = free[rows]
        last = free_rows.argmax(1)  # the seed: the first free diagonal one
        members = np.zeros((len(rows), k), dtype=bool)
        ok = m[rows, last] & m[rows, :, last]  # labels compatible with every member so far
        grow = np.arange(len(rows))
        while grow.size:
            members[grow, last[grow]] = True
            cand = free_rows[grow] & ok[grow] & (labels > last[grow, None])
            has = cand.any(1)
            grow, j = grow[has], cand[has].argmax(1)
            f = rows[grow]
            ok[grow] &= m[f, j] & m[f, :, j]
            last[grow] = j
        ids[rows] = np.where(members, next_id[rows, None], ids[rows])
        free[rows] &= ~members
        next_id[rows] += 1


def cluster_mask(cluster_ids: torch.Tensor) -> torch.Tensor:
    """(C, K, K) bool: True where row and column labels share a cluster of the filter."""
    ids = torch.as_tensor(cluster_ids)
    return (ids.unsqueeze(2) == ids.unsqueeze(1)) & (ids.unsqueeze(2) >= 0)


def cluster_sizes(cluster_ids: torch.Tensor) -> torch.Tensor:
    """(C, K) int64: the size of the cluster each label belongs to in each filter, 0 for none."""
    ids = torch.as_tensor(cluster_ids).long()
    c, k = ids.shape
    flat = (torch.arange(c).view(-1, 1) * k + ids.clamp_min(0)).flatten()
    counts = torch.bincount(flat, weights=(ids >= 0).flatten().double(), minlength=c * k).long().view(c, k)
    return torch.where(ids >= 0, counts.gather(1, ids.clamp_min(0)), torch.zeros_like(ids))


def noise_batched(clipped, cluster_ids: torch.Tensor, budget: int = CHUNK_BYTES) -> torch.Tensor:
    """(C,) number of ones of each clipped matrix outside its clusters (chunked over filters)."""
    m = _as_bool_tensor(clipped)
    ids = torch.as_tensor(cluster_ids)
    k = m.shape[-1]
    out = torch.zeros(m.shape[0], dtype=torch.long)
    for part in filter_chunks(m.shape[0], 2 * k * k, budget):
        out[part] = (m[part] & ~cluster_mask(ids[part])).sum((1, 2))
    return out


def find_clusters(clipped) -> list[list[int]]:
    """Clusters of one clipped K x K 0/1 matrix, as label lists in the order the procedure finds them.

    >>> find_clusters([[1, 1, 0], [1, 1, 0], [0, 0, 1]])
    [[0, 1], [2]]
    """
    m = _as_bool_tensor(clipped)
    if m.dim() != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"expected a square K x K matrix, got shape {tuple(m.shape)}")
    ids = find_clusters_batched(m.unsqueeze(0))[0]
    return [torch.nonzero(ids == i).flatten().tolist() for i in range(int(ids.max()) + 1)]


def count_noise(clipped, clusters: list[list[int]]) -> int:
    """Ones of ``clipped`` outside the given clusters: total ones minus the sum of squared cluster sizes."""
    m = _as_bool_tensor(clipped)
    return int(m.sum()) - sum(len(cl) ** 2 for cl in clusters)
