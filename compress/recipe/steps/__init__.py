"""The built-in recipe steps, one module each; importing this package registers them.

Plug-ins: a package that declares an entry point in the group ``compress.steps`` (the value is
a module that registers its steps with :func:`compress.recipe.register_step`) is imported by
:func:`load_plugins`, which the recipe loader calls, so its steps work in ``compress run``.
"""

from __future__ import annotations

from compress.recipe.steps import (afcc, bench, dilute, export, finetune, prune, quantize,  # noqa: F401
                                   remove_blocks, trim)

__all__ = ["load_plugins"]

_LOADED = False


def load_plugins() -> None:
    """Import every module announced under the ``compress.steps`` entry-point group (once)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from importlib.metadata import entry_points

    for ep in entry_points(group="compress.steps"):
        ep.load()
