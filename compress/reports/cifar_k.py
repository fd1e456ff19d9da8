"""The report of the CIFAR-K experiment: per-K table (mean and spread over the draws of labels),
error against K with its least-squares line, and the per-layer table of every K (the second
paper's Tables 4-6), beside the published one where the setting matches."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from compress.analysis.published import SIZE_COLUMNS, compare, match_tables
from compress.reports.analysis import _published_cell
from compress.reports.document import Heading, Para, Table, save_figure, write_document

__all__ = ["write_cifar_k_report"]


def _pm(value: Any, std: Any, digits: int) -> str:
    """``mean ± std`` (``mean`` alone without a spread), ``-`` for a missing value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = f"{value:.{digits}f}"
    return text if std is None else f"{text} ± {std:.{digits}f}"


def _tap_rule(rule: str) -> str:
    if rule == "auto":
        return ("the error is read at the second paper's layer 10 (features.pool10) where the model has that tap, "
                "as VGG-16 does, and at each analysis' plateau tap otherwise")
    if rule == "plateau":
        return "the error is read at each analysis' plateau tap"
    return f"the error is read at tap {rule}"


def write_cifar_k_report(out: Path, summary: dict[str, Any]) -> None:
    """Write ``report.md`` and ``report.html`` of a CIFAR-K run (see :func:`compress.jobs.run_label_scaling`)."""
    rows, fit = summary["rows"], summary["fit"]
    draws = int(summary.get("draws", 1))
    rule = summary.get("tap_rule", "plateau")
    s = lambda r, key: (r.get("std") or {}).get(key)  # noqa: E731
    table = Table(["K", "tap", "N_f", "accuracy", "error", "n", "N_c", "C_s", "model accuracy", "draws"],
                  [[str(r["K"]), r["tap"], str(r["N_f"]), _pm(r["accuracy"], s(r, "accuracy"), 4),
                    _pm(r["error"], s(r, "error"), 4), _pm(r["n"], s(r, "n"), 2), _pm(r["N_c"], s(r, "N_c"), 2),
                    _pm(r["C_s"], s(r, "C_s"), 2), _pm(r["model_accuracy"], s(r, "model_accuracy"), 4),
                    str(r.get("n_draws", 1))] for r in rows])
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ks = np.array([r["K"] for r in rows], dtype=float)
    errors = [r["error"] for r in rows]
    spread = [s(r, "error") or 0.0 for r in rows]
    if draws > 1:
        for r in rows:
            ax.plot([r["K"]] * len(r["draws"]), [d["error"] for d in r["draws"]], ".", color="tab:gray", ms=4)
        ax.errorbar(ks, errors, yerr=spread, fmt="o", color="tab:blue", capsize=3,
                    label=f"mean error of {draws} draws (bars: std)")
    else:
        ax.plot(ks, errors, "o", color="tab:blue", label="error at the tap")
    if fit:
        xs = np.linspace(0, ks.max() * 1.05, 50)
        ax.plot(xs, fit["slope"] * xs + fit["intercept"], "--", color="tab:red",
                label=f"fit: {fit['slope']:.4f} K {fit['intercept']:+.3f} (R$^2$ {fit['r2']:.2f})")
    ax.set_xlabel("number of labels K")
    ax.set_ylabel("error (1 - accuracy)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    data = summary["data"]
    blocks: list = [
        Heading(1, "Error against the number of labels (CIFAR-K)"),
        Para(f"Model {summary['model']['name']} on nested label subsets of {data['name']}; each K and each draw of "
             f"labels trained and analysed on its own; {_tap_rule(rule)}. "
             + (f"{draws} draws of labels per K (draw d: label seed {data.get('label_seed', 0)} + d, training seed "
                f"+ d); figures are means ± sample standard deviations over the draws. " if draws > 1 else
                "One draw of labels per K (the second paper averages 5). ")
             + f"Labels drawn {_draw_text(data.get('label_draw', 'auto'))}."),
        table, save_figure(fig, "cifar_k_error", "Error at the tap against K, with the least-squares line"
                                                 + (" (grey: single draws)." if draws > 1 else "."))]
    if fit:
        blocks.append(Para(f"Linear fit: error = {fit['slope']:.5f} K + {fit['intercept']:.4f}, R^2 = {fit['r2']:.3f}. "
                           f"The second paper found the error rising about linearly with K."))
    slopes = [f["slope"] for f in summary.get("fit_draws") or []]
    if slopes:
        blocks.append(Para(f"Slopes of the {len(slopes)} draws' own fits: {min(slopes):.5f} to {max(slopes):.5f} "
                           f"(the second paper: 0.0012 to 0.0013 over 5 subsets, EfficientNet-B0 on CIFAR-K/100)."))
    for r in rows:
        blocks += _k_blocks(r, summary)
    write_document(out, "CIFAR-K", blocks)


def _draw_text(label_draw: str) -> str:
    return {"superclass": "evenly over CIFAR-100's 20 superclasses (the second paper's CIFAR-K/100)",
            "random": "at random (a seeded permutation)",
            }.get(label_draw, "evenly over CIFAR-100's 20 superclasses where the labels are CIFAR-100's, at random "
                              "otherwise")


def _k_blocks(r: dict[str, Any], summary: dict[str, Any]) -> list:
    """One K: the labels of every draw and the per-layer table (Tables 4-6), then the published one."""
    k = r["K"]
    blocks: list = [Heading(2, f"K = {k}")]
    for d in r.get("draws", []):
        labels = d["labels"]
        shown = ", ".join(labels[:30]) + (f", ... ({len(labels)} in all)" if len(labels) > 30 else "")
        extra = ""
        if d.get("superclasses"):
            extra = f"; {len(set(d['superclasses']))} superclasses"
        blocks.append(Para(f"Draw {d['draw']} (label seed {d['label_seed']}, seed {d['seed']}): {shown}{extra}; "
                           f"plateau {d['plateau']}, error {d['error']:.4f} at {d['tap']}."))
    header = ["Layer", "N_f", "F_s", "FC_s", "Accuracy", "n", "N_c", "C_s"]
    body, marked = [], set()
    for i, t in enumerate(reversed(r["taps"])):  # deepest first, as the papers' tables
        std = t.get("std") or {}
        name = t["name"] + (" (error tap)" if t["name"] in r["tap"].split("/") else "")
        if t["name"] in r["tap"].split("/"):
            marked.add(i)
        body.append([name, str(t["N_f"]), t["F_s"], str(t["FC_s"]), _pm(t["accuracy"], std.get("accuracy"), 3),
                     _pm(t["n"], std.get("n"), 2), _pm(t["N_c"], std.get("N_c"), 2), _pm(t["C_s"], std.get("C_s"), 2)])
    blocks += [Para("Accuracy per layer and statistics of their filters (the second paper's Tables 4-6)"
                    + (", means ± standard deviations over the draws:" if r.get("n_draws", 1) > 1 else ":")),
               Table(header, body, marked)]
    model, dataset = summary["model"]["name"], summary["data"]["name"]
    measured = {t["name"]: t for t in r["taps"]}
    for table in match_tables(model, dataset, k):
        rows = compare(table, measured, model)
        if not any(x["analysed"] for x in rows):
            continue
        cols = [c for c in ("N_f", "F_s", "FC_s", "accuracy", "n", "N_c", "C_s", *SIZE_COLUMNS)
                if any(c in x["columns"] for x in rows)]
        body = [[str(x["layer"]), x["tap"] + ("" if x["analysed"] else " (not analysed)"),
                 *[_published_cell(c, x["columns"].get(c)) for c in cols]] for x in rows]
        blocks += [Para(f"Published: {table.paper}, {table.source}. Each cell: measured (mean over the draws) / "
                        f"published (difference)." + (f" {table.note}" if table.note else "")),
                   Table([table.unit.capitalize(), "tap", *[{"accuracy": "Accuracy"}.get(c, c) for c in cols]], body)]
    return blocks
