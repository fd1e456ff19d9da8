"""The second paper's CIFAR-K experiment: train on nested K-label subsets, analyse each, and relate
the error at the plateau tap to K (linear fit, Figs. 3-5; per-K table as Tables 4-5)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np

from compress.analysis import AnalysisConfig
from compress.document import Heading, Para, Table, save_figure, write_document
from compress.errors import UserError
from compress.io import atomic_write_text, ensure_writable_dir
from compress.pipeline import DataSpec, ModelSpec, analyze, train
from compress.training import TrainConfig

__all__ = ["run_label_scaling", "fit_error_line"]


def fit_error_line(ks: Sequence[int], errors: Sequence[float]) -> dict[str, float]:
    """Least-squares line error = slope * K + intercept, with R^2 (needs two or more K)."""
    k = np.asarray(ks, dtype=float)
    e = np.asarray(errors, dtype=float)
    if len(k) < 2:
        raise UserError("the CIFAR-K fit needs at least two values of K")
    slope, intercept = np.polyfit(k, e, 1)
    pred = slope * k + intercept
    ss_res = float(((e - pred) ** 2).sum())
    ss_tot = float(((e - e.mean()) ** 2).sum())
    return {"slope": float(slope), "intercept": float(intercept), "r2": 1 - ss_res / ss_tot if ss_tot > 0 else 1.0}


def run_label_scaling(model: ModelSpec, data: DataSpec, ks: Sequence[int], train_cfg: TrainConfig,
                      analysis_cfg: AnalysisConfig, out: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Train and analyse one model per K (nested label subsets of ``data``) and fit error against K.

    Each K gets ``out/K<k>/train`` (resumable) and ``out/K<k>/analysis``; ``out/cifar_k.json`` and
    ``out/report.{md,html}`` hold the per-K table, the fit and the plot.

    Returns:
        ``{"rows": [...], "fit": {...}}``, one row per K with the plateau tap, its error and
        N_f, accuracy, n, N_c, C_s there.
    """
    out = ensure_writable_dir(out)
    ks = sorted(set(int(k) for k in ks))
    rows = []
    for k in ks:
        spec = dataclasses.replace(data, num_labels=k)
        folder = out / f"K{k}"
        trained, history, bundle = train(model, spec, train_cfg, folder / "train", progress=progress)
        result = analyze(model, spec, analysis_cfg, folder / "analysis", model=trained, bundle=bundle,
                         progress=progress)
        tap = result.tap(result.plateau)
        rows.append({"K": k, "labels": bundle.label_names, "plateau": tap.name, "model_accuracy": result.model_accuracy,
                     "accuracy": tap.accuracy, "error": 1 - tap.accuracy, "N_f": tap.n_filters,
                     "n": tap.stats.noise, "N_c": tap.stats.clusters_per_filter, "C_s": tap.stats.cluster_size,
                     "taps": [{"name": t.name, "accuracy": t.accuracy, "n": t.stats.noise,
                               "N_c": t.stats.clusters_per_filter, "C_s": t.stats.cluster_size} for t in result.taps]})
        atomic_write_text(out / "cifar_k.json", json.dumps({"rows": rows}, indent=2))
    fit = fit_error_line([r["K"] for r in rows], [r["error"] for r in rows]) if len(rows) >= 2 else None
    summary = {"model": dataclasses.asdict(model), "data": dataclasses.asdict(data), "rows": rows, "fit": fit}
    atomic_write_text(out / "cifar_k.json", json.dumps(summary, indent=2))
    _write_report(out, summary)
    return summary


def _write_report(out: Path, summary: dict[str, Any]) -> None:
    rows, fit = summary["rows"], summary["fit"]
    table = Table(["K", "plateau tap", "N_f", "accuracy", "error", "n", "N_c", "C_s", "model accuracy"],
                  [[str(r["K"]), r["plateau"], str(r["N_f"]), f"{r['accuracy']:.4f}", f"{r['error']:.4f}",
                    f"{r['n']:.2f}", f"{r['N_c']:.2f}", f"{r['C_s']:.2f}", f"{r['model_accuracy']:.4f}"] for r in rows])
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ks = np.array([r["K"] for r in rows], dtype=float)
    ax.plot(ks, [r["error"] for r in rows], "o", color="tab:blue", label="error at the plateau tap")
    if fit:
        xs = np.linspace(0, ks.max() * 1.05, 50)
        ax.plot(xs, fit["slope"] * xs + fit["intercept"], "--", color="tab:red",
                label=f"fit: {fit['slope']:.4f} K {fit['intercept']:+.3f} (R$^2$ {fit['r2']:.2f})")
    ax.set_xlabel("number of labels K")
    ax.set_ylabel("test error (1 - accuracy)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    blocks: list = [Heading(1, "Error against the number of labels (CIFAR-K)"),
                    Para(f"Model {summary['model']['name']} on nested label subsets of {summary['data']['name']}; "
                         f"each K trained and analysed on its own; the error is the probe's at the plateau tap."),
                    table, save_figure(fig, "cifar_k_error", "Test error at the plateau tap against K, with the "
                                                             "least-squares line.")]
    if fit:
        blocks.append(Para(f"Linear fit: error = {fit['slope']:.5f} K + {fit['intercept']:.4f}, R^2 = {fit['r2']:.3f}. "
                           f"The second paper found the error rising about linearly with K."))
    write_document(out, "CIFAR-K", blocks)
