"""Image folders streamed from their files instead of decoded into memory.

A :class:`StreamSet` stands where an in-memory :class:`compress.data.ImageSet` would: the same
``labels``, ``len`` and ``subset``, and an ``images`` view (:class:`FileImages`) that decodes only
the images it is indexed with. :func:`stream_batches` reads it in batches through a
``torch.utils.data.DataLoader`` whose worker processes decode (:func:`compress.images.decode_image`,
with its checks of hostile files) and augment (``torchvision.transforms.v2``):

- evaluation: every image resized to S x S, as the in-memory path does (bit for bit the same
  pixels); from :data:`CROP_FROM` pixels on, an image that is not square is resized on its
  shorter side and centre-cropped instead (a square one is resized as before);
- training below :data:`CROP_FROM` pixels: the papers' random horizontal flip and translation
  up to 4 pixels (zero fill); from :data:`CROP_FROM` pixels on: random-resized crop and flip
  (the ImageNet convention).

Augmentation is seeded per sample from a seed the caller draws (training: per seed and epoch)
and the sample's place in the epoch, so it does not depend on the number of workers, and a
resumed run sees the same images as an uninterrupted one. Batches are pinned and copied without
blocking on CUDA. A damaged file is a one-line :class:`~compress.errors.UserError` naming it.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from compress import distributed
from compress.errors import UserError
from compress.images import check_fits_memory, check_same_size, decode_image

__all__ = ["StreamSet", "FileImages", "stream_batches", "default_workers", "scan_folder", "decode_files",
           "CROP_FROM", "SHIFT", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")

CROP_FROM = 128  # from this input side on: random-resized crop for training, centre crop for evaluation
SHIFT = 4  # the papers' translation, in pixels, below CROP_FROM
_SEED_MOD = 2**62


def default_workers() -> int:
    """Decoding processes per training process: the CPUs shared by this node's processes, at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus // max(1, distributed.local_world_size())))


@dataclass
class StreamSet:
    """One split read from its files: ``files[i]`` has label ``labels[i]`` and becomes a
    ``size`` x ``size`` RGB image (``resize``: any size is resized; otherwise every file must be
    ``size`` x ``size`` already). ``workers`` decoding processes (0: in this process)."""

    files: list[str]
    labels: torch.Tensor
    size: int
    resize: bool = True
    workers: int | None = None
    where: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "StreamSet":
        index = torch.as_tensor(index, dtype=torch.long)
        return StreamSet([self.files[i] for i in index.tolist()], self.labels[index], self.size, self.resize,
                         self.workers, self.where)

    @property
    def images(self) -> "FileImages":
        return FileImages(self)

    @property
    def nbytes(self) -> int:
        """What the split would take decoded into memory."""
        return len(self) * 3 * self.size * self.size


class FileImages:
    """The (N, 3, S, S) uint8 images of a :class:`StreamSet`, decoded only when indexed
    (evaluation transform): ``images[i]``, ``images[a:b]``, ``images[tensor]``, ``.numpy()``."""

    def __init__(self, owner: StreamSet):
        self.owner = owner

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.owner), 3, self.owner.size, self.owner.size))

    def __len__(self) -> int:
        return len(self.owner)

    def __getitem__(self, index: Any) -> torch.Tensor:
        if isinstance(index, (int, np.integer)) or (torch.is_tensor(index) and index.dim() == 0):
            return self[[int(index)]][0]
        picked = range(len(self.owner))[index] if isinstance(index, slice) else torch.as_tensor(index).tolist()
        check_fits_memory(len(picked), self.owner.size, self.owner.where)
        s = self.owner.size
        out = torch.empty((len(picked), 3, s, s), dtype=torch.uint8)
        for row, i in enumerate(picked):
            out[row] = _evaluation(self.owner.files[i], s, self.owner.resize)
        return out

    def numpy(self) -> np.ndarray:
        return self[:].numpy()


