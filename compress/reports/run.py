"""The report of a recipe run: every step's parameters, FLOPs and accuracy before and after."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from compress.analysis import AnalysisResult
from compress.reports.document import Heading, Para, Table, save_figure, write_document

__all__ = ["write_run_report"]


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.3f}" if base else "-"


def _info_lines(info: dict[str, Any], prefix: str = "") -> list[str]:
    lines = []
    for key, value in info.items():
        if isinstance(value, dict):
            lines += _info_lines(value, f"{prefix}{key}.")
        elif isinstance(value, (list, tuple)) and len(value) > 12:
            lines.append(f"{prefix}{key}: {list(value[:12])} ... ({len(value)} items)")
        elif isinstance(value, float):
            lines.append(f"{prefix}{key}: {value:.4g}")
        else:
            lines.append(f"{prefix}{key}: {value}")
    return lines


def write_run_report(out: str | Path, records: list[dict[str, Any]], artifacts: dict[str, str], name: str,
                     analysis: AnalysisResult) -> dict[str, Path]:
    """Write ``report.md`` and ``report.html`` of a run into ``out``."""
    out = Path(out)
    base = records[0]["after"]
    rows = []
    for i, r in enumerate(records):
        a = r["after"]
        rows.append([f"{i}. {r['step']}", f"{a['params']:,}", f"{a['nonzero_params']:,}", f"{a['flops']:,}",
                     f"{a['accuracy']:.4f}", f"{100 * (a['accuracy'] - base['accuracy']):+.2f}",
                     _ratio(a["nonzero_params"], base["nonzero_params"]), _ratio(a["flops"], base["flops"])])
    split = "validation" if base.get("split") == "val" else "test"
    t0, t1 = records[0].get("test_accuracy"), records[-1].get("test_accuracy")
    blocks: list = [
        Heading(1, f"Compression run: {name}"),
        Para(f"Model {analysis.model} on {analysis.dataset} ({len(analysis.label_names)} labels). The analysis report "
             f"(probe accuracy per tap, filter clusters, noise) is analysis/report.html; the plateau tap is "
             f"{analysis.plateau}."),
        Heading(2, "Steps: before and after"),
        Table(["step", "params", "non-zero params", "FLOPs", f"{split} accuracy", "change (points)",
               "non-zero ratio", "FLOPs ratio"], rows),
        Para("Parameters count every stored weight; non-zero parameters leave out weights that masks hold at zero. "
             "FLOPs are fvcore's count for one image (multiply-adds). "
             + ("Accuracy is top-1 on the validation split, held out from the training images: every choice of "
                "the run (plateau, clusters, masks, filters) was made on it. " if split == "validation" else
                "Accuracy is top-1 on the test split, which the run's choices were also made on (analysis.split: "
                "test, the papers' setting): it overstates what new images will give. ")
             + "Ratios are to the original model."),
    ]
    if t0 is not None and t1 is not None:
        blocks.append(Para(f"Test accuracy, measured once for each of the two models the run is about: original "
                           f"{t0:.4f}, final {t1:.4f} ({100 * (t1 - t0):+.2f} points)."))
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["after"]["flops"] for r in records]
    ys = [r["after"]["accuracy"] for r in records]
    ax.plot(xs, ys, "o-", color="tab:blue")
    for i, r in enumerate(records):
        ax.annotate(f"{i}. {r['step']}", (xs[i], ys[i]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("FLOPs per image")
    ax.set_ylabel(f"{split} accuracy")
    ax.grid(alpha=0.3)
    blocks.append(save_figure(fig, "run_accuracy_flops",
                              f"{split.capitalize()} accuracy against FLOPs after every step."))
    blocks.append(Heading(2, "What each step did"))
    for i, r in enumerate(records[1:], start=1):
        blocks.append(Heading(3, f"{i}. {r['step']} ({r.get('seconds', 0):.1f} s)"))
        blocks += [Para(line) for line in _info_lines(r.get("info", {}))]
    afcc = [r["info"] for r in records if r["step"] == "afcc"]
    for info in afcc:
        if "bytes_dense" in info:
            text = (f"AFCC keeps {info['kept_weights']:,} of {info['dense_weights']:,} head weights "
                    f"({100 * info['removed_fraction']:.1f} % removed; the papers' estimate N_f F_s C_s N_c is "
                    f"{info['papers_estimate']:,.0f}). Stored as kept connections only, the head takes "
                    f"{info['bytes_sparse']:,} bytes instead of {info['bytes_dense']:,} dense.")
            lat = info.get("head_latency")
            if lat:
                faster = lat["sparse_b64_ms"] < lat["dense_b64_ms"]
                text += (f" Its gather/scatter computation is {'faster' if faster else 'slower'} than the dense "
                         f"matrix product on this machine (PyTorch, CPU): head alone "
                         f"{lat['sparse_b1_ms']:.3f} ms vs {lat['dense_b1_ms']:.3f} ms dense at batch 1, "
                         f"{lat['sparse_b64_ms']:.3f} vs {lat['dense_b64_ms']:.3f} ms at batch 64 (the convolutions "
                         f"dominate the model's latency either way).")
            blocks += [Heading(2, "AFCC: size and latency of the head"), Para(text)]
    if "bench" in artifacts:
        blocks += [Heading(2, "Latency"), Para("The measured latency comparison (onnxruntime and PyTorch, interleaved, "
                                               "median and p90) is bench/bench.html (Markdown: bench/bench.md).")]
    blocks += [Heading(2, "Files"), Table(["artifact", "path"], [[k, str(v)] for k, v in artifacts.items()])]
    return write_document(out, f"Compression run: {name}", blocks)
