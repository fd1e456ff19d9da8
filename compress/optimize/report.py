"""The candidate table of ``compress optimize`` (``candidates.json``, ``candidates.md``,
``candidates.html``) and its accuracy-against-latency plot with the Pareto front and the budget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from compress.io import atomic_write_text  # noqa: E402
from compress.optimize.candidates import Variant  # noqa: E402
from compress.optimize.config import OptimizeConfig  # noqa: E402
from compress.reports.document import Heading, Para, Table, save_figure, write_document  # noqa: E402

__all__ = ["rows", "pareto", "write_report"]


def rows(variants: list[Variant], cfg: OptimizeConfig, base_accuracy: float) -> list[dict[str, Any]]:
    """One JSON-able row per candidate, fastest first (those never timed last)."""
    out = []
    for v in sorted(variants, key=lambda v: (v.latency_ms is None, v.latency_ms or 0.0, v.name)):
        info = v.structure.info
        drop = None if v.accuracy is None else 100 * (base_accuracy - v.accuracy)
        folder = f"candidates/{v.structure.folder.name}" if v.structure.folder else None
        out.append({"name": v.name, "structure": v.structure.id, "folder": folder, "kind": v.structure.kind,
                    "precision": v.precision, "tap": v.structure.tap, "prune_ratio": v.structure.ratio,
                    "params": info.get("params"), "flops": info.get("flops"), "flops_ratio": v.flops_ratio,
                    "latency_ms": v.latency_ms, "speedup": v.speedup, "val_accuracy": v.accuracy,
                    "drop_points": drop, "accuracy_source": v.source, "estimated": v.estimated,
                    "probe_accuracy": info.get("probe_accuracy"),
                    "fast_enough": cfg.fast_enough(v.speedup, v.latency_ms, v.flops_ratio),
                    "accurate_enough": cfg.accurate_enough(v.accuracy, base_accuracy),
                    "chosen": v.status.startswith("chosen"), "status": v.status, "onnx": str(v.onnx or "")})
    return out


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both latency (lower) and accuracy (higher), by latency."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def _figure(table: list[dict[str, Any]], cfg: OptimizeConfig, base: dict[str, Any]):
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    pts = [r for r in table if r["latency_ms"] is not None and r["val_accuracy"] is not None]
    for precision, marker in (("fp32", "o"), ("int8", "s")):
        sel = [r for r in pts if r["precision"] == precision]
        if sel:
            ax.plot([r["latency_ms"] for r in sel], [r["val_accuracy"] for r in sel], linestyle="none", marker=marker,
                    alpha=0.75, label=precision.upper())
    for r in pts:
        ax.annotate(r["name"].replace("$", r"\$"), (r["latency_ms"], r["val_accuracy"]), textcoords="offset points",
                    xytext=(4, 3), fontsize=6)
    front = pareto([(r["latency_ms"], r["val_accuracy"]) for r in pts])
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="tab:gray", linewidth=1,
                label="Pareto front")
    floor = base["val_accuracy"] - cfg.max_drop / 100
    ax.axhline(floor, color="tab:red", linestyle="--", linewidth=1, label=f"accuracy floor (-{cfg.max_drop:g} pt)")
    limit = base.get("latency_limit_ms")
    if limit is not None:
        ax.axvline(limit, color="tab:red", linestyle=":", linewidth=1, label="latency budget")
    chosen = [r for r in pts if r["chosen"]]
    if chosen:
        ax.plot([chosen[0]["latency_ms"]], [chosen[0]["val_accuracy"]], marker="*", markersize=16, color="gold",
                markeredgecolor="black", linestyle="none", label="chosen")
    ax.set_xlabel(f"median latency per batch of {cfg.batch_size} (ms, {cfg.backend}, this machine)")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return save_figure(fig, "candidates", f"Validation accuracy against latency of every candidate timed; the budget: "
                                          f"{cfg.describe()}. Candidates without an accuracy estimate are left out.")


def _cell(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def write_report(folder: Path, doc: dict[str, Any], cfg: OptimizeConfig) -> dict[str, Path]:
    """Write ``candidates.json`` (``doc``), ``candidates.md``, ``candidates.html`` and
    ``figures/candidates.png`` under ``folder``."""
    atomic_write_text(folder / "candidates.json", json.dumps(doc, indent=2, default=str))
    table, base = doc["candidates"], doc["original"]
    header = ["candidate", "latency (ms)", "speed-up", "MFLOPs", "FLOPs ratio", "params", "val accuracy",
              "drop (points)", "accuracy from", "chosen or why not"]
    body = [[r["name"], _cell(r["latency_ms"], ".4f"), _cell(r["speedup"], ".2f"),
             _cell(None if r["flops"] is None else r["flops"] / 1e6, ".3f"), _cell(r["flops_ratio"], ".3f"),
             _cell(r["params"], ","), _cell(r["val_accuracy"], ".4f"), _cell(r["drop_points"], "+.2f"),
             r["accuracy_source"] or "-", r["status"]] for r in table]
    marked = {i for i, r in enumerate(table) if r["chosen"]}
    env = doc.get("environment", {})
    blocks = [Heading(1, "compress optimize: candidates"),
              Para(f"Budget: {cfg.describe()}. The original: validation accuracy {base['val_accuracy']:.4f}, "
                   f"{base['latency_ms']:.4f} ms per batch of {cfg.batch_size}."),
              Para(f"Latencies are this machine's ({env.get('cpu', 'unknown CPU')}, {cfg.threads or 'default'} "
                   f"threads), every candidate timed interleaved with the original in one process "
                   f"({cfg.warmup} warm-up calls, {cfg.repeats} rounds, median); another machine gives other "
                   f"ratios. Accuracies are on the validation split; the test split only reports the chosen model."),
              Table(header, body, marked)]
    if doc.get("int8_note"):
        blocks.append(Para(doc["int8_note"]))
    blocks.append(_figure(table, cfg, base))
    final = doc.get("final")
    if final:
        blocks += [Heading(2, "The chosen model"),
                   Para(f"{final['name']}: {final['speedup']:.2f}x, validation accuracy {final['val_accuracy']:.4f}"
                        f" after {final['finetune']}; test accuracy {final.get('test_accuracy', float('nan')):.4f} "
                        f"(the original: {base.get('test_accuracy', float('nan')):.4f}), reported once.")]
    elif doc.get("error"):
        blocks.append(Para(doc["error"]))
    return write_document(folder, "compress optimize: candidates", blocks, stem="candidates")
