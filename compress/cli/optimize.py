"""The command ``optimize``: meet a latency budget (a thin call into :mod:`compress.optimize`); its
budget and search flags are generated from :class:`~compress.optimize.OptimizeConfig`."""

from __future__ import annotations

import argparse
from pathlib import Path

from compress.cli import flags

__all__ = ["add_commands", "print_result"]

_RENAME = {"prune_ratios": "--prune-ratios"}


def print_result(doc: dict, out: str) -> None:
    base, final = doc["original"], doc["final"]
    print(f"budget: {doc['budget']}")
    print(f"{'candidate':<44}{'ms':>10}{'speed-up':>10}{'val acc':>9}  status")
    for r in doc["candidates"]:
        ms = "-" if r["latency_ms"] is None else f"{r['latency_ms']:.4f}"
        up = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        acc = "-" if r["val_accuracy"] is None else f"{r['val_accuracy']:.4f}"
        print(f"{r['name'][:43]:<44}{ms:>10}{up:>10}{acc:>9}  {r['status']}")
    print(f"chosen: {final['name']}, {final['speedup']:.2f}x ({final['latency_ms']:.4f} ms against "
          f"{base['latency_ms']:.4f} ms), validation accuracy {final['val_accuracy']:.4f} against "
          f"{base['val_accuracy']:.4f} ({100 * (final['val_accuracy'] - base['val_accuracy']):+.2f} points), "
          f"after {final['finetune']}")
    print(f"test accuracy (reported once): original {base['test_accuracy']:.4f}, chosen "
          f"{final['test_accuracy']:.4f} ({100 * (final['test_accuracy'] - base['test_accuracy']):+.2f} points)")
    files = ", ".join(Path(p).name for p in (final["model"], final["onnx"], final.get("int8_onnx")) if p)
    print(f"wrote {files}, candidates.md, candidates.html in {out}")


def _cmd_optimize(args: argparse.Namespace) -> None:
    from compress.optimize import OptimizeConfig, optimize

    cfg = flags.from_flags(OptimizeConfig, args, prefix="opt_")
    data = flags.data_config(args)
    analysis = flags.analysis_config(args)
    doc = optimize(args.checkpoint, data, analysis, cfg, args.out, progress=not args.quiet,
                   resume=not args.no_resume, report=not args.no_analysis_report)
    print_result(doc, args.out)


def add_commands(sub) -> None:
    """Register ``optimize`` on the CLI's subparsers."""
    from compress.optimize.config import OptimizeConfig

    p = sub.add_parser("optimize", help="meet a latency budget: analyse, build candidates (cuts, pruning, AFCC, "
                       "INT8), time them here, fine-tune the fastest that keeps the accuracy")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="the trained model (runs/x/model.pt or checkpoint.pt)")
    flags.add_flags(p.add_argument_group("budget (exactly one of --speedup, --latency-ms, --flops-ratio) and search"),
                    OptimizeConfig, prefix="opt_", rename=_RENAME)
    flags.add_data(p)
    flags.add_analysis(p)
    p.add_argument("--out", required=True, help="run folder: the chosen model, its ONNX files, candidates.md/json/html")
    p.add_argument("--no-resume", action="store_true", help="start again even if --out holds a run (its candidates "
                   "are built again and its files replaced)")
    p.add_argument("--no-analysis-report", action="store_true", help="skip the analysis report (analysis/report.html; "
                   "its artifact is written all the same)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_optimize)
