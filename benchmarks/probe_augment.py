"""Probes on augmented copies (``probe_augment: N``) against re-augmenting every probe epoch.

The papers trained with augmentation (random horizontal flip, translation up to 4 pixels). Our
probes train on cached features; ``probe_augment: N`` caches N augmented copies of every training
image beside the plain ones (N more feature passes) and each probe epoch draws, per image, one of
its 1+N versions. The straightforward way re-runs the frozen backbone on freshly augmented batches
in every probe epoch. This benchmark compares, for one model and the same probe epochs:

  * cached, N = 0, 2, 4 (``--ns``): ``extract_features(augment=N)`` over the training images, then
    ``AnalysisConfig.make_probe(K).fit`` per tap (what ``compress analyze --probe-augment N`` does);
  * re-augmenting: every epoch, shuffled batches of ``probe_batch_size`` freshly augmented images
    (``iterate_batches(augmented=True)``, the training augmentation) go through the backbone once,
    up to the deepest tap, and every tap's probe takes one SGD step on its output (same initialisation,
    optimiser and schedule as ``LinearProbe``; one backbone pass serves all taps, which favours it).

Reported: each probe's accuracy on the validation split (held out from the training images,
``--val-fraction``: the split the analysis chooses on), the plateau (earliest tap within
``--tolerance`` points of the best) and the wall time: for the cached way the training-feature
passes plus all probes, for the re-augmenting way all its epochs. The validation features (plain)
are extracted once and not counted in either.

The base model (``benchmarks/cifar10_base/model.pt``) was trained on all 50,000 CIFAR-10 training
images, so the validation images were seen in its training: the accuracies compare the probe
variants with each other, they are not estimates for new images.

Run (from the repository root), at a reduced scale on a shared 2-core machine:

    .venv/bin/python benchmarks/probe_augment.py --subset 10000 --epochs 30 --threads 1 \\
        --save benchmarks/results/probe_augment.txt
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import compress
from compress.analysis.engine import AnalysisConfig
from compress.analysis.features import extract_features
from compress.analysis.stats import find_plateau
from compress.compression.serialize import load_model
from compress.data import DataConfig, iterate_batches
from compress.io import atomic_write_text
from compress.models import default_taps, run_to_taps, tap_shapes

ROOT = Path(__file__).resolve().parents[1]


def cpu_line() -> str:
    """CPU model, whether it has AVX-512 VNNI, logical cores."""
    name, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    vnni = "avx512_vnni" if "avx512_vnni" in flags else "no avx512_vnni"
    return f"{name} ({os.cpu_count()} logical cores, {vnni}{', avx2' if 'avx2' in flags else ''})"


def reaugmenting_probes(model, bundle, taps, cfg: AnalysisConfig, device) -> tuple[dict[str, torch.Tensor], float]:
    """The straightforward way: every epoch, freshly augmented batches through the backbone, one step per tap."""
    k = bundle.num_classes
    shapes = tap_shapes(model, taps, bundle.input_size)
    ws, opts, scheds = {}, {}, {}
    for t in taps:
        d = math.prod(shapes[t])
        gen = torch.Generator().manual_seed(cfg.seed)  # LinearProbe's initialisation
        ws[t] = (torch.rand(k, d, generator=gen) * 2 - 1).mul_(1.0 / math.sqrt(d)).to(device).requires_grad_(True)
        opts[t] = torch.optim.SGD([ws[t]], lr=cfg.probe_lr, momentum=cfg.probe_momentum,
                                  weight_decay=cfg.probe_weight_decay, nesterov=True)
        scheds[t] = (torch.optim.lr_scheduler.ExponentialLR(opts[t], gamma=cfg.probe_lr_decay) if cfg.probe_lr_step == 1
                     else torch.optim.lr_scheduler.StepLR(opts[t], step_size=cfg.probe_lr_step,
                                                          gamma=cfg.probe_lr_decay))
    t0 = time.perf_counter()
    for epoch in range(cfg.probe_epochs):
        gen = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
        for x, y in iterate_batches(bundle, bundle.train, cfg.probe_batch_size, shuffle=True, augmented=True,
                                    generator=gen, device=device):
            with torch.no_grad():
                feats = run_to_taps(model, x, taps)
            for t in taps:
                loss = F.cross_entropy(feats[t].flatten(1).float() @ ws[t].t(), y)
                opts[t].zero_grad(set_to_none=True)
                loss.backward()
                opts[t].step()
        for t in taps:
            scheds[t].step()
    return {t: w.detach().cpu() for t, w in ws.items()}, time.perf_counter() - t0


@torch.inference_mode()
def accuracy(weight: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> float:
    x = features.reshape(len(features), -1)
    pred = torch.cat([(x[i:i + 4096].float() @ weight.t()).argmax(1) for i in range(0, len(x), 4096)])
    return (pred == labels).float().mean().item()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "benchmarks" / "cifar10_base" / "model.pt"), help="a model.pt")
    ap.add_argument("--data", default="imagefolder:" + os.path.relpath(ROOT.parent / "shared" / "data" / "cifar10"))
    ap.add_argument("--val-fraction", type=float, default=0.1, help="validation hold-out (the analysis' default)")
    ap.add_argument("--subset", type=int, default=None, metavar="N", help="training images used (default: all)")
    ap.add_argument("--taps", nargs="+", default=None, help="taps (default: the model's)")
    ap.add_argument("--epochs", type=int, default=30, help="probe epochs, the same for every variant")
    ap.add_argument("--ns", type=int, nargs="+", default=[0, 2, 4], help="augmented copies to compare")
    ap.add_argument("--no-reaugment", action="store_true", help="skip the re-augmenting way")
    ap.add_argument("--preset", default=None, help="probe preset (default: the public code's values)")
    ap.add_argument("--tolerance", type=float, default=0.5, help="plateau tolerance, accuracy points")
    ap.add_argument("--extract-batch-size", type=int, default=500)
    ap.add_argument("--max-memory-gb", type=float, default=8.0, help="feature caches above this go to disk")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--save", default=None, help="also write the output to this text file")
    args = ap.parse_args(argv)

    lines: list[str] = []

    def out(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    # the analysis' validation split (val_fraction, split seed 0); the test split is not used
    bundle = DataConfig(name=args.data, val_fraction=args.val_fraction, limit_test=10).load()
    full_train = len(bundle.train)
    if args.subset is not None and args.subset < full_train:
        keep = torch.randperm(full_train, generator=torch.Generator().manual_seed(args.seed))[:args.subset]
        bundle = dataclasses.replace(bundle, train=bundle.train.subset(keep.sort().values))
    choices = bundle.for_choices("val")
    load_s = time.perf_counter() - t0
    model, meta = load_model(args.model, device)
    taps = args.taps or default_taps(model, bundle.input_size)
    shapes = tap_shapes(model, taps, bundle.input_size)
    cfg = AnalysisConfig(probe_epochs=args.epochs, probe_preset=args.preset, seed=args.seed,
                         batch_size=args.extract_batch_size, plateau_tolerance=args.tolerance)
    k, n = bundle.num_classes, len(bundle.train)
    scale = "FULL" if n == full_train and cfg.probe_epochs == 200 else "REDUCED"

    out("== probe augmentation benchmark: cached augmented copies (probe_augment N) vs re-augmenting every epoch ==")
    out(f"command: {' '.join([Path(sys.executable).name] + sys.argv)}")
    out(f"cpu: {cpu_line()} | torch threads: {torch.get_num_threads()} | device: {device} | "
        f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    out(f"python {platform.python_version()} | torch {torch.__version__} | compress {compress.__version__}")
    shown = os.path.relpath(args.model, ROOT) if Path(args.model).resolve().is_relative_to(ROOT) else args.model
    out(f"model: {shown} ({meta.get('model')} {meta.get('options', {})}, K={k})")
    out(f"data: {bundle.name}: {n} training images (of {full_train} after the validation hold-out; subset seed "
        f"{args.seed}), {len(choices.test)} validation images (val_fraction {args.val_fraction}); loaded in "
        f"{load_s:.1f} s, not timed below")
    out(f"scale: {scale} ({n} of {full_train} training images, {cfg.probe_epochs} probe epochs; the analysis "
        f"default is all images and 200 epochs)")
    out("taps: " + ", ".join(f"{t} {shapes[t]}" for t in taps))
    out(f"probe: {cfg.probe_epochs} epochs, batch {cfg.probe_batch_size}, SGD Nesterov lr {cfg.probe_lr}, momentum "
        f"{cfg.probe_momentum}, wd {cfg.probe_weight_decay}, lr x{cfg.probe_lr_decay} every {cfg.probe_lr_step} "
        f"epoch(s) (preset {args.preset or 'none: public code'}); seed {cfg.seed}; feature batch {cfg.batch_size}")
    out()

    t0 = time.perf_counter()
    val = extract_features(model, choices, choices.test, taps, batch_size=cfg.batch_size, device=device,
                           progress=False)
    out(f"validation features (plain, shared by all variants, not counted): {time.perf_counter() - t0:.1f} s")

    rows: dict[str, dict[str, float]] = {}  # variant -> {tap: accuracy}
    times: dict[str, tuple[float, float]] = {}  # variant -> (feature or backbone s, probe s)
    for nn_ in args.ns:
        name = f"cached N={nn_}"
        t0 = time.perf_counter()
        train = extract_features(model, choices, choices.train, taps, batch_size=cfg.batch_size, device=device,
                                 progress=False, augment=nn_, seed=cfg.seed, max_memory_gb=args.max_memory_gb)
        feat_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        rows[name] = {}
        for t in taps:
            probe = cfg.make_probe(k).fit(train.features[t], train.labels)
            rows[name][t] = accuracy(probe.coef_, val.features[t], val.labels)
        times[name] = (feat_s, time.perf_counter() - t0)
        out(f"{name}: {(1 + nn_) * n} cached training rows ({train.nbytes / 2**20:.0f} MiB"
            f"{', on disk' if train.on_disk else ''}); features {feat_s:.1f} s, probes {times[name][1]:.1f} s")
        del train
    if not args.no_reaugment:
        name = "re-augmenting"
        weights, total = reaugmenting_probes(model, choices, taps, cfg, device)
        rows[name] = {t: accuracy(weights[t], val.features[t], val.labels) for t in taps}
        times[name] = (total, 0.0)
        out(f"{name}: {cfg.probe_epochs} epochs x {n} freshly augmented images through the backbone "
            f"(batch {cfg.probe_batch_size}, all taps from one pass); {total:.1f} s")
    out()

    variants = list(rows)
    width = max(len(t) for t in taps + ["plateau (tol 0.5)", "time (s)"]) + 2
    col = max(16, max(len(v) for v in variants) + 2)
    out(f"validation accuracy per tap ({len(choices.test)} images; one standard error is about "
        f"{100 * math.sqrt(0.25 / len(choices.test)):.1f} points at 50% accuracy, less further from 50%)")
    out(f"{'tap':<{width}}" + "".join(f"{v:>{col}}" for v in variants))
    for t in taps:
        out(f"{t:<{width}}" + "".join(f"{rows[v][t]:>{col}.4f}" for v in variants))
    plateaus = {v: taps[find_plateau([rows[v][t] for t in taps], args.tolerance)] for v in variants}
    out(f"{f'plateau (tol {args.tolerance:g})':<{width}}" + "".join(f"{plateaus[v]:>{col}}" for v in variants))
    out(f"{'best probe':<{width}}" + "".join(f"{max(rows[v].values()):>{col}.4f}" for v in variants))
    out(f"{'time (s)':<{width}}" + "".join(f"{sum(times[v]):>{col}.1f}" for v in variants))
    out("time: cached = training-feature passes (1+N) + all probes; re-augmenting = all its epochs (backbone and "
        "probe steps)")
    if "re-augmenting" in times:
        ref = sum(times["re-augmenting"])
        out("speed-up over re-augmenting: " + ", ".join(f"{v} {ref / sum(times[v]):.1f}x" for v in variants
                                                         if v != "re-augmenting"))
    out(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())} (other processes on the machine "
        f"inflate all timings)")
    if args.save:
        atomic_write_text(args.save, "\n".join(lines) + "\n")
        print(f"saved to {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
