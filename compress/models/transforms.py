"""The registry of structural transforms: changes to an architecture (a pruning, a cut, a swapped
head) recorded as JSON so that a saved model can be rebuilt without pickled code.

A leaf: it imports nothing above :mod:`compress.errors`. The transforms themselves live with the
code that makes them (:mod:`compress.compression`), which registers them here; the model file
(:mod:`compress.compression.serialize`) replays them.
"""

from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn

from compress.errors import unknown_name

__all__ = ["register_transform", "apply_transform", "record_transform", "list_transforms"]

_TRANSFORMS: dict[str, Callable[[nn.Module, dict[str, Any]], nn.Module]] = {}


def register_transform(kind: str):
    """Register ``fn(model, spec) -> model`` that re-applies a recorded structural change of ``kind``.

    Raises:
        ValueError: ``kind`` is already registered.
    """

    def deco(fn):
        if kind in _TRANSFORMS:
            raise ValueError(f"transform {kind!r} is already registered")
        _TRANSFORMS[kind] = fn
        return fn

    return deco


def list_transforms() -> list[str]:
    """The registered transform kinds."""
    return sorted(_TRANSFORMS)


def apply_transform(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Re-apply one recorded transform to ``model`` (its weights are loaded afterwards)."""
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind not in _TRANSFORMS:
        raise unknown_name("model transform", str(kind), _TRANSFORMS)
    return _TRANSFORMS[kind](model, spec)


def record_transform(model: nn.Module, spec: dict[str, Any]) -> None:
    """Append ``spec`` to the transforms the model carries (``model.compress_transforms``)."""
    history = list(getattr(model, "compress_transforms", []))
    history.append(spec)
    model.compress_transforms = history
