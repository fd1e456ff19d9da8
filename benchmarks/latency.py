"""Latency, size and accuracy of an original model against compressed variants, recorded.

What it does, on one data set (default: the embedded digits):

  1. trains the original, the demo's VGG-16 at width 0.25 with batch-norm (``--epochs``);
  2. makes compressed variants by removing ``--prune`` fractions of the channels of every conv
     layer with Torch-Pruning's dependency graph (L1 magnitude, output layer kept), each
     fine-tuned for ``--finetune-epochs``;
  3. runs :func:`compress.deploy.bench.run_bench` on all of them in one process: export to ONNX (verified
     against PyTorch), parameters and FLOPs (fvcore), latency with onnxruntime and PyTorch eager
     at ``--batch-sizes`` (``--warmup`` calls, then ``--repeats`` interleaved rounds, median and p90,
     PyTorch under ``torch.inference_mode``), test accuracy of each ONNX model;
  4. prints the environment, the summary table, the ratios to the original and the latency of
     every backend and batch; ``--save`` also writes that text to a file. The Markdown and HTML
     report and ``bench.json`` are in ``--out``.

The machine may be shared: the interleaving makes drifts hit all models alike, and the p90 column
shows how noisy the run was. ``--threads`` sets the CPU threads of PyTorch and onnxruntime.

Run (from the repository root):

    .venv/bin/python benchmarks/latency.py --save benchmarks/results/latency_digits_cpu.txt
"""

from __future__ import annotations

import argparse
import copy
import io
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import torch

from compress.deploy.bench import run_bench
from compress.reports.bench import write_bench_report
from compress.reports.bench import primary_backend, summary_rows
from compress.data import load_data
from compress.io import atomic_write_text
from compress.models import create_model
from compress.jobs import model_meta
from compress.models import ModelConfig
from compress.training import TrainConfig, evaluate, fit


def prune_channels(model: torch.nn.Module, fraction: float, input_size) -> torch.nn.Module:
    """Remove ``fraction`` of every conv layer's channels (L1 magnitude, Torch-Pruning's dependency graph)."""
    import torch_pruning as tp

    model = model.cpu().eval()
    keep = [model.get_classifier()]
    pruner = tp.pruner.BasePruner(model, torch.zeros(1, *input_size), importance=tp.importance.GroupMagnitudeImportance(p=1),
                                  pruning_ratio=fraction, ignored_layers=keep)
    pruner.step()
    return model


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) + 2 for i in range(len(header))]
    return "\n".join("".join(f"{str(v):<{w}}" for v, w in zip(r, widths)).rstrip() for r in [header, *rows])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="digits")
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--limit-test", type=int, default=None)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--prune", type=float, nargs="+", default=[0.5, 0.75], help="fractions of channels removed")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="runs/bench_latency")
    p.add_argument("--save", default=None, help="also write the printed results to this file")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    torch.manual_seed(0)
    bundle = load_data(args.data, limit_train=args.limit_train, limit_test=args.limit_test)
    spec = ModelConfig("vgg16", {"width": 0.25, "batch_norm": True, "fc_hidden": []})
    meta = model_meta(spec, bundle)
    c, h, _ = bundle.input_size
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    original = create_model(spec.name, num_classes=bundle.num_classes, in_chans=c, img_size=h, **spec.options)
    cfg = TrainConfig(epochs=args.epochs, lr=0.02, momentum=0.9, weight_decay=5e-4, schedule="cosine")
    fit(original, bundle, cfg, out / "train" / "original", meta=meta, resume=False, progress=False)
    models = [("original", original.cpu().eval(), meta)]
    for frac in args.prune:
        pruned = prune_channels(copy.deepcopy(original).cpu(), frac, bundle.input_size)
        if args.finetune_epochs > 0:
            ft = TrainConfig(epochs=args.finetune_epochs, lr=0.01, momentum=0.9, weight_decay=5e-4, schedule="cosine")
            fit(pruned, bundle, ft, out / "train" / f"pruned{int(frac * 100)}", meta=meta, resume=False, progress=False)
        models.append((f"pruned{int(frac * 100)}", pruned.cpu().eval(), meta))
    trained_s = time.perf_counter() - t0
    accuracy = {name: evaluate(m, bundle, device=torch.device("cpu")) for name, m, _ in models}

    result = run_bench(models, bundle, out, batch_sizes=args.batch_sizes, warmup=args.warmup, repeats=args.repeats,
                       threads=args.threads)
    write_bench_report(result, out)
    buf = io.StringIO()
    with redirect_stdout(buf):
        print(f"# benchmarks/latency.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
        print(f"data: {bundle.name}, {len(bundle.train)} train / {len(bundle.test)} test images; original: "
              f"vgg16 width 0.25 with batch-norm, {args.epochs} epochs on {device}; variants: "
              f"{', '.join(f'{f:.0%}' for f in args.prune)} of the conv channels removed (Torch-Pruning, L1), "
              f"fine-tuned {args.finetune_epochs} epochs; training took {trained_s:.0f} s")
        print("environment:")
        for k, v in result.environment.items():
            print(f"  {k}: {v}")
        s = result.settings
        print(f"timing: {s['warmup']} warm-up calls, {s['repeats']} interleaved repeats per model, backend and "
              f"batch; {s['threads']} CPU threads for PyTorch and onnxruntime; {s['timing']}")
        print()
        header, rows, ratio_header, ratios = summary_rows(result)
        print(f"summary (latency: {primary_backend(result)}, median per batch; accuracy: ONNX model on the test split)")
        print(table(header, rows))
        print()
        print("ratios to the original (below 1: smaller, cheaper or faster)")
        print(table(["model", *ratio_header[1:]], ratios))
        print()
        print("latency per backend and batch (ms; throughput in images/s)")
        lat_rows = []
        for backend in s["backends"]:
            for b in s["batch_sizes"]:
                for i, m in enumerate(result.models):
                    st = m["latency"].get(backend, {}).get(str(b))
                    if st is not None:
                        r = result.ratio(i, "latency", backend, b)
                        lat_rows.append([m["name"], backend, b, f"{st['median_ms']:.3f}", f"{st['p90_ms']:.3f}",
                                         f"{st['throughput']:,.0f}", f"{r:.3f}"])
        print(table(["model", "backend", "batch", "median", "p90", "throughput", "median/original"], lat_rows))
        print()
        print("PyTorch accuracy before export (same test split): "
              + ", ".join(f"{n} {a:.4f}" for n, a in accuracy.items()))
        print(f"report: {out / 'bench.html'}; total {time.perf_counter() - t0:.0f} s")
    text = buf.getvalue()
    print(text, end="")
    if args.save:
        atomic_write_text(args.save, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
