"""Phase 1: the loop learns, checkpoints every epoch, and a resumed run equals an uninterrupted one."""

import json

import torch

from compress.training import TrainConfig, evaluate, fit, param_groups

from conftest import tiny_vgg

CFG = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="step", lr_decay=0.5, lr_step=1, seed=3)


def test_training_learns_and_checkpoints(tmp_path, small_digits):
    torch.manual_seed(0)
    model = tiny_vgg()
    history = fit(model, small_digits, TrainConfig(epochs=3, **CFG), tmp_path, progress=False)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["loss"] < history[0]["loss"]
    assert evaluate(model, small_digits) > 0.3  # chance is 0.1
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2
    assert len(json.loads((tmp_path / "history.json").read_text())) == 3


def test_resume_gives_the_same_model(tmp_path, small_digits):
    torch.manual_seed(0)
    a = tiny_vgg()
    torch.manual_seed(0)
    b = tiny_vgg()
    fit(a, small_digits, TrainConfig(epochs=2, **CFG), tmp_path / "a", progress=False)
    fit(b, small_digits, TrainConfig(epochs=1, **CFG), tmp_path / "b", progress=False)  # "interrupted" after 1
    torch.manual_seed(0)
    b2 = tiny_vgg()
    hist = fit(b2, small_digits, TrainConfig(epochs=2, **CFG), tmp_path / "b", progress=False)
    assert len(hist) == 2
    for k, v in a.state_dict().items():
        assert torch.equal(v, b2.state_dict()[k]), k


def test_separate_conv_and_fc_groups():
    model = tiny_vgg()
    groups = param_groups(model, TrainConfig(lr=0.1, lr_fc=0.01, weight_decay_fc=0.0))
    by_name = {g["name"]: g for g in groups}
    assert by_name["conv"]["lr"] == 0.1 and by_name["fc"]["lr"] == 0.01
    assert by_name["fc"]["weight_decay"] == 0.0
    assert [p.shape for p in by_name["fc"]["params"]] == [model.get_classifier().weight.shape]


def test_sparse_head_is_in_the_fc_group():
    from compress.compression.afcc import SparseHead

    model = tiny_vgg()
    model.head.out = SparseHead([0, 1, 1], [0, 3, 5], n_filters=2, out_features=10, spatial=(1, 1))
    groups = {g["name"]: g for g in param_groups(model, TrainConfig(lr=0.1, lr_fc=0.01))}
    assert [p is model.head.out.values for p in groups["fc"]["params"]] == [True]
    assert all(p is not model.head.out.values for p in groups["conv"]["params"])
