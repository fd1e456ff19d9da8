"""The ``compress`` command line: thin wrappers around :mod:`compress.pipeline`."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from compress.cli_deploy import add_commands as add_deploy_commands
from compress.errors import UserError


def _model_options(args: argparse.Namespace) -> dict:
    opts = {}
    if args.width is not None:
        opts["width"] = args.width
    if args.batch_norm is not None:
        opts["batch_norm"] = args.batch_norm
    if args.fc_hidden is not None:
        text = args.fc_hidden.strip().lower()
        try:
            opts["fc_hidden"] = [] if text in ("", "none") else [int(v) for v in text.split(",")]
        except ValueError:
            raise UserError(f"--fc-hidden {args.fc_hidden!r} must be comma-separated integers or 'none'") from None
    return opts


def _add_model(p: argparse.ArgumentParser, required: bool = False) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None if not required else "vgg16",
                   help="vgg16, vgg6, avgg16, timm:<name> or torchvision:<name> (default: from the checkpoint, else vgg16)")
    g.add_argument("--width", type=float, default=None, help="width multiplier of the own VGGs (e.g. 0.25)")
    g.add_argument("--batch-norm", dest="batch_norm", action=argparse.BooleanOptionalAction, default=None,
                   help="batch-norm after every conv (own VGGs; default on)")
    g.add_argument("--fc-hidden", default=None, help="hidden FC widths before the output layer, e.g. 4096,4096 or none")
    g.add_argument("--checkpoint", default=None, help="state dict (.pt/.pth, training checkpoint) or .safetensors")
    g.add_argument("--pretrained", action="store_true", help="timm/torchvision pretrained weights (downloads)")


def _add_data(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default="digits", help="digits (default), cifar10, cifar100 or imagefolder:<path>")
    g.add_argument("--data-root", default=None, help="folder of the torchvision CIFAR files")
    g.add_argument("--download", action="store_true", help="let torchvision download CIFAR into --data-root")
    g.add_argument("--labels", type=int, default=None, metavar="K", help="nested subset of K labels (CIFAR-K)")
    g.add_argument("--image-size", type=int, default=None, help="resize image-folder images to this size")
    g.add_argument("--limit-train", type=int, default=None, help="use a random subset of N training images")
    g.add_argument("--limit-test", type=int, default=None, help="use a random subset of N test images")


def _add_optim(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimisation (SGD, Nesterov momentum, L2)")
    g.add_argument("--epochs", type=int, default=30)
    g.add_argument("--batch-size", type=int, default=100)
    g.add_argument("--lr", type=float, default=0.028, help="learning rate of the conv layers")
    g.add_argument("--momentum", type=float, default=0.975)
    g.add_argument("--weight-decay", type=float, default=1.5e-3)
    g.add_argument("--lr-fc", type=float, default=None, help="learning rate of the FC layers (default: --lr)")
    g.add_argument("--momentum-fc", type=float, default=None)
    g.add_argument("--weight-decay-fc", type=float, default=None)
    g.add_argument("--schedule", default="step", choices=["step", "cosine", "onecycle"])
    g.add_argument("--lr-decay", type=float, default=0.6, help="q: factor applied every --lr-step epochs")
    g.add_argument("--lr-step", type=int, default=20, help="dt: epochs between decays")
    g.add_argument("--no-augment", action="store_true", help="no flip/translation augmentation")
    g.add_argument("--seed", type=int, default=0)


def _add_analysis(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("analysis")
    g.add_argument("--taps", nargs="+", default=None, help="module paths or globs (default: the model's taps)")
    g.add_argument("--threshold", type=float, default=0.3, help="clipping threshold in (0, 1)")
    g.add_argument("--probe-epochs", type=int, default=200)
    g.add_argument("--probe-lr", type=float, default=0.01)
    g.add_argument("--tolerance", type=float, default=0.5, help="plateau tolerance in accuracy points")
    g.add_argument("--feature-dtype", default="float32", choices=["float32", "float16"])
    g.add_argument("--max-memory-gb", type=float, default=4.0, help="larger feature caches go to disk")
    g.add_argument("--cache-dir", default=None, help="folder for on-disk feature caches")
    g.add_argument("--tap-pool", type=int, default=None, metavar="K",
                   help="average-pool every tap KxK, stride K, before its probe (the paper used 7 at 224x224)")
    if "--seed" not in p._option_string_actions:  # shared with the optimisation options
        g.add_argument("--seed", type=int, default=0)


def _specs(args: argparse.Namespace):
    from compress.pipeline import DataSpec, ModelSpec

    model = ModelSpec(args.model or ("" if args.checkpoint else "vgg16"), _model_options(args), args.checkpoint,
                      args.pretrained)
    data = DataSpec(args.data, args.data_root, args.download, args.labels, 0, args.image_size, args.limit_train,
                    args.limit_test)
    return model, data


def _train_config(args: argparse.Namespace):
    from compress.training import TrainConfig

    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                       weight_decay=args.weight_decay, lr_fc=args.lr_fc, momentum_fc=args.momentum_fc,
                       weight_decay_fc=args.weight_decay_fc, schedule=args.schedule, lr_decay=args.lr_decay,
                       lr_step=args.lr_step, augment=not args.no_augment, seed=args.seed)


def _cmd_cifar_k(args: argparse.Namespace) -> None:
    from compress.experiments import run_label_scaling

    model, data = _specs(args)
    if not model.name:
        model = type(model)("vgg16", model.options, None, model.pretrained)
    summary = run_label_scaling(model, data, args.ks, _train_config(args), _analysis_config(args), args.out,
                                progress=not args.quiet)
    print(f"{'K':>4}{'plateau':>18}{'N_f':>6}{'accuracy':>10}{'n':>8}{'N_c':>7}{'C_s':>7}")
    for r in summary["rows"]:
        print(f"{r['K']:>4}{r['plateau']:>18}{r['N_f']:>6}{r['accuracy']:>10.4f}{r['n']:>8.2f}{r['N_c']:>7.2f}"
              f"{r['C_s']:>7.2f}")
    if summary["fit"]:
        f = summary["fit"]
        print(f"error = {f['slope']:.5f} K + {f['intercept']:.4f}  (R^2 {f['r2']:.3f})")
    print(f"report: {Path(args.out) / 'report.html'}")


def _cmd_train(args: argparse.Namespace) -> None:
    from compress.pipeline import train
    from compress.training import TrainConfig

    model, data = _specs(args)
    if not model.name:
        model = type(model)("vgg16", model.options, model.checkpoint, model.pretrained)
    _, history, _ = train(model, data, _train_config(args), args.out, resume=not args.no_resume,
                          progress=not args.quiet)
    if history:
        print(f"trained {model.name}: test accuracy {history[-1]['test_acc']:.4f} after {history[-1]['epoch']} epochs; "
              f"checkpoint {Path(args.out) / 'checkpoint.pt'}")


def _analysis_config(args: argparse.Namespace):
    from compress.analysis import AnalysisConfig

    return AnalysisConfig(threshold=args.threshold, probe_epochs=args.probe_epochs, probe_lr=args.probe_lr,
                          plateau_tolerance=args.tolerance, feature_dtype=args.feature_dtype,
                          max_memory_gb=args.max_memory_gb, cache_dir=args.cache_dir, tap_pool=args.tap_pool,
                          seed=args.seed)


def _print_result(result, out) -> None:
    print(f"{'tap':<24}{'N_f':>6}{'F_s':>7}{'acc':>8}{'n':>8}{'N_c':>7}{'C_s':>7}")
    for t in result.taps:
        mark = "  <- plateau" if t.name == result.plateau else ""
        print(f"{t.name:<24}{t.n_filters:>6}{t.filter_size:>7}{t.accuracy:>8.4f}{t.stats.noise:>8.2f}"
              f"{t.stats.clusters_per_filter:>7.2f}{t.stats.cluster_size:>7.2f}{mark}")
    print(f"report: {Path(out) / 'report.html'}")


def _cmd_analyze(args: argparse.Namespace) -> None:
    from compress.pipeline import analyze

    model, data = _specs(args)
    result = analyze(model, data, _analysis_config(args), args.out, taps=args.taps, progress=not args.quiet)
    _print_result(result, args.out)


def _cmd_taps(args: argparse.Namespace) -> None:
    from compress.models import create_model, default_taps, tap_shapes

    model = create_model(args.model_name, num_classes=args.num_classes, img_size=args.img_size,
                         **_model_options(args))
    size = (3, args.img_size, args.img_size)
    names = [n for n, _ in model.named_modules() if n] if args.all else default_taps(model, size)
    shapes = tap_shapes(model, names, size)
    width = max((len(n) for n in names), default=10) + 2
    for n in names:
        if n in shapes:
            print(f"{n:<{width}}{'x'.join(str(s) for s in shapes[n])}")


def _cmd_report(args: argparse.Namespace) -> None:
    from compress.analysis import load_analysis
    from compress.report import write_report

    paths = write_report(load_analysis(args.run), args.run)
    print(f"report: {paths['html']}")


def _print_run(summary: dict, out) -> None:
    base = summary["steps"][0]["after"]
    print(f"{'step':<14}{'params':>12}{'non-zero':>12}{'FLOPs':>14}{'accuracy':>10}")
    for r in summary["steps"]:
        a = r["after"]
        print(f"{r['step']:<14}{a['params']:>12,}{a['nonzero_params']:>12,}{a['flops']:>14,}{a['accuracy']:>10.4f}")
    last = summary["steps"][-1]["after"]
    print(f"FLOPs x{base['flops'] / max(last['flops'], 1):.2f} fewer, non-zero parameters "
          f"x{base['nonzero_params'] / max(last['nonzero_params'], 1):.2f} fewer, accuracy "
          f"{100 * (last['accuracy'] - base['accuracy']):+.2f} points")
    print(f"report: {Path(out) / 'report.html'}   analysis: {Path(out) / 'analysis' / 'report.html'}")


def _cmd_run(args: argparse.Namespace) -> None:
    from compress.recipes import load_recipe
    from compress.runner import run_recipe

    recipe = load_recipe(args.recipe, args.set)
    if args.dry_run:
        from compress.runner import dry_run

        plan = dry_run(recipe)
        print(f"recipe {recipe.name!r} is valid: {plan['model']} ({plan['params']:,} parameters, input "
              f"{'x'.join(map(str, plan['input_size']))}) took a training step on the CPU; steps: "
              f"{' -> '.join(plan['steps'])}")
        return
    out = args.out or str(Path("runs") / recipe.name)
    _print_run(run_recipe(recipe, out, progress=not args.quiet), out)


def _cmd_demo(args: argparse.Namespace) -> None:
    from importlib.resources import files

    from compress.recipes import load_recipe
    from compress.runner import run_recipe

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "digits-demo.yaml"
        path.write_text(files("compress").joinpath("demo_recipe.yaml").read_text())
        recipe = load_recipe(path, args.set)
    _print_run(run_recipe(recipe, args.out, progress=not args.quiet), args.out)


def build_parser() -> argparse.ArgumentParser:
    from compress._version import __version__

    parser = argparse.ArgumentParser(prog="compress", description=(
        "Look inside a trained image classifier: probe every stage, find each filter's label clusters, "
        "and report which layers and filters do real work. With no command, runs the demo on the embedded digits."))
    parser.add_argument("--version", action="version", version=f"compress {__version__}")
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("demo", help="the main job on the embedded digits: train, analyse, compress, export, benchmark")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("run", help="run a compression recipe (YAML): analyse, compress, fine-tune, export, bench")
    p.add_argument("recipe", help="recipe file, e.g. recipes/digits-demo.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value, e.g. --set model.train.epochs=2 --set steps.0.trim.tap=last")
    p.add_argument("--out", default=None, help="run folder (default runs/<recipe name>)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, build the model and take one training step on random data, then stop")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("train", help="phase 1: train a model, a checkpoint each epoch, resumable")
    _add_model(p)
    _add_data(p)
    _add_optim(p)
    p.add_argument("--out", required=True, help="run folder (checkpoint.pt, history.json, config.yaml)")
    p.add_argument("--no-resume", action="store_true", help="start again even if a checkpoint exists")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("analyze", help="phases 2-3: probes per tap, filter clusters, noise, SNR, report")
    _add_model(p)
    _add_data(p)
    _add_analysis(p)
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_analyze)

    p = sub.add_parser("cifar-k", help="train and analyse on nested K-label subsets; error at the plateau against K")
    _add_model(p)
    _add_data(p)
    p.add_argument("--ks", type=int, nargs="+", default=[3, 6, 8, 10], help="numbers of labels (nested subsets)")
    _add_optim(p)
    _add_analysis(p)
    p.add_argument("--out", required=True, help="folder: K<k>/train, K<k>/analysis, cifar_k.json, report")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_cifar_k)

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
    add_deploy_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``compress`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv or ["demo"])
    from compress import distributed

    try:
        with distributed.cli_session(args):  # under torchrun: join the group; ranks > 0 stay quiet
            args.func(args)
    except UserError as e:
        if distributed.is_main():
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished epochs are checkpointed, run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
