"""Streaming image folders: peak resident memory against the number of images, and loader speed.

The script makes its own ImageNet-layout folders (``train/<class>/*.jpg``, ``test/<class>/*.jpg``),
256 x 256 JPEGs made from CIFAR-10 images upscaled (bicubic), so nothing is downloaded: class
``c<i>`` takes distinct images of CIFAR-10 class ``i mod 10``. Two folders of ``--per-class``
sizes (the second at least 4x the first) are made, then:

1. **Loader throughput** on the larger folder, every training file once, ``--workers`` decoding
   processes, batches of 64, no model: the decode-only ceiling (a ``DataLoader`` whose workers only
   decode each file to pixels, :func:`compress.images.decode_image`), the streamed evaluation
   transform (resize + centre crop to 224) and the streamed training transform (random-resized
   crop + flip at 224), as :func:`compress.streaming.stream_batches` yields them. The target: the
   loader at least 80 % of the ceiling.
2. **Peak resident memory** of ``compress analyze --model timm:resnet18 --image-size 224`` (random
   weights: memory does not depend on them) streaming each folder, and decoding the larger one into
   memory (``--stream false``): ``VmHWM`` of the analysing process (the kernel's high-water mark of
   its resident set), and the largest of its decoding workers. The targets: streamed, the two sizes
   within 10 % of each other and within 4 GiB.

Run (from the repository root; ../shared/data/cifar10 is the source of the pictures)::

    .venv/bin/python benchmarks/streaming.py --save benchmarks/results/streaming.txt
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = Path("../shared/data/cifar10")

_CHILD = r"""
import json, resource, sys
from pathlib import Path
from compress.cli.main import main
rc = main(sys.argv[1:])
hwm = next(int(l.split()[1]) * 1024 for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM"))
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"rc": rc, "vmhwm": hwm, "workers_max_rss": kids}))
"""


def cpu_line(threads: int) -> str:
    model, flags = platform.processor() or "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("?", "x86_64", ""):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    vnni = "avx512_vnni" if "avx512_vnni" in flags else ("avx_vnni" if "avx_vnni" in flags else "no VNNI")
    avx = "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "no AVX2")
    return (f"CPU: {model}, {os.cpu_count()} logical CPUs, {avx}, {vnni}; torch threads {threads}; "
            f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def make_folder(dest: Path, source: Path, classes: int, per_class: int, test_per_class: int, side: int) -> Path:
    """An ImageNet-layout folder of ``classes`` x ``per_class`` training and ``test_per_class`` test
    JPEGs of ``side`` px; reused when already complete."""
    from PIL import Image

    done = dest / ".complete"
    if done.is_file():
        return dest
    cifar = sorted(p.name for p in (source / "train").iterdir() if p.is_dir())
    for split, n in (("train", per_class), ("test", test_per_class)):
        for c in range(classes):
            src = sorted((source / split / cifar[c % len(cifar)]).iterdir())
            offset = (c // len(cifar)) * n  # class c and c + 10 take different pictures
            if offset + n > len(src):
                raise SystemExit(f"error: {source / split / cifar[c % len(cifar)]} has {len(src)} images; "
                                 f"{offset + n} needed (fewer classes or images per class)")
            out = dest / split / f"c{c:03d}"
            out.mkdir(parents=True, exist_ok=True)
            for k, f in enumerate(src[offset:offset + n]):
                with Image.open(f) as im:
                    im.convert("RGB").resize((side, side), Image.BICUBIC).save(out / f"{k:05d}.jpg", quality=90)
    done.write_text("ok\n")
    return dest


class _DecodeOnly(torch.utils.data.Dataset):
    """The bare work: file -> pixels (resized to ``size`` when given) -> tensor, nothing else."""

    def __init__(self, files: list[str], size: int | None):
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        from compress.images import decode_image

        a = decode_image(self.files[i], 3, (self.size, self.size) if self.size else None)
        return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def _throughput(folder: Path, workers: int, size: int, repeats: int) -> dict[str, float]:
    """Images per second of bare decoding (to the files' own size, and resized to ``size``: the
    ceiling), streamed evaluation and streamed training, each the best of ``repeats`` passes over
    every training file (interleaved, so load drifts hit all)."""
    from compress.streaming import StreamSet, scan_folder, stream_batches

    files, labels, _ = scan_folder(folder / "train", None)
    split = StreamSet([str(f) for f in files], labels, size, resize=True, workers=workers)
    order = torch.arange(len(files))

    def bare(side: int | None):
        def run() -> None:
            loader = torch.utils.data.DataLoader(_DecodeOnly(split.files, side), batch_size=64, num_workers=workers,
                                                 prefetch_factor=2, multiprocessing_context="fork")
            for _ in loader:
                pass
        return run

    def evaluation() -> None:
        for _ in stream_batches(split, order, 64, workers=workers):
            pass

    def training() -> None:
        for _ in stream_batches(split, order, 64, augmented=True, seed=1, workers=workers):
            pass

    runs = {"decode only (own size)": bare(None), f"decode + resize to {size} (ceiling)": bare(size),
            "stream_batches, evaluation": evaluation, "stream_batches, training": training}
    best = {k: float("inf") for k in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return {k: len(files) / v for k, v in best.items()}


def _analyze(folder: Path, stream: str, out: Path, checkpoint: Path, args: argparse.Namespace) -> dict[str, float]:
    argv = ["analyze", "--model", "timm:resnet18", "--checkpoint", str(checkpoint), "--data", f"imagefolder:{folder}",
            "--image-size", "224",
            "--stream", stream, "--max-memory-gb", str(args.max_memory_gb), "--workers", str(args.workers),
            "--probe-epochs", str(args.probe_epochs), "--feature-dtype", "float16",
            "--extract-batch-size", str(args.batch_size), "--out", str(out), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _CHILD, *argv], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"error: compress analyze failed on {folder} ({stream}):\n{done.stderr[-2000:]}")
    doc = json.loads(done.stdout.strip().splitlines()[-1])
    if doc["rc"] != 0:
        raise SystemExit(f"error: compress analyze exited {doc['rc']}:\n{done.stderr[-2000:]}")
    return {**doc, "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="CIFAR-10 ImageFolder (train/, test/)")
    p.add_argument("--work", type=Path, default=None, help="where the generated folders go (default: a temporary one)")
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--per-class", type=int, nargs=2, default=[25, 100], metavar=("SMALL", "LARGE"))
    p.add_argument("--test-per-class", type=int, default=10)
    p.add_argument("--side", type=int, default=256, help="side of the generated JPEGs")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="passes of each loader (best kept)")
    p.add_argument("--probe-epochs", type=int, default=1)
    p.add_argument("--max-memory-gb", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=50, help="images per forward pass of the analysis (its "
                   "activations, not the data, set the peak: both folders must hold more than one batch)")
    p.add_argument("--parts", nargs="+", choices=["throughput", "memory"], default=["throughput", "memory"])
    p.add_argument("--save", type=Path, default=None)
    args = p.parse_args()
    if args.per_class[1] < 4 * args.per_class[0]:
        p.error("the larger folder must hold at least 4x the images of the smaller (--per-class SMALL LARGE)")
    if not (args.source / "train").is_dir():
        raise SystemExit(f"error: {args.source} has no train/ folder; pass --source to a CIFAR-10 ImageFolder")
    torch.set_num_threads(args.threads)
    lines: list[str] = []

    def say(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    say(f"# streaming benchmark ({time.strftime('%Y-%m-%d %H:%M')})")
    say(f"command: {' '.join(['python', 'benchmarks/streaming.py', *sys.argv[1:]])}")
    say(cpu_line(args.threads))
    say(f"torch {torch.__version__}; decoding workers {args.workers}; memory budget --max-memory-gb {args.max_memory_gb}")
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = args.work or Path(tmp)
        folders = {}
        for n in args.per_class:
            t0 = time.perf_counter()
            folders[n] = make_folder(work / f"synthetic-{args.classes}x{n}", args.source, args.classes, n,
                                     args.test_per_class, args.side)
            say(f"folder {args.classes} classes x {n} training (+{args.test_per_class} test) JPEGs of "
                f"{args.side}px: {args.classes * n} training images ({time.perf_counter() - t0:.0f} s to make)")
        if "throughput" in args.parts:
            _part_throughput(folders[args.per_class[1]], args, say)
        if "memory" in args.parts:
            _part_memory(folders, work, args, say)
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text("\n".join(lines) + "\n")


def _part_throughput(folder: Path, args: argparse.Namespace, say) -> None:
    large = args.per_class[1]
    say()
    say(f"## 1. loader throughput ({args.classes * large} training files, {args.workers} workers, batch 64, "
        f"no model, best of {args.repeats})")
    speed = _throughput(folder, args.workers, 224, args.repeats)
    ceiling = speed["decode + resize to 224 (ceiling)"]
    say("The ceiling: a bare DataLoader over the same files with the same workers, each file decoded and")
    say("resized to the input size (the work no loader can skip), default collate; decoding alone is shown too.")
    say("| loader | images/s | of the ceiling |")
    say("| --- | --- | --- |")
    for name, v in speed.items():
        say(f"| {name} | {v:.0f} | {v / ceiling:.0%} |")
    ev, tr = speed["stream_batches, evaluation"], speed["stream_batches, training"]
    say(f"target: the streamed loader >= 80 % of the ceiling: evaluation {'met' if ev >= 0.8 * ceiling else 'NOT met'}"
        f", training {'met' if tr >= 0.8 * ceiling else 'NOT met'}")


def _part_memory(folders: dict[int, Path], work: Path, args: argparse.Namespace, say) -> None:
    small, large = args.per_class
    say()
    say(f"## 2. peak resident memory of compress analyze --model timm:resnet18 --image-size 224 "
        f"(probe epochs {args.probe_epochs}, float16 features, --extract-batch-size {args.batch_size})")
    say("| folder | data path | training images | decoded size | VmHWM (analysing process) | "
        "largest worker | wall s |")
    say("| --- | --- | --- | --- | --- | --- | --- |")
    peaks = {}
    from compress.models import create_model

    checkpoint = work / "resnet18-random.pt"  # random weights: the memory does not depend on them
    torch.save(create_model("timm:resnet18", num_classes=args.classes).state_dict(), checkpoint)
    for n, stream in ((small, "true"), (large, "true"), (large, "false")):
        r = _analyze(folders[n], stream, work / f"analysis-{n}-{stream}", checkpoint, args)
        images = args.classes * (n + args.test_per_class)
        peaks[(n, stream)] = r["vmhwm"]
        say(f"| {args.classes}x{n} | {'streamed' if stream == 'true' else 'in memory'} | {args.classes * n} | "
            f"{images * 3 * 224 * 224 / 2**30:.2f} GiB | {r['vmhwm'] / 2**30:.2f} GiB | "
            f"{r['workers_max_rss'] / 2**30:.2f} GiB | {r['seconds']:.0f} |")
    a, b = peaks[(small, "true")], peaks[(large, "true")]
    change = b / a - 1
    say(f"streamed, {large // small}x the images: peak {change:+.1%} "
        f"(target within 10 %: {'met' if abs(change) <= 0.10 else 'NOT met'}); largest streamed peak "
        f"{max(a, b) / 2**30:.2f} GiB (target <= 4 GiB: {'met' if max(a, b) <= 4 * 2**30 else 'NOT met'}); "
        f"in memory the larger folder peaks at {peaks[(large, 'false')] / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
