"""Filter dilution by label coverage: selection contracts, real removal, replay, Torch-Pruning importance."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

from compress.compression.dilute import (ClusterCoverageImportance, coverage, dilute, dilute_by_coverage,
                                         dilution_report, filter_scores, find_tap_conv, rank_filters,
                                         record_pruning, select_filters)
from compress.errors import UserError
from compress.models import create_model
from compress.compression.serialize import load_model, save_model
from conftest import tiny_vgg


def synthetic_clusters(c: int = 64, k: int = 10, seed: int = 0, empty: int = 4) -> np.ndarray:
    """(C, K) cluster ids: 1-3 disjoint clusters of 1-3 labels per filter, the first ``empty`` with none."""
    rng = np.random.default_rng(seed)
    ids = np.full((c, k), -1, dtype=np.int64)
    for f in range(empty, c):
        labels = rng.permutation(k)
        start = 0
        for j in range(rng.integers(1, 4)):
            size = int(rng.integers(1, 4))
            ids[f, labels[start:start + size]] = j
            start += size
    return ids


def vgg16_tiny():
    return create_model("vgg16", width=0.125, fc_hidden=[32], num_classes=10)


def meta_of(name: str, opts: dict, img: int = 32) -> dict:
    return {"model": name, "options": opts, "num_classes": 10, "input_size": [3, img, img]}


@pytest.mark.parametrize("c", [1, 2])
def test_selection_covers_every_label(c):
    ids = synthetic_clusters()
    scores = np.random.default_rng(1).random(len(ids))
    auto = select_filters(ids, scores, min_coverage=c)
    fixed = select_filters(ids, scores, target=40, min_coverage=c)
    for kept in (auto, fixed):
        assert kept == sorted(set(kept))
        assert int(coverage(ids, kept).min()) >= c
    assert len(fixed) == 40
    assert len(auto) <= len(fixed)
    assert dilution_report(ids, auto, "l", min_coverage=c)["coverage_met"]


def test_selection_is_balanced_and_prefers_scores():
    ids = synthetic_clusters(c=128, seed=3)
    scores = np.random.default_rng(2).random(len(ids))
    kept = select_filters(ids, scores, target=48)
    report = dilution_report(ids, kept, "l")
    rng = np.random.default_rng(4)
    random_cv = [dilution_report(ids, rng.choice(len(ids), 48, replace=False).tolist(), "l")["balance_after"]
                 for _ in range(20)]
    assert report["balance_after"] < np.median(random_cv)
    assert report["filters_before"] == 128 and report["filters_after"] == 48
    assert sorted(report["removed"] + kept) == list(range(128))
    # filters without a cluster (0..3) are never kept before covering ones
    assert not set(kept) & {0, 1, 2, 3}
    # with identical label sets, the higher score is picked first
    twin = np.array([[0, 0, -1], [0, 0, -1], [-1, -1, 0]])
    assert select_filters(twin, [0.1, 0.9, 0.5], min_coverage=1) == [1, 2]


def test_target_errors_and_small_budget():
    ids = synthetic_clusters()
    with pytest.raises(UserError, match="dilution target 600 is larger than layer features.conv13 with 64 filters"):
        select_filters(ids, None, target=600, layer="features.conv13")
    need = len(select_filters(ids, None, min_coverage=2))
    one = len(select_filters(ids, None, min_coverage=1))
    assert one < need
    with pytest.warns(UserWarning, match="below min_coverage 2"):
        kept = select_filters(ids, None, target=one, min_coverage=2)
    assert len(kept) == one
    assert int(coverage(ids, kept).min()) >= 1  # the budget went to the least-covered labels
    report = dilution_report(ids, kept, "l", min_coverage=2)
    assert not report["coverage_met"] and report["labels_below_quota"]


def test_rare_label_quota_is_capped():
    ids = synthetic_clusters(c=16, k=4, seed=5)
    ids[:, 3] = -1
    ids[7, 3] = 5  # label 3 exists in one filter only
    with pytest.warns(UserWarning, match=r"labels \[3\] appear in fewer than 2"):
        kept = select_filters(ids, None, min_coverage=2)
    cov = coverage(ids, kept)
    assert 7 in kept and int(cov[3]) == 1 and int(cov[:3].min()) >= 2


def test_filter_scores_prefer_strong_fields_and_low_noise():
    ids = np.array([[0, 0, -1], [0, 0, -1], [-1, 0, -1], [-1, -1, -1]])
    fields = np.ones((4, 3, 3))
    fields[2] *= 3.0
    tap = SimpleNamespace(cluster_ids=ids, fields=fields, noise=np.array([0, 3, 0, 0]))
    s = filter_scores(tap)
    assert s[0] > s[1]  # same fields, more noise
    assert s[2] < s[0]  # one strong label (3) vs four in-cluster entries (4)
    assert s[3] == s.min() and s[3] < 0  # no cluster: lowest


def test_rank_matches_selection():
    ids = synthetic_clusters()
    scores = np.random.default_rng(0).random(len(ids))
    order = rank_filters(ids, scores, min_coverage=2)
    assert sorted(order) == list(range(len(ids)))
    for m in (len(select_filters(ids, scores, min_coverage=2)), 20, 50):
        assert select_filters(ids, scores, target=m, min_coverage=2) == sorted(order[:m])


@pytest.mark.parametrize("build,name,opts,layer,nxt", [
    (tiny_vgg, "vgg6", {"width": 0.125, "fc_hidden": []}, "features.conv5", "head.out"),
    (tiny_vgg, "vgg6", {"width": 0.125, "fc_hidden": []}, "features.conv3", "features.conv4"),
    (vgg16_tiny, "vgg16", {"width": 0.125, "fc_hidden": [32]}, "features.conv13", "head.fc1"),
    (vgg16_tiny, "vgg16", {"width": 0.125, "fc_hidden": [32]}, "features.conv9", "features.conv10"),
])
def test_dilute_removes_filters_and_replays(tmp_path, build, name, opts, layer, nxt):
    torch.manual_seed(0)
    model = build().eval()
    modules = dict(model.named_modules())
    c = modules[layer].out_channels
    keep = select_filters(synthetic_clusters(c=c, k=10, empty=1), None, target=c // 2)
    x = torch.randn(4, 3, 32, 32)
    ops0, params0 = tp.utils.count_ops_and_params(model, x[:1])
    dilute(model, layer, keep)
    modules = dict(model.named_modules())
    assert modules[layer].out_channels == len(keep)
    assert modules[layer.replace("conv", "bn")].num_features == len(keep)
    nxt_in = modules[nxt].in_channels if isinstance(modules[nxt], nn.Conv2d) else modules[nxt].in_features
    assert nxt_in == len(keep)  # 1x1 spatial at the head at 32 px
    ops1, params1 = tp.utils.count_ops_and_params(model, x[:1])
    assert ops1 < ops0 and params1 < params0
    with torch.inference_mode():
        out = model(x)
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    spec = model.compress_transforms[-1]
    assert spec["kind"] == "prune" and spec["history"][0][:2] == [layer, True]
    save_model(model, tmp_path / "m.pt", meta_of(name, opts))
    loaded, _ = load_model(tmp_path / "m.pt")
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    with torch.inference_mode():
        assert torch.equal(loaded(x), out)


@pytest.mark.parametrize("img", [32, 64])
def test_dilute_last_conv_keeps_exact_channels(img):
    """Flatten + Linear: the head keeps each kept channel's H*W block; outputs equal the masked original."""
    torch.manual_seed(0)
    model = tiny_vgg(img_size=img).eval()
    original = tiny_vgg(img_size=img).eval()
    original.load_state_dict(model.state_dict())
    with torch.no_grad():  # give batch norm non-trivial statistics to check they are carried over
        model.features.bn5.running_mean.normal_()
        original.features.bn5.running_mean.copy_(model.features.bn5.running_mean)
    keep = [1, 4, 5, 9, 30, 63]
    hw = (img // 32) ** 2
    dilute(model, "features.conv5", keep)
    w0 = original.head.out.weight.detach().view(10, 64, hw)
    assert model.head.out.in_features == len(keep) * hw
    assert torch.equal(model.head.out.weight.detach(), w0[:, keep].flatten(1))
    assert torch.equal(model.features.bn5.running_mean, original.features.bn5.running_mean[keep])
    mask = torch.zeros(64, dtype=torch.bool)
    mask[keep] = True
    with torch.no_grad():
        original.head.out.weight.view(10, 64, hw)[:, ~mask] = 0
        x = torch.randn(3, 3, img, img)
        torch.testing.assert_close(model(x), original(x))


def test_dilute_rejects_bad_requests():
    model = tiny_vgg()
    with pytest.raises(UserError, match="did you mean"):
        dilute(model, "features.conv55", [0])
    with pytest.raises(UserError, match="not a Conv2d"):
        dilute(model, "features.bn5", [0])
    with pytest.raises(UserError, match="non-empty subset"):
        dilute(model, "features.conv5", [64])
    assert dilute(model, "features.conv5", range(64)) is model
    assert not getattr(model, "compress_transforms", [])


def conv_stats(model: nn.Module, names: list[str]) -> dict:
    mods = dict(model.named_modules())
    return {n: (synthetic_clusters(c=mods[n].out_channels, k=10, seed=i, empty=1),
                np.random.default_rng(i).random(mods[n].out_channels)) for i, n in enumerate(names)}


@pytest.mark.parametrize("steps", [1, 2])
def test_importance_drives_pruner(tmp_path, steps):
    torch.manual_seed(0)
    model = tiny_vgg().eval()
    with torch.no_grad():  # tag each filter of conv5 with its original index
        model.features.bn5.bias.copy_(torch.arange(64.0))
    stats = conv_stats(model, ["features.conv2", "features.conv4", "features.conv5"])  # conv1, conv3: L1
    x = torch.randn(2, 3, 32, 32)
    pruner = tp.pruner.BasePruner(model, x[:1], importance=ClusterCoverageImportance(stats, min_coverage=2),
                                  pruning_ratio=0.5, iterative_steps=steps, ignored_layers=[model.head.out],
                                  root_module_types=[nn.Conv2d])
    for _ in range(steps):
        pruner.step()
    widths = [m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert widths == [4, 8, 16, 32, 32]
    assert model.head.out.in_features == 32
    # the kept filters of conv5 are the greedy cover's first 32 picks (an iterative run too)
    first = sorted(rank_filters(*stats["features.conv5"], min_coverage=2)[:32])
    assert model.features.bn5.bias.detach().long().tolist() == first
    record_pruning(model, pruner.DG)
    save_model(model, tmp_path / "m.pt", meta_of("vgg6", {"width": 0.125, "fc_hidden": []}))
    loaded, _ = load_model(tmp_path / "m.pt")
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))


