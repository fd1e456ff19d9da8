"""Batched phase-3 matrices against a brute-force computation with silenced probe weights."""

import pytest
import torch

from compress.analysis import clip_fields, field_matrices, normalize_fields
from compress.data import iterate_batches
from compress.errors import UserError
from compress.analysis.features import extract_features
from compress.models import run_to_taps

from conftest import tiny_vgg


@pytest.mark.parametrize("tap", ["features.pool2", "features.pool4"])
def test_fields_equal_brute_force(small_digits, tap):
    torch.manual_seed(0)
    model = tiny_vgg().eval()
    k = small_digits.num_classes
    cache = extract_features(model, small_digits, small_digits.test, [tap], progress=False)
    feats = cache.features[tap]
    c = feats.shape[1]
    weight = torch.randn(k, feats[0].numel())
    fields, decision = field_matrices(feats, cache.labels, weight, k, batch_size=37)

    # Brute force: silence every probe weight but filter c's and run the test images.
    w4 = weight.view(k, *feats.shape[1:])
    for f in range(c):
        silenced = torch.zeros_like(w4)
        silenced[:, f] = w4[:, f]
        probe = torch.nn.Linear(weight.shape[1], k, bias=False)
        probe.weight.data = silenced.reshape(k, -1)
        sums = torch.zeros(k, k, dtype=torch.float64)
        counts = torch.zeros(k, k, dtype=torch.float64)
        with torch.no_grad():
            for x, y in iterate_batches(small_digits, small_digits.test, 64):
                out = probe(torch.flatten(run_to_taps(model, x, [tap])[tap], 1))
                for n in range(len(y)):
                    sums[y[n]] += out[n].double()
                    if (out[n] != 0).any():
                        counts[y[n], out[n].argmax()] += 1
        assert torch.allclose(fields[f], sums, rtol=1e-4, atol=1e-3), f"filter {f}"
        expected = counts / counts.sum(1, keepdim=True).clamp_min(1)
        assert torch.allclose(decision[f], expected, atol=1e-6), f"filter {f}"


def test_decision_rows_sum_to_one_or_zero(small_digits):
    model = tiny_vgg().eval()
    cache = extract_features(model, small_digits, small_digits.test, ["features.pool5"], progress=False)
    feats = cache.features["features.pool5"]
    _, decision = field_matrices(feats, cache.labels, torch.randn(10, feats[0].numel()), 10)
    rows = decision.sum(2)
    assert torch.all((rows - 1).abs().lt(1e-9) | rows.eq(0))


def test_normalize_and_clip():
    fields = torch.tensor([[[2.0, 1.0], [0.5, -1.0]], [[-1.0, -2.0], [-3.0, -1.0]]], dtype=torch.float64)
    norm = normalize_fields(fields)
    assert norm[0].max() == 1.0 and norm[0, 1, 0] == 0.25
    assert torch.all(norm[1] == 0)  # a filter with no positive field (dead) has no clusters
    clipped = clip_fields(norm, 0.3)
    assert clipped[0].tolist() == [[True, True], [False, False]]


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.2, 1.5])
def test_threshold_outside_unit_interval_is_refused(bad):
    with pytest.raises(UserError, match="outside \\(0, 1\\)"):
        clip_fields(torch.zeros(1, 2, 2), bad)
