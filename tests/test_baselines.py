"""Torch-Pruning criteria pruned to a FLOPs or parameter target: within tolerance, smaller, replayable."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from compress.compression.prune import (accumulate_gradients, count_metric, make_importance, needs_gradients,
                                            prune_to_target)
from compress.compression.dilute import ClusterCoverageImportance
from compress.errors import UserError
from compress.models import create_model
from compress.compression.serialize import load_model, save_model

OPTS = {"width": 0.125, "fc_hidden": [16]}
SIZE = [3, 32, 32]


def tiny():
    torch.manual_seed(0)
    return create_model("vgg6", num_classes=10, **OPTS).eval()


def meta() -> dict:
    return {"model": "vgg6", "options": OPTS, "num_classes": 10, "input_size": SIZE}


@pytest.mark.parametrize("name,metric", [("l1", "flops"), ("bn-scale", "flops"), ("random", "params")])
def test_reaches_target_and_reloads(tmp_path, name, metric):
    model = tiny()
    start = count_metric(model, metric, SIZE)
    info = prune_to_target(model, make_importance(name), 0.5 * start, metric=metric, tol=0.05)
    assert abs(info["relative_error"]) <= 0.05
    assert info["value"] == count_metric(model, metric, SIZE) < start
    assert model.head.out.out_features == 10  # the classifier keeps its outputs
    assert model.head.fc1.out_features < 16  # the hidden FC layer (no batch-norm) is pruned too
    x = torch.randn(2, *SIZE)
    save_model(model, tmp_path / "m.pt", meta())
    loaded, _ = load_model(tmp_path / "m.pt")
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))


def test_round_to_keeps_multiples():
    model = create_model("vgg6", num_classes=10, width=0.25, fc_hidden=[16]).eval()
    info = prune_to_target(model, make_importance("l1"), 0.5 * count_metric(model, "flops", SIZE), tol=0.1,
                           round_to=8)
    assert all(w % 8 == 0 for n, w in info["widths"].items() if n.startswith("features"))
    assert info["flops"] < count_metric(create_model("vgg6", num_classes=10, width=0.25, fc_hidden=[16]), "flops", SIZE)


def test_taylor_needs_gradients(small_digits):
    model = tiny()
    imp = make_importance("taylor")
    assert needs_gradients(imp) and not needs_gradients(make_importance("l1"))
    target = 0.6 * count_metric(model, "flops", SIZE)
    with pytest.raises(UserError, match="gradients"):
        prune_to_target(model, imp, target)
    accumulate_gradients(model, small_digits, batches=2, batch_size=50)
    info = prune_to_target(model, imp, target, tol=0.05)
    assert abs(info["relative_error"]) <= 0.05
    assert all(p.grad is None for p in model.parameters())


def test_coverage_importance_and_bad_inputs():
    model = tiny()
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    widths = {n: model.get_submodule(n).out_channels for n in convs}
    stats = {n: (torch.arange(c)[:, None].remainder(10).eq(torch.arange(10)).long().sub(1).numpy(),
                 torch.rand(c).numpy()) for n, c in widths.items()}
    info = prune_to_target(model, ClusterCoverageImportance(stats), 0.5 * count_metric(model, "flops", SIZE), tol=0.05)
    assert all(info["widths"][n] < widths[n] for n in convs)
    with pytest.raises(UserError, match="target"):
        prune_to_target(tiny(), make_importance("l1"), 10 ** 12)
    with pytest.raises(UserError, match="criterion"):
        make_importance("l7")
    with pytest.raises(UserError):
        prune_to_target(tiny(), make_importance("l1"), 1000, ignored=["head.nope"])
