"""Saving and loading models without pickled code: a state dict plus JSON metadata that says how
to rebuild the architecture (base model, then each recorded structural transform in order).

A model file is ``torch.save({"model": state_dict, "meta": json_string})``, loadable with
``weights_only=True``. ``meta`` holds:

- ``model``, ``options``: the factory name and architecture options of the base model;
- ``num_classes``, ``input_size`` ([C, H, W]), ``label_names``, ``mean``, ``std``: what a
  deployment needs (scaling is ``(pixel / 255 - mean) / std`` per channel, RGB order);
- ``transforms``: structural changes applied after building the base model, each a JSON dict
  with a ``kind`` registered by :func:`register_transform` (e.g. ``prune`` replays a
  Torch-Pruning history, ``trim`` cuts the network at a tap, ``afcc`` swaps a head for the
  kept connections only). The registry is :mod:`compress.models.transforms`; the transforms
  are registered by the modules of :mod:`compress.compression` that make them.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from compress import distributed
from compress.errors import UserError
from compress.io import atomic_torch_save
from compress.models.factory import create_model, load_checkpoint, read_checkpoint
from compress.models.meta import parse_meta
from compress.models.transforms import apply_transform

__all__ = ["save_model", "load_model", "read_model_meta", "model_bytes", "model_from_bytes", "load_shared",
           "share_model"]


def _contents(model: nn.Module, meta: dict[str, Any]) -> dict[str, Any]:
    """What a model file holds: ``{"model": state dict on the CPU, "meta": JSON text}``."""
    meta = dict(meta)
    meta["transforms"] = list(getattr(model, "compress_transforms", meta.get("transforms", [])))
    for key in ("model", "num_classes", "input_size"):
        if key not in meta:
            raise ValueError(f"model metadata needs {key!r}")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return {"model": state, "meta": json.dumps(meta)}


def save_model(model: nn.Module, path: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Write ``model`` and its metadata (see the module docstring) atomically to ``path``."""
    return atomic_torch_save(_contents(model, meta), path)


def model_bytes(model: nn.Module, meta: dict[str, Any]) -> bytes:
    """The bytes :func:`save_model` would write for ``model``."""
    buf = io.BytesIO()
    torch.save(_contents(model, meta), buf)
    return buf.getvalue()


def model_from_bytes(data: bytes, device: torch.device | str = "cpu",
                     source: str = "model bytes") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from :func:`model_bytes` (as :func:`load_model` does from a file).

    Building the base model draws initial weights: the random-number state is left as it was,
    so a rebuilt model changes no later draw.
    """
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{source} cannot be read ({type(e).__name__}); they are truncated or damaged") from None
    if not (isinstance(obj, dict) and isinstance(obj.get("model"), dict) and isinstance(obj.get("meta"), str)):
        raise UserError(f"{source} hold no model written by compress (a state dict and its metadata)")
    with torch.random.fork_rng(devices=[]):
        return _rebuild((obj["model"], obj["meta"]), source, source, device)


def read_model_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The checked metadata of a model file (:func:`compress.models.meta.check_meta`); a bare
    state dict gives ``{}``.

    Raises:
        UserError: the file is missing, unreadable or carries code, or its metadata is damaged.
    """
    return parse_meta(read_checkpoint(path)[1], f"model file {str(path)!r}")


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model written by :func:`save_model` (or a training checkpoint) and load its weights.

    The file is untrusted: its metadata is checked (types, an input size and class count within
    bounds) before the model is built, and a transform that cannot be replayed is an error naming
    the file and the transform.

    Returns:
        ``(model, meta)`` with the model in eval mode on ``device``.
    """
    return _rebuild(read_checkpoint(path), f"model file {str(path)!r}", path, device)


def _rebuild(checkpoint: tuple[dict[str, torch.Tensor], str | None], source: str, path: str | os.PathLike,
             device: torch.device | str) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a read checkpoint (its state dict and metadata text): base model, transforms, weights."""
    from compress.compression import afcc, blocks, dilute, trim  # noqa: F401  (register the transforms)

    meta = parse_meta(checkpoint[1], source)
    if "model" not in meta:
        raise UserError(f"{str(path)!r} carries no model description; pass --model and its options with the checkpoint")
    c, h, _ = meta.get("input_size", [3, 32, 32])
    classes = meta.get("num_classes", len(meta.get("label_names", [])) or 10)
    try:
        model = create_model(meta["model"], num_classes=classes, in_chans=c, img_size=h, **meta.get("options", {}))
    except UserError as e:
        raise UserError(f"{source}: {e}") from None
    for i, spec in enumerate(meta.get("transforms", [])):
        try:
            model = apply_transform(model, spec)
        except UserError as e:
            raise UserError(f"{source}: transforms[{i}]: {e}; the file is damaged or from another version") from None
    model.compress_transforms = list(meta.get("transforms", []))  # replays may record on their own
    load_checkpoint(model, path, checkpoint=checkpoint)
    return model.to(device).eval(), meta


def load_shared(path: str | os.PathLike, device: torch.device | str = "cpu") -> nn.Module:
    """:func:`load_model` of a file written by rank 0 (a run's model), on every process.

    Under ``torchrun`` rank 0 reads the file and sends its bytes, so the other processes need
    no storage in common with it; every process must call this at the same point.
    """
    if not distributed.is_distributed():
        return load_model(path, device=device)[0]
    data = distributed.broadcast_object(Path(path).read_bytes() if distributed.is_main() else None)
    return model_from_bytes(data, device, f"model file {str(path)!r} (from rank 0)")[0]


def share_model(make: Callable[[], nn.Module], meta: dict[str, Any],
                device: torch.device | str | None = None) -> nn.Module:
    """``make()`` on rank 0 alone (:func:`compress.distributed.run_on_main`), and every process
    rebuilds the model from its bytes, rank 0 too: under ``torchrun`` all hold the same modules,
    parameters in the same order (as ``DistributedDataParallel`` needs) and the same weights.
    In a single process, simply ``make()``.

    Args:
        make: builds or changes the model (it may run collective-free library code: training,
            evaluation, analysis run as in a single process on rank 0).
        meta: the metadata the model is saved with (see the module docstring).
        device: where the rebuilt model goes (default: where rank 0's was).
    """
    if not distributed.is_distributed():
        return make()

    def made() -> tuple[bytes, str]:
        model = make()
        return model_bytes(model, meta), str(next(model.parameters()).device)

    data, where = distributed.run_on_main(made)
    target = device if device is not None else (where if distributed.is_main() else _local(where))
    return model_from_bytes(data, target, "the model from rank 0")[0]


def _local(device: str) -> str:
    """Rank 0's device as this process names it: its own GPU for a GPU."""
    return f"cuda:{torch.cuda.current_device()}" if device.startswith("cuda") else device
