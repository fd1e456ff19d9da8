"""torchvision's ResNet-18, unchanged, on the real CIFAR-10: train, analyse, cut at the plateau, fine-tune,
export, time. Then the results page.

The run is the recipe ``recipes/resnet18-cifar10.yaml`` (12 epochs one-cycle at 32x32 on 45,000
images, 5,000 held out for validation; the analysis probes every stage end on the validation split;
the cut falls at the plateau; 3 fine-tuning epochs; ONNX; onnxruntime CPU latency at batch 1 and 64,
1 thread, interleaved in one process). It is resumable: run the same command again after an
interruption. This script runs it (unless ``--report-only``) and writes the page from the run folder:
probe accuracy per stage, the plateau, params, FLOPs, latencies and their ratios, test accuracy.

Run (from the repository root)::

    .venv/bin/python benchmarks/resnet18_cifar10.py --save benchmarks/results/resnet18_cifar10.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "recipes/resnet18-cifar10.yaml"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def page(run: Path) -> str:
    summary = json.loads((run / "summary.json").read_text())
    analysis = json.loads((run / "analysis" / "analysis.json").read_text())
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    bench = json.loads((run / "bench" / "bench.json").read_text())
    history = json.loads((run / "train" / "history.json").read_text())
    env = summary["environment"]
    train = recipe["model"]["train"]
    steps = summary["steps"]
    first, last = steps[0], steps[-1]
    out = ["# torchvision ResNet-18 on CIFAR-10: cut at the plateau", ""]
    out.append(f"Command: `python benchmarks/resnet18_cifar10.py` (the recipe `{RECIPE}`, run folder `{run}`).")
    out.append(f"Machine: {env['cpu']} ({env['cpu_count']} CPUs, flags {env['cpu_flags']}), GPU {env['gpu']}, "
               f"torch {env['torch']}, onnxruntime {env['onnxruntime']}; load average at the end "
               f"{env['load_average']}.")
    out.append("")
    out.append("## Training (phase 1)")
    out.append(f"`torchvision:resnet18` unchanged (ImageNet stem: 7x7 stride-2 conv, stride-2 max-pool), random "
               f"initialisation, CIFAR-10 at its own 32x32, {train['epochs']} epochs, {train['schedule']} schedule, "
               f"peak lr {train['lr']}, batch {train['batch_size']}, SGD Nesterov momentum {train['momentum']}, "
               f"weight decay {train['weight_decay']}, flip + 4-pixel translation; "
               f"{recipe['data']['val_fraction']:.0%} of the training images held out for validation.")
    out.append("")
    out.append(md_table(["epoch", "loss", "train acc", "val acc", "seconds"],
                        [[str(h["epoch"]), f"{h['loss']:.3f}", f"{h['train_acc']:.4f}", f"{h.get('val_acc', float('nan')):.4f}",
                          f"{h['seconds']:.0f}"] for h in history]))
    out.append("")
    out.append("## Probes per stage (validation split)")
    split = analysis["config"].get("split", "val")
    out.append(f"Bias-free linear probes on the frozen stage outputs, {analysis['config']['analysis']['probe_epochs']} "
               f"epochs; accuracy on the {split} split. The whole network: {analysis['model_accuracy']:.4f}. "
               f"Plateau: the first tap within {analysis['plateau_tolerance']:g} point(s) of the "
               f"{analysis['plateau_reference'].replace('_', ' ')}: **{analysis['plateau']}**.")
    out.append("")
    out.append(md_table(["tap", "output", "probe inputs", "probe acc (val)", "probe acc (train)", "noise",
                         "clusters/filter"],
                        [[("**" + t["name"] + "**") if t["name"] == analysis["plateau"] else t["name"],
                          f"{t['n_filters']} x {t['filter_size']}", f"{t['fc_size']:,}", f"{t['accuracy']:.4f}",
                          f"{t['train_accuracy']:.4f}", f"{t['noise']:.2f}", f"{t['clusters_per_filter']:.2f}"]
                         for t in analysis["taps"]]))
    out.append("")
    out.append("## Steps (accuracy on validation; test reported once for the original and the final model)")
    rows = []
    for s in steps:
        a = s["after"]
        rows.append([s["step"], f"{a['params']:,}", f"{a['flops'] / 1e6:.1f} M", f"{a['accuracy']:.4f}",
                     f"{s['test_accuracy']:.4f}" if "test_accuracy" in s else ""])
    out.append(md_table(["step", "params", "FLOPs", "val acc", "test acc"], rows))
    out.append("")
    models = bench["models"]
    base = models[0]
    out.append("## onnxruntime CPU latency (interleaved in one process)")
    settings = bench.get("settings", {})
    out.append(f"Settings: {json.dumps(settings)}")
    out.append("")
    lrows = []
    for m in models:
        lat = m["latency"]["ort-cpu"]
        b1, b64 = lat["1"]["median_ms"], lat["64"]["median_ms"]
        r1 = base["latency"]["ort-cpu"]["1"]["median_ms"] / b1
        r64 = base["latency"]["ort-cpu"]["64"]["median_ms"] / b64
        lrows.append([m["name"], f"{m['params']:,}", f"{m['flops'] / 1e6:.1f} M", f"{b1:.3f}", f"{b64:.2f}",
                      f"{r1:.2f}x", f"{r64:.2f}x", f"{m['accuracy']:.4f}"])
    out.append(md_table(["model", "params", "FLOPs", "b1 ms", "b64 ms", "speed-up b1", "speed-up b64",
                         "test acc (ONNX)"], lrows))
    out.append("")
    up1 = base["latency"]["ort-cpu"]["1"]["median_ms"] / models[-1]["latency"]["ort-cpu"]["1"]["median_ms"]
    drop = 100 * (first["test_accuracy"] - last["test_accuracy"])
    met = up1 >= 2 and drop <= 1
    out.append(f"**Target (at least 2x at batch 1 within 1 point of the base's test accuracy): "
               f"{'met' if met else 'NOT met'}** — {up1:.2f}x at batch 1, test accuracy "
               f"{first['test_accuracy']:.4f} -> {last['test_accuracy']:.4f} ({-drop:+.2f} points).")
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/resnet18-cifar10"))
    p.add_argument("--report-only", action="store_true", help="write the page from an existing run folder")
    p.add_argument("--save", type=Path, default=None)
    args = p.parse_args()
    if not args.report_only:
        done = subprocess.run([sys.executable, "-m", "compress.cli", "run", RECIPE, "--out", str(args.out)], cwd=ROOT)
        if done.returncode != 0:
            sys.exit(done.returncode)
    text = page(args.out)
    print(text)
    if args.save:
        args.save.write_text(text)


if __name__ == "__main__":
    main()
