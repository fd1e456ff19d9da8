"""Feature extraction for all taps in one pass over the data, cached in memory or on disk."""

from __future__ import annotations

import math
import mmap
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from compress.progress import tqdm

from compress import distributed
from compress.accel import inference_forward
from compress.data import DataBundle, ImageSet, StreamSet, iterate_batches
from compress.errors import UserError
from compress.models.taps import StopForward, capture, tap_shapes

__all__ = ["FeatureCache", "extract_features"]

_DTYPES = {"float32": (torch.float32, np.float32), "float16": (torch.float16, np.float16)}
_RELEASE_BYTES = 256 * 2**20  # on-disk caches: flush and drop written pages this often


@dataclass
class FeatureCache:
    """Tap outputs for one split: ``features[tap]`` is (N, C, H, W), ``labels`` is (N,).

    With augmented copies (``versions`` > 1, :func:`extract_features` ``augment``) ``features[tap]``
    holds ``versions * N`` rows, version-major: the plain images first (rows ``0..N-1``, what
    :meth:`plain` returns), then copy v of image i at row ``v * N + i``; ``labels`` stays (N,).

    Arrays live in memory, or in memory-mapped files under ``folder`` when they would not fit
    (``on_disk``); either way they are torch tensors sharing the storage. The files are removed
    when the cache is garbage-collected.
    """

    features: dict[str, torch.Tensor]
    labels: torch.Tensor
    on_disk: bool = False
    folder: Path | None = None
    maps: dict[str, np.memmap] = field(default_factory=dict, repr=False)
    versions: int = 1

    def __len__(self) -> int:
        return len(self.labels)

    def plain(self, tap: str) -> torch.Tensor:
        """The features of the plain (unaugmented) images at ``tap``: the first ``len(self)`` rows."""
        return self.features[tap][:len(self.labels)]

    def release(self) -> None:
        """Drop the file pages an on-disk cache has mapped into this process (they are read back
        from the file on the next access); a no-op for an in-memory cache."""
        _release(self.maps)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.features.values())


