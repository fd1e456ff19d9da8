"""The papers' greedy diagonal clusters and the noise outside them, batched over filters."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["find_clusters", "count_noise", "find_clusters_batched", "cluster_mask", "noise_batched"]


def _as_bool_tensor(clipped) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(clipped)) if not isinstance(clipped, torch.Tensor) else clipped
    return t.bool()


def find_clusters_batched(clipped) -> torch.Tensor:
    """Greedy diagonal clusters of many clipped matrices at once.

    The procedure of the papers' supplement: walk the diagonal in label order; the first label
    with a one on the diagonal that is not yet in a cluster seeds a cluster; every later such
    label joins it if the enlarged set is still an all-ones square block; repeat with a new
    seed while labels with a diagonal one are left. The loops run over labels, never over
    filters: each step is one tensor operation over all filters.

    Args:
        clipped: (C, K, K) 0/1 matrices (row = true label, column = output unit).

    Returns:
        (C, K) int64 cluster index of each label in each filter, in the order the clusters were
        found, or -1 for labels in no cluster.
    """
    m = _as_bool_tensor(clipped)
    if m.dim() != 3 or m.shape[1] != m.shape[2]:
        raise ValueError(f"expected (C, K, K) matrices, got shape {tuple(m.shape)}")
    c, k, _ = m.shape
    diag = m.diagonal(dim1=1, dim2=2)  # (C, K)
    ids = torch.full((c, k), -1, dtype=torch.long)
    next_id = torch.zeros(c, dtype=torch.long)
    arange = torch.arange(c)
    while True:
        free = diag & (ids < 0)
        active = free.any(1)
        if not active.any():
            return ids
        seed = torch.where(active, free.float().argmax(1), torch.zeros_like(next_id))  # first free diagonal one
        members = torch.zeros(c, k, dtype=torch.bool)
        members[arange[active], seed[active]] = True
        for j in range(k):
            # j joins if it is free, after the seed, and its row and column are ones on all members.
            row_ok = (m[:, j, :] | ~members).all(1)
            col_ok = (m[:, :, j] | ~members).all(1)
            join = active & free[:, j] & (j > seed) & row_ok & col_ok
            members[:, j] |= join
        ids = torch.where(members, next_id.view(-1, 1).expand(c, k), ids)
        next_id += active.long()


def cluster_mask(cluster_ids: torch.Tensor) -> torch.Tensor:
    """(C, K, K) bool: True where row and column labels share a cluster of the filter."""
    ids = torch.as_tensor(cluster_ids)
    return (ids.unsqueeze(2) == ids.unsqueeze(1)) & (ids.unsqueeze(2) >= 0)


def noise_batched(clipped, cluster_ids: torch.Tensor) -> torch.Tensor:
    """(C,) number of ones of each clipped matrix outside its clusters."""
    m = _as_bool_tensor(clipped)
    return (m & ~cluster_mask(cluster_ids)).sum((1, 2))


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
