"""The commands ``run`` (a recipe) and ``demo`` (the shipped recipe on the embedded digits), and
``steps`` (every recipe step with its options)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

__all__ = ["add_commands"]


def _print_run(summary: dict, out) -> None:
    steps = summary["steps"]
    base, last = steps[0]["after"], steps[-1]["after"]
    split = {"val": "val acc", "test": "test acc"}[base.get("split", "test")]
    print(f"{'step':<14}{'params':>12}{'non-zero':>12}{'FLOPs':>14}{split:>10}")
    for r in steps:
        a = r["after"]
        print(f"{r['step']:<14}{a['params']:>12,}{a['nonzero_params']:>12,}{a['flops']:>14,}{a['accuracy']:>10.4f}")
    print(f"FLOPs x{base['flops'] / max(last['flops'], 1):.2f} fewer, non-zero parameters "
          f"x{base['nonzero_params'] / max(last['nonzero_params'], 1):.2f} fewer, {split[:-4]} accuracy "
          f"{100 * (last['accuracy'] - base['accuracy']):+.2f} points")
    t0, t1 = steps[0].get("test_accuracy"), steps[-1].get("test_accuracy")
    if t0 is not None and t1 is not None:
        print(f"test accuracy (reported once per model): original {t0:.4f}, final {t1:.4f} "
              f"({100 * (t1 - t0):+.2f} points)")
    print(f"report: {Path(out) / 'report.html'}   analysis: {Path(out) / 'analysis' / 'report.html'}")


def _cmd_run(args: argparse.Namespace) -> None:
    from compress.recipe import load_recipe
    from compress.recipe.runner import dry_run, run_recipe

    recipe = load_recipe(args.recipe, args.set)
    if args.dry_run:
        plan = dry_run(recipe)
        print(f"recipe {recipe.name!r} is valid: {plan['model']} ({plan['params']:,} parameters, input "
              f"{'x'.join(map(str, plan['input_size']))}) took a training step on the CPU; steps: "
              f"{' -> '.join(plan['steps'])}")
        return
    out = args.out or str(Path("runs") / recipe.name)
    summary = run_recipe(recipe, out, progress=not args.quiet, resume=not args.no_resume)
    if recipe.target is not None:
        from compress.cli.optimize import print_result

        print_result(summary["optimize"], str(Path(out) / "optimize"))
        return
    _print_run(summary, out)


def _cmd_demo(args: argparse.Namespace) -> None:
    from importlib.resources import files

    from compress.recipe import load_recipe
    from compress.recipe.runner import run_recipe

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "digits-demo.yaml"
        path.write_text(files("compress").joinpath("demo_recipe.yaml").read_text())
        recipe = load_recipe(path, args.set)
    _print_run(run_recipe(recipe, args.out, progress=not args.quiet, resume=not args.no_resume), args.out)


def _cmd_steps(args: argparse.Namespace) -> None:
    from compress.recipe.docs import steps_markdown

    print(steps_markdown(), end="")


_NO_RESUME = ("start the run again even if --out holds one (of this or another recipe): its checkpoints are "
              "not continued and its files are replaced")


def add_commands(sub) -> None:
    """Register ``demo``, ``run`` and ``steps`` on the CLI's subparsers."""
    p = sub.add_parser("demo", help="the main job on the embedded digits: train, analyse, compress, export, benchmark")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    p.add_argument("--no-resume", action="store_true", help=_NO_RESUME)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_demo, distributed=True)

    p = sub.add_parser("run", help="run a compression recipe (YAML): analyse, compress, fine-tune, export, bench")
    p.add_argument("recipe", help="recipe file, e.g. recipes/digits-demo.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value, e.g. --set model.train.epochs=2 --set steps.0.trim.tap=last")
    p.add_argument("--out", default=None, help="run folder (default runs/<recipe name>)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, build the model and take one training step on random data, then stop")
    p.add_argument("--no-resume", action="store_true", help=_NO_RESUME)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_run, distributed=True)

    p = sub.add_parser("steps", help="list every recipe step with its options, defaults and meaning (Markdown)")
    p.set_defaults(func=_cmd_steps)
