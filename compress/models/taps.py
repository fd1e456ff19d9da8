"""Feature taps: naming a layer by its ``named_modules()`` path, default taps, and the hook
context manager that records tap outputs."""

from __future__ import annotations

import fnmatch
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn

from compress.errors import UserError, unknown_name

__all__ = ["default_taps", "resolve_taps", "tap_shapes", "capture", "StopForward"]


class StopForward(Exception):
    """Raised from a hook once every tap of a batch has fired, to skip the rest of the network."""


def default_taps(model: nn.Module) -> list[str]:
    """The taps a model declares: its ``feature_info`` modules (own VGGs, timm models)."""
    info = getattr(model, "feature_info", None)
    if info:
        names = [f["module"] for f in info]
        modules = dict(model.named_modules())
        return [n for n in names if n in modules]
    raise UserError(
        f"{type(model).__name__} declares no feature taps; name them with --taps "
        f"(module paths from `compress taps MODEL --all`, globs allowed)"
    )


def resolve_taps(model: nn.Module, names: Sequence[str] | None) -> list[str]:
    """Turn tap names and globs into module paths, in network (registration) order.

    Args:
        model: the network.
        names: module paths or globs such as ``features.pool*``; ``None`` or empty means the
            model's default taps.
    """
    if not names:
        return default_taps(model)
    modules = [n for n, _ in model.named_modules() if n]
    chosen: set[str] = set()
    for name in names:
        hits = fnmatch.filter(modules, name) if any(ch in name for ch in "*?[") else [name] if name in modules else []
        if not hits:
            raise unknown_name("tap", name, modules)
        chosen.update(hits)
    return [n for n in modules if n in chosen]


@contextmanager
def capture(model: nn.Module, taps: Sequence[str], sink: Callable[[str, torch.Tensor], None],
            stop_after_last: bool = True) -> Iterator[None]:
    """Call ``sink(tap, output)`` for each tap during forward passes inside the block.

    Args:
        model: the network.
        taps: module paths (see :func:`resolve_taps`).
        sink: receives each tap's output tensor; it must copy what it keeps.
        stop_after_last: raise :class:`StopForward` once all taps fired in a forward pass, so
            the layers after the deepest tap are not computed (catch it around the call).
    """
    modules = dict(model.named_modules())
    fired: set[str] = set()

    def make_hook(name: str):
        def hook(_module, _inputs, output):
            if not isinstance(output, torch.Tensor):
                raise UserError(f"tap {name!r} outputs {type(output).__name__}, not a tensor; choose another layer")
            sink(name, output)
            fired.add(name)
            if stop_after_last and len(fired) == len(taps):
                fired.clear()
                raise StopForward

        return hook

    handles = [modules[t].register_forward_hook(make_hook(t)) for t in taps]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def run_to_taps(model: nn.Module, x: torch.Tensor, taps: Sequence[str]) -> dict[str, torch.Tensor]:
    """One forward pass returning each tap's output (a copy), skipping layers after the deepest tap."""
    out: dict[str, torch.Tensor] = {}
    with capture(model, taps, lambda n, t: out.__setitem__(n, t.detach().clone())):
        try:
            model(x)
        except StopForward:
            pass
    return out


def tap_shapes(model: nn.Module, taps: Sequence[str], input_size: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """Output shape (without batch) of each tap for one input of ``input_size`` (C, H, W)."""
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters(), None)
        x = torch.zeros(1, *input_size, device=p.device if p is not None else "cpu")
        with torch.no_grad():
            outs = run_to_taps(model, x, taps)
    finally:
        model.train(was_training)
    return {t: tuple(outs[t].shape[1:]) for t in taps if t in outs}