def _pixels(path: str, side: int | None, resize: bool, expect: int) -> np.ndarray:
    """(H, W, 3) uint8 pixels of ``path``, resized to ``side`` x ``side`` when given; a file kept at
    its own size must be ``expect`` x ``expect``."""
    a = decode_image(path, 3, (side, side) if side else None)
    if not resize and a.shape[:2] != (expect, expect):
        raise UserError(f"image file {path!r} is {a.shape[1]}x{a.shape[0]}, but the images of its folder are "
                        f"{expect}x{expect}; pass --image-size N to resize every image to NxN")
    return a


def _chw(a: np.ndarray) -> torch.Tensor:
    """(H, W, 3) pixels as a (3, H, W) uint8 tensor; numpy's copy, not torch's (whose threaded
    uint8 transpose costs ten times more on a loaded machine)."""
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def _evaluation(path: str, size: int, resize: bool) -> torch.Tensor:
    """The evaluation transform of one file as (3, S, S) uint8 (see the module docstring); the
    file is decoded once."""
    if not resize or size < CROP_FROM:
        return _chw(_pixels(path, size if resize else None, resize, size))
    from PIL import Image

    a = decode_image(path, 3)
    h, w = a.shape[:2]
    if (h, w) == (size, size):
        return _chw(a)
    if h == w:  # the pixels decode_image(path, 3, (size, size)) gives: the same resize of the same RGB image
        return _chw(np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR), dtype=np.uint8))
    scale = size / min(h, w)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = Image.fromarray(a).resize((nw, nh), Image.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return _chw(np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8))


def _crop_box(rng: np.random.Generator, h: int, w: int) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop`` box (scale 0.08-1 of the area, aspect 3/4-4/3, ten
    tries, then the centre crop of the nearest allowed aspect), drawn from ``rng``."""
    area, (lo, hi) = h * w, (np.log(3 / 4), np.log(4 / 3))
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        ratio = float(np.exp(rng.uniform(lo, hi)))
        cw, ch = int(round(np.sqrt(target * ratio))), int(round(np.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    ratio = w / h
    ch, cw = (h, int(round(h * 4 / 3))) if ratio > 4 / 3 else ((int(round(w * 3 / 4)), w) if ratio < 3 / 4 else (h, w))
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def _training(path: str, size: int, resize: bool, seed: int) -> torch.Tensor:
    """The training transform of one file, its randomness drawn from ``seed`` alone (a numpy
    generator of its own: torch's global one is neither used nor reseeded)."""
    rng = np.random.default_rng(seed)
    if size < CROP_FROM:  # the papers' flip and translation up to SHIFT pixels, zero fill
        a = _pixels(path, size if resize else None, resize, size)
        if rng.random() < 0.5:
            a = a[:, ::-1]
        dy, dx = (int(v) for v in rng.integers(0, 2 * SHIFT + 1, size=2))
        padded = np.zeros((size + 2 * SHIFT, size + 2 * SHIFT, 3), dtype=np.uint8)
        padded[SHIFT:SHIFT + size, SHIFT:SHIFT + size] = a
        return _chw(padded[dy:dy + size, dx:dx + size])
    from torchvision.transforms.v2 import functional as F

    a = _pixels(path, None, resize, size)
    top, left, ch, cw = _crop_box(rng, *a.shape[:2])
    flip = rng.random() < 0.5
    x = F.resized_crop(_chw(a), top, left, ch, cw, [size, size], antialias=True)
    return F.horizontal_flip(x) if flip else x


class _Epoch(torch.utils.data.Dataset):
    """The samples ``order`` of a :class:`StreamSet` in that order; item ``k`` is the ``k``-th of
    the pass (augmented with seed ``base`` and ``k`` when ``augmented``)."""

    def __init__(self, split: StreamSet, order: Sequence[int], augmented: bool, base: int):
        self.files, self.labels = split.files, split.labels
        self.size, self.resize, self.order = split.size, split.resize, list(order)
        self.augmented, self.base = augmented, base

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k: int) -> tuple[Any, int]:
        i = self.order[k]
        try:
            if self.augmented:
                x = _training(self.files[i], self.size, self.resize, (self.base * 1_000_003 + k) % _SEED_MOD)
            else:
                x = _evaluation(self.files[i], self.size, self.resize)
        except UserError as e:  # carried to the main process as a value: one line, no worker traceback
            return _Failure(str(e)), -1
        return x, int(self.labels[i])


