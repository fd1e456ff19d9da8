"""Several processes under torchrun (2 CPU processes, gloo): the analysis equals the single-process
one, and training runs with DistributedDataParallel and writes one checkpoint."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from compress import distributed

CLI = [sys.executable, "-m", "compress.cli"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")
DATA = ["--limit-train", "300", "--limit-test", "200"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(argv: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr",
                "127.0.0.1", "--master_port", str(_free_port()), "-m", "compress.cli"]
    return subprocess.run([*launcher, *argv], capture_output=True, text=True, env=ENV, timeout=300)


def _cli(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *argv], capture_output=True, text=True, env=ENV, timeout=300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained")
    proc = _cli(["train", "--model", "vgg6", "--width", "0.125", "--fc-hidden", "none", "--epochs", "1",
                 "--limit-train", "200", "--limit-test", "100", "--out", str(out), "--quiet"])
    assert proc.returncode == 0, proc.stderr
    return out / "checkpoint.pt"


@pytest.fixture(scope="module")
def single(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    proc = _cli(["analyze", "--checkpoint", str(checkpoint), *DATA, "--probe-epochs", "5", "--out", str(out), "--quiet"])
    assert proc.returncode == 0, proc.stderr
    return out


def _assert_same_analysis(a: Path, b: Path) -> None:
    sa, sb = json.loads((a / "analysis.json").read_text()), json.loads((b / "analysis.json").read_text())
    assert sa["model_accuracy"] == sb["model_accuracy"] and sa["plateau"] == sb["plateau"]
    assert len(sa["taps"]) == len(sb["taps"]) > 1
    for ta, tb in zip(sa["taps"], sb["taps"]):
        assert ta["accuracy"] == tb["accuracy"] and ta["train_accuracy"] == tb["train_accuracy"], ta["name"]
        for key in ("noise", "clusters_per_filter", "cluster_size", "size_fractions", "filters_without_cluster",
                    "label_counts"):
            assert ta[key] == pytest.approx(tb[key], rel=1e-12), (ta["name"], key)
        with np.load(a / "arrays" / f"{ta['name']}.npz") as za, np.load(b / "arrays" / f"{ta['name']}.npz") as zb:
            assert za.files == zb.files
            for key in za.files:
                if za[key].dtype.kind == "f":  # sums added in another order: equal to rounding
                    np.testing.assert_allclose(za[key], zb[key], rtol=1e-9, atol=1e-12, err_msg=key)
                else:  # clipped matrices, clusters, noise, label counts: identical
                    np.testing.assert_array_equal(za[key], zb[key], err_msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_two_process_analysis_equals_single_process(cache, checkpoint, single, tmp_path):
    out = tmp_path / "dist"
    extra = ["--max-memory-gb", "1e-6", "--cache-dir", str(tmp_path / "cache")] if cache == "disk" else []
    proc = _torchrun(["analyze", "--checkpoint", str(checkpoint), *DATA, "--probe-epochs", "5", "--out", str(out),
                      *extra])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("report:") == 1  # rank 0 prints, rank 1 is silent
    _assert_same_analysis(single, out)
    if cache == "disk":
        assert not any((tmp_path / "cache").iterdir())  # the memory-mapped caches are removed afterwards


@pytest.mark.slow
def test_two_process_training_writes_one_checkpoint(tmp_path):
    out = tmp_path / "ddp"
    proc = _torchrun(["train", "--model", "vgg6", "--width", "0.125", "--fc-hidden", "none", "--epochs", "1",
                      "--limit-train", "200", "--limit-test", "100", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained vgg6") == 1
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 0 and not any(k.startswith("module.") for k in state["model"])  # the unwrapped model
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 1 and 0 <= history[0]["val_acc"] <= 1  # the validation split (data.val_fraction 0.1)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.yaml", "history.json", "model.pt"]


def test_commands_other_than_train_and_analyze_refuse_several_processes(tmp_path):
    proc = _torchrun(["taps", "vgg16"])
    assert proc.returncode != 0
    assert proc.stderr.count("error: `compress taps` runs in one process; under torchrun use `compress train`") == 1


def test_single_process_helpers_are_the_identity():
    assert not distributed.is_distributed() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.shard_range(10, 3) == (0, 10)
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(5))
    assert torch.equal(distributed.shard_indices(10, 5), expected)  # the single-process epoch order
    t = torch.arange(4.0)
    assert torch.equal(distributed.all_reduce_sum(t), torch.arange(4.0))
    assert distributed.broadcast_object("x") == "x"


@pytest.mark.parametrize("n,world,block", [(10, 2, 1), (11, 3, 1), (7, 4, 1), (360, 2, 100), (50, 3, 100)])
def test_shards_cover_every_row_once(n, world, block, monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    ranges = [distributed.shard_range(n, block, of_rank=r) for r in range(world)]
    rows = [i for start, stop in ranges for i in range(start, stop)]
    assert rows == list(range(n))  # contiguous, in rank order, disjoint
    assert all(start % block == 0 for start, _ in ranges)  # whole batches
