"""``trim`` on any classifier with taps (timm, torchvision): the cut model is the tap's probe on the
original model's tap output, it exports to ONNX with parity, reloads from ``model.pt``, and the
recipe steps run on it."""

import json

import pytest
import torch
import torch.nn as nn
from conftest import tiny_vgg

from compress.analysis import AnalysisConfig, analyze_model
from compress.cli import main
from compress.compression.cut import CUT_HEAD, cut_at, find_classifier, is_cut
from compress.compression.serialize import load_model, save_model
from compress.compression.trim import trim_model
from compress.data import DataConfig, load_data
from compress.deploy.export import export_and_verify
from compress.errors import UserError
from compress.models import create_model, default_taps
from compress.models.introspect import count_flops, count_params
from compress.models.taps import run_to_taps
from compress.recipe.schema import Recipe, RecipeModel
from compress.recipe.state import RunState
from compress.recipe.steps.afcc import Afcc
from compress.recipe.steps.dilute import Dilute
from compress.recipe.steps.trim import Trim

# three of each library (timm's EfficientNet-B0 and 36 more CNNs: benchmarks/model_coverage.py)
ARCHS = ["timm:resnet18", "timm:mobilenetv3_small_100", "timm:convnext_atto",
         "torchvision:resnet18", "torchvision:efficientnet_b0", "torchvision:shufflenet_v2_x0_5"]
SIZE = (3, 32, 32)


@pytest.fixture(scope="module")
def data():
    return load_data("digits", limit_train=60, limit_test=30, image_size=32)


def _meta(name, data):
    return {"model": name, "options": {}, "num_classes": 10, "input_size": list(SIZE),
            "label_names": list(data.label_names), "mean": list(data.mean), "std": list(data.std)}


def _probe(model, data, tap, **config):
    """The trained probe of ``tap`` (one quick analysis of that tap alone)."""
    result = analyze_model(model, data, [tap], AnalysisConfig(probe_epochs=1, **config), progress=False)
    return torch.as_tensor(result.tap(tap).probe_weight)


def _tap_output(model, x, tap):
    with torch.no_grad():
        return run_to_taps(model, x, [tap])[tap]


@pytest.mark.parametrize("name", ARCHS)
def test_trim_at_a_middle_tap_is_the_probe(name, data, tmp_path):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, img_size=32).eval()
    taps = default_taps(model)
    tap = taps[len(taps) // 2]
    weight = _probe(model, data, tap)
    x = data.normalize(data.test.images[:8])
    expected = _tap_output(model, x, tap).flatten(1) @ weight.reshape(10, -1).t()
    params = count_params(model)
    trim_model(model, tap, weight)
    assert is_cut(model) and find_classifier(model) == f"{CUT_HEAD}.out"
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert count_params(model) < params  # the layers after the tap are gone (FLOPs: the tests below)
    path = save_model(model, tmp_path / "model.pt", _meta(name, data))
    reloaded, meta = load_model(path)
    assert meta["transforms"][-1]["kind"] == "cut" and meta["transforms"][-1]["tap"] == tap
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), out)
    report = export_and_verify(reloaded, meta, tmp_path / "model.onnx", data, tol=1e-4)
    assert report["passed"] and report["argmax_agreement"] == 1.0


def test_pool_head_is_the_probe_summed_over_positions(data, tmp_path):
    torch.manual_seed(0)
    model = create_model("torchvision:resnet18", num_classes=10, img_size=32).eval()
    weight = _probe(model, data, "layer2")  # (K, 128, 4, 4)
    x = data.normalize(data.test.images[:8])
    feats = _tap_output(model, x, "layer2").mean(dim=(2, 3))
    trim_model(model, "layer2", weight, head="pool")
    head = model.get_submodule(f"{CUT_HEAD}.out")
    assert (head.in_features, head.bias is not None) == (128, True)
    with torch.no_grad():
        torch.testing.assert_close(model(x), feats @ weight.reshape(10, 128, -1).sum(-1).t(), rtol=1e-4, atol=1e-5)
    reloaded, meta = load_model(save_model(model, tmp_path / "model.pt", _meta("torchvision:resnet18", data)))
    assert export_and_verify(reloaded, meta, tmp_path / "model.onnx", data, tol=1e-4)["passed"]


def test_pooled_probe_and_a_tap_inside_a_block(data, tmp_path):
    """A probe trained on a tap pooled 3x3 (ceil mode: 8x8 -> 3x3), at a tap inside a residual
    block (its own forward code runs around the tap): FLOPs counted, exported, reloaded."""
    torch.manual_seed(0)
    model = create_model("timm:resnet18", num_classes=10, img_size=32).eval()
    tap = "layer1.1.conv2"
    weight = _probe(model, data, tap, tap_pool=3)
    assert weight.shape[1:] == (64, 3, 3)
    x = data.normalize(data.test.images[:8])
    pooled = torch.nn.functional.avg_pool2d(_tap_output(model, x, tap), 3, 3, ceil_mode=True)
    trim_model(model, tap, weight, pool=3)
    with torch.no_grad():
        torch.testing.assert_close(model(x), pooled.flatten(1) @ weight.reshape(10, -1).t(), rtol=1e-4, atol=1e-5)
    assert 0 < count_flops(model) < count_flops(create_model("timm:resnet18", num_classes=10, img_size=32))
    assert isinstance(model.layer1[1].bn2, nn.Identity) and isinstance(model.layer2, nn.Identity)
    reloaded, meta = load_model(save_model(model, tmp_path / "model.pt", _meta("timm:resnet18", data)))
    assert export_and_verify(reloaded, meta, tmp_path / "model.onnx", data, tol=1e-4)["passed"]


