"""The greedy diagonal clusters and noise: the paper's example and a reference implementation."""

import numpy as np
import pytest
import torch

from compress.analysis import count_noise, find_clusters, find_clusters_batched, noise_batched


def fig4b_matrix():
    m = np.zeros((10, 10), dtype=int)
    for cl in [(0, 4, 9), (1, 2, 5), (7,), (8,)]:
        for i in cl:
            for j in cl:
                m[i, j] = 1
    for i, j in [(0, 1), (3, 2), (6, 7), (2, 8), (9, 3), (4, 6)]:  # six noise ones off the clusters
        m[i, j] = 1
    return m


def test_paper_fig4b_example():
    m = fig4b_matrix()
    clusters = find_clusters(m)
    assert clusters == [[0, 4, 9], [1, 2, 5], [7], [8]]
    assert count_noise(m, clusters) == 6


def reference_clusters(m):
    """Plain-Python transcription of the supplement's procedure, one matrix at a time."""
    k = len(m)
    assigned = set()
    clusters = []
    while True:
        free = [i for i in range(k) if m[i][i] and i not in assigned]
        if not free:
            return clusters
        cluster = [free[0]]
        for j in free[1:]:
            if all(m[j][a] and m[a][j] for a in cluster):
                cluster.append(j)
        assigned.update(cluster)
        clusters.append(cluster)


@pytest.mark.parametrize("k,density", [(10, 0.3), (10, 0.6), (17, 0.4), (5, 0.9)])
def test_batched_matches_reference(k, density):
    gen = torch.Generator().manual_seed(k)
    clipped = torch.rand(64, k, k, generator=gen) < density
    ids = find_clusters_batched(clipped)
    noise = noise_batched(clipped, ids)
    for c in range(64):
        ref = reference_clusters(clipped[c].tolist())
        got = [torch.nonzero(ids[c] == i).flatten().tolist() for i in range(int(ids[c].max()) + 1)]
        assert got == ref
        assert noise[c].item() == count_noise(clipped[c], ref)


def test_clusters_are_all_ones_blocks_and_disjoint():
    clipped = torch.rand(128, 10, 10, generator=torch.Generator().manual_seed(1)) < 0.5
    ids = find_clusters_batched(clipped)
    for c in range(128):
        for cl in find_clusters(clipped[c]):
            block = clipped[c][np.ix_(cl, cl)]
            assert bool(block.all())
        labels = ids[c][ids[c] >= 0]
        assert len(labels) == int(clipped[c].diagonal().sum())  # every diagonal one lands in a cluster


def test_empty_and_full_matrices():
    assert find_clusters(np.zeros((4, 4))) == []
    assert count_noise(np.zeros((4, 4)), []) == 0
    assert find_clusters(np.ones((4, 4))) == [[0, 1, 2, 3]]
    assert count_noise(np.ones((4, 4)), [[0, 1, 2, 3]]) == 0


def test_rejects_non_square():
    with pytest.raises(ValueError):
        find_clusters(np.zeros((3, 4)))
