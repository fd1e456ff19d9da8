"""AFCC: masks keep each filter's cluster labels only, stay zero through training, and the compact
head equals the masked dense head, survives save/load and ONNX, and makes the files smaller."""

import copy
import io

import numpy as np
import pytest
import torch
import torch.nn as nn

from compress.analysis.result import TapAnalysis
from compress.analysis.stats import layer_stats
from compress.compression.afcc import (MaskKeeper, SparseHead, afcc_mask, afcc_report, apply_mask, compress_head,
                                       conv_mask_from_labels, count_kept, fc_mask_from_labels, label_sets,
                                       papers_estimate, select_trainable)
from compress.errors import UserError
from compress.compression.serialize import load_model, save_model
from compress.training import TrainConfig, fit

from conftest import tiny_vgg


def make_tap(ids: np.ndarray, spatial: tuple[int, int]) -> TapAnalysis:
    """A TapAnalysis holding only what AFCC reads: cluster ids, spatial size and statistics."""
    c, k = ids.shape
    t = torch.as_tensor(ids)
    zeros = np.zeros((c, k, k))
    return TapAnalysis(name="features.pool5", n_filters=c, spatial=spatial, accuracy=1.0, train_accuracy=1.0,
                       threshold=0.3, probe_weight=np.zeros((k, c, *spatial)), fields=zeros, decision=zeros,
                       normalized=zeros, clipped=zeros.astype(bool), cluster_ids=ids, noise=np.zeros(c, int),
                       stats=layer_stats(t, torch.zeros(c, dtype=torch.long)), snr={})


def random_ids(c: int, k: int, per_filter: int, seed: int = 0) -> np.ndarray:
    """(C, K) cluster ids: each filter has one cluster of ``per_filter`` random labels."""
    rng = np.random.default_rng(seed)
    ids = -np.ones((c, k), dtype=np.int64)
    for f in range(c):
        ids[f, rng.choice(k, per_filter, replace=False)] = 0
    return ids


def masked_linear(ids: np.ndarray, spatial: tuple[int, int], bias: bool = False) -> tuple[nn.Linear, torch.Tensor]:
    c, k = ids.shape
    mask = afcc_mask(ids, spatial)
    linear = nn.Linear(c * spatial[0] * spatial[1], k, bias=bias)
    return apply_mask(linear, mask), mask


def test_mask_hand_example():
    # filter 0: cluster {0, 1}; filter 1: clusters {2} and {0}; K = 3, 2x2 blocks
    ids = np.array([[0, 0, -1], [1, -1, 0]])
    mask = afcc_mask(ids, (2, 2))
    expected = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1],
                             [1, 1, 1, 1, 0, 0, 0, 0],
                             [0, 0, 0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, expected)
    assert count_kept(mask) == 16
    assert label_sets(ids) == [{0, 1}, {0, 2}]


def test_kept_count_equals_papers_estimate():
    c, k, s, spatial = 16, 10, 3, (2, 2)
    ids = random_ids(c, k, s)
    tap = make_tap(ids, spatial)
    mask = afcc_mask(ids, spatial)
    assert count_kept(mask) == c * 4 * s * 1 == pytest.approx(papers_estimate(tap))
    report = afcc_report(mask, tap)
    assert report["dense_weights"] == k * c * 4
    assert report["kept_weights"] == count_kept(mask)
    assert report["removed_fraction"] == pytest.approx(1 - s / k)
    assert report["pairs"] == c * s
    assert report["bytes_sparse"] < report["bytes_dense"]
    # several clusters of mixed sizes: still exact; a filter without any makes it overshoot by C / (C - 1)
    ids[0][ids[0] < 0] = np.arange(k - s) % 3 + 1
    assert count_kept(afcc_mask(ids, spatial)) == pytest.approx(papers_estimate(make_tap(ids, spatial)))
    ids[1] = -1
    assert count_kept(afcc_mask(ids, spatial)) * c / (c - 1) == pytest.approx(papers_estimate(make_tap(ids, spatial)))