def test_importance_without_fallback_skips_layers():
    model = tiny_vgg().eval()
    imp = ClusterCoverageImportance(conv_stats(model, ["features.conv5"]), fallback=None)
    tp.pruner.BasePruner(model, torch.randn(1, 3, 32, 32), importance=imp, pruning_ratio=0.25,
                         ignored_layers=[model.head.out], root_module_types=[nn.Conv2d]).step()
    assert [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)] == [8, 16, 32, 64, 48]


def test_dilute_by_coverage_on_a_real_analysis(small_digits):
    from compress.analysis import AnalysisConfig, analyze_model

    torch.manual_seed(0)
    model = tiny_vgg().eval()
    taps = [f"features.pool{i}" for i in (3, 4, 5)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = analyze_model(model, small_digits, taps, AnalysisConfig(probe_epochs=2), progress=False)
        model, report = dilute_by_coverage(model, analysis, layer="features.conv5", min_coverage=1)
    tap = analysis.tap("features.pool5")
    assert report["coverage_met"] and report["layer"] == "features.conv5"
    present = np.asarray(tap.stats.label_counts) > 0
    assert (np.asarray(report["coverage_after"])[present] >= 1).all()
    assert model.features.conv5.out_channels == report["filters_after"] <= 64
    with torch.inference_mode():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    fresh = tiny_vgg().eval()
    layer = find_tap_conv(fresh, analysis.plateau)
    half = dict(fresh.named_modules())[layer].out_channels // 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, default = dilute_by_coverage(fresh, analysis, target=half)
    assert default["layer"] == layer and default["filters_after"] == half
    imp = ClusterCoverageImportance.from_analysis(tiny_vgg(), analysis)
    assert set(imp.stats) == {"features.conv3", "features.conv4", "features.conv5"}


def test_round_up():
    from compress.compression.dilute import round_up

    assert [round_up(n, 8, 64) for n in (1, 8, 9, 63, 64)] == [8, 8, 16, 64, 64]
    assert round_up(61, 8, 62) == 62 and round_up(13, None, 64) == 13
    with pytest.raises(UserError, match="round_to"):
        round_up(5, 0, 64)


@pytest.mark.parametrize("target", [None, 13])
def test_dilute_by_coverage_rounds_the_width(small_digits, target):
    from compress.analysis import AnalysisConfig, analyze_model

    torch.manual_seed(0)
    model = tiny_vgg().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = analyze_model(model, small_digits, ["features.pool5"], AnalysisConfig(probe_epochs=2),
                                 progress=False)
        plain = dilute_by_coverage(tiny_vgg().eval(), analysis, layer="features.conv5", target=target)[1]
        model, report = dilute_by_coverage(model, analysis, layer="features.conv5", target=target, round_to=8)
    assert plain["filters_after"] % 8 != 0  # the case is not trivially rounded already
    want = min(64, -(-plain["filters_after"] // 8) * 8)
    assert model.features.conv5.out_channels == report["filters_after"] == want and report["round_to"] == 8
    assert set(plain["removed"]) >= set(report["removed"])  # the greedy picks the same filters first, then more
    with torch.inference_mode():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
