"""Registry of this project's own architectures (``register_model`` / ``list_models``).

A builder may carry an option check: a function ``check_options(options)`` stored as the
builder's ``check_options`` attribute, which refuses bad architecture options (raising
:class:`~compress.errors.OptionError` with the key ``options.<name>``) before anything is built;
:func:`option_check` returns it.
"""

from __future__ import annotations

from typing import Any, Callable

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


def option_check(name: str) -> Callable[[dict[str, Any]], None] | None:
    """The option check of the own architecture ``name`` (``None``: unknown name or no check)."""
    return getattr(_MODELS.get(name), "check_options", None)