def test_masked_weights_stay_exactly_zero_through_fit(tmp_path, small_digits):
    torch.manual_seed(0)
    model = tiny_vgg()
    head = model.head.out
    c = head.in_features  # vgg6 at 32 px ends at 1x1
    mask = afcc_mask(random_ids(c, 10, 3), (1, 1))
    apply_mask(head, mask)
    conv_before = model.features.conv1.weight.detach().clone()
    kept_before = head.weight.detach()[mask].clone()
    assert select_trainable(model, ["head"]) == ["head.out.weight"]
    cfg = TrainConfig(epochs=1, batch_size=50, lr=0.05, momentum=0.9, weight_decay=5e-3, amp=False, augment=False)
    fit(model, small_digits, cfg, tmp_path, progress=False, device=torch.device("cpu"),
        after_step=MaskKeeper({"head.out": mask}))
    assert torch.count_nonzero(head.weight[~mask]) == 0
    assert not torch.equal(head.weight.detach()[mask], kept_before)  # the kept weights did train
    assert torch.equal(model.features.conv1.weight, conv_before)  # frozen
    # without the keeper, one step with decay and momentum moves masked weights off zero
    opt = torch.optim.SGD([head.weight], lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-3)
    x, y = small_digits.normalize(small_digits.train.images[:20]), small_digits.train.labels[:20]
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert torch.count_nonzero(head.weight[~mask]) > 0


def test_sparse_head_equals_masked_linear():
    torch.manual_seed(0)
    ids = random_ids(12, 7, 2)
    ids[3, :] = -1  # a filter without clusters
    ids[5, [0, 4]] = [0, 1]  # and one with two clusters
    linear, mask = masked_linear(ids, (2, 3), bias=True)
    head = SparseHead.from_linear(linear, mask, (2, 3))
    assert head.values.shape == (count_kept(mask) // 6, 6)
    assert head.filters.dtype == head.labels.dtype == torch.int64
    x = torch.randn(9, 12, 2, 3)
    assert torch.allclose(head(x), linear(x.flatten(1)), atol=1e-6)
    assert torch.allclose(head(x.flatten(1)), linear(x.flatten(1)), atol=1e-6)
    dense = head.to_dense()
    assert torch.equal(dense.weight, linear.weight) and torch.equal(dense.bias, linear.bias)


def test_compress_head_saves_only_kept_values_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = tiny_vgg(img_size=64).eval()  # head fed by 64 filters x 2x2
    c, spatial = 64, (2, 2)
    mask = afcc_mask(random_ids(c, 10, 3), spatial)
    apply_mask(model.head.out, mask)
    x = torch.randn(4, 3, 64, 64)
    with torch.inference_mode():
        expected = model(x)
    compress_head(model, "head.out", mask, spatial)
    assert isinstance(model.head.out, SparseHead)
    with torch.inference_mode():
        assert torch.allclose(model(x), expected, atol=1e-5)
    path = save_model(model, tmp_path / "afcc.pt", {"model": "vgg6", "options": {"width": 0.125, "fc_hidden": []},
                                                     "num_classes": 10, "input_size": [3, 64, 64]})
    state = torch.load(path, weights_only=True)["model"]
    head_keys = {k: v for k, v in state.items() if k.startswith("head.")}
    assert set(head_keys) == {"head.out.values", "head.out.filters", "head.out.labels"}
    assert head_keys["head.out.values"].numel() == count_kept(mask)
    loaded, meta = load_model(path)
    assert meta["transforms"][-1]["kind"] == "afcc"
    assert isinstance(loaded.head.out, SparseHead)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_onnx_export_matches_and_shrinks(tmp_path, dynamo):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    dense = tiny_vgg(img_size=64, num_classes=100).eval()  # CIFAR-100-like head: 100 x (64 x 2x2)
    mask = afcc_mask(random_ids(64, 100, 5), (2, 2))
    apply_mask(dense.head.out, mask)
    sparse = compress_head(copy.deepcopy(dense), "head.out", mask, (2, 2)).eval()
    paths = {}
    for name, model in (("sparse", sparse), ("dense", dense))[:1 if dynamo else 2]:  # sizes: one exporter is enough
        paths[name] = tmp_path / f"{name}.onnx"
        axes = {"dynamic_shapes": ({0: torch.export.Dim("batch")},), "external_data": False} if dynamo else \
            {"dynamic_axes": {"x": {0: "batch"}, "y": {0: "batch"}}}
        torch.onnx.export(model, (torch.randn(2, 3, 64, 64),), paths[name], input_names=["x"], output_names=["y"],
                          opset_version=17, dynamo=dynamo, **axes)
    session = ort.InferenceSession(str(paths["sparse"]), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = torch.randn(batch, 3, 64, 64)
        with torch.inference_mode():
            expected = sparse(x).numpy()
        np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], expected, atol=1e-4)
    if not dynamo:
        assert paths["sparse"].stat().st_size < paths["dense"].stat().st_size


