"""Datasets as in-memory uint8 tensors, the papers' preprocessing and batched augmentation.

Names: ``digits`` (scikit-learn, the embedded default), ``cifar10``, ``cifar100`` (torchvision,
from ``root``), ``imagefolder:<path>`` (``train/`` and ``test/`` or ``val/``). Any of them can
be cut to a nested subset of K labels (``num_labels``), remapped to 0..K-1. An image folder too
large for memory is streamed from its files instead (:mod:`compress.streaming`): its splits are
:class:`~compress.streaming.StreamSet` objects, read through :func:`iterate_batches` alike.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Literal

import torch
import torch.nn.functional as F

from compress.checks import MAX_CHANNELS, MAX_CLASSES, MAX_IMAGE_SIDE, integer, number
from compress.checks import seed as check_seed
from compress.errors import OptionError, UserError, shorten, unknown_name
from compress.images import check_same_size, decode_image
from compress.labelsets import choose_labels, superclass_groups
from compress.streaming import IMAGE_EXTENSIONS, StreamSet, decode_files, scan_folder, stream_batches  # noqa: F401

__all__ = ["DataConfig", "ImageSet", "DataBundle", "load_data", "register_dataset", "list_datasets", "iterate_batches",
           "choose_labels", "label_groups", "split_validation", "StreamSet"]


@dataclass
class ImageSet:
    """One split: ``images`` (N, C, H, W) uint8 and ``labels`` (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index])


@dataclass
class DataBundle:
    """Train and test splits with label names and the normalisation the model expects.

    Pixels become ``(x / 255 - mean) / std`` per channel; the papers' [-1, 1] scaling is
    ``mean = std = 0.5``.
    """

    name: str
    train: ImageSet | StreamSet
    test: ImageSet | StreamSet
    label_names: list[str]
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    meta: dict = field(default_factory=dict)
    resize_to: int | None = None  # upscale batches on the fly (e.g. CIFAR 32 -> 224) instead of storing them large
    val: ImageSet | StreamSet | None = None  # held out from the training images: every choice is made on it
    eval_split: Literal["test", "val"] = "test"  # what ``test`` holds (see :meth:`for_choices`)

    def for_choices(self, split: Literal["val", "test"] = "val") -> "DataBundle":
        """This data with the split that choices are made on in the place of ``test``.

        Everything that evaluates (training's per-epoch accuracy, probes, field matrices, the
        plateau, masks, a search) reads ``bundle.test``; on the returned bundle that is the
        validation split (``eval_split == "val"``), so the test split stays for reporting.
        ``split="test"`` keeps the test split (the papers' setting).

        Raises:
            UserError: ``val`` was asked for but the data has no validation split.
        """
        if split == "test" or self.eval_split == "val":
            return self
        if self.val is None:
            raise UserError("the data has no validation split to choose on; set data.val_fraction (--val-fraction) "
                            "above 0, or analysis.split: test (the papers' setting, choices made on the test split)")
        return replace(self, test=self.val, eval_split="val")

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def input_size(self) -> tuple[int, int, int]:
        c, h, w = self.train.images.shape[1:]
        return (c, self.resize_to, self.resize_to) if self.resize_to else (c, h, w)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) on any device -> float normalised batch (resized when ``resize_to`` is set)."""
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        x = x.float()
        if self.resize_to and x.shape[-1] != self.resize_to:
            x = F.interpolate(x, size=(self.resize_to, self.resize_to), mode="bicubic", align_corners=False).clamp(0, 255)
        return (x / 255.0 - mean) / std


_DATASETS: dict[str, Callable[..., DataBundle]] = {}
_PREFIXED: dict[str, Callable[..., DataBundle]] = {}


def register_dataset(name: str, *, prefix: bool = False):
    """Register a data set loader under ``name``; a duplicate name is an error.

    A plain loader is called ``fn(root=..., download=...)`` and returns the whole data set (label
    subsets and limits are applied afterwards). A ``prefix`` loader answers every name
    ``<name>:<argument>`` (as ``imagefolder:<path>``, like ``timm:<model>``) and is called
    ``fn(argument, image_size=, keep=, limits=(train, test), seed=)``: it applies the label subset
    ``keep`` and the limits itself, so it can skip decoding what is not kept.

    Raises:
        ValueError: ``name`` is already registered.
    """

    def deco(fn):
        if name in _DATASETS or name in _PREFIXED:
            raise ValueError(f"dataset {name!r} is already registered")
        (_PREFIXED if prefix else _DATASETS)[name] = fn
        return fn

    return deco


def list_datasets() -> list[str]:
    """Registered data set names (``<name>:<argument>`` for prefixed ones)."""
    return sorted(_DATASETS) + [f"{p}:<{'path' if p == 'imagefolder' else 'argument'}>" for p in sorted(_PREFIXED)]


@register_dataset("digits")
def _digits(root=None, download=False, seed: int = 0, test_fraction: float = 0.2) -> DataBundle:
    """scikit-learn's 1,797 handwritten 8x8 digits, upscaled to 32x32 grey replicated to RGB."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float().unsqueeze(1) * (255.0 / 16.0)
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(d.target).long()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(y) * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    return DataBundle("digits", ImageSet(x[train], y[train]), ImageSet(x[test], y[test]),
                      [str(i) for i in range(10)])


