"""Removing blocks inside stages and dropping layers of timm and torchvision models."""

import pytest
import torch

from compress.compression.blocks import drop_layers, list_stages, remove_blocks
from compress.errors import UserError
from compress.models import create_model
from compress.compression.serialize import load_model, save_model

SIZE = (3, 32, 32)


def _params(m):
    return sum(p.numel() for p in m.parameters())


def test_efficientnet_b0_stage_simplifications(tmp_path):
    """The second paper's changes: stages 3-4 to one block, stage 5 to two, stage 9 dropped."""
    torch.manual_seed(0)
    model = create_model("timm:efficientnet_b0", num_classes=10).eval()
    stages = list_stages(model)
    assert stages["blocks.1"] == 2 and stages["blocks.3"] == 3
    n0 = _params(model)
    remove_blocks(model, {"blocks.1": 1, "blocks.2": 1, "blocks.3": 2}, SIZE)
    drop_layers(model, ["conv_head", "bn2"], SIZE)
    assert [len(model.blocks[i]) for i in range(7)] == [1, 1, 1, 2, 3, 4, 1]
    assert model.get_classifier().in_features == 320
    assert _params(model) < n0
    x = torch.randn(2, *SIZE)
    y = model(x)
    assert y.shape == (2, 10)
    meta = {"model": "timm:efficientnet_b0", "options": {}, "num_classes": 10, "input_size": list(SIZE)}
    save_model(model, tmp_path / "m.pt", meta)
    again, _ = load_model(tmp_path / "m.pt")
    assert torch.allclose(again(x), y, atol=1e-5)


def test_torchvision_resnet_blocks():
    model = create_model("torchvision:resnet18", num_classes=10).eval()
    assert list_stages(model) == {"layer1": 2, "layer2": 2, "layer3": 2, "layer4": 2}
    remove_blocks(model, {"layer2": 1, "layer3": 1}, SIZE)
    assert model(torch.randn(1, *SIZE)).shape == (1, 10)


def test_bad_block_requests_are_refused():
    model = create_model("timm:efficientnet_b0", num_classes=10)
    with pytest.raises(UserError, match="unknown stage 'blocks.9'"):
        remove_blocks(model, {"blocks.9": 1}, SIZE)
    with pytest.raises(UserError, match="has 3 blocks; keep between 1 and 3"):
        remove_blocks(model, {"blocks.3": 4}, SIZE)
    with pytest.raises(UserError, match="unknown layer 'conv_hed'"):
        drop_layers(model, ["conv_hed"], SIZE)
