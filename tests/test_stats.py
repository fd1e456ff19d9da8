"""Layer statistics and the per-label SNR of Fig. 2 on hand-made matrices."""

import pytest
import torch

from compress.analysis import find_clusters_batched, find_plateau, label_snr, layer_stats, noise_batched, snr_estimates


def test_label_snr_by_hand():
    clipped = torch.tensor([[[1, 1, 0], [1, 1, 0], [1, 0, 0]]], dtype=torch.bool)  # cluster {0,1}, noise (2,0)
    fields = torch.tensor([[[4.0, 3.0, -1.0], [2.0, 5.0, 0.0], [6.0, 1.0, 0.5]]])
    ids = find_clusters_batched(clipped)
    snr = label_snr(clipped, fields, ids)
    assert snr["boolean"]["signal"].tolist() == [1, 1, 0]
    assert snr["boolean"]["noise_internal"].tolist() == [0.5, 0.5, 0]
    assert snr["boolean"]["noise_external"].tolist() == [0, 0, 0.5]
    assert snr["field"]["signal"].tolist() == [4.0, 5.0, 0.0]
    assert snr["field"]["noise_internal"].tolist() == [1.5, 1.0, 0.0]
    assert snr["field"]["noise_external"].tolist() == [0.0, 0.0, 3.0]


def test_layer_stats_skip_filters_without_clusters():
    clipped = torch.zeros(3, 4, 4, dtype=torch.bool)
    clipped[0, :2, :2] = True  # one cluster of 2
    clipped[0, 3, 0] = True  # one noise element
    clipped[1, 2, 2] = clipped[1, 3, 3] = True  # two clusters of 1 (2 and 3 do not form a block)
    ids = find_clusters_batched(clipped)  # filter 2 has no cluster
    stats = layer_stats(ids, noise_batched(clipped, ids))
    assert stats.filters_without_cluster == 1
    assert stats.clusters_per_filter == 1.5
    assert stats.noise == 0.5
    assert stats.cluster_size == pytest.approx(4 / 3)
    assert stats.size_fractions[:2] == pytest.approx([2 / 3, 1 / 3])
    assert stats.label_counts == [1, 1, 1, 1]
    est = snr_estimates(stats, n_filters=3, num_labels=4)
    # Eq. (1): the mean label count (4 memberships / 4 labels), not C_s N_c N_f / K = 1.5, which
    # counts filter 2 (no cluster) as if it had N_c clusters (issue 15, point 6)
    assert est["signal"] == pytest.approx(1.0)
    assert est["signal"] == pytest.approx(4 / 3 * 1.5 * 2 / 4)  # C_s N_c times the filters that have a cluster


def test_plateau_is_earliest_within_tolerance():
    assert find_plateau([0.70, 0.85, 0.931, 0.94, 0.94], 0.5) == 3
    assert find_plateau([0.70, 0.85, 0.931, 0.94, 0.94], 1.0) == 2
    assert find_plateau([0.5, 0.4], 0.0) == 0