def _torchvision_cifar(cls_name: str, root, download: bool) -> DataBundle:
    import torchvision

    if root is None:
        raise UserError(f"dataset {cls_name.lower()!r} needs --data-root (the folder holding the torchvision files)")
    cls = getattr(torchvision.datasets, cls_name)
    splits = []
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=download)
        except RuntimeError as e:
            raise UserError(f"{cls_name} not found under {str(root)!r} ({e}); pass --download to fetch it") from None
        splits.append(ImageSet(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(),
                               torch.as_tensor(ds.targets, dtype=torch.long)))
    return DataBundle(cls_name.lower(), splits[0], splits[1], list(ds.classes))


@register_dataset("cifar10")
def _cifar10(root=None, download=False, **_) -> DataBundle:
    return _torchvision_cifar("CIFAR10", root, download)


@register_dataset("cifar100")
def _cifar100(root=None, download=False, **_) -> DataBundle:
    return _torchvision_cifar("CIFAR100", root, download)


@register_dataset("imagefolder", prefix=True)
def _imagefolder(path: str, *, image_size: int | None, keep: list[int] | None, limits: tuple, seed: int,
                 stream: bool | str = False, max_memory_gb: float = 4.0, workers: int | None = None) -> DataBundle:
    """Scan first, select (label subset, limits), then decode only the chosen files, or stream
    them (``stream`` true, or ``auto`` and more than ``max_memory_gb`` decoded)."""
    root = Path(path)
    if not (root / "train").is_dir():
        raise UserError(f"image folder {path!r} needs a train/ subfolder (and test/ or val/), one folder per class")
    test_dir = next((root / s for s in ("test", "val") if (root / s).is_dir()), None)
    if test_dir is None:
        raise UserError(f"image folder {path!r} needs a test/ or val/ subfolder next to train/")
    train_files, train_labels, classes = scan_folder(root / "train", None)
    test_files, test_labels, _ = scan_folder(test_dir, classes)
    chosen = []
    for files, labels, limit, s, d in ((train_files, train_labels, limits[0], seed, root / "train"),
                                       (test_files, test_labels, limits[1], seed + 1, test_dir)):
        idx, new_labels = _select(labels, keep, limit, s)
        chosen.append(([files[i] for i in idx.tolist()], new_labels, str(d)))
    sides = [image_size or (max(decode_image(f[0], 3).shape[:2]) if f else 1) for f, _, _ in chosen]
    big = sum(len(f) for f, _, _ in chosen) * 3 * max(sides) ** 2 > max_memory_gb * 2**30
    if stream is True or (stream == "auto" and big):
        if image_size is None:  # the first image of each split gives the size; the workers check the others
            firsts = [decode_image(f[0], 3) for f, _, _ in chosen]
            check_same_size(firsts, [f[0] for f, _, _ in chosen], str(root))
        splits = [StreamSet([str(x) for x in f], lab, side, image_size is not None, workers, d)
                  for (f, lab, d), side in zip(chosen, sides)]
    else:
        splits = [ImageSet(decode_files(f, image_size, d), lab) for f, lab, d in chosen]
    (tw, th), (vw, vh) = (tuple(sp.images.shape[-2:][::-1]) for sp in splits)
    if len(splits[0]) and len(splits[1]) and (tw, th) != (vw, vh):
        raise UserError(f"the images of {str(root / 'train')!r} are {tw}x{th} but those of {str(test_dir)!r} are "
                        f"{vw}x{vh}; pass --image-size N to resize every image to NxN")
    names = classes if keep is None else [classes[i] for i in keep]
    return DataBundle(f"imagefolder:{path}", splits[0], splits[1], names)


