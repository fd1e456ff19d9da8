"""The benchmark report: the original against each compressed variant (size, FLOPs, latency,
accuracy and their ratios), accuracy against latency and against FLOPs, and the environment, as
Markdown and one self-contained HTML file (built with :mod:`compress.reports.document`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from compress.deploy.bench import BenchResult  # noqa: E402
from compress.reports.document import Heading, Para, Table, save_figure, write_document  # noqa: E402

__all__ = ["write_bench_report", "primary_backend", "summary_rows", "int8_note"]

PREFERRED = ("ort-cpu", "ort-cuda", "ort-trt", "torch-cpu", "torch-cuda")


def write_bench_report(result: BenchResult, folder: str | Path) -> dict[str, Path]:
    """Write ``bench.md``, ``bench.html`` and ``figures/bench_*.png`` under ``folder``.

    Returns:
        ``{"markdown": path, "html": path}``.
    """
    return write_document(folder, _title(result), _build_blocks(result), stem="bench")


def primary_backend(result: BenchResult) -> str | None:
    """The backend of the summary table and the plots: onnxruntime on CPU when it was timed."""
    timed = [b for b in result.settings.get("backends", []) if any(b in m["latency"] for m in result.models)]
    return next((b for b in PREFERRED if b in timed), timed[0] if timed else None)


def _title(result: BenchResult) -> str:
    return f"Benchmark: {result.models[0]['name']} against {len(result.models) - 1} compressed variant(s)"


def _env_line(result: BenchResult, backend: str | None) -> str:
    e = result.environment
    where = e.get("gpu") if backend and backend.endswith(("cuda", "trt")) else f"{e.get('cpu')}, {e.get('torch_threads')} threads"
    return (f"Measured with {backend or '-'} on {where}; torch {e.get('torch')}, onnxruntime {e.get('onnxruntime')}, "
            f"{result.settings.get('warmup')} warm-up calls, {result.settings.get('repeats')} interleaved repeats.")


def _slow_int8(result: BenchResult) -> bool:
    """INT8 rows are present and the CPU has no fast INT8 path: their latencies are not a result."""
    return not result.settings.get("int8", {}).get("fast_path", True) and any(
        m.get("precision") == "int8" for m in result.models)


def int8_note(result: BenchResult) -> str | None:
    """The sentence beside the INT8 rows: how they were made and, without VNNI, why their latency
    is not a result; ``None`` when the bench has no INT8 rows."""
    info = result.settings.get("int8")
    if not info or not any(m.get("precision") == "int8" for m in result.models):
        return None
    mark = "* " if _slow_int8(result) else ""
    return f"{mark}INT8 rows: {info.get('method', 'onnxruntime INT8')}. {info['note'][0].upper()}{info['note'][1:]}."


def _label(result: BenchResult, m: dict[str, Any]) -> str:
    return f"{m['name']} *" if m.get("precision") == "int8" and _slow_int8(result) else m["name"]


def summary_rows(result: BenchResult) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    """The value table and the ratio table (header, rows) of the summary section."""
    backend = primary_backend(result)
    batches = [int(b) for b in result.settings.get("batch_sizes", [])]
    lat_heads = [f"latency b{b} (ms)" for b in batches]
    header = ["Model", "Params", "FLOPs", "ONNX size", *lat_heads, "Accuracy"]
    ratio_header = ["Model", "Params", "FLOPs", "ONNX size", *[f"latency b{b}" for b in batches], "Accuracy",
                    "Accuracy change (points)"]
    rows, ratios = [], []
    base_acc = result.models[0].get("accuracy")
    for i, m in enumerate(result.models):
        lat = [_latency(m, backend, b) for b in batches]
        rows.append([_label(result, m), _count(m["params"]), _count(m["flops"], "FLOPs"), _bytes(m["file_size"]),
                     *[_num(v, 3) for v in lat], _num(m.get("accuracy"), 4, fixed=True)])
        delta = None if base_acc is None or m.get("accuracy") is None else 100 * (m["accuracy"] - base_acc)
        ratios.append([_label(result, m), *[_x(result.ratio(i, k)) for k in ("params", "flops", "file_size")],
                       *[_x(result.ratio(i, "latency", backend, b)) for b in batches], _x(result.ratio(i, "accuracy")),
                       "-" if delta is None else f"{delta:+.2f}"])
    return header, rows, ratio_header, ratios


def _build_blocks(result: BenchResult) -> list:
    backend = primary_backend(result)
    s = result.settings
    blocks: list = [Heading(1, _title(result)), Para(
        f"Original: {result.models[0]['name']} ({result.models[0]['source']}). Test accuracy of each exported "
        f"ONNX model on {s.get('test_samples')} images of {s.get('data')}, fed as its metadata says. "
        f"Latency: median and p90 of {s.get('repeats')} timed calls after {s.get('warmup')} warm-up calls "
        f"({s.get('timing')}), {s.get('threads')} CPU threads. FLOPs: {s.get('flops')}.")]
    header, rows, ratio_header, ratios = summary_rows(result)
    note = int8_note(result)
    blocks += [Heading(2, f"Original against compressed (latency: {backend})"), Table(header, rows, {0}),
               *([Para(note)] if note else []),
               Heading(2, "Ratios to the original"),
               Para("Each value divided by the original's: below 1 is smaller, cheaper or faster."),
               Table(ratio_header, ratios, {0}), *([Para(note)] if note else [])]
    blocks += [Heading(2, "Latency per backend and batch"), _latency_table(result)]
    if backend is not None:
        blocks += [Heading(2, "Accuracy against latency"), _latency_figure(result, backend)]
    if any(m.get("flops") for m in result.models):
        blocks += [Heading(2, "Accuracy against FLOPs"), _flops_figure(result, backend)]
    checks = [m for m in result.models if m.get("export_check")]
    if checks:
        blocks += [Heading(2, "Export check (ONNX Runtime against PyTorch)"), Table(
            ["Model", "inputs", "max |diff|", "argmax agreement"],
            [[m["name"], str(m["export_check"]["samples"]), f"{m['export_check']['max_abs_diff']:.2e}",
              f"{m['export_check']['argmax_agreement']:.2%}"] for m in checks])]
    blocks += [Heading(2, "Environment"), Table(["Key", "Value"], [[k, str(v)] for k, v in result.environment.items()]),
               Heading(2, "Files"), Table(["Model", "source", "ONNX file"],
                                          [[m["name"], m["source"], m["onnx"]] for m in result.models])]
    return blocks


def _latency_table(result: BenchResult) -> Table:
    rows = []
    for backend in result.settings.get("backends", []):
        for b in result.settings.get("batch_sizes", []):
            for i, m in enumerate(result.models):
                st = m["latency"].get(backend, {}).get(str(b))
                if st is None:
                    continue
                rows.append([_label(result, m), backend, str(b), _num(st["median_ms"], 3), _num(st["p90_ms"], 3),
                             f"{st['throughput']:,.0f}", _x(result.ratio(i, "latency", backend, b))])
    return Table(["Model", "backend", "batch", "median (ms)", "p90 (ms)", "throughput (img/s)",
                  "median / original"], rows)


def _scatter(ax, xs: list[float], ys: list[float], names: list[str], **kw) -> None:
    ax.plot(xs, ys, linestyle="none", **{"marker": "o", **kw})
    for x, y, n in zip(xs, ys, names):
        ax.annotate(str(n).replace("$", r"\$"), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)


def _latency_figure(result: BenchResult, backend: str):
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    markers = "osD^v<>"
    for j, b in enumerate(result.settings.get("batch_sizes", [])):
        pts = [(m["latency"][backend][str(b)]["median_ms"], m["accuracy"], m["name"]) for m in result.models
               if str(b) in m["latency"].get(backend, {})]
        if pts:
            xs, ys, ns = zip(*pts)
            _scatter(ax, list(xs), list(ys), list(ns), marker=markers[j % len(markers)], label=f"batch {b}")
    ax.set_xscale("log")
    ax.set_xlabel(f"median latency per batch (ms, {backend}, log scale)")
    ax.set_ylabel("test accuracy (ONNX)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save_figure(fig, "bench_accuracy_latency",
                       f"Test accuracy against median latency, one marker per model and batch size. "
                       f"{_env_line(result, backend)}")


def _flops_figure(result: BenchResult, backend: str | None):
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    pts = [(m["flops"] / 1e6, m["accuracy"], m["name"]) for m in result.models if m.get("flops")]
    xs, ys, ns = zip(*pts)
    _scatter(ax, list(xs), list(ys), list(ns), color="tab:green")
    if len(set(xs)) > 1 and max(xs) / max(min(xs), 1e-12) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("MFLOPs per image (fvcore)")
    ax.set_ylabel("test accuracy (ONNX)")
    ax.grid(alpha=0.3, which="both")
    return save_figure(fig, "bench_accuracy_flops",
                       f"Test accuracy against FLOPs per image. {_env_line(result, backend)}")


# ----------------------------------------------------------------------------- formatting


def _latency(m: dict[str, Any], backend: str | None, batch: int) -> float | None:
    st = m["latency"].get(backend, {}).get(str(batch)) if backend else None
    return None if st is None else st["median_ms"]


def _num(v, digits: int, fixed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}" if fixed else f"{v:.{digits}g}"


def _count(v, unit: str = "") -> str:
    if v is None:
        return "-"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= div:
            return f"{v / div:.3g} {suffix}{unit}".rstrip()
    return f"{int(v)} {unit}".rstrip()


def _bytes(v) -> str:
    if v is None:
        return "-"
    for div, suffix in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if v >= div:
            return f"{v / div:.3g} {suffix}"
    return f"{int(v)} B"


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.3f}"
