"""Real CIFAR-10 head to head: the mechanism's recipes against Torch-Pruning's criteria at equal budgets.

From the trained base model (``benchmarks/train_cifar10_base.py``) it runs the full analysis
(probes at the papers' taps on the whole training set, plus the ReLU after every other conv so
that each conv has cluster statistics), builds every variant from a fresh copy of the base,
fine-tunes each with one fixed budget, and times all of them interleaved in one onnxruntime
process. Variants:

- the recipes: ``trim`` (at the plateau, probe as head), ``dilute`` (the plateau conv by label
  coverage), ``afcc`` (at the plateau, head+stage fine-tune), ``trim+dilute+afcc``;
- ``mechanism-multi``: trim at the plateau, then every conv pruned by cluster coverage (the
  ``prune`` step's ``coverage`` criterion) through Torch-Pruning to ``--flops-target`` of the base
  FLOPs;
- ``coverage@flops``: the coverage criterion alone on the untrimmed model, same FLOPs (a control
  with the baselines' architecture);
- ``<criterion>@flops`` / ``<criterion>@params``: Torch-Pruning's L1, Taylor, BN-scale and random
  criteria pruned to mechanism-multi's FLOPs / parameter count;
- ``<criterion>@latency``: the same criteria pruned to the batch-1 onnxruntime latency of
  ``--latency-reference`` (a mechanism variant built first), bisecting on the latency measured on
  this machine (``cifar10_headtohead_latency.py``).

Every choice (the plateau, clusters, masks, pruning targets, the latency bisection) is made on a
validation split held out of the training images (``--val-fraction``, default 0.1; 0 restores the
old setting, choices on the test split); the test split only reports, once per model, in the bench.
Fine-tuning distils from the base (``--distill T ALPHA``, default 4 0.9; ``--no-distill``); ``--int8``
adds an onnxruntime static INT8 file of every model to the bench.

Each variant is saved under ``--out/models/<name>/`` and skipped when its ``model.pt`` exists, so
the run can be split (``--variants``) and resumed. Results: ``--results/<tag>.md``, ``.png``,
``.txt`` (everything printed) and ``<tag>_analysis/`` (the analysis report without arrays).

    python benchmarks/cifar10_headtohead.py --threads 1 --finetune-epochs 3 --probe-epochs 30 --bench-repeats 100
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from compress.analysis import AnalysisConfig, AnalysisResult, analyze_model, load_analysis
from compress.analysis.stats import find_plateau
from compress.compression.dilute import coverage, filter_scores, find_tap_conv, rank_filters
from compress.compression.serialize import load_model, save_model
from compress.data import DataConfig, iterate_batches, load_data
from compress.deploy.bench import BenchResult, run_bench
from compress.jobs import analyze
from compress.models import ModelConfig
from compress.recipe import Recipe, RecipeModel, Step
from compress.recipe.state import RunState, measure
from compress.recipe.steps.afcc import Afcc
from compress.recipe.steps.dilute import Dilute
from compress.recipe.steps.finetune import Finetune
from compress.recipe.steps.prune import Prune
from compress.recipe.steps.trim import Trim
from compress.reports.bench import write_bench_report
from compress.system import environment

from cifar10_headtohead_latency import LatencyBudget  # noqa: E402  (next to this script)
from cifar10_headtohead_report import write_results  # noqa: E402
from compress.distill import DistillConfig


CRITERIA = ["l1", "taylor", "bn-scale", "random"]
MECHANISM = ["trim", "dilute", "afcc", "trim+dilute+afcc", "trim-conv", "trim-conv+dilute+afcc", "mechanism-multi",
             "mechanism-multi-r8", "coverage@flops"]
FINE = ("trim-conv",)  # variants planned on the per-conv analysis (plateau among every conv from the stage before)
VARIANTS = MECHANISM + [f"{c}@{m}" for m in ("flops", "params", "latency") for c in CRITERIA]


class Log:
    """print() that also appends to this invocation's log (all logs become the results' .txt)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, *parts: Any) -> None:
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def fmt(m: dict[str, float]) -> str:
    return f"params {m['params']:,}  FLOPs {m['flops']:,}  accuracy {m['accuracy']:.4f}"


