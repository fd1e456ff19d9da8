"""Phase 3 at ImageNet scale: time and peak memory of one tap's phase 3, before and after issue 17.

Random tap features with the shapes of the paper's EfficientNet-B0 stages on ImageNet (K = 1,000,
Table 3 of the second paper, taps average-pooled 7 x 7 as there, plus stage 8 with 320 filters)
and of VGG-16's taps on CIFAR-100 (K = 100, Table 1), 50,000 test images by default. Each image
gets a label; its features are ``relu(mu[label] + noise)`` with a sparse random class mean ``mu``,
and the probe weight is the centred class mean plus noise, so that the field matrices have
clusters and noise like a trained probe's.

What is timed, per tap, in a fresh subprocess (so that ``VmHWM`` of ``/proc/self/status``, the
kernel's high-water mark of the resident set, is the peak of that case alone):

- ``before``: the implementation of commit 75618ec (``fields.py``, ``clusters.py``, ``stats.py``,
  ``result.py`` read with ``git show`` into a temporary package, and its ``analyze_tap`` copied
  below): dense (C, K, K) float64 arrays and an (images, C, K) tensor per batch of 1,000 images;
- ``after``: :func:`compress.analysis.engine.analyze_tap` with the default ``AnalysisConfig``
  (``decision: auto``, ``save_fields: auto``, ``max_memory_gb: 4``);
- ``after+decision``: the same with ``decision: all`` (only where ``auto`` leaves it off);

each followed by writing the tap's artifact (``AnalysisResult.save``). Reported: phase-3 seconds,
artifact-writing seconds, artifact size, resident memory before phase 3 (features and imports)
and the peak. ``before`` is not started where its dense arrays alone would exceed
``--before-max-gb`` (estimated from the shapes) or where it would run for longer than
``--before-timeout`` seconds; the output says which and why. Where both ran, the clusters and
noise of ``after`` are checked to equal ``before``'s.

Run (from the repository root). On a shared 2-core machine one torch thread is the stable
setting (two threads wait for each other whenever another job takes a core); the second run
repeats the issue's target case with two threads:

    .venv/bin/python benchmarks/phase3_scale.py --threads 1 --save benchmarks/results/phase3_scale.txt
    .venv/bin/python benchmarks/phase3_scale.py --threads 2 --cases stage9 --impls after after+decision \\
        --save benchmarks/results/phase3_scale.txt --append
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
BASE_COMMIT = "75618ec7805b5d1112c8c5981e889ab02e6b4f89"  # phase 3 before issue 17
OLD_MODULES = ("fields", "clusters", "stats", "result")
GIB = 2**30
TARGET_CASE = (1000, 1280, 1, 1)  # the targets are for this tap (EfficientNet-B0 stage 9)

# (family, tap, K, C, H, W): EfficientNet-B0 on ImageNet (stage outputs pooled 7 x 7), VGG-16 on CIFAR-100 and
# VGG-16's first tap on CIFAR-10.
CASES = [
    ("EfficientNet-B0", "stage9", 1000, 1280, 1, 1),
    ("EfficientNet-B0", "stage8", 1000, 320, 1, 1),
    ("EfficientNet-B0", "stage7", 1000, 192, 1, 1),
    ("EfficientNet-B0", "stage5", 1000, 80, 2, 2),
    ("EfficientNet-B0", "stage4", 1000, 40, 4, 4),
    ("EfficientNet-B0", "stage3", 1000, 24, 8, 8),
    ("EfficientNet-B0", "stage1", 1000, 32, 16, 16),
    ("VGG-16", "layer13", 100, 512, 1, 1),
    ("VGG-16", "layer10", 100, 512, 2, 2),
    ("VGG-16", "layer7", 100, 256, 4, 4),
    ("VGG-16", "layer4", 100, 128, 8, 8),
    ("VGG-16", "layer2", 100, 64, 16, 16),
    ("VGG-16 on CIFAR-10", "c10-layer2", 10, 64, 16, 16),  # the one case not faster: K small, many positions
]


# ----------------------------------------------------------------------------- worker (one case)


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def make_tap(n: int, k: int, c: int, h: int, w: int, seed: int = 0):
    """Random features (N, C, H, W) float32, labels (N,) and a probe weight (K, C*H*W)."""
    from compress.analysis.features import FeatureCache

    g = torch.Generator().manual_seed(seed)
    mu = torch.rand(k, c, h, w, generator=g) * (torch.rand(k, c, 1, 1, generator=g) < 0.1) * 3.0
    labels = torch.randperm(n, generator=g) % k
    feats = torch.empty(n, c, h, w)
    for start in range(0, n, 1000):  # bounded temporaries
        y = labels[start:start + 1000]
        feats[start:start + len(y)] = torch.relu(mu[y] + torch.randn(len(y), c, h, w, generator=g) - 0.5)
    weight = (mu - mu.mean(0)).reshape(k, -1) + 0.3 * torch.randn(k, c * h * w, generator=g)
    return FeatureCache(features={"tap": feats}, labels=labels), weight


def _old_package(folder: Path) -> str:
    """Write the base commit's phase-3 modules as package ``old_phase3`` under ``folder``."""
    pkg = folder / "old_phase3"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    for mod in OLD_MODULES:
        text = subprocess.run(["git", "-C", str(REPO), "show", f"{BASE_COMMIT}:compress/analysis/{mod}.py"],
                              check=True, capture_output=True, text=True).stdout
        (pkg / f"{mod}.py").write_text(text.replace("compress.analysis.", "old_phase3."))
    return str(folder)