def test_sparse_head_files_shrink_for_a_realistic_mask(tmp_path):
    k, c, spatial = 100, 64, (2, 2)  # ~5 labels per filter, as the papers' last layers
    linear, mask = masked_linear(random_ids(c, k, 5), spatial)
    head = SparseHead.from_linear(linear, mask, spatial)
    sizes = {}
    for name, module in (("dense", linear), ("sparse", head)):
        buf = io.BytesIO()
        torch.save(module.state_dict(), buf)
        onnx_path = tmp_path / f"{name}.onnx"
        torch.onnx.export(module.eval(), (torch.randn(2, c * 4),), onnx_path, input_names=["x"], opset_version=17,
                          dynamic_axes={"x": {0: "batch"}}, dynamo=False)
        sizes[name] = (buf.getbuffer().nbytes, onnx_path.stat().st_size)
    assert sizes["sparse"][0] < sizes["dense"][0] / 4
    assert sizes["sparse"][1] < sizes["dense"][1] / 4
    assert sum(v.numel() for v in head.state_dict().values()) == count_kept(mask) + 2 * c * 5


def test_fc_and_conv_masks_from_label_sets():
    in_sets = [{0, 1}, {2}, set()]
    out_sets = [{1}, {2, 3}]
    fc = fc_mask_from_labels(in_sets, out_sets)
    assert torch.equal(fc, torch.tensor([[True, False, False], [False, True, False]]))
    conv = conv_mask_from_labels(in_sets, out_sets, 3)
    assert conv.shape == (2, 3, 3, 3)
    assert torch.equal(conv, fc[:, :, None, None].expand(2, 3, 3, 3))
    # several clusters per filter: filter 0 of the input has clusters {0} and {3}
    ids = np.array([[0, -1, -1, 1], [-1, 0, 0, -1]])
    assert torch.equal(conv_mask_from_labels(label_sets(ids), [{3}, {1}], (1, 1)).flatten(1),
                       torch.tensor([[True, False], [False, True]]))
    layer = nn.Conv2d(3, 2, 3)
    apply_mask(layer, conv)
    assert torch.count_nonzero(layer.weight[~conv]) == 0


def test_bad_paths_and_shapes_raise():
    model = tiny_vgg()
    mask = afcc_mask(random_ids(64, 10, 2), (1, 1))
    with pytest.raises(UserError, match="did you mean"):
        compress_head(model, "head.outt", mask, (1, 1))
    with pytest.raises(UserError, match="not an nn.Linear"):
        compress_head(model, "features.conv1", mask, (1, 1))
    with pytest.raises(ValueError, match="does not match"):
        MaskKeeper({"head.out": mask[:, :10]})(model)
