"""The benchmark: timing statistics and interleaving, FLOPs, and `compress bench` on two tiny
models (table, ratios, report files, bench.json)."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch

from compress.deploy.bench import (BenchResult, LatencyStats, available_backends, count_flops, count_params, measure_latency, run_bench,
                            time_interleaved, torch_runner)
from compress.reports.bench import write_bench_report
from compress.cli import main
from compress.data import load_data
from compress.errors import UserError
from compress.deploy.export import export_onnx
from compress.compression.serialize import save_model
from compress.jobs import model_meta
from compress.models import ModelConfig

from conftest import tiny_vgg


@pytest.fixture(scope="module")
def bundle():
    return load_data("digits", limit_train=1, limit_test=64)


@pytest.fixture(scope="module")
def two_models(bundle, tmp_path_factory):
    """An "original" (width 0.25) and a "compressed" one (width 0.125) saved as model files."""
    folder = tmp_path_factory.mktemp("models")
    paths = []
    for name, width in (("original", 0.25), ("small", 0.125)):
        torch.manual_seed(0)
        model = tiny_vgg(width=width).eval()
        meta = model_meta(ModelConfig("vgg6", {"width": width, "fc_hidden": []}), bundle)
        paths.append(save_model(model, folder / name / "model.pt", meta))
    return paths


def test_latency_statistics():
    stats = LatencyStats.from_samples(8, [0.004, 0.001, 0.002, 0.003, 0.010])
    assert stats.median_ms == pytest.approx(3.0) and stats.min_ms == pytest.approx(1.0)
    assert stats.median_ms <= stats.p90_ms <= 10.0 and stats.repeats == 5
    assert stats.throughput == pytest.approx(8 / 0.003)
    slept = measure_latency(lambda: time.sleep(0.002), batch=1, warmup=1, repeats=5)
    assert slept.median_ms >= 2.0 and slept.repeats == 5


def test_time_interleaved_rotates_and_counts_calls():
    calls: list[str] = []
    fns = {n: (lambda n=n: calls.append(n)) for n in "abc"}
    stats = time_interleaved(fns, batch=4, warmup=2, repeats=3)
    assert set(stats) == {"a", "b", "c"} and all(s.repeats == 3 for s in stats.values())
    timed = calls[6:]  # after 2 warm-up calls each
    assert [timed[i * 3:(i + 1) * 3] for i in range(3)] == [list("abc"), list("bca"), list("cab")]
    with pytest.raises(UserError):
        time_interleaved(fns, batch=1, repeats=0)


def test_bursts_time_only_the_later_calls_of_each_turn():
    """burst 4: each turn is 4 calls in a row, 2 untimed then 2 timed; 5 timed calls need 3 rounds (the
    last turn times one); the untimed call before a timed one is what brings a model back into the caches."""
    calls: list[str] = []
    fns = {n: (lambda n=n: calls.append(n) or time.sleep(0.001 if n == "a" else 0.003)) for n in "ab"}
    stats = time_interleaved(fns, batch=1, warmup=0, repeats=5, burst=4)
    assert all(s.repeats == 5 for s in stats.values())
    assert calls[:8] == list("aaaabbbb") and calls[8:16] == list("bbbbaaaa")
    assert len(calls) == 2 * (2 * 4 + 2 + 1)  # the last turn: 2 untimed, 1 timed
    assert stats["a"].median_ms < stats["b"].median_ms
    with pytest.raises(UserError):
        time_interleaved(fns, batch=1, repeats=1, burst=0)


def test_torch_runner_uses_inference_mode():
    model = tiny_vgg()
    out = torch_runner(model, (3, 32, 32), 2)()
    assert out.shape == (2, 10) and out.is_inference()


def test_flops_and_params_match_the_architecture():
    model = tiny_vgg().eval()
    macs = []
    hooks = [m.register_forward_hook(lambda m, i, o: macs.append(
        o.numel() * m.in_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups if isinstance(m, torch.nn.Conv2d)
        else m.in_features * m.out_features)) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    model(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    flops = count_flops(model, (3, 32, 32))
    assert sum(macs) <= flops <= 1.05 * sum(macs)  # conv + linear multiply-adds, plus batch-norm
    assert count_params(model) == sum(p.numel() for p in model.parameters())


def test_bench_command_on_two_tiny_models(two_models, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", *map(str, two_models), "--out", str(out), "--batch-sizes", "1", "4", "--warmup", "1",
                 "--repeats", "3", "--backends", "ort-cpu", "torch-cpu", "--threads", "1", "--limit-test", "64"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "bench.json").read_text())
    names = [m["name"] for m in result["models"]]
    assert names == ["original", "small"]  # named after the run folders
    big, small = result["models"]
    assert small["params"] < big["params"] and small["flops"] < big["flops"]
    assert small["file_size"] < big["file_size"]
    for m in result["models"]:
        assert set(m["latency"]) == {"ort-cpu", "torch-cpu"}
        for per_batch in m["latency"].values():
            assert set(per_batch) == {"1", "4"}
            assert all(s["median_ms"] > 0 and s["p90_ms"] >= s["median_ms"] and s["repeats"] == 3
                       for s in per_batch.values())
        assert 0.0 <= m["accuracy"] <= 1.0 and m["export_check"]["argmax_agreement"] == 1.0
    assert result["settings"]["threads"] == 1 and result["settings"]["test_samples"] == 64
    env = result["environment"]
    assert {"cpu", "torch_threads", "torch", "onnxruntime", "onnx"} <= set(env)

    md = (out / "bench.md").read_text()
    ratio_table = md.split("## Ratios to the original")[1].split("\n## ")[0]
    rows = {r.split("|")[1].strip(" *"): [c.strip(" *") for c in r.split("|")[2:-1]]
            for r in ratio_table.splitlines() if r.startswith("| ") and "---" not in r and "Model" not in r}
    assert set(rows["original"][:6]) == {"1.000"}
    params_ratio = small["params"] / big["params"]
    assert rows["small"][0] == f"{params_ratio:.3f}"
    lat = small["latency"]["ort-cpu"]["1"]["median_ms"] / big["latency"]["ort-cpu"]["1"]["median_ms"]
    assert rows["small"][3] == f"{lat:.3f}"
    assert f"{params_ratio:.3f}" in printed and "bench.html" in printed
    html = (out / "bench.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and not re.search(r"(src|href)=\"https?:", html)
    assert {p.name for p in (out / "figures").iterdir()} == {"bench_accuracy_latency.png", "bench_accuracy_flops.png"}


def test_bench_takes_onnx_files_beside_model_files(two_models, bundle, tmp_path):
    from compress.compression.serialize import load_model

    model, meta = load_model(two_models[1])
    onnx_path = export_onnx(model, meta, tmp_path / "small.onnx",
                            extra_meta={"params": count_params(model), "flops": count_flops(model, (3, 32, 32))})
    result = run_bench([two_models[0], onnx_path], bundle, tmp_path / "b", batch_sizes=[2], warmup=0, repeats=2,
                       backends=["ort-cpu", "torch-cpu"], threads=1)
    original, small = result.models
    assert small["name"] == "small" and small["flops"] == count_flops(model, (3, 32, 32))
    assert set(small["latency"]) == {"ort-cpu"}  # no PyTorch model behind an ONNX file
    assert result.ratio(1, "latency", "torch-cpu", 2) is None
    assert result.ratio(1, "params") == pytest.approx(small["params"] / original["params"])


def test_bench_rejects_bad_settings(two_models, bundle, tmp_path):
    with pytest.raises(UserError, match="unknown backend"):
        run_bench(two_models, bundle, tmp_path, backends=["ort-tpu"])
    with pytest.raises(UserError, match="batch sizes"):
        run_bench(two_models, bundle, tmp_path, batch_sizes=[0])
    if "ort-cuda" not in available_backends():
        with pytest.raises(UserError, match="not available"):
            run_bench(two_models, bundle, tmp_path, backends=["ort-cuda"])


def fake_result(n_models: int = 3) -> BenchResult:
    """A benchmark result without measuring anything (for report tests)."""
    models = []
    for i in range(n_models):
        scale = 0.5 ** i
        lat = {"ort-cpu": {str(b): {"batch": b, "median_ms": b * scale, "p90_ms": b * scale * 1.2,
                                    "mean_ms": b * scale, "min_ms": b * scale, "repeats": 5,
                                    "throughput": 1000 / scale} for b in (1, 64)}}
        models.append({"name": f"model{i}", "source": f"runs/m{i}/model.pt", "onnx": f"onnx/model{i}.onnx",
                       "model": "vgg6", "params": int(1e6 * scale), "flops": int(3e7 * scale),
                       "file_size": int(4e6 * scale), "accuracy": 0.95 - 0.01 * i, "latency": lat,
                       "export_check": {"samples": 64, "max_abs_diff": 1e-6, "argmax_agreement": 1.0}})
    return BenchResult(models, {"batch_sizes": [1, 64], "warmup": 2, "repeats": 5, "backends": ["ort-cpu"],
                                "threads": 2, "data": "digits", "test_samples": 360, "timing": "interleaved",
                                "flops": "fvcore"}, {"cpu": "test cpu", "torch": "x", "onnxruntime": "y"})


def test_report_from_a_result(tmp_path):
    paths = write_bench_report(fake_result(), tmp_path)
    md = paths["markdown"].read_text()
    assert "| **model0** | **1 M** | **30 MFLOPs** |" in md
    assert "| model2 | 0.250 | 0.250 | 0.250 | 0.250 | 0.250 | 0.979 | -2.00 |" in md
    assert "figures/bench_accuracy_latency.png" in md and "test cpu" in md