def old_analyze_tap(name, weight, test, num_classes, threshold):
    """``analyze_tap`` of the base commit (its body, on the base commit's modules)."""
    from old_phase3.clusters import find_clusters_batched, noise_batched
    from old_phase3.fields import clip_fields, field_matrices, normalize_fields
    from old_phase3.result import TapAnalysis
    from old_phase3.stats import label_snr, layer_stats, snr_estimates

    feats = test.features[name]
    c, h, w = feats.shape[1], *(feats.shape[2:4] if feats.dim() == 4 else (1, 1))
    fields, decision = field_matrices(feats, test.labels, weight, num_classes)
    normalized = normalize_fields(fields)
    clipped = clip_fields(normalized, threshold)
    ids = find_clusters_batched(clipped)
    noise = noise_batched(clipped, ids)
    stats = layer_stats(ids, noise)
    snr = label_snr(clipped, fields, ids)
    return TapAnalysis(
        name=name, n_filters=c, spatial=(h, w), accuracy=float("nan"), train_accuracy=float("nan"),
        threshold=threshold, probe_weight=weight.reshape(num_classes, c, h, w).numpy(), fields=fields.numpy(),
        decision=decision.numpy(), normalized=normalized.numpy(), clipped=clipped.numpy(), cluster_ids=ids.numpy(),
        noise=noise.numpy(), stats=stats, snr={k: {p: v.numpy() for p, v in d.items()} for k, d in snr.items()},
        estimates=snr_estimates(stats, c, num_classes),
    )


def worker(spec: dict) -> dict:
    """Run one case; returns the figures as a dict (printed as JSON by ``--worker``)."""
    torch.set_num_threads(spec["threads"])
    k, c, h, w = spec["k"], spec["c"], spec["h"], spec["w"]
    test, weight = make_tap(spec["images"], k, c, h, w)
    with tempfile.TemporaryDirectory() as tmp:
        if spec["impl"] == "before":
            sys.path.insert(0, _old_package(Path(tmp) / "old"))
            from old_phase3.result import AnalysisResult

            def run():
                return old_analyze_tap("tap", weight, test, k, 0.3)
        else:
            from compress.analysis.engine import AnalysisConfig, analyze_tap
            from compress.analysis.result import AnalysisResult

            cfg = AnalysisConfig(decision="all" if spec["impl"] == "after+decision" else "auto")

            def run():
                return analyze_tap("tap", weight, test, k, 0.3, cfg=cfg)
        rss0 = _status_bytes("VmRSS")
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        tap = run()
        t1 = time.perf_counter()
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        result = AnalysisResult(model="random", dataset="random", label_names=[str(i) for i in range(k)], taps=[tap],
                                plateau="tap", plateau_tolerance=0.5)
        result.save(Path(tmp) / "run")
        t2 = time.perf_counter()
        size = sum(p.stat().st_size for p in (Path(tmp) / "run").rglob("*") if p.is_file())
    ids = np.asarray(tap.cluster_ids, dtype=np.int64)
    digest = hashlib.sha1(ids.tobytes() + np.asarray(tap.noise, dtype=np.int64).tobytes()).hexdigest()[:12]
    cpu = cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime
    return {"phase3_s": t1 - t0, "phase3_cpu_s": cpu, "save_s": t2 - t1, "artifact_bytes": size, "rss_before": rss0,
            "peak": _status_bytes("VmHWM"), "digest": digest, "noise": tap.stats.noise,
            "clusters_per_filter": tap.stats.clusters_per_filter, "cluster_size": tap.stats.cluster_size}


# ----------------------------------------------------------------------------- driver


def before_estimate(n: int, k: int, c: int, h: int, w: int) -> tuple[float, float]:
    """(bytes, seconds) the base commit's phase 3 would need: its dense arrays and per-batch
    tensors, and its (images, C, K) einsum at a conservative 1.5 G multiply-adds/s."""
    dense = c * k * k
    nbytes = dense * (8 * 6 + 2) + 1000 * c * k * 12 + n * c * h * w * 4
    seconds = n * c * k * h * w / 1.5e9 + dense * 8 * 12 / 2e9
    return nbytes, seconds


