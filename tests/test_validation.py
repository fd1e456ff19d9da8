"""Choices are made on a validation split held out from the training images; the test split only
reports: the split itself, and which split the plateau and the per-tap accuracies come from."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from compress.analysis import AnalysisConfig
from compress.cli import main
from compress.data import DataConfig, load_data, split_validation
from compress.errors import UserError
from compress.jobs import analyze
from compress.models import ModelConfig
from compress.training import TrainConfig, fit

from conftest import tiny_vgg


def test_the_validation_split_is_stratified_seeded_and_disjoint():
    labels = torch.arange(10).repeat_interleave(torch.arange(10, 20))  # label j has 10 + j images
    kept, held = split_validation(labels, 0.2, seed=4)
    assert set(kept.tolist()).isdisjoint(held.tolist()) and len(kept) + len(held) == len(labels)
    counts = torch.bincount(labels[held], minlength=10)
    assert counts.tolist() == [round(0.2 * (10 + j)) for j in range(10)]  # per label, not overall
    again, _ = split_validation(labels, 0.2, seed=4)
    other, _ = split_validation(labels, 0.2, seed=5)
    assert torch.equal(kept, again) and not torch.equal(kept, other)


def test_load_data_carves_validation_from_the_training_images_only():
    full = load_data("digits")
    split = load_data("digits", val_fraction=0.1)
    assert len(split.train) + len(split.val) == len(full.train) and torch.equal(split.test.images, full.test.images)
    kept, held = split_validation(full.train.labels, 0.1)
    assert torch.equal(split.val.images, full.train.images[held]) and torch.equal(split.train.images,
                                                                                   full.train.images[kept])
    assert DataConfig().val_fraction == 0.1 and DataConfig().load().val is not None
    with pytest.raises(UserError, match="no validation split"):
        full.for_choices("val")
    with pytest.raises(UserError, match="val_fraction"):
        DataConfig(val_fraction=1.5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    bundle = load_data("digits", limit_train=600, limit_test=300, val_fraction=0.25)
    model = tiny_vgg()
    fit(model, bundle.for_choices(), TrainConfig(epochs=3, lr=0.05, momentum=0.9), tmp_path_factory.mktemp("t"),
        progress=False)
    return model, bundle


def test_the_plateau_and_tap_accuracies_come_from_validation_not_test(trained, tmp_path):
    model, bundle = trained
    k = bundle.num_classes
    # A test split whose labels are all wrong: chosen on it, every tap would look useless.
    broken = dataclasses.replace(bundle, test=dataclasses.replace(bundle.test, labels=(bundle.test.labels + 1) % k))
    cfg = AnalysisConfig(probe_epochs=10, taps=["features.pool2", "features.pool3", "features.pool5"])
    on_val = analyze(ModelConfig("vgg6"), DataConfig(), cfg, tmp_path / "v", model=model, bundle=broken,
                     report=False)
    on_test = analyze(ModelConfig("vgg6"), DataConfig(), dataclasses.replace(cfg, split="test"), tmp_path / "t",
                      model=model, bundle=broken, report=False)
    assert on_val.config["split"] == "val" and on_test.config["split"] == "test"
    assert min(t.accuracy for t in on_val.taps) > 0.5 > max(t.accuracy for t in on_test.taps)
    best = max(t.accuracy for t in on_val.taps)
    expected = next(t.name for t in on_val.taps if t.accuracy >= best - cfg.plateau_tolerance / 100)
    assert on_val.plateau == expected
    saved = json.loads((tmp_path / "v" / "analysis.json").read_text())
    assert saved["config"]["split"] == "val" and "validation split" in saved["config"]["split_note"]


def test_a_run_chooses_on_validation_and_reports_test_once(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("""
name: v
model: {name: vgg6, options: {width: 0.125, fc_hidden: []}, train: {epochs: 1, lr: 0.03, momentum: 0.9}}
data: {name: digits, limit_train: 300, limit_test: 100, val_fraction: 0.2}
analysis: {probe_epochs: 2, taps: [features.pool2, features.pool3]}
steps:
  - trim: {tap: plateau}
  - finetune: {epochs: 1, lr: 0.002}
""")
    assert main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    steps = summary["steps"]
    assert all(s["after"]["split"] == "val" for s in steps)
    assert "test_accuracy" in steps[0] and "test_accuracy" in steps[-1] and "test_accuracy" not in steps[1]
    assert "final_val_acc" in steps[2]["info"]
    history = json.loads((tmp_path / "out" / "train" / "history.json").read_text())
    assert "val_acc" in history[-1] and "test_acc" not in history[-1]