def label_groups(label_names: list[str], label_draw: str) -> list[list[int]] | None:
    """The groups a draw of K labels spreads over (:func:`compress.labelsets.choose_labels`): the
    CIFAR-100 superclasses with ``superclass``, or with ``auto`` when the labels are CIFAR-100's 100
    fine labels; None (a plain random draw) otherwise.

    Raises:
        UserError: ``superclass`` on labels that are not CIFAR-100's.
    """
    if label_draw == "random":
        return None
    groups = superclass_groups(label_names)
    if groups is None and label_draw == "superclass":
        raise UserError(f"label_draw superclass needs the 100 CIFAR-100 labels (e.g. --data cifar100); this data set "
                        f"has {len(label_names)} labels ({shorten(label_names[:5])}...): use random or auto")
    return groups


def _select(labels: torch.Tensor, keep: list[int] | None, limit: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the samples to keep (label subset, then a random subset of ``limit``) and their new labels."""
    idx = torch.arange(len(labels))
    new = labels
    if keep is not None:
        remap = torch.full((max(keep + [int(labels.max()) if len(labels) else 0]) + 1,), -1, dtype=torch.long)
        remap[torch.tensor(keep, dtype=torch.long)] = torch.arange(len(keep))
        new = remap[labels]
        idx = idx[new >= 0]
        new = new[new >= 0]
    if limit is not None and limit < len(idx):
        pick = torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
        idx, new = idx[pick], new[pick]
    return idx, new


def _apply(split: ImageSet, keep: list[int] | None, limit: int | None, seed: int) -> ImageSet:
    idx, new = _select(split.labels, keep, limit, seed)
    return ImageSet(split.images[idx], new)


@dataclass(frozen=True)
class DataConfig:
    """Which data to load (see :func:`load_data`).

    Attributes:
        name: digits (the embedded default), cifar10, cifar100 or imagefolder:<path>.
        root: folder of the torchvision CIFAR files.
        download: let torchvision download CIFAR into root.
        num_labels: a nested subset of K labels, remapped to 0..K-1 (CIFAR-K).
        label_seed: seed of the nested label order.
        label_draw: how the K labels are drawn: random (a seeded permutation), superclass (spread over
            CIFAR-100's 20 superclasses as evenly as possible, the second paper's CIFAR-K/100), or auto
            (superclass when the labels are CIFAR-100's, random otherwise).
        image_size: square input size (image folders are resized when read, other data sets batch by batch).
        limit_train: a random subset of this many training images.
        limit_test: a random subset of this many test images.
        mean: per-channel mean of the normalisation (default 0.5 each: the papers' [-1, 1] scaling).
        std: per-channel standard deviation of the normalisation (default 0.5 each).
        val_fraction: fraction of the training images held out, stratified and seeded, as the
            validation split every choice is made on (0: none; choices then fall back to the test split).
        split_seed: seed of the validation split (and of the training and test subsets).
        stream: read image folders from their files in batches, decoded and augmented by worker
            processes, instead of decoding them into memory first: true, false, or auto (stream
            when the decoded images would take more than max_memory_gb).
        max_memory_gb: memory budget in GiB: with stream auto, image folders that would take more
            decoded are streamed (the analysis keeps its feature caches within the same budget).
        workers: decoding processes of streamed data per training process (default: the CPUs, at most 8).
    """

    name: str = "digits"
    root: str | None = None
    download: bool = False
    num_labels: int | None = None
    label_seed: int = 0
    label_draw: Literal["auto", "random", "superclass"] = "auto"
    image_size: int | None = None
    limit_train: int | None = None
    limit_test: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    val_fraction: float = 0.1
    split_seed: int = 0
    stream: bool | Literal["auto"] = "auto"
    max_memory_gb: float = 4.0
    workers: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip() or len(self.name) > 4096:
            raise OptionError("name", f"{shorten(self.name)}: not a data set name; valid: {', '.join(list_datasets())}")
        if self.num_labels is not None:
            integer("num_labels", self.num_labels, low=1, high=MAX_CLASSES, hint="K, the number of labels kept")
        check_seed("label_seed", self.label_seed)
        if self.label_draw not in ("auto", "random", "superclass"):
            raise OptionError("label_draw", f"{shorten(self.label_draw)}: valid: auto, random, superclass")
        check_seed("split_seed", self.split_seed)
        if self.image_size is not None:
            integer("image_size", self.image_size, low=1, high=MAX_IMAGE_SIDE, hint="the square input size in pixels")
        for key in ("limit_train", "limit_test"):
            if getattr(self, key) is not None:
                integer(key, getattr(self, key), low=1, hint="a number of images (leave it out to use all)")
        for key in ("mean", "std"):
            values = getattr(self, key)
            if values is not None:
                if not 1 <= len(values) <= MAX_CHANNELS:
                    raise OptionError(key, f"{shorten(values)}: expected one value per input channel, e.g. "
                                           f"[0.5, 0.5, 0.5]")
                for v in values:
                    number(key, v, low=0 if key == "std" else None, low_open=True,
                           hint="one finite value per channel" + (", each above 0" if key == "std" else ""))
        number("val_fraction", self.val_fraction, low=0, high=1, high_open=True,
               hint="the fraction of the training images held out (default 0.1; 0: no validation split)")
        if not (isinstance(self.stream, bool) or self.stream == "auto"):
            raise OptionError("stream", f"{shorten(self.stream)}: valid: auto, true, false")
        number("max_memory_gb", self.max_memory_gb, low=0, high=1e6, low_open=True, hint="GiB, e.g. 4")
        if self.workers is not None:
            integer("workers", self.workers, low=0, high=256, hint="decoding processes (0: in the main process)")

    def load(self) -> DataBundle:
        """Load the data (:func:`load_data` with these settings)."""
        return load_data(self.name, root=self.root, download=self.download, num_labels=self.num_labels,
                         label_seed=self.label_seed, label_draw=self.label_draw, image_size=self.image_size,
                         limit_train=self.limit_train, limit_test=self.limit_test, mean=self.mean, std=self.std,
                         val_fraction=self.val_fraction, seed=self.split_seed, stream=self.stream,
                         max_memory_gb=self.max_memory_gb, workers=self.workers)


def load_data(name: str, *, root: str | os.PathLike | None = None, download: bool = False,
              num_labels: int | None = None, label_seed: int = 0, label_draw: str = "auto",
              image_size: int | None = None,
              limit_train: int | None = None, limit_test: int | None = None, seed: int = 0,
              mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
              val_fraction: float = 0.0, stream: bool | str = False, max_memory_gb: float = 4.0,
              workers: int | None = None) -> DataBundle:
    """Load a dataset by name.

    Args:
        name: ``digits``, ``cifar10``, ``cifar100`` or ``imagefolder:<path>``.
        root: folder of the torchvision files (CIFAR).
        download: let torchvision download CIFAR (never done unless asked).
        num_labels: keep a nested subset of K labels, remapped to 0..K-1 (CIFAR-K).
        label_seed: seed of the nested label order.
        label_draw: how the K labels are drawn: random (a seeded permutation), superclass (spread over
            CIFAR-100's 20 superclasses as evenly as possible, the second paper's CIFAR-K/100), or auto
            (superclass when the labels are CIFAR-100's, random otherwise).
        image_size: square input size: image folders are resized when read, the other data
            sets batch by batch (CIFAR upscaled to 224 for ImageNet models stays small in memory).
        limit_train: keep a random subset of this many training images (quick runs, tests).
        limit_test: the same for the test split.
        seed: seed of the subsets and of the digits split.
        mean: per-channel mean of the normalisation (default 0.5: the papers' [-1, 1] scaling).
        std: per-channel standard deviation (default 0.5).
        val_fraction: hold out this fraction of the (limited) training images, per label, as
            ``bundle.val`` (:func:`split_validation`); 0 (this function's default) holds out none.
            :class:`DataConfig`, which recipes and the command line use, defaults to 0.1.
        stream: image folders only: True streams the files (:mod:`compress.streaming`), ``"auto"``
            streams when decoded they would exceed ``max_memory_gb``, False (this function's
            default) decodes them into memory. Other data sets are small and always in memory.
        max_memory_gb: the budget of ``"auto"``, in GiB.
        workers: decoding processes of a streamed folder (default: the CPUs, at most 8).
    """
    for flag, value in (("limit_train", limit_train), ("limit_test", limit_test)):
        if value is not None and value < 1:
            raise UserError(f"{flag}={value} would leave no images; give at least 1 (or leave it out to use all)")
    if image_size is not None and not 1 <= image_size <= MAX_IMAGE_SIDE:
        raise UserError(f"image_size {image_size} is outside 1..{MAX_IMAGE_SIDE}")
    prefix, _, arg = name.partition(":")
    if prefix in _PREFIXED and arg:
        keep = None
        if num_labels is not None:
            train_dir = Path(arg) / "train"
            names = sorted(p.name for p in train_dir.iterdir()
                           if p.is_dir() and not p.name.startswith(".")) if train_dir.is_dir() else []
            keep = choose_labels(len(names), num_labels, label_seed, label_groups(names, label_draw))
        extra = dict(stream=stream, max_memory_gb=max_memory_gb, workers=workers) if prefix == "imagefolder" else {}
        bundle = _PREFIXED[prefix](arg, image_size=image_size, keep=keep, limits=(limit_train, limit_test), seed=seed,
                                   **extra)
        if keep is not None:
            bundle = replace(bundle, meta={"labels_kept": keep})
    elif name in _DATASETS:
        if stream is True:
            raise UserError(f"stream: only image folders (imagefolder:<path>) are streamed; {name!r} is small "
                            f"enough to hold in memory (upscaled batch by batch): use stream auto or false")
        bundle = _DATASETS[name](root=root, download=download)
        keep = None if num_labels is None else choose_labels(bundle.num_classes, num_labels, label_seed,
                                                             label_groups(bundle.label_names, label_draw))
        bundle = replace(bundle, train=_apply(bundle.train, keep, limit_train, seed),
                         test=_apply(bundle.test, keep, limit_test, seed + 1),
                         label_names=bundle.label_names if keep is None else [bundle.label_names[i] for i in keep],
                         meta={} if keep is None else {"labels_kept": keep})
    else:
        raise unknown_name("dataset", name, list_datasets())
    for split_name, split in (("train", bundle.train), ("test", bundle.test)):
        if len(split) == 0:
            raise UserError(f"dataset {name!r} has an empty {split_name} split; every split needs images of each label")
    if image_size is not None and bundle.train.images.shape[-1] != image_size:
        bundle = replace(bundle, resize_to=image_size)
    for label, values in (("mean", mean), ("std", std)):
        if values is not None and len(values) != bundle.input_size[0]:
            raise UserError(f"{label} needs {bundle.input_size[0]} values (one per channel), got {list(values)}")
    if std is not None and min(std) <= 0:
        raise UserError(f"std values must be positive, got {list(std)}")
    bundle = replace(bundle, mean=tuple(mean or bundle.mean), std=tuple(std or bundle.std))
    if val_fraction:
        kept, held = split_validation(bundle.train.labels, val_fraction, seed)
        bundle = replace(bundle, train=bundle.train.subset(kept), val=bundle.train.subset(held))
    return bundle


def split_validation(labels: torch.Tensor, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A stratified, seeded hold-out: per label, ``round(fraction * count)`` images at random (at
    least one for every label with two or more images).

    Returns:
        ``(kept, held)``: sorted indices into ``labels`` of the training and the validation part.

    Raises:
        UserError: ``fraction`` is outside (0, 1), or a label would keep no training image.
    """
    if not 0 < fraction < 1:
        raise UserError(f"val_fraction {fraction} must be in (0, 1)")
    n = len(labels)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919))
    order = perm[torch.sort(labels[perm], stable=True).indices]  # grouped by label, random within a label
    counts = torch.bincount(labels, minlength=int(labels.max()) + 1 if n else 0)
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n) - start[labels[order]]  # position within its label's group
    quota = torch.where(counts >= 2, (counts.double() * fraction).round().long().clamp(1, None), torch.zeros_like(counts))
    if bool(((counts - quota) < 1)[counts > 0].any()):
        raise UserError(f"val_fraction {fraction} leaves a label with no training image; use a smaller fraction")
    held_mask = rank < quota[labels[order]]
    return order[~held_mask].sort().values, order[held_mask].sort().values


def augment(x: torch.Tensor, generator: torch.Generator, shift: int = 4) -> torch.Tensor:
    """Random horizontal flip and translation up to ``shift`` pixels (zero fill), batched on x's device."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=generator) < 0.5
    dy = torch.randint(0, 2 * shift + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * shift + 1, (b,), generator=generator)
    x = torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(3), x)
    xp = F.pad(x, (shift, shift, shift, shift))
    rows = (dy.view(-1, 1) + torch.arange(h)).to(x.device)  # (B, H)
    cols = (dx.view(-1, 1) + torch.arange(w)).to(x.device)  # (B, W)
    bidx = torch.arange(b, device=x.device).view(-1, 1, 1)
    out = xp.permute(0, 2, 3, 1)[bidx, rows.view(b, h, 1), cols.view(b, 1, w)]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def iterate_batches(bundle: DataBundle, split: ImageSet | StreamSet, batch_size: int, *, shuffle: bool = False,
                    augmented: bool = False, generator: torch.Generator | None = None,
                    device: torch.device | str = "cpu",
                    order: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield normalised float batches ``(x, y)`` on ``device``; order and augmentation follow ``generator``.

    ``order`` gives the sample indices to visit instead (e.g. one process's shard of an epoch).
    A :class:`~compress.streaming.StreamSet` is decoded and augmented by worker processes, the
    augmentation seeded by one number drawn from ``generator`` after the order.
    """
    generator = generator or torch.Generator().manual_seed(0)
    if order is None:
        order = torch.randperm(len(split), generator=generator) if shuffle else torch.arange(len(split))
    if isinstance(split, StreamSet):
        seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if augmented else 0
        for x, y in stream_batches(split, order, batch_size, augmented=augmented, seed=seed, device=device):
            yield bundle.normalize(x), y
        return
    n = len(order)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        x = split.images[idx].to(device, non_blocking=True)
        if augmented:
            x = augment(x, generator)
        yield bundle.normalize(x), split.labels[idx].to(device, non_blocking=True)
