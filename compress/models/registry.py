"""Registry of this project's own architectures (``register_model`` / ``list_models``)."""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a builder under its function name; a duplicate name is an error."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = fn
    return fn


def list_models() -> list[str]:
    """Names of the registered architectures (without a ``timm:``/``torchvision:`` prefix)."""
    return sorted(_MODELS)


def get_builder(name: str) -> Callable[..., nn.Module]:
    from compress.errors import unknown_name

    if name not in _MODELS:
        raise unknown_name("model", name, list_models() + ["timm:<name>", "torchvision:<name>"])
    return _MODELS[name]
