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

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from compress.errors import UserError
from compress.io import atomic_torch_save
from compress.models.factory import create_model, load_checkpoint, read_checkpoint
from compress.models.meta import parse_meta
from compress.models.transforms import apply_transform

__all__ = ["save_model", "load_model", "read_model_meta"]

def save_model(model: nn.Module, path: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Write ``model`` and its metadata (see the module docstring) atomically to ``path``."""
    meta = dict(meta)
    meta["transforms"] = list(getattr(model, "compress_transforms", meta.get("transforms", [])))
    for key in ("model", "num_classes", "input_size"):
        if key not in meta:
            raise ValueError(f"model metadata needs {key!r}")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return atomic_torch_save({"model": state, "meta": json.dumps(meta)}, path)


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
    from compress.compression import afcc, blocks, dilute, trim  # noqa: F401  (register the transforms)

    source = f"model file {str(path)!r}"
    checkpoint = read_checkpoint(path)
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
