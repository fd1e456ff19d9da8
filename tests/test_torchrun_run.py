"""Whole recipes and CIFAR-K under torchrun (2 CPU processes, gloo): the run ends as the single-process
run does (the same steps, the same files), and only rank 0 writes.

Rank 1 is started in a working folder of its own and both ranks get the same relative ``--out``,
as on two machines without shared storage: rank 0's run folder is ``rank0/run``, and rank 1's
would-be ``rank1/run`` must not even exist afterwards. A write by rank 1 (a file, a folder, a lock,
a traceback), or a read of a file only rank 0 wrote (a model, the summary), fails the test.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compress import distributed

ENV = dict(os.environ, OMP_NUM_THREADS="1")

RECIPE = """
name: tiny-torchrun
model:
  name: vgg6
  options: {width: 0.125, fc_hidden: []}
  train: {epochs: 1, lr: 0.03, momentum: 0.9, weight_decay: 5.0e-4, batch_size: 50}
data: {name: digits, limit_train: 300, limit_test: 150}
analysis: {probe_epochs: 3}
steps:
  - trim: {tap: plateau}
  - dilute: {tap: plateau, target: 0.6, min_coverage: 1}
  - afcc: {tap: plateau, train: head, finetune: {epochs: 1, lr: 0.002, batch_size: 50}}
  - finetune: {epochs: 1, lr: 0.002, batch_size: 50, distill: {temperature: 4, alpha: 0.5}}
  - export: {}
  - quantize: {calibration_images: 16, max_drop: null}
  - bench: {batch_sizes: [1], warmup: 1, repeats: 2, torch_eager: false}
"""

# torchrun's entry point: each rank in a working folder of its own (rank0/, rank1/ under the folder given)
ENTRY = """
import os, sys
os.chdir(os.path.join(os.environ["RANK_FOLDERS"], "rank" + os.environ["RANK"]))
from compress.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_apart(root: Path, argv: list[str]) -> subprocess.CompletedProcess:
    """``compress <argv>`` under a 2-process torchrun, rank r working in ``root/rank<r>``."""
    for r in (0, 1):
        (root / f"rank{r}").mkdir(parents=True)
    entry = root / "entry.py"
    entry.write_text(ENTRY)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port()), str(entry)]
    return subprocess.run([*launcher, *argv], capture_output=True, text=True, env=dict(ENV, RANK_FOLDERS=str(root)),
                          timeout=400)


def _files(folder: Path) -> list[str]:
    """Every path under ``folder``; the analysis figures of single filters are named by filter
    index, which depends on the trained weights, so only their number counts."""
    return sorted(re.sub(r"_\d+\.png$", "_N.png", str(p.relative_to(folder))) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(RECIPE)
    return path


@pytest.fixture(scope="module")
def single(recipe, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    proc = subprocess.run([sys.executable, "-m", "compress.cli", "run", str(recipe), "--out", str(out), "--quiet"],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_a_recipe_under_torchrun_ends_as_in_one_process_and_only_rank_0_writes(recipe, single, tmp_path):
    proc = _torchrun_apart(tmp_path, ["run", str(recipe), "--out", "run", "--quiet"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("report:") == 1  # rank 0 prints, rank 1 is silent
    assert "error:" not in proc.stderr
    assert not (tmp_path / "rank1" / "run").exists()  # rank 1 wrote nothing, not even the folder
    assert not list((tmp_path / "rank1").iterdir())
    out = tmp_path / "rank0" / "run"
    assert _files(out) == _files(single)  # the same files as one process writes, no more (no lock, no traces)
    ours, theirs = (json.loads((f / "summary.json").read_text()) for f in (out, single))
    assert [s["step"] for s in ours["steps"]] == [s["step"] for s in theirs["steps"]]
    assert [s["step"] for s in ours["steps"]] == ["original", "trim", "dilute", "afcc", "finetune", "export",
                                                  "quantize", "bench"]
    for key in ("original", "final", "onnx", "int8_onnx", "bench"):  # paths as rank 0 sees them
        assert key in ours["artifacts"]
    for record in (ours["steps"][0], ours["steps"][-1]):
        assert 0 <= record["test_accuracy"] <= 1
    assert ours["steps"][3]["info"]["finetune"]["epochs"] == 1  # the masked fine-tuning ran (on both ranks)


@pytest.mark.slow
def test_cifar_k_under_torchrun_finishes_and_only_rank_0_writes(tmp_path):
    argv = ["cifar-k", "--model", "vgg6", "--width", "0.125", "--fc-hidden", "none", "--ks", "2", "3", "--tap",
            "features.pool2", "--limit-train", "160", "--limit-test", "80", "--epochs", "1", "--lr", "0.03",
            "--momentum", "0.9", "--batch-size", "40", "--probe-epochs", "2", "--out", "ck", "--quiet"]
    proc = _torchrun_apart(tmp_path, argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("report:") == 1
    assert not list((tmp_path / "rank1").iterdir())  # no shared storage needed, nothing written by rank 1
    out = tmp_path / "rank0" / "ck"
    summary = json.loads((out / "cifar_k.json").read_text())
    assert [r["K"] for r in summary["rows"]] == [2, 3] and summary["fit"] is not None
    for k in (2, 3):
        for name in ("train/checkpoint.pt", "train/model.pt", "analysis/analysis.json", "analysis/report.html"):
            assert (out / f"K{k}" / name).is_file(), (k, name)
    assert (out / "report.html").is_file() and not (out / ".lock").exists()


def test_work_on_rank_0_alone_is_plain_work_in_one_process():
    assert distributed.run_on_main(lambda: 41 + 1) == 42
    with distributed.alone():
        assert not distributed.is_distributed() and distributed.world_size() == 1 and distributed.is_main()
    with pytest.raises(ValueError):
        distributed.run_on_main(lambda: int("x"))
    t = torch.nn.Linear(2, 2)
    assert distributed.broadcast_state_(t) is t


def test_a_model_crosses_as_bytes_with_its_transforms(tmp_path):
    from compress.compression.serialize import load_model, model_bytes, model_from_bytes, save_model, share_model
    from compress.compression.trim import trim_at
    from compress.models import tap_shapes

    from conftest import tiny_vgg

    model = tiny_vgg()
    shape = tap_shapes(model, ["features.pool3"], (3, 32, 32))["features.pool3"]
    trim_at(model, "features.pool3", torch.randn(10, int(torch.tensor(shape).prod())))
    model.eval()
    meta = {"model": "vgg6", "options": {"width": 0.125, "fc_hidden": []}, "num_classes": 10,
            "input_size": [3, 32, 32]}
    state = torch.random.get_rng_state()
    rebuilt, got = model_from_bytes(model_bytes(model, meta))
    assert torch.equal(torch.random.get_rng_state(), state)  # rebuilding draws no number of the run's
    assert got["transforms"] == model.compress_transforms
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    assert [n for n, _ in rebuilt.named_parameters()] == [n for n, _ in model.named_parameters()]
    from_file = load_model(save_model(model, tmp_path / "model.pt", meta))[0]
    assert (tmp_path / "model.pt").read_bytes() == model_bytes(model, meta)  # the same bytes as the file
    assert from_file.state_dict().keys() == rebuilt.state_dict().keys()
    assert share_model(lambda: model, meta) is model  # one process: the model as made
