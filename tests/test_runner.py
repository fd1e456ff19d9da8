"""A whole recipe on the digits: trim, dilute, AFCC, fine-tune, export, bench, one run folder."""

import json

import pytest
import torch

from compress.analysis import AnalysisConfig, analyze_model
from compress.cli import main
from compress.compression.trim import trim_at
from compress.compression.serialize import load_model
from compress.training import TrainConfig, evaluate, fit

from conftest import tiny_vgg


@pytest.mark.parametrize("cut", ["features.pool3", "features.relu4"])  # a pooling tap, and a ReLU between two
def test_trim_reproduces_probe_accuracy(small_digits, tmp_path, cut):
    model = tiny_vgg()
    fit(model, small_digits, TrainConfig(epochs=2, lr=0.05, momentum=0.9), tmp_path, progress=False)
    result = analyze_model(model, small_digits, [cut, "features.pool5"], AnalysisConfig(probe_epochs=5),
                           progress=False)
    tap = result.tap(cut)
    trim_at(model, cut, torch.as_tensor(tap.probe_weight))
    assert list(model.features._modules)[-1] == cut.split(".")[1]  # the model ends at the tap
    assert list(model.head._modules) == ["out"] and model.head.out.bias is None
    assert abs(evaluate(model, small_digits) - tap.accuracy) <= 1 / len(small_digits.test)


RECIPE = """
name: tiny
model:
  name: vgg6
  options: {width: 0.25, fc_hidden: []}
  train: {epochs: 3, lr: 0.03, momentum: 0.9, weight_decay: 5.0e-4}
data: {name: digits, limit_train: 500, limit_test: 200}
analysis: {probe_epochs: 8}
steps:
  - trim: {tap: plateau}
  - dilute: {tap: plateau, target: 0.6, min_coverage: 1}
  - afcc: {tap: plateau, train: head, finetune: {epochs: 1, lr: 0.002}, sparse: false}
  - finetune: {epochs: 1, lr: 0.002}
  - export: {}
  - bench: {batch_sizes: [1, 4], warmup: 1, repeats: 3, torch_eager: false}
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    (folder / "tiny.yaml").write_text(RECIPE)
    assert main(["run", str(folder / "tiny.yaml"), "--out", str(folder / "out"), "--quiet"]) == 0
    return folder / "out"


def test_run_folder_holds_everything(run):
    for name in ("recipe.yaml", "summary.json", "report.md", "report.html", "model.pt", "model.onnx",
                 "analysis/analysis.json", "analysis/report.html", "bench/bench.json"):
        assert (run / name).is_file(), name
    steps = sorted(p.name for p in (run / "steps").iterdir())
    assert steps == ["00-original", "01-trim", "02-dilute", "03-afcc", "04-finetune"]
    summary = json.loads((run / "summary.json").read_text())
    names = [s["step"] for s in summary["steps"]]
    assert names == ["original", "trim", "dilute", "afcc", "finetune", "export", "bench"]
    for s in summary["steps"][1:5]:  # every structural step reports before and after
        assert {"params", "nonzero_params", "flops", "accuracy"} <= set(s["before"]) == set(s["after"])
    orig, final = summary["steps"][0]["after"], summary["steps"][4]["after"]
    assert final["flops"] < orig["flops"] and final["params"] < orig["params"]
    assert "speedup_ort-cpu_b1" in summary["steps"][6]["info"]


def test_afcc_masks_survive_finetuning(run):
    """The AFCC head kept its zeros through its own and the later fine-tuning (dense mode)."""
    summary = json.loads((run / "summary.json").read_text())
    afcc = summary["steps"][3]["info"]
    model, _ = load_model(run / "steps" / "04-finetune" / "model.pt")
    head = model.head.out.weight
    assert int((head != 0).sum()) == afcc["kept_weights"]
    assert afcc["kept_weights"] < afcc["dense_weights"]


def test_saved_models_replay(run):
    model, meta = load_model(run / "model.pt")
    x = torch.zeros(2, *meta["input_size"])
    assert model(x).shape == (2, 10)
    assert [t["kind"] for t in meta["transforms"]] == ["trim", "prune"]


STAGE_RECIPE = """
name: resnet
model:
  name: timm:resnet18
  train: {epochs: 1, lr: 0.01, momentum: 0.9}
data: {name: digits, limit_train: 300, limit_test: 100}
analysis: {probe_epochs: 2}
steps:
  - remove_blocks: {keep: {layer3: 1, layer4: 1}}
  - afcc: {head: fc, train: head, finetune: {epochs: 1, lr: 0.001}}
  - export: {}
"""


@pytest.mark.slow
def test_stage_model_recipe_with_afcc_on_its_classifier(tmp_path):
    (tmp_path / "r.yaml").write_text(STAGE_RECIPE)
    assert main(["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    afcc = summary["steps"][2]["info"]
    assert afcc["kept_weights"] < afcc["dense_weights"] == 512 * 10
    model, meta = load_model(tmp_path / "out" / "model.pt")
    assert [t["kind"] for t in meta["transforms"]] == ["remove_blocks", "afcc"]
    assert len(model.layer3) == 1 and type(model.fc).__name__ == "SparseHead"
    assert summary["steps"][3]["info"]["model"]["argmax_agreement"] == 1.0
