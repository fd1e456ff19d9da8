"""Coverage table: does the whole chain run on the CNN classifiers people deploy?

For every model of ``MODELS`` (timm and torchvision, random weights, 10 labels), at 32x32 input,
or 64x64 where a model does not run at 32x32:

  taps      the model's default taps (``compress.models.default_taps``);
  analysis  a short analysis of every tap on a few hundred digits images
            (``analyze_model``, 2 probe epochs);
  trim      the ``trim`` step at the middle tap (the tap's probe becomes the head);
  dilute    the ``dilute`` step on the conv feeding that tap (coverage, ``target: auto``);
  afcc      the ``afcc`` step on the new head (masked fine-tuning of the head, 1 epoch, then the
            sparse head);
  export    the ``export`` step (ONNX opset 17, onnxruntime against PyTorch on test images,
            tolerance 1e-3; the original model is exported and verified too);
  reload    ``load_model`` of the saved ``model.pt`` (``weights_only=True``, the recorded
            transforms replayed), its outputs against the model in memory and against the ONNX file.

The steps are the recipe's own step classes run on a ``RunState``, as ``compress run`` runs
them. One row per model: ``pass``, or the step that failed and its error on one line. The
accuracies are of untrained networks and mean nothing; the table is about whether each step runs.

Run (from the repository root; about 20-40 minutes on 2 CPU cores)::

    .venv/bin/python benchmarks/model_coverage.py --save benchmarks/results/model_coverage.txt
    .venv/bin/python benchmarks/model_coverage.py --models timm:resnet18 torchvision:resnet18
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from compress.analysis import AnalysisConfig, analyze_model
from compress.compression.serialize import load_model
from compress.data import DataConfig, load_data
from compress.deploy.export import verify_onnx
from compress.jobs import model_meta
from compress.models import ModelConfig, create_model, default_taps
from compress.models.introspect import count_flops, count_params
from compress.recipe.schema import Recipe, RecipeModel
from compress.recipe.state import RunState
from compress.recipe.steps.afcc import Afcc
from compress.recipe.steps.dilute import Dilute
from compress.recipe.steps.export import Export
from compress.recipe.steps.finetune import Finetune
from compress.recipe.steps.trim import Trim
from compress.system import environment

MODELS = [
    # timm
    "timm:resnet18", "timm:resnet50", "timm:resnet26d", "timm:seresnext26d_32x4d", "timm:efficientnet_b0",
    "timm:efficientnet_lite0", "timm:mobilenetv2_100", "timm:mobilenetv3_small_100", "timm:mobilenetv3_large_100",
    "timm:mnasnet_100", "timm:fbnetc_100", "timm:mixnet_s", "timm:ghostnet_100", "timm:lcnet_050",
    "timm:rexnet_100", "timm:regnetx_002", "timm:regnety_002", "timm:convnext_atto", "timm:densenet121",
    "timm:dla34", "timm:cspresnet50", "timm:res2net50_14w_8s", "timm:tinynet_e", "timm:repvgg_a0",
    # torchvision
    "torchvision:resnet18", "torchvision:resnet50", "torchvision:resnext50_32x4d", "torchvision:mobilenet_v2",
    "torchvision:mobilenet_v3_small", "torchvision:mobilenet_v3_large", "torchvision:efficientnet_b0",
    "torchvision:efficientnet_v2_s", "torchvision:shufflenet_v2_x0_5", "torchvision:shufflenet_v2_x1_0",
    "torchvision:squeezenet1_1", "torchvision:densenet121", "torchvision:mnasnet0_5", "torchvision:regnet_x_400mf",
    "torchvision:regnet_y_400mf", "torchvision:convnext_tiny", "torchvision:googlenet", "torchvision:alexnet",
    "torchvision:vgg11_bn",
]


class StepTimeout(BaseException):
    """A model ran past its time limit."""


def _alarm(_signum, _frame):
    raise StepTimeout("time limit reached")


def input_size(name: str) -> int:
    """32, or 64 when the model does not run on a 32x32 image."""
    for size in (32, 64):
        model = create_model(name, num_classes=10, img_size=size).eval()
        try:
            with torch.no_grad():
                model(torch.zeros(1, 3, size, size))
            return size
        except RuntimeError:
            continue
    return 64


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text}"[:240]


def prepare(name: str, bundle, folder: Path, probe_epochs: int, row: dict[str, Any]) -> RunState:
    """Build the model, find its taps and analyse them: the run state the steps work on."""
    torch.manual_seed(0)
    cfg = ModelConfig(name)
    model = cfg.build(bundle.num_classes, bundle.input_size).eval()
    size = tuple(bundle.input_size)
    row.update(params0=count_params(model), flops0=count_flops(model, size))
    row["at"] = "taps"
    taps = default_taps(model, size)
    row.update(taps=len(taps), tap=taps[len(taps) // 2])
    row["at"] = "analysis"
    config = AnalysisConfig(probe_epochs=probe_epochs)
    result = analyze_model(model, bundle, taps, config, model_name=name, progress=False)
    recipe = Recipe(name="coverage", model=RecipeModel(name=name), data=DataConfig(name="digits"), analysis=config,
                    steps=())
    state = RunState(recipe, model, bundle, model_meta(cfg, bundle), result, folder, progress=False)
    state.models["original"] = str(state.save_current(folder / "original.pt"))
    return state


def chain_steps(state: RunState, row: dict[str, Any]) -> list[tuple[str, Callable[[], None]]]:
    """The steps after the analysis, each a callable that updates ``row``; run in order, a failing
    one does not stop the next (each later step then works on the model as the failure left it)."""
    folder, model, size = state.out, state.model, tuple(state.bundle.input_size)

    def trim() -> None:
        info = Trim(tap=row["tap"]).run(state, folder / "trim")
        row.update(params_trim=count_params(model), flops_trim=count_flops(model, size))
        row.update(probe_acc=info["probe_accuracy"], trim_acc=info["accuracy_before_finetune"])

    def dilute() -> None:
        info = Dilute(tap="last").run(state, folder / "dilute")
        row["filters"] = f"{info['filters_before']}->{info['filters_after']}"

    def afcc() -> None:
        info = Afcc(train="head", finetune=Finetune(epochs=1, lr=0.001)).run(state, folder / "afcc")
        row["afcc_kept"] = info["kept_weights"] / info["dense_weights"]
        for p in model.parameters():
            p.requires_grad_(True)

    def export() -> None:
        row["onnx_diff"] = Export().run(state, folder / "export")["model"]["max_abs_diff"]

    def reload() -> None:
        reloaded, _ = load_model(state.save_current(folder / "model.pt"))
        x = state.bundle.normalize(state.bundle.test.images[:16])
        with torch.no_grad():
            diff = float((reloaded(x) - model.cpu().eval()(x)).abs().max())
        if diff > 1e-5:
            raise AssertionError(f"the reloaded model's outputs differ by {diff:.2e}")
        if (folder / "model.onnx").is_file():
            verify_onnx(folder / "model.onnx", reloaded, state.bundle, tol=1e-3)
        row.update(params=count_params(model), flops=count_flops(model, size))

    return [("trim", trim), ("dilute", dilute), ("afcc", afcc), ("export", export), ("reload", reload)]


def run_one(name: str, bundles: dict[int, Any], probe_epochs: int, limit_s: int) -> dict[str, Any]:
    """One row: the chain's figures and ``status`` (pass, or each failing step and its error)."""
    t0 = time.perf_counter()
    row: dict[str, Any] = {"model": name, "at": "build", "failed": [], "tracebacks": []}
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(limit_s)
    try:
        with tempfile.TemporaryDirectory(prefix="coverage-") as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            row["size"] = input_size(name)
            state = prepare(name, bundles[row["size"]], Path(tmp), probe_epochs, row)
            for step, fn in chain_steps(state, row):
                row["at"] = step
                try:
                    fn()
                except (StepTimeout, KeyboardInterrupt):
                    raise
                except Exception as e:  # noqa: BLE001 - one row per model, whatever stops a step
                    row["failed"].append(f"{step}: {one_line(e)}")
                    row["tracebacks"].append(traceback.format_exc(limit=-3))
    except (Exception, StepTimeout) as e:  # noqa: BLE001 - building, tapping, analysing failed or time ran out
        row["failed"].append(f"{row['at']}: {one_line(e)}")
        row["tracebacks"].append(traceback.format_exc(limit=-3))
    finally:
        signal.alarm(0)
    row["status"] = "pass" if not row["failed"] else "FAIL " + "; ".join(row["failed"])
    row["seconds"] = time.perf_counter() - t0
    return row


