"""The commands ``train``, ``analyze``, ``cifar-k``, ``taps`` and ``report``: thin calls into
:mod:`compress.jobs`, :mod:`compress.models` and :mod:`compress.reports`."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from compress.cli import flags

__all__ = ["add_commands"]


def _cmd_train(args: argparse.Namespace) -> None:
    from compress.jobs import train

    model = dataclasses.replace(flags.model_config(args), name=args.model_name or "vgg16")
    from compress.training import evaluate

    trained, history, bundle = train(model, flags.data_config(args), flags.train_config(args), args.out,
                                     resume=not args.no_resume, progress=not args.quiet)
    if history:
        last = history[-1]
        val = f"validation accuracy {last['val_acc']:.4f}, " if "val_acc" in last else ""
        print(f"trained {model.name} for {last['epoch']} epochs: {val}test accuracy {evaluate(trained, bundle):.4f}; "
              f"checkpoint {Path(args.out) / 'checkpoint.pt'}")


def _print_result(result, out) -> None:
    print(f"{'tap':<24}{'N_f':>6}{'F_s':>7}{'acc':>8}{'n':>8}{'N_c':>7}{'C_s':>7}")
    for t in result.taps:
        mark = "  <- plateau" if t.name == result.plateau else ""
        print(f"{t.name:<24}{t.n_filters:>6}{t.filter_size:>7}{t.accuracy:>8.4f}{t.stats.noise:>8.2f}"
              f"{t.stats.clusters_per_filter:>7.2f}{t.stats.cluster_size:>7.2f}{mark}")
    if result.config.get("split_note"):
        print(result.config["split_note"])
    print(f"report: {Path(out) / 'report.html'}")


def _cmd_analyze(args: argparse.Namespace) -> None:
    from compress.jobs import analyze

    result = analyze(flags.model_config(args), flags.data_config(args), flags.analysis_config(args), args.out,
                     progress=not args.quiet)
    _print_result(result, args.out)


def _cmd_cifar_k(args: argparse.Namespace) -> None:
    from compress.jobs import run_label_scaling

    model = dataclasses.replace(flags.model_config(args), name=args.model_name or "vgg16",
                                checkpoint=args.model_checkpoint if args.model_name else None)
    for k in args.ks:
        if k < 1:
            from compress.errors import UserError

            raise UserError(f"--ks {k}: every K must be a positive number of labels, e.g. --ks 3 6 8 10")
    summary = run_label_scaling(model, flags.data_config(args), args.ks, flags.train_config(args),
                                flags.analysis_config(args), args.out, tap=args.tap, draws=args.draws,
                                resume=not args.no_resume, progress=not args.quiet)
    spread = args.draws > 1
    w = max([18] + [len(r["tap"]) + 2 for r in summary["rows"]])
    print(f"{'K':>4}{'tap':>{w}}{'N_f':>6}{'accuracy':>10}{'+-':>8}{'n':>8}{'N_c':>7}{'C_s':>7}" if spread else
          f"{'K':>4}{'tap':>{w}}{'N_f':>6}{'accuracy':>10}{'n':>8}{'N_c':>7}{'C_s':>7}")
    for r in summary["rows"]:
        std = f"{r['std']['accuracy']:>8.4f}" if spread and r["std"]["accuracy"] is not None else (
            f"{'-':>8}" if spread else "")
        print(f"{r['K']:>4}{r['tap']:>{w}}{r['N_f']:>6}{r['accuracy']:>10.4f}{std}{r['n']:>8.2f}{r['N_c']:>7.2f}"
              f"{r['C_s']:>7.2f}")
    if summary["fit"]:
        f = summary["fit"]
        print(f"error = {f['slope']:.5f} K + {f['intercept']:.4f}  (R^2 {f['r2']:.3f})"
              + (f"; mean of {args.draws} draws per K" if spread else ""))
    print(f"report: {Path(args.out) / 'report.html'}")


def _cmd_taps(args: argparse.Namespace) -> None:
    from compress.checks import MAX_CLASSES, MAX_IMAGE_SIDE
    from compress.errors import UserError
    from compress.models import create_model, default_taps, tap_shapes

    if not 1 <= args.num_classes <= MAX_CLASSES:
        raise UserError(f"--num-classes {args.num_classes}: must be from 1 to {MAX_CLASSES}")
    if not 1 <= args.img_size <= MAX_IMAGE_SIDE:
        raise UserError(f"--img-size {args.img_size}: must be from 1 to {MAX_IMAGE_SIDE}")

    model = create_model(args.model_name, num_classes=args.num_classes, img_size=args.img_size,
                         **flags.model_options(args))
    size = (3, args.img_size, args.img_size)
    names = [n for n, _ in model.named_modules() if n] if args.all else default_taps(model, size)
    shapes = tap_shapes(model, names, size)
    width = max((len(n) for n in names), default=10) + 2
    for n in names:
        if n in shapes:
            print(f"{n:<{width}}{'x'.join(str(s) for s in shapes[n])}")


def _cmd_report(args: argparse.Namespace) -> None:
    import zipfile

    from compress.analysis import load_analysis
    from compress.errors import UserError, clip, shorten
    from compress.reports.analysis import write_report

    try:
        result = load_analysis(args.run)
    except UserError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"the analysis in {shorten(args.run)} cannot be read ({type(e).__name__}: "
                        f"{clip(str(e), 120)}); its analysis.json or arrays/ are truncated or damaged: run "
                        f"`compress analyze` again") from None
    from compress.io import run_folder_lock

    with run_folder_lock(args.run):
        paths = write_report(result, args.run)
    print(f"report: {paths['html']}")


def add_commands(sub) -> None:
    """Register ``train``, ``analyze``, ``cifar-k``, ``taps`` and ``report`` on the CLI's subparsers."""
    p = sub.add_parser("train", help="phase 1: train a model, a checkpoint each epoch, resumable")
    flags.add_model(p)
    flags.add_data(p)
    flags.add_train(p)
    p.add_argument("--out", required=True, help="run folder (checkpoint.pt, history.json, config.yaml)")
    p.add_argument("--no-resume", action="store_true", help="start again even if a checkpoint exists")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_train, distributed=True)

    p = sub.add_parser("analyze", help="phases 2-3: probes per tap, filter clusters, noise, SNR, report")
    flags.add_model(p)
    flags.add_data(p)
    flags.add_analysis(p)
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_analyze, distributed=True)

    p = sub.add_parser("cifar-k", help="train and analyse on nested K-label subsets; error at the plateau against K")
    flags.add_model(p)
    flags.add_data(p)
    p.add_argument("--ks", type=int, nargs="+", default=[3, 6, 8, 10], help="numbers of labels (nested subsets)")
    p.add_argument("--tap", default="auto",
                   help="the tap the error is read at: auto (the second paper's layer 10, features.pool10, where the "
                        "model has that tap, as VGG-16; the plateau otherwise), plateau (each analysis' own plateau), "
                        "or a tap name among the analysed ones (default: auto)")
    p.add_argument("--draws", type=int, default=1, metavar="N",
                   help="draws of labels per K, each with its own label seed (label seed + d) and training seed "
                        "(seed + d); the table gives their mean and standard deviation (the paper: 5; default: 1)")
    flags.add_train(p)
    flags.add_analysis(p)
    p.add_argument("--out", required=True, help="folder: K<k>/train, K<k>/analysis, cifar_k.json, report")
    p.add_argument("--no-resume", action="store_true", help="train every K again even if its checkpoint exists")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_cifar_k, distributed=True)

    p = sub.add_parser("taps", help="list a model's taps with their output shapes")
    p.add_argument("model_name", metavar="MODEL")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--width", type=float, default=None)
    p.add_argument("--batch-norm", dest="batch_norm", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--fc-hidden", default=None)
    p.add_argument("--all", action="store_true", help="every module, not only the default taps")
    p.set_defaults(func=_cmd_taps)

    p = sub.add_parser("report", help="write report.md and report.html again from a run folder")
    p.add_argument("run", help="folder holding analysis.json")
    p.set_defaults(func=_cmd_report)