@dataclass
class _Failure:
    message: str


def _collate(items: list[tuple[Any, int]]) -> Any:
    failed = next((x for x, _ in items if isinstance(x, _Failure)), None)
    if failed is not None:
        return failed
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.long)


def stream_batches(split: StreamSet, order: torch.Tensor, batch_size: int, *, augmented: bool = False,
                   seed: int = 0, device: torch.device | str = "cpu",
                   workers: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield uint8 batches ``(x, y)`` of the samples ``order`` on ``device``, decoded (and, with
    ``augmented``, augmented from ``seed``) by ``workers`` processes (default: the split's, else
    :func:`default_workers`; 0: in this process).

    Raises:
        UserError: a file cannot be decoded, or has another size than the folder's images.
    """
    device = torch.device(device)
    workers = split.workers if workers is None else workers
    workers = default_workers() if workers is None else workers
    order = order.tolist() if torch.is_tensor(order) else list(order)
    if not order:
        return
    workers = min(workers, -(-len(order) // batch_size))
    if augmented:
        from torchvision.transforms.v2 import functional  # noqa: F401  (imported once here, not in every forked worker)
    _fixed_mmap_threshold()
    loader = torch.utils.data.DataLoader(
        _Epoch(split, order, augmented, seed), batch_size=batch_size, shuffle=False, num_workers=workers,
        collate_fn=_collate, pin_memory=device.type == "cuda", prefetch_factor=2 if workers else None,
        persistent_workers=False, multiprocessing_context="fork" if workers and _can_fork() else None)
    for batch in loader:
        if isinstance(batch, _Failure):
            raise UserError(batch.message)
        x, y = batch
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


_MMAP_THRESHOLD = 1 << 20
_threshold_set = False


def _fixed_mmap_threshold() -> None:
    """Have glibc's malloc serve every block of 1 MiB or more with its own mapping, returned on free.

    By default glibc raises that threshold each time such a block is freed, after which batches
    come from the heap; a stream of batches of a few MiB each then fragments the heap and the
    resident memory grows with every batch (by gigabytes over an epoch) though nothing is kept.
    Done once per process, on glibc only.
    """
    global _threshold_set
    if _threshold_set:
        return
    _threshold_set = True
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, _MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _can_fork() -> bool:
    import multiprocessing

    return "fork" in multiprocessing.get_all_start_methods()


def scan_folder(split_dir: Path, classes: list[str] | None) -> tuple[list[Path], torch.Tensor, list[str]]:
    """The image files of one split of an ImageNet-layout folder (one subfolder per class, in
    ``classes`` order when given), their labels and the class names."""
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = classes or found
    if not classes:
        raise UserError(f"{str(split_dir)!r} holds no class folders; expected one folder of images per class")
    if set(found) != set(classes):
        raise UserError(f"{str(split_dir)!r} has classes {found}, but the training split has {classes}")
    files: list[Path] = []
    labels: list[int] = []
    for i, c in enumerate(classes):
        entries = sorted(p for p in (split_dir / c).iterdir() if not p.name.startswith("."))
        bad = [p for p in entries if p.suffix.lower() not in IMAGE_EXTENSIONS]
        if bad:
            raise UserError(f"{str(bad[0])!r} is not an image file (valid: {', '.join(IMAGE_EXTENSIONS)})")
        if not entries:
            raise UserError(f"class folder {str(split_dir / c)!r} holds no images; every class needs at least one")
        files += entries
        labels += [i] * len(entries)
    return files, torch.tensor(labels, dtype=torch.long), classes


def decode_files(files: list[Path], size: int | None, where: str) -> torch.Tensor:
    """Every file decoded into memory as (N, 3, S, S) uint8 (resized to ``size`` x ``size`` when
    given; otherwise they must all have one square size, which is kept)."""
    if files:
        check_fits_memory(len(files), size or max(decode_image(files[0], 3).shape[:2]), where)
    shape = None if size is None else (size, size)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        arrays = list(pool.map(lambda p: decode_image(p, 3, shape), files))
    if size is None:
        check_same_size(arrays, files, where)
    if not arrays:
        return torch.empty(0, 3, size or 1, size or 1, dtype=torch.uint8)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
