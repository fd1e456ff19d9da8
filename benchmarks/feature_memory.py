"""Peak memory of a feature cache larger than RAM should allow: VGG-16's tap after conv 2 on full CIFAR-10.

The tap ``features.pool2`` of a width-1.0 VGG-16 is 64 x 16 x 16 = 16,384 features per image;
over the 50,000 training images that is 3.05 GiB in float32 (1.53 GiB in float16). With
``max_memory_gb`` below that, :func:`compress.analysis.features.extract_features` writes it to a
memory-mapped ``.npy`` file and, every 256 MiB written, flushes the pages and drops them from
the process (``madvise(MADV_DONTNEED)``), so the resident set stays bounded.

Only conv 1-2 run (the forward stops after the deepest tap). Reported, from ``/proc/self/status``:

- ``VmHWM``: the kernel's high-water mark of the whole resident set (anonymous memory plus
  file pages mapped into the process), the strictest figure;
- ``RssAnon`` / ``RssFile``: the anonymous (heap, tensors) and file-backed (the memory map)
  parts, sampled every 50 ms by a thread, with their peaks;
- ``ru_maxrss`` from ``getrusage``, which equals ``VmHWM``.

The decoded CIFAR-10 images (uint8) take 150 MB for the training split and 30 MB for the test
split. After extraction, the cache is checked against a direct forward pass on a few batches and
read back once in chunks (as probe training does), with the resident memory of that pass too.

Run (from the repository root; one thread, as the machine is shared):

    .venv/bin/python benchmarks/feature_memory.py --threads 1 --save benchmarks/results/feature_memory.txt
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import compress
from compress.data import iterate_batches, load_data
from compress.analysis.features import extract_features
from compress.io import atomic_write_text
from compress.models import create_model, run_to_taps

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"


def status() -> dict[str, int]:
    """Memory lines of ``/proc/self/status`` in bytes (VmRSS, VmHWM, RssAnon, RssFile, RssShmem)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(value.split()[0]) * 1024
    return out


