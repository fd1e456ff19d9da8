"""Model factory contracts: declared taps match real shapes, bias-free output, checkpoints, names."""

import pytest
import torch

from compress.errors import UserError
from compress.models import create_model, default_taps, load_checkpoint, resolve_taps, tap_shapes

from conftest import tiny_vgg


@pytest.mark.parametrize("name,n_taps", [("vgg16", 5), ("vgg6", 5), ("avgg16", 2)])
@pytest.mark.parametrize("batch_norm", [True, False])
def test_declared_taps_match_real_shapes(name, n_taps, batch_norm):
    model = create_model(name, width=0.125, batch_norm=batch_norm, fc_hidden=[], img_size=32)
    taps = default_taps(model)
    assert len(taps) == n_taps
    shapes = tap_shapes(model, taps, (3, 32, 32))
    for info in model.feature_info:
        c, h, w = shapes[info["module"]]
        assert c == info["num_chs"]
        assert h == w == 32 // info["reduction"]


def test_vgg16_layout_follows_the_paper():
    model = create_model("vgg16", width=0.25)
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 13
    assert [f["layer"] for f in model.feature_info] == [2, 4, 7, 10, 13]
    linears = [m for m in model.head if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [1024, 1024, 10]  # 4096 x width 0.25
    assert model.get_classifier().bias is None
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_avgg16_head_sees_8192_inputs():
    model = create_model("avgg16", fc_hidden=[], num_classes=10)
    assert model.get_classifier().in_features == 512 * 4 * 4
    pools = [type(m).__name__ for n, m in model.features.named_children() if n.startswith("pool")]
    assert pools == ["AvgPool2d", "MaxPool2d"]


def test_vgg6_single_fc_layer_no_bias():
    model = create_model("vgg6", num_classes=7)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 1 and linears[0].bias is None and linears[0].out_features == 7


def test_external_models_build():
    m = create_model("timm:resnet18", num_classes=5).eval()
    assert m(torch.zeros(1, 3, 32, 32)).shape == (1, 5)
    assert default_taps(m)  # timm declares feature_info
    m = create_model("torchvision:resnet18", num_classes=5).eval()
    assert m(torch.zeros(1, 3, 32, 32)).shape == (1, 5)


@pytest.mark.parametrize("name", ["vgg17", "timm:not_a_model", "torchvision:resnet9000"])
def test_unknown_model_lists_valid_names(name):
    with pytest.raises(UserError, match="valid:"):
        create_model(name)


def test_unknown_tap_lists_valid_names():
    with pytest.raises(UserError, match=r"unknown tap 'features\.pool3'.*valid:.*features\.pool2"):
        resolve_taps(create_model("vgg16", width=0.125), ["features.pool3"])


def test_tap_globs_resolve_in_network_order():
    model = create_model("vgg16", width=0.125)
    assert resolve_taps(model, ["features.pool1*", "features.pool2"]) == [
        "features.pool2", "features.pool10", "features.pool13"]


def test_checkpoint_round_trip_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    model = tiny_vgg()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    save_file(model.state_dict(), str(tmp_path / "m.safetensors"))
    for f in ("m.pt", "m.safetensors"):
        other = load_checkpoint(tiny_vgg(), tmp_path / f)
        for k, v in model.state_dict().items():
            assert torch.equal(other.state_dict()[k], v)


def test_mismatched_checkpoint_names_keys(tmp_path):
    torch.save(tiny_vgg(num_classes=10).state_dict(), tmp_path / "ten.pt")
    with pytest.raises(UserError, match=r"shape mismatch: head\.out\.weight"):
        load_checkpoint(tiny_vgg(num_classes=5), tmp_path / "ten.pt")
    torch.save(tiny_vgg(batch_norm=False).state_dict(), tmp_path / "nobn.pt")
    with pytest.raises(UserError, match=r"missing: features\.bn1\.weight"):
        load_checkpoint(tiny_vgg(), tmp_path / "nobn.pt")


def test_truncated_and_pickled_checkpoints_are_refused(tmp_path):
    torch.save(tiny_vgg().state_dict(), tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cannot be read"):
        load_checkpoint(tiny_vgg(), tmp_path / "cut.pt")
    torch.save({"model": tiny_vgg()}, tmp_path / "pickled.pt")  # a whole module: pickled code
    with pytest.raises(UserError, match="pickled code"):
        load_checkpoint(tiny_vgg(), tmp_path / "pickled.pt")