def _target(r: dict, default: bool) -> str:
    """The issue's targets for K = 1,000, C = 1,280, 1 x 1 (time and artifact: default run only)."""
    checks = [("peak < 4 GiB", r["peak"] < 4 * GIB)]
    if default:
        checks += [("phase 3 < 60 s", r["phase3_s"] < 60), ("artifact < 1 GB", r["artifact_bytes"] < 1e9)]
    return ", ".join(f"{name}: {'PASS' if ok else 'FAIL'}" for name, ok in checks)


def run_case(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"skipped": f"did not finish within {timeout:.0f} s (stopped)"}
    if proc.returncode != 0:
        return {"skipped": f"failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt(r: dict) -> str:
    if "skipped" in r:
        return f"not run: {r['skipped']}"
    return (f"phase 3 {r['phase3_s']:7.2f} s (CPU {r['phase3_cpu_s']:7.2f} s) | save {r['save_s']:6.2f} s"
            f" | artifact {r['artifact_bytes'] / 1e6:8.1f} MB"
            f" | RSS before {r['rss_before'] / GIB:5.2f} GiB | peak (VmHWM) {r['peak'] / GIB:5.2f} GiB"
            f" | n {r['noise']:.1f} N_c {r['clusters_per_filter']:.2f} C_s {r['cluster_size']:.2f}")


def run_tap(args, env: dict, out, family: str, tap: str, k: int, c: int, h: int, w: int) -> None:
    """Run the implementations of one tap, each in a fresh process, and print one line each."""
    out(f"\n{family} {tap}: K = {k}, C = {c}, H x W = {h} x {w}")
    decision_by_default = k <= 100
    digests = {}
    for impl in args.impls:
        if impl == "after+decision" and decision_by_default:
            continue  # 'after' computes them already
        label = impl + (" (decision on)" if impl == "after" and decision_by_default else "")
        timeout = args.timeout
        if impl == "before":
            nbytes, seconds = before_estimate(args.images, k, c, h, w)
            if nbytes > args.before_max_gb * GIB:
                out(f"  {label:<22} not run: needs about {nbytes / GIB:.0f} GiB (> {args.before_max_gb:g} GiB "
                    f"allowed on this shared 24 GiB machine)")
                continue
            if seconds > args.before_timeout:
                out(f"  {label:<22} not run: estimated {seconds:.0f} s (> {args.before_timeout:g} s)")
                continue
            timeout = args.before_timeout
        spec = {"impl": impl, "k": k, "c": c, "h": h, "w": w, "images": args.images, "threads": args.threads}
        r = run_case(spec, timeout)
        out(f"  {label:<22} {_fmt(r)}")
        if "digest" in r:
            digests[impl] = r["digest"]
            if (k, c, h, w) == TARGET_CASE and impl != "before":
                out(f"  {'':<22} target {_target(r, impl == 'after')}")
    if "before" in digests and len(digests) > 1:
        same = all(d == digests["before"] for d in digests.values())
        out(f"  {'':<22} clusters and noise of after {'EQUAL' if same else 'DIFFER FROM'} before's")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--images", type=int, default=50_000)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)")
    p.add_argument("--cases", nargs="*", default=None, help="taps to run (e.g. stage9 layer10); default all")
    p.add_argument("--impls", nargs="*", default=["before", "after", "after+decision"])
    p.add_argument("--before-max-gb", type=float, default=10.0, help="skip 'before' above this estimated memory")
    p.add_argument("--before-timeout", type=float, default=900.0, help="skip or stop 'before' above this many seconds")
    p.add_argument("--timeout", type=float, default=1800.0, help="stop any case after this many seconds")
    p.add_argument("--save", default=None, help="also write the output to this text file")
    p.add_argument("--append", action="store_true", help="add to the --save file instead of replacing it")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    from compress.io import atomic_write_text
    from compress.system import environment

    lines: list[str] = []

    def out(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    env = environment()
    out("== phase 3 at scale (issue 17) ==")
    out("command: python " + " ".join([Path(__file__).relative_to(REPO).as_posix(), *(argv or sys.argv[1:])]))
    out(f"cpu: {env['cpu']} ({env['cpu_count']} logical cores, affinity {env['cpu_affinity']}) | torch threads: "
        f"{args.threads} | load average at start: {env['load_average']}")
    out(f"python {env['python']} | torch {env['torch']} | numpy {env['numpy']} | compress {env['compress']}")
    out(f"images: {args.images:,}; before = commit {BASE_COMMIT[:7]}; after = working tree, default AnalysisConfig")
    for family, tap, k, c, h, w in CASES:
        if not args.cases or tap in args.cases:
            run_tap(args, env, out, family, tap, k, c, h, w)
    out(f"\nload average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.save:
        before = Path(args.save).read_text() + "\n" if args.append and Path(args.save).is_file() else ""
        atomic_write_text(args.save, before + "\n".join(lines) + "\n")
        print(f"saved to {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