def _m(v: Any, scale: float) -> str:
    return f"{v / scale:.2f}" if isinstance(v, (int, float)) else "-"


def format_row(r: dict[str, Any]) -> str:
    flops = f"{_m(r.get('flops0'), 1e6)}>{_m(r.get('flops_trim'), 1e6)}>{_m(r.get('flops'), 1e6)}"
    params = f"{_m(r.get('params0'), 1e6)}>{_m(r.get('params_trim'), 1e6)}>{_m(r.get('params'), 1e6)}"
    onnx = f"{r['onnx_diff']:.1e}" if isinstance(r.get("onnx_diff"), float) else "-"
    return (f"{r['model']:<34} {r.get('size', '-')!s:>4} {r.get('taps', '-')!s:>4} {r.get('tap', '-')!s:<16} "
            f"{flops:<22} {params:<20} {r.get('filters', '-'):<10} {onnx:>8} {r['seconds']:>6.0f}  {r['status']}")


HEADER = (f"{'model':<34} {'px':>4} {'taps':>4} {'cut tap':<16} {'MFLOPs orig>trim>final':<22} "
          f"{'Mparams orig>trim>final':<20} {'dilute':<10} {'onnx':>8} {'sec':>6}  status")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--limit-train", type=int, default=300)
    ap.add_argument("--limit-test", type=int, default=200)
    ap.add_argument("--probe-epochs", type=int, default=2)
    ap.add_argument("--limit-s", type=int, default=600, help="time limit per model (seconds)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save", type=Path, help="also write the table to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    bundles = {s: load_data("digits", limit_train=args.limit_train, limit_test=args.limit_test, image_size=s)
               for s in (32, 64)}
    lines = ["# Model coverage: taps -> analysis -> trim (middle tap) -> dilute -> afcc -> export -> reload",
             (f"# digits, {args.limit_train} train / {args.limit_test} test images, {args.probe_epochs} probe "
              f"epochs, random weights, 10 labels; FLOPs and params: original > after trim > final"),
             "# environment: " + ", ".join(f"{k}={v}" for k, v in environment().items() if k != "cpu_flags"),
             "", HEADER]
    print("\n".join(lines), flush=True)
    rows = []
    for name in args.models:
        row = run_one(name, bundles, args.probe_epochs, args.limit_s)
        rows.append(row)
        lines.append(format_row(row))
        print(lines[-1], flush=True)
        for tb in row["tracebacks"]:
            print("    " + tb.strip().replace("\n", "\n    "), file=sys.stderr, flush=True)
    passed = sum(r["status"] == "pass" for r in rows)
    lines += ["", f"# {passed} of {len(rows)} models pass; {time.perf_counter() - t0:.0f} s in all"]
    print(lines[-1], flush=True)
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text("\n".join(lines) + "\n")
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