def choices(args, bundle):
    """The data every choice is made on: its ``test`` is the validation split (``--val-fraction 0``: the test
    split, the old setting)."""
    return bundle.for_choices("val" if args.val_fraction else "test")


def subset(bundle, n: int | None, seed: int = 0):
    """The same fixed random ``n`` training images for every model (``None``: all)."""
    if n is None or n >= len(bundle.train):
        return bundle
    idx = torch.randperm(len(bundle.train), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return dataclasses.replace(bundle, train=bundle.train.subset(idx))


@torch.inference_mode()
def per_label_accuracy(model: nn.Module, bundle) -> list[float]:
    model.eval()
    k = bundle.num_classes
    hit, total = torch.zeros(k), torch.zeros(k)
    for x, y in iterate_batches(bundle, bundle.test, 500, device=next(model.parameters()).device):
        hit += torch.bincount(y[model(x).argmax(1) == y], minlength=k).float()
        total += torch.bincount(y, minlength=k).float()
    return (hit / total.clamp(min=1)).tolist()


# ------------------------------------------------------------------------------------ analysis


def run_analysis(args, base: Path, model: nn.Module, meta: dict, bundle, log: Log):
    """The papers' analysis (default taps, full training set) and one ReLU tap for every other conv."""
    cfg = AnalysisConfig(probe_epochs=args.probe_epochs, feature_dtype="float16")
    folder = args.out / "analysis"
    t0 = time.perf_counter()
    if (folder / "analysis.json").is_file():
        main = load_analysis(folder)
    else:
        model_cfg = ModelConfig(meta["model"], dict(meta.get("options", {})), str(base))
        main = analyze(model_cfg, DataConfig(f"imagefolder:{args.data_dir}", val_fraction=args.val_fraction), cfg,
                       folder, model=model, bundle=bundle, progress=False)
    have = {find_tap_conv(model, t.name) for t in main.taps}
    taps = [n.replace("conv", "relu") for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n not in have]
    folder = args.out / "analysis-convs"
    if (folder / "analysis.json").is_file():
        extra = load_analysis(folder)
    else:
        extra = analyze_model(model, subset(choices(args, bundle), args.conv_stats_train), taps, cfg,
                              model_name=meta["model"], progress=False)
        extra.save(folder)
    log(f"analysis: plateau {main.plateau}; probe accuracy per tap "
        + ", ".join(f"{t.name} {t.accuracy:.4f}" for t in main.taps) + f"  ({time.perf_counter() - t0:.0f} s)")
    log("conv statistics: " + ", ".join(f"{t.name} acc {t.accuracy:.3f} n {t.stats.noise:.2f}" for t in extra.taps))
    stats = {find_tap_conv(model, t.name): t for t in [*main.taps, *extra.taps]}
    return main, extra, stats


def fine_analysis(args, model: nn.Module, meta: dict, main, bundle, log: Log):
    """The plateau at conv granularity: one ReLU tap for every conv from the stage before ``main``'s plateau on
    (probes on the full training set, like the pooling taps), merged with ``main``'s taps in network order and
    the plateau found again among them with the same tolerance. What a user gets by listing those taps in a
    recipe's ``analysis.taps``."""
    order = [n for n, _ in model.named_modules()]
    names = [t.name for t in main.taps]
    p = names.index(main.plateau)
    start = order.index(names[p - 1]) if p else 0
    have = {find_tap_conv(model, t.name) for t in main.taps}
    taps = [n.replace("conv", "relu") for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and n not in have and order.index(n) > start]
    folder = args.out / "analysis-deep"
    t0 = time.perf_counter()
    if (folder / "analysis.json").is_file():
        deep = load_analysis(folder)
    else:
        cfg = AnalysisConfig(probe_epochs=args.probe_epochs, feature_dtype="float16")
        deep = analyze_model(model, choices(args, bundle), taps, cfg, model_name=meta["model"], progress=False)
        deep.save(folder)
    merged = sorted([*main.taps, *deep.taps], key=lambda t: order.index(t.name))
    plateau = merged[find_plateau([t.accuracy for t in merged], main.plateau_tolerance)].name
    log(f"per-conv analysis: plateau {plateau}; probe accuracy per tap "
        + ", ".join(f"{t.name} {t.accuracy:.4f}" for t in merged) + f"  ({time.perf_counter() - t0:.0f} s)")
    return dataclasses.replace(main, taps=merged, plateau=plateau)


# ------------------------------------------------------------------------------------ variants


def fresh_state(args, base: Path, bundle, analysis: AnalysisResult, folder: Path) -> RunState:
    """A run state on a fresh copy of the base; ``bundle`` is the data choices are made on (validation as its
    ``test``); the base is the teacher of distillation."""
    model, meta = load_model(base)
    model.train()
    recipe = Recipe("cifar10-headtohead", RecipeModel(meta["model"], dict(meta["options"]), str(base)),
                    DataConfig(f"imagefolder:{args.data_dir}", val_fraction=args.val_fraction),
                    AnalysisConfig(probe_epochs=args.probe_epochs, feature_dtype="float16"), ())
    state = RunState(recipe, model, bundle, meta, copy.deepcopy(analysis), folder, progress=False)
    state.models["original"] = str(base)
    return state


@dataclasses.dataclass(frozen=True)
class Budget:
    """A ``prune`` step to an absolute FLOPs or parameter count (the ``prune`` step's own target is a fraction
    of the model it gets, known only once the steps before it have run)."""

    criterion: str
    target: float
    metric: str
    round_to: int | None
    name = "prune"

    def run(self, state: RunState, folder: Path, args) -> dict[str, Any]:
        now = measure(state.model, state.bundle)[self.metric]
        if now <= self.target * (1 + args.tol):  # e.g. trimming alone already reached mechanism-multi's target
            return {"skipped": f"{self.metric} {now:,} already within the target {self.target:,.0f}"}
        step = Prune(criterion=self.criterion, target=self.target / now, metric=self.metric, tolerance=args.tol,
                     round_to=self.round_to, min_coverage=args.min_coverage if self.criterion == "coverage" else 1,
                     gradient_batches=args.taylor_batches)
        return step.run(state, folder)


def plan(name: str, args, targets: dict | None) -> list[Step | Budget]:
    """The steps of a variant: recipe steps, and :class:`Budget` for pruning to mechanism-multi's budgets. The
    coverage criterion reads the clusters of every tap of the state's analysis (:func:`analysis_for`)."""
    distill = DistillConfig(temperature=args.distill[0], alpha=args.distill[1]) if args.distill else None
    budget = Finetune(epochs=args.finetune_epochs, lr=args.finetune_lr, momentum=0.9, weight_decay=5e-4,
                      schedule="cosine", seed=getattr(args, "seed", 0), distill=distill)
    trim = Trim("plateau")
    dilute = Dilute(tap="plateau", target=args.dilute_target, min_coverage=args.min_coverage)
    plans = {
        "trim": [trim, budget],
        "trim-conv": [trim, budget],
        "trim-conv+dilute+afcc": [trim, dilute, Afcc(tap="plateau", train="all", finetune=budget)],
        "dilute": [dilute, budget],
        "afcc": [Afcc(tap="plateau", train="head+stage", finetune=budget)],
        "trim+dilute+afcc": [trim, dilute, Afcc(tap="plateau", train="all", finetune=budget)],
    }
    if name in plans:
        return plans[name]
    if name.startswith("mechanism-multi"):  # -r8: widths multiples of 8 (faster kernels, coarser FLOPs)
        target = args.flops_target * targets["base_flops"]
        return [trim, Budget("coverage", target, "flops", 8 if name.endswith("r8") else args.round_to), budget]
    criterion, metric = name.split("@")
    if metric == "latency":
        reference = variant_folder(args, args.latency_reference) / "model.pt"
        if not reference.is_file():
            raise SystemExit(f"error: {name} is pruned to the latency of {args.latency_reference}, which is not built "
                             f"yet ({reference}); build it first (--variants {args.latency_reference} ...)")
        shared = args.out / "latency" / f"{args.latency_reference}-r{args.latency_round_to or 1}.json"
        return [LatencyBudget(criterion, reference, shared), budget]
    return [Budget(criterion, targets[metric], metric, args.round_to), budget]


def analysis_for(name: str, analyses: dict[str, AnalysisResult]) -> AnalysisResult:
    """The analysis a variant starts from: the per-conv plateau for the FINE variants; for those pruned by
    cluster coverage the papers' taps and one ReLU tap per other conv (every conv has statistics); else the
    papers' taps."""
    if name.startswith(FINE):
        return analyses["fine"]
    if name.startswith("mechanism-multi") or name.startswith("coverage@"):
        return analyses["convs"]
    return analyses["main"]


def apply_steps(state: RunState, steps: list[Step | Budget], args, log: Log) -> list[dict[str, Any]]:
    records = []
    for i, step in enumerate(steps, start=1):
        t0 = time.perf_counter()
        folder = state.out / "steps" / f"{i:02d}-{step.name}"
        if isinstance(step, (Budget, LatencyBudget)):
            info = step.run(state, folder, args)
        else:
            info = step.run(state, folder) or {}
        step = step.name
        for p in state.model.parameters():
            p.requires_grad_(True)
        after = measure(state.model, state.bundle)
        seconds = time.perf_counter() - t0
        log(f"  {step:9s} {fmt(after)}  ({seconds:.0f} s)")
        records.append({"step": step, "info": info, "after": after, "seconds": seconds})
    return records


def mechanism_targets(args, base: Path, bundle, analyses: dict[str, AnalysisResult], log: Log) -> dict[str, Any]:
    """FLOPs and parameters of mechanism-multi (trimmed, coverage-pruned): the baselines' budgets."""
    path = args.out / "targets.json"
    if path.is_file():
        targets = json.loads(path.read_text())
        if (targets["flops_target"], targets["round_to"]) != (args.flops_target, args.round_to):
            raise SystemExit(f"error: {path} was made with --flops-target {targets['flops_target']} --round-to "
                             f"{targets['round_to']}; use those or remove it (and the variants built on it)")
        return targets
    state = fresh_state(args, base, bundle, analysis_for("mechanism-multi", analyses), args.out / "targets")
    base_m = measure(state.model, bundle)
    log(f"base: {fmt(base_m)}")
    targets = {"base_flops": base_m["flops"], "base_params": base_m["params"], "base_accuracy": base_m["accuracy"],
               "flops_target": args.flops_target, "round_to": args.round_to}
    log("mechanism-multi structure (for the targets):")
    apply_steps(state, plan("mechanism-multi", args, targets)[:2], args, log)
    targets.update(flops=measure(state.model, bundle)["flops"], params=sum(p.numel() for p in state.model.parameters()))
    path.write_text(json.dumps(targets, indent=2))
    return targets


def variant_folder(args, name: str, seed: int = 0) -> Path:
    folder = args.out / "models" / name.replace("@", "-at-").replace("+", "-")
    return folder / f"seed{seed}" if seed else folder


def build_variant(name: str, args, base: Path, bundle, analyses: dict[str, AnalysisResult], stats, targets, log: Log,
                  seed: int = 0, report=None) -> None:
    """Build ``name`` (its steps, then ``info.json`` + ``model.pt``); ``seed`` != 0: the same steps with
    another fine-tuning seed, in a ``seed<N>`` sub-folder (the seed spread of the candidates)."""
    folder = variant_folder(args, name, seed)
    args = argparse.Namespace(**{**vars(args), "seed": seed})
    if (folder / "model.pt").is_file():
        log(f"{name}: done before ({folder / 'model.pt'})")
        return
    if not claim(folder / "building.lock"):
        log(f"{name}: being built by another process; skipped")
        return
    try:
        log(f"{name}:" + (f" (fine-tuning seed {seed})" if seed else ""))
        torch.manual_seed(seed)
        state = fresh_state(args, base, bundle, analysis_for(name, analyses), folder)
        records = apply_steps(state, plan(name, args, targets), args, log)
        save_info(name, args, state, records, stats, report or bundle, folder)
    finally:
        (folder / "building.lock").unlink(missing_ok=True)


def claim(lock: Path) -> bool:
    """Take ``lock`` for this process (two processes may share the variant list); a dead owner's lock is taken over."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            os.kill(int(lock.read_text() or 0), 0)
            return False
        except (ProcessLookupError, ValueError):
            lock.unlink(missing_ok=True)
            return claim(lock)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def save_info(name: str, args, state: RunState, records: list, stats: dict, bundle, folder: Path) -> None:
    """``info.json`` (steps with validation accuracies, per-label test accuracy) and ``model.pt``."""
    doc = {"name": name, "steps": records, "per_label_accuracy": per_label_accuracy(state.model, bundle),
           "test_accuracy": measure(state.model, bundle)["accuracy"],
           "transforms": [t.get("kind") for t in getattr(state.model, "compress_transforms", [])]}
    if name.startswith("mechanism-multi"):  # which labels each pruned conv still covers (cluster statistics)
        doc["coverage"] = {}
        for step in records:
            for conv, width in step["info"].get("widths", {}).items():
                if conv in stats:
                    kept = rank_filters(stats[conv].cluster_ids, filter_scores(stats[conv]),
                                        min_coverage=args.min_coverage)[:width]
                    doc["coverage"][conv] = {"kept": width, "of": stats[conv].n_filters,
                                             "noise": stats[conv].stats.noise,
                                             "no_cluster": stats[conv].stats.filters_without_cluster,
                                             "per_label": coverage(stats[conv].cluster_ids, kept).tolist()}
    (folder / "info.json").write_text(json.dumps(doc, indent=2, default=str))
    save_model(state.model, folder / "model.pt", state.meta)


def layer_sensitivity(base: Path, bundle, stats: dict, widths: dict[str, int], *, min_coverage: int = 1,
                      n_test: int = 2000) -> list[list[str]]:
    """Accuracy of the base with ONE conv pruned to mechanism-multi's width, the filters kept chosen by
    cluster coverage or by Torch-Pruning's group L1 (no fine-tuning, the first ``n_test`` test images)."""
    import torch_pruning as tp

    from compress.compression.dilute import dilute
    from compress.training import evaluate

    small = dataclasses.replace(bundle, test=bundle.test.subset(torch.arange(min(n_test, len(bundle.test)))))
    full = f"{100 * evaluate(load_model(base)[0], small):.1f}"
    rows = [["(none: the base)", "-", "-", full, full, "-"]]
    for conv, width in widths.items():
        if conv not in stats or width >= stats[conv].n_filters:
            continue
        accs = []
        for criterion in ("coverage", "l1"):
            model, _ = load_model(base)
            if criterion == "coverage":
                keep = rank_filters(stats[conv].cluster_ids, filter_scores(stats[conv]),
                                    min_coverage=min_coverage)[:width]
            else:
                layer = model.get_submodule(conv)
                graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, *bundle.input_size))
                group = graph.get_pruning_group(layer, tp.prune_conv_out_channels, idxs=list(range(layer.out_channels)))
                keep = tp.importance.GroupMagnitudeImportance(p=1)(group).argsort(descending=True)[:width].tolist()
            accs.append(evaluate(dilute(model.eval(), conv, keep), small))
        rows.append([conv, f"{width}/{stats[conv].n_filters}", f"{stats[conv].stats.noise:.2f}",
                     f"{100 * accs[0]:.1f}", f"{100 * accs[1]:.1f}", f"{100 * (accs[0] - accs[1]):+.1f}"])
    return rows


