"""The report of the CIFAR-K experiment: per-K table, error against K with its least-squares line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from compress.reports.document import Heading, Para, Table, save_figure, write_document

__all__ = ["write_cifar_k_report"]


def write_cifar_k_report(out: Path, summary: dict[str, Any]) -> None:
    """Write ``report.md`` and ``report.html`` of a CIFAR-K run (see :func:`compress.jobs.run_label_scaling`)."""
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
