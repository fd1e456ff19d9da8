"""Speed of the analysis (phases 2 and 3) against a plain forward pass and the papers' naive probing.

What it measures, for one model and data set, with ``time.perf_counter`` (under
``torch.inference_mode`` where no gradient is needed), each after one warm-up batch:

  (a) one plain forward pass of the whole model over train + test (eval mode, batch 500);
  (b) feature extraction of all default taps over train + test (``extract_features``, one pass per split);
  (c) probe training of all taps on the cached features (``AnalysisConfig.make_probe(K).fit``);
  (d) phase 3 of all taps (``analyze_tap`` on the test cache);

the ratios (b)/(a) (target <= 1.3) and (d)/(a) (target <= 0.2), and the speed-up of our phase 2
(b + c) over the straightforward way of the papers' public code, which re-runs the frozen
backbone up to the tap in every probe epoch (shuffled, augmentation-free batches of 100, one SGD
step per batch, same optimiser as ``LinearProbe``). The naive way is timed for ``--naive-epochs``
epochs per tap; its fastest epoch is extrapolated linearly to ``--probe-epochs`` (target speed-up >= 20x).

(a), (b) and (d) run ``--repeat`` times (interleaved) and the minimum is reported, since the
machine may be shared; (c) and the naive epochs run once. ``--threads`` sets torch's threads: on a
shared 2-core machine use ``--threads 1``, since two threads competing with another process turn
every small op of probe training into a wait of milliseconds (10-100x slower steps).

Without ``--checkpoint`` the weights are randomly initialised; the timings do not depend on the
weight values (same shapes, same operations).

Run (from the repository root):

    .venv/bin/python benchmarks/analysis_speed.py --data digits --threads 1 \\
        --save benchmarks/results/analysis_speed_digits.txt
    .venv/bin/python benchmarks/analysis_speed.py --data imagefolder:../shared/data/cifar10 \\
        --limit-train 10000 --limit-test 2000 --probe-epochs 50 --naive-epochs 2 --threads 1 \\
        --save benchmarks/results/analysis_speed_cifar10.txt
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import compress
from compress.analysis.engine import AnalysisConfig, analyze_tap
from compress.data import iterate_batches, load_data
from compress.analysis.features import FeatureCache, extract_features
from compress.io import atomic_write_text
from compress.models import create_model, default_taps, run_to_taps, tap_shapes


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def count_macs(model: nn.Module, input_size: tuple[int, ...]) -> int:
    """Multiply-accumulates of one image through conv and linear layers (hooks, one forward)."""
    total = 0

    def hook(m, inp, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out[0].numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)
        elif isinstance(m, nn.Linear):
            total += m.in_features * m.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.inference_mode():
        model(torch.zeros(1, *input_size, device=next(model.parameters()).device))
    for h in handles:
        h.remove()
    return total


def warm_up(model: nn.Module, bundle, device, batch_size: int = 500) -> None:
    with torch.inference_mode():
        x, _ = next(iterate_batches(bundle, bundle.train, batch_size, device=device))
        model(x)


@torch.inference_mode()
def plain_forward(model: nn.Module, bundle, batch_size: int, device) -> None:
    for split in (bundle.train, bundle.test):
        for x, _ in iterate_batches(bundle, split, batch_size, device=device):
            model(x)


def naive_probe_epochs(model: nn.Module, bundle, tap: str, cfg: AnalysisConfig, epochs: int, device) -> list[float]:
    """The papers' way: every epoch re-runs the frozen backbone to ``tap`` on each batch, then one SGD step."""
    k = bundle.num_classes
    d = math.prod(tap_shapes(model, [tap], bundle.input_size)[tap])
    gen = torch.Generator().manual_seed(cfg.seed)
    w = (torch.rand(k, d, generator=gen) * 2 - 1).mul_(1.0 / math.sqrt(d)).to(device).requires_grad_(True)
    opt = torch.optim.SGD([w], lr=cfg.probe_lr, momentum=cfg.probe_momentum, weight_decay=cfg.probe_weight_decay,
                          nesterov=True)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=cfg.probe_lr_decay)
    times = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        for x, y in iterate_batches(bundle, bundle.train, cfg.probe_batch_size, shuffle=True, generator=gen,
                                    device=device):
            with torch.no_grad():
                f = run_to_taps(model, x, [tap])[tap]
            loss = F.cross_entropy(f.flatten(1) @ w.t(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        times.append(time.perf_counter() - t0)
    return times


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vgg16")
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--data", default="digits", help="digits | cifar10 | imagefolder:<path>")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--limit-train", type=int, default=None)
    ap.add_argument("--limit-test", type=int, default=None)
    ap.add_argument("--probe-epochs", type=int, default=50)
    ap.add_argument("--naive-epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=500, help="images per forward pass in (a) and (b)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of (a), (b), (d); the minimum is reported")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--checkpoint", default=None, help="weights (default: random; timings do not depend on them)")
    ap.add_argument("--save", default=None, help="also write the report to this text file")
    args = ap.parse_args(argv)

    lines: list[str] = []

    def out(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    bundle = load_data(args.data, root=args.data_root, limit_train=args.limit_train, limit_test=args.limit_test)
    load_s = time.perf_counter() - t0
    k, size = bundle.num_classes, bundle.input_size
    model = create_model(args.model, num_classes=k, in_chans=size[0], img_size=size[1], width=args.width,
                         checkpoint=args.checkpoint).to(device).eval()
    taps = default_taps(model)
    shapes = tap_shapes(model, taps, size)
    cfg = AnalysisConfig(probe_epochs=args.probe_epochs, batch_size=args.batch_size)
    n_train, n_test = len(bundle.train), len(bundle.test)

    out("== analysis speed benchmark ==")
    out(f"command: {' '.join([Path(sys.executable).name] + sys.argv)}")
    out(f"cpu: {cpu_model()} ({os.cpu_count()} logical cores) | torch threads: {torch.get_num_threads()} | "
        f"device: {device} | load average at start: {os.getloadavg()[0]:.2f}")
    out(f"python {platform.python_version()} | torch {torch.__version__} | compress {compress.__version__}")
    out(f"model: {args.model} width {args.width}, input {tuple(size)}, K={k}, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, {count_macs(model, size) / 1e6:.1f} M MACs/image")
    out("weights: " + (f"checkpoint {args.checkpoint}" if args.checkpoint else
                       "random initialisation (timings do not depend on the weight values)"))
    out(f"data: {bundle.name}, N train {n_train}, N test {n_test} (loaded in {load_s:.1f} s, not timed below)")
    out("taps: " + ", ".join(f"{t} {shapes[t]}" for t in taps))
    out(f"probe: {cfg.probe_epochs} epochs, batch {cfg.probe_batch_size}, SGD Nesterov lr {cfg.probe_lr}, "
        f"momentum {cfg.probe_momentum}, wd {cfg.probe_weight_decay}, lr x{cfg.probe_lr_decay}/epoch")
    out()

    # (a) plain forward pass of the whole model and (b) feature extraction of all taps (one pass per
    # split), interleaved --repeat times; the minimum of each is reported (the machine may be shared).
    common = dict(batch_size=args.batch_size, device=device, progress=False)
    a_runs, b_runs = [], []
    for _ in range(args.repeat):
        warm_up(model, bundle, device)
        t0 = time.perf_counter()
        plain_forward(model, bundle, args.batch_size, device)
        a_runs.append(time.perf_counter() - t0)
        warm_up(model, bundle, device)
        t0 = time.perf_counter()
        train = extract_features(model, bundle, bundle.train, taps, **common)
        test = extract_features(model, bundle, bundle.test, taps, **common)
        b_runs.append(time.perf_counter() - t0)
    a, b = min(a_runs), min(b_runs)
    cache_mb = (train.nbytes + test.nbytes) / 2**20

    # (c) probe training on the cached features
    t_first = taps[0]
    AnalysisConfig(probe_epochs=1).make_probe(k).fit(train.features[t_first][:100], train.labels[:100])  # warm-up
    probes, c_tap = {}, {}
    for t in taps:
        t0 = time.perf_counter()
        probes[t] = cfg.make_probe(k).fit(train.features[t], train.labels)
        c_tap[t] = time.perf_counter() - t0
    c = sum(c_tap.values())

    # (d) phase 3 on the test cache
    small = FeatureCache({t_first: test.features[t_first][:100]}, test.labels[:100])
    analyze_tap(t_first, probes[t_first].coef_, small, k, cfg.threshold)  # warm-up
    d_tap = {}
    for t in taps:
        runs = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            analyze_tap(t, probes[t].coef_, test, k, cfg.threshold)
            runs.append(time.perf_counter() - t0)
        d_tap[t] = min(runs)
    d = sum(d_tap.values())

    runs = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    out(f"(a) plain forward, whole model, train+test:        {a:8.2f} s  (min of {args.repeat}: {runs(a_runs)})")
    out(f"(b) feature extraction, {len(taps)} taps, train+test:      {b:8.2f} s  (min of {args.repeat}: {runs(b_runs)}; "
        f"cache {cache_mb:.0f} MiB)")
    out(f"(c) probe training, {len(taps)} taps x {cfg.probe_epochs} epochs, cached: {c:8.2f} s  (one run)")
    out(f"(d) phase 3 (analyze_tap), {len(taps)} taps, test cache:  {d:8.2f} s  (min of {args.repeat} per tap)")
    out("    per tap: " + ", ".join(f"{t}: probe {c_tap[t]:.2f} s / phase3 {d_tap[t]:.3f} s "
                                    f"(test acc {probes[t].score(test.features[t], test.labels):.3f})" for t in taps))
    out(f"(b)/(a) = {b / a:.3f}  target <= 1.3  {verdict(b / a <= 1.3)}")
    out(f"(d)/(a) = {d / a:.3f}  target <= 0.2  {verdict(d / a <= 0.2)}")
    out()

    # naive phase 2: backbone re-run up to the tap in every probe epoch
    warm_up(model, bundle, device, cfg.probe_batch_size)
    naive_total = 0.0
    out(f"naive phase 2 (papers' public code: backbone re-run to the tap every epoch, batch {cfg.probe_batch_size}, "
        f"no augmentation, train split only):")
    for t in taps:
        times = naive_probe_epochs(model, bundle, t, cfg, args.naive_epochs, device)
        per_epoch = min(times)  # the fastest measured epoch: noise from other processes does not favour us
        naive_total += per_epoch * cfg.probe_epochs
        out(f"    {t}: {per_epoch:.2f} s/epoch (fastest of {len(times)} measured epochs: "
            f"{', '.join(f'{x:.2f}' for x in times)} s) -> {per_epoch * cfg.probe_epochs:.1f} s at {cfg.probe_epochs} epochs")
    ours = b + c
    speedup = naive_total / ours
    out(f"naive total at {cfg.probe_epochs} epochs: {naive_total:.1f} s  "
        f"(EXTRAPOLATED linearly: fastest of {args.naive_epochs} measured epochs per tap x {cfg.probe_epochs})")
    out(f"ours, phase 2 = (b)+(c): {ours:.1f} s  (includes the test-split pass, which the naive figure does not)")
    out(f"speed-up at {cfg.probe_epochs} probe epochs = {speedup:.1f}x  target >= 20x  {verdict(speedup >= 20)}")

    out(f"load average at end: {os.getloadavg()[0]:.2f} (other processes on the machine inflate all timings)")
    if args.save:
        atomic_write_text(args.save, "\n".join(lines) + "\n")
        print(f"saved to {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