class Sampler:
    """Peaks of RssAnon and RssFile, sampled by a thread while the block runs."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            s = status()
            for k in self.peak:
                self.peak[k] = max(self.peak[k], s[k])
            time.sleep(self.interval)

    def __enter__(self) -> "Sampler":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=f"imagefolder:{DEFAULT_DATA}")
    p.add_argument("--model", default="vgg16")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--tap", default="features.pool2")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--max-memory-gb", type=float, default=0.5, help="caches above this go to a memory-mapped file")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--limit-train", type=int, default=None, help="fewer images, for a quick try")
    p.add_argument("--cache-dir", default=None, help="folder for the cache file (default: a temporary folder)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--save", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lines: list[str] = []

    def out(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    out("== feature cache memory benchmark ==")
    out(f"command: python {' '.join(sys.argv)}")
    out(f"cpu: {cpu_model()} ({os.cpu_count()} logical cores) | torch threads: {torch.get_num_threads()} | "
        f"RAM {gib(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'))} | load average at start: "
        f"{os.getloadavg()[0]:.2f}")
    out(f"python {platform.python_version()} | torch {torch.__version__} | compress {compress.__version__}")
    s0 = status()
    out(f"after imports: RSS {gib(s0['VmRSS'])} (anon {gib(s0['RssAnon'])}, file {gib(s0['RssFile'])})")

    t0 = time.perf_counter()
    bundle = load_data(args.data, limit_train=args.limit_train)
    split = bundle.train
    s1 = status()
    images = split.images.numel() + bundle.test.images.numel()
    out(f"data: {bundle.name}, {len(split):,} training images {tuple(split.images.shape[1:])} uint8 "
        f"(decoded train + test images {images / 1e6:.0f} MB), loaded in {time.perf_counter() - t0:.1f} s; "
        f"RSS {gib(s1['VmRSS'])} (anon {gib(s1['RssAnon'])})")

    torch.manual_seed(0)
    model = create_model(args.model, num_classes=bundle.num_classes, width=args.width).eval()
    per_image = run_to_taps(model, torch.zeros(1, *bundle.input_size), [args.tap])[args.tap][0].numel()
    size = len(split) * per_image * (4 if args.dtype == "float32" else 2)
    out(f"model: {args.model} width {args.width}, {sum(p.numel() for p in model.parameters()):,} parameters; tap "
        f"{args.tap}: {per_image:,} features/image -> cache {len(split):,} x {per_image:,} {args.dtype} = "
        f"{gib(size)} ({size / 1e9:.2f} GB); max_memory_gb {args.max_memory_gb} -> "
        f"{'memory-mapped file' if size > args.max_memory_gb * 2**30 else 'in memory'}")

    folder = Path(args.cache_dir) if args.cache_dir else Path(tempfile.mkdtemp(prefix="feature-memory-"))
    t0 = time.perf_counter()
    with Sampler() as sampler:
        cache = extract_features(model, bundle, split, [args.tap], dtype=args.dtype, batch_size=args.batch_size,
                                 max_memory_gb=args.max_memory_gb, cache_dir=folder, device=torch.device("cpu"),
                                 progress=False)
    seconds = time.perf_counter() - t0
    s2 = status()
    where = "in memory"
    if cache.on_disk:
        file = cache.folder / f"{args.tap}.npy"
        where = f"memory-mapped file {file} ({file.stat().st_size / 2**30:.2f} GiB)"
    out(f"extraction: {seconds:.1f} s ({len(split) / seconds:,.0f} images/s, batch {args.batch_size}); {where}")
    out(f"  peak during extraction (sampled every 50 ms): RssAnon {gib(sampler.peak['RssAnon'])}, "
        f"RssFile {gib(sampler.peak['RssFile'])}, RSS {gib(sampler.peak['VmRSS'])}")
    out(f"  VmHWM (kernel's peak resident set since start, anon + file) {gib(s2['VmHWM'])}; ru_maxrss "
        f"{gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}")
    out(f"  after extraction: RSS {gib(s2['VmRSS'])} (anon {gib(s2['RssAnon'])}, file {gib(s2['RssFile'])})")
    hwm_extraction = s2["VmHWM"]

    # The cache holds what a direct forward pass gives (first, middle and last batch).
    tensor = cache.features[args.tap]
    for start in (0, len(split) // 2, len(split) - args.batch_size):
        idx = torch.arange(start, min(len(split), start + args.batch_size))
        x, _ = next(iterate_batches(bundle, split.subset(idx), len(idx)))
        with torch.inference_mode():
            direct = run_to_taps(model, x, [args.tap])[args.tap].to(tensor.dtype)
        assert torch.equal(tensor[start:start + len(idx)], direct), f"cache differs from a direct pass at {start}"
    out("  check: cache rows equal a direct forward pass (first, middle, last batch)")

    # Read the whole cache back in chunks, as each probe epoch does: the file's pages map into the
    # process (RssFile) but stay the kernel's reclaimable page cache; dropping them as we go
    # (FeatureCache.release) shows the pass does not need them resident.
    anon_peak = sampler.peak["RssAnon"]
    for drop in (False, True):
        cache.release()
        t0 = time.perf_counter()
        total = torch.zeros(per_image, dtype=torch.float64)
        with Sampler() as reading:
            for start in range(0, len(split), 1000):
                total += tensor[start:start + 1000].reshape(-1, per_image).double().sum(0)
                if drop:
                    cache.release()
        anon_peak = max(anon_peak, reading.peak["RssAnon"])
        out(f"read-back in chunks of 1,000{', pages dropped after each' if drop else ''}: "
            f"{time.perf_counter() - t0:.1f} s; peak RssAnon {gib(reading.peak['RssAnon'])}, "
            f"RssFile {gib(reading.peak['RssFile'])}, RSS {gib(reading.peak['VmRSS'])}")
    out("  (RssFile: pages of the cache file mapped into the process, clean page cache the kernel reclaims "
        "under pressure, not memory the pass needs)")
    verdict = "PASS" if hwm_extraction <= 4 * 2**30 else "FAIL"
    out(f"peak RAM of the extraction (VmHWM, anon + file) {gib(hwm_extraction)}  target <= 4 GiB  {verdict}")
    out(f"peak anonymous memory over the whole run {gib(anon_peak)}; "
        f"VmHWM over the whole run {gib(status()['VmHWM'])} (includes the mapped file pages of the first read-back)")
    out(f"load average at end: {os.getloadavg()[0]:.2f}")
    del cache, tensor
    if not args.cache_dir:
        shutil.rmtree(folder, ignore_errors=True)
    if args.save:
        atomic_write_text(args.save, "\n".join(lines) + "\n")
        print(f"saved to {args.save}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
