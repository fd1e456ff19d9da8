"""Crash safety: a training run killed mid-epoch resumes to the same model as an uninterrupted
run, and the same seed gives the same analysis artifact bit for bit on the CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

CLI = [sys.executable, "-m", "compress.cli"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")
TRAIN = ["train", "--model", "vgg6", "--width", "0.25", "--fc-hidden", "none", "--epochs", "3", "--limit-train", "600",
         "--limit-test", "100", "--lr", "0.03", "--momentum", "0.9", "--seed", "7", "--quiet"]


def _train(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *TRAIN, "--out", str(out)], capture_output=True, text=True, env=ENV, timeout=300)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.is_file():
        assert proc.poll() is None, f"training ended before {path.name} appeared: {proc.stderr.read()}"
        assert time.monotonic() < end, f"{path} did not appear"
        time.sleep(0.02)


@pytest.mark.slow
def test_run_killed_mid_epoch_resumes_to_the_same_model(tmp_path):
    whole = tmp_path / "whole"
    assert _train(whole).returncode == 0

    cut = tmp_path / "cut"
    proc = subprocess.Popen([*CLI, *TRAIN, "--out", str(cut)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    try:
        _wait_for(cut / "history.json", proc)  # written right after the epoch-1 checkpoint
        epoch_seconds = json.loads((cut / "history.json").read_text())[0]["seconds"]
        time.sleep(epoch_seconds / 3)  # well inside epoch 2
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    state = torch.load(cut / "checkpoint.pt", weights_only=True)  # intact despite the kill
    assert state["epoch"] == 0, "the kill should land in epoch 2; the checkpoint is still epoch 1's"
    assert not list(cut.glob(".*.tmp"))  # the kill fell between writes: nothing half-written

    resumed = _train(cut)  # the same command resumes after epoch 1
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(whole / "checkpoint.pt", weights_only=True)
    b = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in json.loads(h)]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"])
    ma = torch.load(whole / "model.pt", weights_only=True)
    mb = torch.load(cut / "model.pt", weights_only=True)
    assert ma["meta"] == mb["meta"] and all(torch.equal(v, mb["model"][k]) for k, v in ma["model"].items())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    proc = subprocess.run([*CLI, "train", "--model", "vgg6", "--width", "0.125", "--fc-hidden", "none", "--epochs", "1",
                           "--limit-train", "200", "--limit-test", "100", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out / "checkpoint.pt"


def test_same_seed_gives_the_same_analysis_bit_for_bit(checkpoint, tmp_path):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        proc = subprocess.run([*CLI, "analyze", "--checkpoint", str(checkpoint), "--limit-train", "200",
                               "--limit-test", "100", "--probe-epochs", "3", "--seed", "5", "--out", str(out),
                               "--quiet"], capture_output=True, text=True, env=ENV, timeout=300)
        assert proc.returncode == 0, proc.stderr
        runs.append(out)
    a, b = runs
    assert (a / "analysis.json").read_bytes() == (b / "analysis.json").read_bytes()
    files = sorted(p.name for p in (a / "arrays").glob("*.npz"))
    assert files and files == sorted(p.name for p in (b / "arrays").glob("*.npz"))
    for name in files:  # the arrays, not the zip members' timestamps
        with np.load(a / "arrays" / name) as za, np.load(b / "arrays" / name) as zb:
            assert za.files == zb.files
            for key in za.files:
                assert za[key].dtype == zb[key].dtype and za[key].tobytes() == zb[key].tobytes(), (name, key)