def test_own_vgg_keeps_its_trim_and_takes_the_cut_for_a_pooled_probe():
    model = tiny_vgg(img_size=32)
    c, h, w = _tap_output(model.eval(), torch.zeros(1, *SIZE), "features.pool3").shape[1:]
    trim_model(model, "features.pool3", torch.zeros(10, c * h * w))
    assert not is_cut(model) and model.compress_transforms[-1]["kind"] == "trim"
    model = tiny_vgg(img_size=32)
    trim_model(model, "features.pool3", torch.zeros(10, c * (h // 2) * (w // 2)), pool=2)
    assert is_cut(model) and model(torch.zeros(2, *SIZE)).shape == (2, 10)


def test_cut_again_at_an_earlier_tap_and_errors_name_the_option():
    model = create_model("torchvision:resnet18", num_classes=10, img_size=32).eval()
    cut_at(model, "layer3")
    with pytest.raises(UserError, match="not reached"):
        cut_at(model, "layer4")  # removed by the first cut
    cut_at(model, "layer1")
    assert model(torch.zeros(2, *SIZE)).shape == (2, 10) and isinstance(model.layer2, nn.Identity)
    with pytest.raises(UserError, match="head pool needs a tap with a .C, H, W. output.*head: probe"):
        cut_at(create_model("torchvision:resnet18", num_classes=10, img_size=32), "fc", head="pool")


def test_steps_on_a_cut_stage_model(data, tmp_path):
    """afcc with no head named uses the classifier of a stage model, and after a trim the probe
    head; dilute after the trim thins the conv feeding the cut; the chain saves and reloads."""
    torch.manual_seed(0)
    name = "timm:resnet18"
    model = create_model(name, num_classes=10, img_size=32).eval()
    config = AnalysisConfig(probe_epochs=1)
    result = analyze_model(model, data, ["layer1", "layer2"], config, progress=False)
    recipe = Recipe(name="t", model=RecipeModel(name=name), data=DataConfig(name="digits"), analysis=config, steps=())
    state = RunState(recipe, model, data, _meta(name, data), result, tmp_path, progress=False)
    info = Afcc(train="none", sparse=False).run(state, tmp_path / "afcc-fc")
    assert info["head"] == "fc" and info["dense_weights"] == 512 * 10
    state.masks.clear()
    info = Trim(tap="layer2").run(state, tmp_path / "trim")
    assert info["head"] == f"{CUT_HEAD}.out" and "layer3" in info["removed_modules"]
    assert info["accuracy_before_finetune"] == pytest.approx(result.tap("layer2").accuracy, abs=1 / len(data.test))
    info = Dilute(tap="last", target=0.5).run(state, tmp_path / "dilute")
    assert info["layer"] == "layer2.1.conv2" and info["filters_after"] == 64
    info = Afcc(train="none").run(state, tmp_path / "afcc")
    assert info["head"] == f"{CUT_HEAD}.out" and info["dense_weights"] == 10 * 64 * 4 * 4
    reloaded, meta = load_model(state.save_current(tmp_path / "model.pt"))
    assert [t["kind"] for t in meta["transforms"]] == ["cut", "prune", "afcc"]
    x = data.normalize(data.test.images[:4])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x))
    with pytest.raises(UserError, match="afcc.head .*'layer9'"):
        Afcc(head="layer9").run(state, tmp_path / "bad")


RECIPE = """
name: tv-resnet
model:
  name: torchvision:resnet18
  train: {epochs: 1, lr: 0.01, momentum: 0.9}
data: {name: digits, limit_train: 200, limit_test: 100, image_size: 32}
analysis: {probe_epochs: 2, taps: [layer3, layer4]}
steps:
  - dilute: {tap: plateau, target: 0.5}
  - afcc: {train: head, finetune: {epochs: 1, lr: 0.001}}
  - export: {}
"""


@pytest.mark.slow
def test_recipe_with_dilute_and_afcc_on_torchvision_resnet(tmp_path):
    """The input size comes from the data; afcc with no head named uses the classifier ``fc``."""
    (tmp_path / "r.yaml").write_text(RECIPE)
    assert main(["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    original, dilute, afcc, export = summary["steps"]
    assert dilute["after"]["params"] < original["after"]["params"]
    assert dilute["after"]["flops"] < original["after"]["flops"]
    assert afcc["info"]["head"] == "fc" and afcc["info"]["kept_weights"] < afcc["info"]["dense_weights"]
    assert export["info"]["model"]["passed"] and export["info"]["original"]["passed"]
    model, meta = load_model(tmp_path / "out" / "model.pt")
    assert [t["kind"] for t in meta["transforms"]] == ["prune", "afcc"]
    assert type(model.fc).__name__ == "SparseHead"