def test_accuracy(info: dict) -> float:
    """A variant's final test accuracy (results before the validation split recorded the test accuracy as the
    last step's)."""
    return info.get("test_accuracy", info["steps"][-1]["after"]["accuracy"])


# ------------------------------------------------------------------------------------ main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # paths relative to the repository root, where the script runs (as printed and recorded)
    p.add_argument("--base", default="benchmarks/cifar10_base_val/model.pt")
    p.add_argument("--data-dir", default="../shared/data/cifar10")
    p.add_argument("--out", type=Path, default=Path("runs/cifar10_headtohead"))
    p.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--tag", default="cifar10_headtohead", help="file stem of the results")
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--limit-train", type=int, default=None, help="fine-tuning images (same subset for every model)")
    p.add_argument("--limit-test", type=int, default=None, help="test images (debugging only; default all)")
    p.add_argument("--analysis-train", type=int, default=None, help="training images for the probes (default all)")
    p.add_argument("--conv-stats-train", type=int, default=10000, help="training images for the per-conv ReLU probes")
    p.add_argument("--probe-epochs", type=int, default=30)
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--flops-target", type=float, default=0.5, help="mechanism-multi's FLOPs, fraction of the base")
    p.add_argument("--dilute-target", type=float, default=0.5)
    p.add_argument("--min-coverage", type=int, default=1)
    p.add_argument("--tol", type=float, default=0.02, help="relative distance to a FLOPs / params target")
    p.add_argument("--round-to", type=int, default=0, help="pruned widths are multiples of this (0: any width, "
                   "so that FLOPs can be matched; mechanism-multi-r8 always uses 8)")
    p.add_argument("--taylor-batches", type=int, default=10)
    p.add_argument("--bench-repeats", type=int, default=50, help="timed calls of each model")
    p.add_argument("--bench-burst", type=int, default=20,
                   help="calls per model and turn, the first half untimed (steady state; 1: one call per turn, "
                        "each starting with another model's weights in the caches)")
    p.add_argument("--no-bench", action="store_true", help="build variants only; no timing and no report")
    p.add_argument("--report-only", action="store_true",
                   help="no building and no timing: write the results again from the bench runs already recorded")
    p.add_argument("--seed-variants", nargs="*", choices=VARIANTS,
                   default=["trim-conv", "trim-conv+dilute+afcc", "mechanism-multi", "l1@flops", "bn-scale@flops"],
                   help="variants also built with the extra --seeds (the seed-to-seed spread of the candidates for "
                        "both targets: the fastest within 1 point, and the equal-FLOPs comparison's two best criteria)")
    p.add_argument("--seeds", type=int, nargs="*", default=[1, 2], help="extra fine-tuning seeds (0 is the main one)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="training images held out (stratified, seeded) as the validation split every choice is made "
                        "on; 0: choices on the test split (the setting of the results before the validation split)")
    p.add_argument("--distill", type=float, nargs=2, default=[4.0, 0.9], metavar=("T", "ALPHA"),
                   help="distil from the base in every fine-tuning (temperature, alpha)")
    p.add_argument("--no-distill", dest="distill", action="store_const", const=None, help="plain fine-tuning")
    p.add_argument("--int8", action="store_true", help="bench an onnxruntime static INT8 file of every model too")
    p.add_argument("--latency-reference", default="trim-conv", choices=MECHANISM,
                   help="the mechanism variant whose batch-1 latency the @latency baselines are pruned to")
    p.add_argument("--latency-tol", type=float, default=0.03, help="relative latency distance that ends the bisection")
    p.add_argument("--latency-steps", type=int, default=8, help="bisection trials at most")
    p.add_argument("--latency-lo", type=float, default=0.05, help="smallest FLOPs fraction the bisection tries")
    p.add_argument("--latency-repeats", type=int, default=300,
                   help="interleaved rounds per latency trial (in blocks of 50; the ratio is the blocks' median)")
    p.add_argument("--latency-round-to", type=int, default=8,
                   help="round the @latency baselines' widths to multiples of this (onnxruntime's fast x86 "
                        "convolutions want multiples of 8; 0: no rounding)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.round_to = args.round_to or None
    args.latency_round_to = args.latency_round_to or None
    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "logs" / f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{os.getpid()}.txt")
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    log(f"\n$ {command}\n# {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}  {json.dumps(environment())}")
    with open(args.out / "commands.txt", "a") as f:
        f.write(command + "\n")
    base = Path(args.base)
    t0 = time.perf_counter()
    bundle = load_data(f"imagefolder:{args.data_dir}", limit_train=args.analysis_train, limit_test=args.limit_test,
                       val_fraction=args.val_fraction)
    tune_bundle = subset(choices(args, bundle), args.limit_train)  # its test: the validation split
    args.n_tune, args.n_analysis = len(tune_bundle.train), len(bundle.train)
    args.n_val = len(bundle.val) if bundle.val is not None else 0
    log(f"data: {len(bundle.train)} training images for the analysis, {len(tune_bundle.train)} for fine-tuning, "
        f"{args.n_val} validation images (every choice), {len(bundle.test)} test images (reporting only) "
        f"({time.perf_counter() - t0:.0f} s to load)")
    model, meta = load_model(base)
    analysis, extra, stats = run_analysis(args, base, model, meta, bundle, log)
    fine = fine_analysis(args, model, meta, analysis, bundle, log)
    order = [n for n, _ in model.named_modules()]
    convs = dataclasses.replace(analysis, taps=sorted([*analysis.taps, *extra.taps], key=lambda t: order.index(t.name)))
    analyses = {"main": analysis, "fine": fine, "convs": convs}
    targets = None
    if set(args.variants) - set(MECHANISM[:6]):  # mechanism-multi and the baselines need its budgets
        targets = mechanism_targets(args, base, tune_bundle, analyses, log)
        log(f"targets: FLOPs {targets['flops']:,} ({targets['flops'] / targets['base_flops']:.3f} of the base), "
            f"params {targets['params']:,} ({targets['params'] / targets['base_params']:.3f})")
    for name in [] if args.report_only else args.variants:
        t1 = time.perf_counter()
        build_variant(name, args, base, tune_bundle, analyses, stats, targets, log, report=bundle)
        log(f"  ({time.perf_counter() - t1:.0f} s)")
    for name in [v for v in args.seed_variants if v in args.variants and not args.report_only]:
        for seed in args.seeds:
            t1 = time.perf_counter()
            build_variant(name, args, base, tune_bundle, analyses, stats, targets, log, seed=seed, report=bundle)
            log(f"  ({time.perf_counter() - t1:.0f} s)")
    done = [v for v in VARIANTS if (variant_folder(args, v) / "model.pt").is_file()]
    if args.no_bench or len(done) < len(args.variants):
        log(f"built {len(done)} of {len(VARIANTS)} variants; no bench this time")
        return
    folders = [variant_folder(args, v) for v in done]
    history = args.out / "bench-history"  # every bench run is kept: the speed-ups are medians over the runs
    if args.report_only:
        result = BenchResult(**json.loads((args.out / "bench" / "bench.json").read_text()))
    else:
        result = run_bench([str(base)] + [str(f / "model.pt") for f in folders], bundle, args.out / "bench",
                           names=["base", *done], backends=["ort-cpu"], batch_sizes=[1, 64], threads=args.threads,
                           repeats=args.bench_repeats, int8=args.int8, burst=args.bench_burst)
        write_bench_report(result, args.out / "bench")
        history.mkdir(exist_ok=True)
        shutil.copy(args.out / "bench" / "bench.json",
                    history / f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json")
    runs = [BenchResult(**json.loads(f.read_text())) for f in sorted(history.glob("*.json"))]
    runs = [r for r in runs if r.settings.get("burst", 1) == result.settings.get("burst", 1)]  # one way of timing
    infos = {v: json.loads((f / "info.json").read_text()) for v, f in zip(done, folders)}
    for v, info in infos.items():  # final accuracy (PyTorch, full test set) per fine-tuning seed
        info["seed_accuracy"] = {s: test_accuracy(json.loads((variant_folder(args, v, s) / "info.json").read_text()))
                                 for s in [0, *args.seeds] if (variant_folder(args, v, s) / "info.json").is_file()}
    targets = mechanism_targets(args, base, tune_bundle, analyses, log)
    base_labels = per_label_accuracy(model, bundle)
    prune_step = next(r for r in infos["mechanism-multi"]["steps"] if r["step"] == "prune")
    sensitivity = layer_sensitivity(base, choices(args, bundle), stats, prune_step["info"].get("widths", {}),
                                    min_coverage=args.min_coverage)
    report_dir = args.results / f"{args.tag}_analysis"
    shutil.rmtree(report_dir, ignore_errors=True)
    shutil.copytree(args.out / "analysis" / "figures", report_dir / "figures")
    for name in ("report.md", "analysis.json"):
        shutil.copy(args.out / "analysis" / name, report_dir / name)
    text = write_results(args, result, runs, analysis, extra, fine, infos, targets, base_labels, sensitivity,
                         (args.out / "commands.txt").read_text().splitlines(), MECHANISM, CRITERIA)
    log(text)
    log(f"total {time.perf_counter() - t0:.0f} s this invocation")
    logs = sorted((args.out / "logs").glob("*.txt"))  # every invocation, each in one piece
    (args.results / f"{args.tag}.txt").write_text("".join(f.read_text() for f in logs))


if __name__ == "__main__":
    main()
