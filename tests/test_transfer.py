"""Transfer learning from local weights: partial loading and per-stage learning-rate factors."""

import pytest
import torch

from compress.errors import UserError
from compress.models import create_model, load_checkpoint
from compress.data import DataConfig
from compress.jobs import train
from compress.models import ModelConfig
from compress.training import TrainConfig, param_groups


def test_checkpoint_skip_loads_all_but_the_classifier(tmp_path):
    source = create_model("timm:resnet18", num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "imagenet.pt")
    with pytest.raises(UserError, match="shape mismatch: fc.weight"):
        load_checkpoint(create_model("timm:resnet18", num_classes=10), tmp_path / "imagenet.pt")
    model = create_model("timm:resnet18", num_classes=10, checkpoint=tmp_path / "imagenet.pt", checkpoint_skip=["fc"])
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert model.fc.out_features == 10


def test_lr_factors_make_per_stage_groups():
    model = create_model("timm:resnet18", num_classes=10)
    groups = param_groups(model, TrainConfig(lr=0.01, lr_factors={"layer1": 0.1, "layer4": 0.2}))
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs == {"conv": 0.01, "convx0.2": pytest.approx(0.002), "convx0.1": pytest.approx(0.001), "fc": 0.01}
    n = sum(len(g["params"]) for g in groups)
    assert n == len(list(model.parameters()))


def test_fine_tune_from_local_weights(tmp_path):
    source = create_model("vgg6", width=0.125, fc_hidden=[], num_classes=7)
    torch.save(source.state_dict(), tmp_path / "src.pt")
    spec = ModelConfig("vgg6", {"width": 0.125, "fc_hidden": []}, str(tmp_path / "src.pt"), ["head"])
    model, history, _ = train(spec, DataConfig("digits", limit_train=200, limit_test=100),
                              TrainConfig(epochs=1, lr=0.01, momentum=0.9, lr_factors={"features": 0.1}),
                              tmp_path / "run", progress=False)
    assert len(history) == 1 and model.get_classifier().out_features == 10
