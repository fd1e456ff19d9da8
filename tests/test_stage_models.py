"""The chain on the models people deploy: taps, analysis, dilution, block removal, ONNX export."""

import pytest
import torch

from compress.analysis import AnalysisConfig, analyze_model
from compress.compression.blocks import list_stages, remove_blocks
from compress.compression.dilute import dilute_by_coverage
from compress.data import load_data
from compress.errors import UserError
from compress.deploy.export import export_and_verify
from compress.models import create_model, default_taps, tap_shapes
from compress.models.taps import auto_taps

MODELS = ["timm:efficientnet_b0", "timm:resnet18", "torchvision:resnet50", "timm:mobilenetv3_small_100"]
SIZE = (3, 32, 32)


@pytest.fixture(scope="module")
def data():
    return load_data("digits", limit_train=120, limit_test=60)


def _params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", MODELS)
def test_taps_match_real_shapes(name):
    model = create_model(name, num_classes=10).eval()
    taps = default_taps(model, SIZE)
    shapes = tap_shapes(model, taps, SIZE)
    assert list(shapes) == taps and len(taps) >= 4
    sizes = [s[1] for s in shapes.values()]
    assert sizes == sorted(sizes, reverse=True)  # stage ends in network order, resolution falling
    info = getattr(model, "feature_info", None)
    if info is not None:  # timm declares channels and reductions: they must match
        for f in info:
            c, h, _ = shapes[f["module"]]
            assert c == f["num_chs"] and h == max(1, 32 // f["reduction"])


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_chain_on_stage_model(name, data, tmp_path):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    taps = default_taps(model, SIZE)
    result = analyze_model(model, data, taps, AnalysisConfig(probe_epochs=1, threshold=0.3), progress=False)
    assert len(result.taps) == len(taps)
    n0 = _params(model)
    meta = {"model": name, "options": {}, "num_classes": 10, "input_size": list(SIZE),
            "label_names": data.label_names, "mean": list(data.mean), "std": list(data.std)}
    dilute_by_coverage(model, result, target=None, min_coverage=1, example_inputs=torch.randn(1, *SIZE))
    n1 = _params(model)
    assert n1 < n0
    stage, blocks = next((s, n) for s, n in list_stages(model).items() if n >= 2)
    remove_blocks(model, {stage: 1}, SIZE)
    assert _params(model) < n1
    assert model(torch.randn(2, *SIZE)).shape == (2, 10)
    out = export_and_verify(model.eval(), meta, tmp_path / "m.onnx", data, tol=1e-3)
    assert out["argmax_agreement"] == 1.0


def test_untappable_model_gets_a_clear_message():
    model = create_model("timm:vit_tiny_patch16_224", num_classes=10)
    with pytest.raises(UserError, match="no convolutional .* name taps with --taps"):
        auto_taps(model)
