"""The registry of structural transforms: changes to an architecture (a pruning, a cut, a swapped
head) recorded as JSON so that a saved model can be rebuilt without pickled code.

A leaf: it imports nothing above :mod:`compress.errors`. The transforms themselves live with the
code that makes them (:mod:`compress.compression`), which registers them here; the model file
(:mod:`compress.compression.serialize`) replays them.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch.nn as nn

from compress.errors import UserError, clip, shorten, unknown_name

__all__ = ["register_transform", "apply_transform", "record_transform", "list_transforms"]

_TRANSFORMS: dict[str, Callable[[nn.Module, dict[str, Any]], nn.Module]] = {}
_KEYS: dict[str, tuple[str, ...]] = {}


def register_transform(kind: str, keys: Sequence[str] = ()):
    """Register ``fn(model, spec) -> model`` that re-applies a recorded structural change of ``kind``.

    Args:
        kind: the ``kind`` a recorded spec carries.
        keys: the keys every spec of this kind must have (checked before ``fn`` runs).

    Raises:
        ValueError: ``kind`` is already registered.
    """

    def deco(fn):
        if kind in _TRANSFORMS:
            raise ValueError(f"transform {kind!r} is already registered")
        _TRANSFORMS[kind] = fn
        _KEYS[kind] = tuple(keys)
        return fn

    return deco


def list_transforms() -> list[str]:
    """The registered transform kinds."""
    return sorted(_TRANSFORMS)


def apply_transform(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Re-apply one recorded transform to ``model`` (its weights are loaded afterwards).

    A spec comes from a file: a missing key or a value of the wrong type or range is a
    :class:`UserError` naming the transform, never a ``KeyError`` from deep inside its replay.
    """
    if not isinstance(spec, dict):
        raise UserError(f"a transform must be a mapping with a 'kind', got {shorten(spec)}")
    kind = spec.get("kind")
    if not isinstance(kind, str) or kind not in _TRANSFORMS:
        raise unknown_name("model transform", str(kind), _TRANSFORMS)
    missing = [k for k in _KEYS.get(kind, ()) if k not in spec]
    if missing:
        raise UserError(f"transform {kind!r} lacks the key {missing[0]!r}")
    try:
        return _TRANSFORMS[kind](model, spec)
    except UserError:
        raise
    except KeyError as e:
        raise UserError(f"transform {kind!r} lacks the key {shorten(e.args[0] if e.args else '?')} (or names a "
                        f"module the model does not have)") from None
    except (TypeError, ValueError, IndexError, AttributeError, RuntimeError, AssertionError, ZeroDivisionError,
            OverflowError) as e:
        raise UserError(f"transform {kind!r} cannot be replayed ({type(e).__name__}: {clip(str(e), 160)}); its "
                        f"recorded values do not fit the model") from None


def record_transform(model: nn.Module, spec: dict[str, Any]) -> None:
    """Append ``spec`` to the transforms the model carries (``model.compress_transforms``)."""
    history = list(getattr(model, "compress_transforms", []))
    history.append(spec)
    model.compress_transforms = history
