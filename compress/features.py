"""Feature extraction for all taps in one pass over the data, cached in memory or on disk."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from compress.data import DataBundle, ImageSet, iterate_batches
from compress.models.taps import StopForward, capture, tap_shapes

__all__ = ["FeatureCache", "extract_features"]

_DTYPES = {"float32": (torch.float32, np.float32), "float16": (torch.float16, np.float16)}


@dataclass
class FeatureCache:
    """Tap outputs for one split: ``features[tap]`` is (N, C, H, W), ``labels`` is (N,).

    Arrays live in memory, or in memory-mapped files under ``folder`` when they would not fit
    (``on_disk``); either way they are torch tensors sharing the storage.
    """

    features: dict[str, torch.Tensor]
    labels: torch.Tensor
    on_disk: bool = False
    folder: Path | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.features.values())


def _pooled_shape(shape: tuple[int, ...], k: int) -> tuple[int, ...]:
    if len(shape) != 3:
        return shape
    c, h, w = shape
    return (c, -(-h // k), -(-w // k))


def _allocate(shape: tuple[int, ...], dtype: str, path: Path | None) -> torch.Tensor:
    if path is None:
        return torch.empty(shape, dtype=_DTYPES[dtype][0])
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=_DTYPES[dtype][1], shape=shape)
    return torch.from_numpy(arr)


@torch.inference_mode()
def extract_features(model: nn.Module, bundle: DataBundle, split: ImageSet, taps: Sequence[str], *,
                     dtype: str = "float32", batch_size: int = 500, max_memory_gb: float = 4.0,
                     cache_dir: str | Path | None = None, device: torch.device | None = None,
                     progress: bool = True, desc: str = "features", pool: int | None = None) -> FeatureCache:
    """Run ``split`` through ``model`` once and keep every tap's output.

    Layers after the deepest tap are skipped. No augmentation: the papers' probes see the
    preprocessed images.

    Args:
        model: the trained network (put in eval mode).
        bundle: supplies the normalisation.
        split: the images to run.
        taps: module paths.
        dtype: ``float32`` or ``float16`` storage.
        batch_size: images per forward pass.
        max_memory_gb: above this total size, features go to memory-mapped ``.npy`` files.
        cache_dir: folder for those files (default: a temporary folder).
        device: defaults to the model's device.
        progress: show a progress bar.
        desc: progress bar label.
        pool: average-pool every 4-D tap output with this kernel and stride (ceil mode) before
            caching, as the second paper did before its EfficientNet probes (7: 112x112 -> 16x16).
    """
    if dtype not in _DTYPES:
        from compress.errors import UserError

        raise UserError(f"unknown feature dtype {dtype!r}; valid: {', '.join(_DTYPES)}")
    device = device or next(model.parameters()).device
    model.eval()
    shapes = tap_shapes(model, taps, bundle.input_size)
    if pool:
        shapes = {t: _pooled_shape(s, pool) for t, s in shapes.items()}
    n = len(split)
    total = sum(n * math.prod(s) for s in shapes.values()) * torch.tensor([], dtype=_DTYPES[dtype][0]).element_size()
    on_disk = total > max_memory_gb * 2**30
    folder = None
    if on_disk:
        folder = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="compress-features-"))
        folder.mkdir(parents=True, exist_ok=True)
    feats = {t: _allocate((n, *shapes[t]), dtype, folder / f"{t}.npy" if folder else None) for t in taps}
    offset = 0

    def sink(name: str, out: torch.Tensor) -> None:
        if pool and out.dim() == 4:
            out = F.avg_pool2d(out, pool, pool, ceil_mode=True)
        feats[name][offset:offset + out.shape[0]] = out.detach().to("cpu", _DTYPES[dtype][0])

    with capture(model, taps, sink):
        batches = iterate_batches(bundle, split, batch_size, device=device)
        for x, _ in tqdm(batches, total=math.ceil(n / batch_size), desc=desc, disable=not progress, leave=False):
            try:
                model(x)
            except StopForward:
                pass
            offset += x.shape[0]
    return FeatureCache(feats, split.labels.clone(), on_disk=on_disk, folder=folder)


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