def _pooled_shape(shape: tuple[int, ...], k: int) -> tuple[int, ...]:
    if len(shape) != 3:
        return shape
    c, h, w = shape
    return (c, -(-h // k), -(-w // k))


def _cache_folder(cache_dir: str | Path | None) -> Path:
    """A fresh folder for one cache (inside ``cache_dir`` when given), the same on every process."""
    if cache_dir is None and distributed.world_size() > distributed.local_world_size():
        raise UserError("feature caches on disk across several nodes need --cache-dir on storage every node shares")
    folder = None
    if distributed.is_main():
        try:
            if cache_dir is not None:
                Path(cache_dir).mkdir(parents=True, exist_ok=True)
            folder = tempfile.mkdtemp(prefix="compress-features-", dir=cache_dir)
        except OSError as e:
            raise UserError(f"cache folder {str(cache_dir)!r} is not writable ({e.strerror}); pass a writable "
                            f"--cache-dir") from None
    return Path(distributed.broadcast_object(folder))


def _open_maps(folder: Path, shapes: dict[str, tuple[int, ...]], dtype: str, create: bool) -> dict[str, np.memmap]:
    """Memory-mapped ``.npy`` files, one per tap: created by rank 0, then opened by every process."""
    np_dtype = _DTYPES[dtype][1]
    maps = {}
    if create and distributed.is_main():
        maps = {t: np.lib.format.open_memmap(folder / f"{t}.npy", mode="w+", dtype=np_dtype, shape=s)
                for t, s in shapes.items()}
    distributed.barrier()
    if not maps:
        for t, s in shapes.items():
            try:
                maps[t] = np.lib.format.open_memmap(folder / f"{t}.npy", mode="r+")
            except OSError as e:
                raise UserError(f"feature cache {str(folder / f'{t}.npy')!r} cannot be opened ({e.strerror}); "
                                f"pass a --cache-dir every process can reach") from None
            if maps[t].shape != s:
                raise UserError(f"feature cache {str(folder / f'{t}.npy')!r} has shape {maps[t].shape}, not {s}")
    return maps


def _release(maps: dict[str, np.memmap]) -> None:
    """Write dirty pages to the files and drop them from this process's resident set.

    The data stays in the files (and the kernel's page cache); it is read back on access. This
    keeps a cache larger than memory from growing the process's resident memory while it is filled.
    """
    for arr in maps.values():
        arr.flush()
        mm = getattr(arr, "_mmap", None)
        if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            mm.madvise(mmap.MADV_DONTNEED)


def _share(feats: dict[str, torch.Tensor], n: int, block: int, versions: int = 1) -> None:
    """Give every process the rows the others extracted (in-memory caches), in each version's rows."""
    for v in range(versions):
        for r in range(distributed.world_size()):
            start, stop = distributed.shard_range(n, block, of_rank=r)
            if stop > start:
                for t in feats.values():
                    distributed.broadcast_(t[v * n + start:v * n + stop], src=r)


def _copy_seed(seed: int, version: int, first: int) -> int:
    """The augmentation seed of copy ``version`` of the images from ``first`` on."""
    return ((seed * 1_000_003 + version) * 1_000_033 + first) % 2**63


def _all_versions(bundle: DataBundle, split: ImageSet | StreamSet, batch_size: int, device: torch.device,
                  start: int, stop: int, versions: int, seed: int):
    """Yield ``(x, first row)``: the batches of images ``start..stop``, plain, then each augmented copy.

    Copy v (1..versions-1) of an in-memory batch is augmented as training augments (random flip
    and translation, :func:`compress.data.augment`) from :func:`_copy_seed` of ``seed``, v and the
    batch's first image: the same for a given seed and batch size whatever the number of processes
    (their blocks are whole batches). A streamed split is augmented by its loader's workers, seeded
    per image of the process's block.
    """
    n = len(split)
    row = start
    for x, _ in iterate_batches(bundle, split, batch_size, device=device, order=torch.arange(start, stop)):
        yield x, row
        row += x.shape[0]
    spans = ([(start, stop)] if isinstance(split, StreamSet) else
             [(a, min(a + batch_size, stop)) for a in range(start, stop, batch_size)])
    for v in range(1, versions):
        for a, b in spans:
            row = v * n + a
            gen = torch.Generator().manual_seed(_copy_seed(seed, v, a))
            for x, _ in iterate_batches(bundle, split, batch_size, augmented=True, generator=gen, device=device,
                                        order=torch.arange(a, b)):
                yield x, row
                row += x.shape[0]


@torch.inference_mode()
def extract_features(model: nn.Module, bundle: DataBundle, split: ImageSet, taps: Sequence[str], *,
                     dtype: str = "float32", batch_size: int = 500, max_memory_gb: float = 4.0,
                     cache_dir: str | Path | None = None, device: torch.device | None = None,
                     progress: bool = True, desc: str = "features", pool: int | None = None, augment: int = 0,
                     seed: int = 0) -> FeatureCache:
    """Run ``split`` through ``model`` once and keep every tap's output.

    Layers after the deepest tap are skipped. No augmentation unless ``augment`` asks for
    augmented copies (one more pass each). Under ``torchrun`` each process runs a contiguous
    block of whole batches (the same batches a single process runs, so the features are the same), then every
    process gets the full cache: in memory by broadcasting each block, on disk by writing each
    block into the same memory-mapped files.

    Args:
        model: the trained network (put in eval mode).
        bundle: supplies the normalisation.
        split: the images to run.
        taps: module paths.
        dtype: ``float32`` or ``float16`` storage.
        batch_size: images per forward pass.
        max_memory_gb: above this total size, features go to memory-mapped ``.npy`` files; the
            pages written are flushed and dropped from the process's memory as they fill, so
            resident memory stays small whatever the cache size.
        cache_dir: folder for those files (each call makes its own subfolder; default: a
            temporary folder).
        device: defaults to the model's device.
        progress: show a progress bar.
        desc: progress bar label.
        pool: average-pool every 4-D tap output with this kernel and stride (ceil mode) before
            caching, as the second paper did before its EfficientNet probes (7: 112x112 -> 16x16).
        augment: also cache this many augmented copies of every image (random flip and translation
            up to 4 pixels, as training augments), after the plain ones in the same arrays:
            ``features[tap]`` gets ``(1 + augment) * N`` rows (see :class:`FeatureCache`).
        seed: seeds the copies' augmentation (deterministic for a given seed and ``batch_size``).
    """
    if dtype not in _DTYPES:
        raise UserError(f"unknown feature dtype {dtype!r}; valid: {', '.join(_DTYPES)}")
    if isinstance(augment, bool) or not isinstance(augment, int) or augment < 0:
        raise UserError(f"augment {augment!r}: the augmented copies per image must be a whole number, 0 or more")
    device = device or next(model.parameters()).device
    model.eval()
    shapes = tap_shapes(model, taps, bundle.input_size)
    if pool:
        shapes = {t: _pooled_shape(s, pool) for t, s in shapes.items()}
    n, versions = len(split), 1 + augment
    rows = versions * n
    row_bytes = sum(math.prod(s) for s in shapes.values()) * torch.tensor([], dtype=_DTYPES[dtype][0]).element_size()
    on_disk = rows * row_bytes > max_memory_gb * 2**30
    folder, maps = None, {}
    if on_disk:
        folder = _cache_folder(cache_dir)
        maps = _open_maps(folder, {t: (rows, *shapes[t]) for t in taps}, dtype, create=True)
        feats = {t: torch.from_numpy(maps[t]) for t in taps}
    else:
        feats = {t: torch.empty((rows, *shapes[t]), dtype=_DTYPES[dtype][0]) for t in taps}
    start, stop = distributed.shard_range(n, batch_size)
    offset, unreleased = start, 0

    def sink(name: str, out: torch.Tensor) -> None:
        if pool and out.dim() == 4:
            out = F.avg_pool2d(out, pool, pool, ceil_mode=True)
        feats[name][offset:offset + out.shape[0]] = out.detach().to("cpu", _DTYPES[dtype][0])

    with capture(model, taps, sink):
        batches = _all_versions(bundle, split, batch_size, device, start, stop, versions, seed)
        for x, row in tqdm(batches, total=versions * math.ceil((stop - start) / batch_size), desc=desc,
                           disable=not (progress and distributed.is_main()), leave=False):
            offset = row
            try:
                inference_forward(model, x)  # CUDA: float16 autocast, channels-last; elsewhere model(x)
            except StopForward:
                pass
            offset += x.shape[0]
            unreleased += x.shape[0] * row_bytes
            if maps and unreleased >= _RELEASE_BYTES:
                _release(maps)
                unreleased = 0
    if maps:
        _release(maps)
        if distributed.is_distributed():  # every block is in the files: map them afresh
            maps = _open_maps(folder, {t: (rows, *shapes[t]) for t in taps}, dtype, create=False)
            feats = {t: torch.from_numpy(maps[t]) for t in taps}
    elif distributed.is_distributed():
        _share(feats, n, batch_size, versions)
    cache = FeatureCache(feats, split.labels.clone(), on_disk=on_disk, folder=folder, maps=maps, versions=versions)
    if folder is not None and distributed.is_main():
        weakref.finalize(cache, shutil.rmtree, folder, ignore_errors=True)
    return cache


@torch.inference_mode()
def extract_inputs(model: nn.Module, bundle: DataBundle, split: ImageSet, module: str, *, batch_size: int = 100,
                   device: torch.device | None = None) -> FeatureCache:
    """What ``module`` (e.g. a classifier) receives for every image of ``split``, flattened to (N, D, 1, 1).

    The cache is keyed by ``module``; used to analyse a model's own head, whatever pools or
    flattens before it.
    """
    device = device or next(model.parameters()).device
    model.eval()
    target = model.get_submodule(module)
    chunks: list[torch.Tensor] = []
    handle = target.register_forward_pre_hook(lambda _m, args: chunks.append(args[0].detach().flatten(1).cpu()))
    try:
        for x, _ in iterate_batches(bundle, split, batch_size, device=device):
            model(x)
    finally:
        handle.remove()
    feats = torch.cat(chunks)
    return FeatureCache({module: feats.view(len(feats), -1, 1, 1)}, split.labels.clone())
