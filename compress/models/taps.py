"""Feature taps: naming a layer by its ``named_modules()`` path, default taps, and the hook
context manager that records tap outputs."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn

from compress.errors import UserError
from compress.models.introspect import input_size_of, match_modules

__all__ = ["default_taps", "auto_taps", "resolve_taps", "tap_shapes", "capture", "StopForward"]


class StopForward(Exception):
    """Raised from a hook once every tap of a batch has fired, to skip the rest of the network."""


def default_taps(model: nn.Module, input_size: Sequence[int] | None = None) -> list[str]:
    """The taps probed when none are named.

    A model that declares ``feature_info`` (the own VGGs, timm models) gives its declared taps,
    plus its final feature layer when that is not among them. Any other model (torchvision
    classifiers, your own) gets :func:`auto_taps`: the end of every stage where the spatial size
    halves, plus the final feature layer.
    """
    info = getattr(model, "feature_info", None)
    modules = dict(model.named_modules())
    if info:
        info = info.get_dicts() if hasattr(info, "get_dicts") else info
        names = [f["module"] for f in info if f.get("module") in modules]
        try:
            final = _final_feature_layer(model, input_size)
        except RuntimeError:  # the input size does not fit the model: keep the declared taps
            final = None
        if final and final not in names and not any(final.startswith(n + ".") for n in names):
            names.append(final)
        return names
    return auto_taps(model, input_size)


def _is_stage(m: nn.Module) -> bool:
    """A container of repeated blocks (kept whole as one unit), not a list of plain layers."""
    children = list(m.children())
    plain = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.Dropout, nn.Linear, nn.Identity)
    return (bool(children) and not any(isinstance(c, plain) for c in children)
            and len({type(c) for c in children}) == 1)


def _units(model: nn.Module, prefix: str = "") -> list[str]:
    """Candidate tap points: top-level children, looking inside containers of plain layers."""
    out = []
    for name, child in model.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, (nn.Sequential, nn.ModuleList)) and not _is_stage(child):
            out += _units(child, path + ".")
        else:
            out.append(path)
    return out


def _unit_shapes(model: nn.Module, input_size: Sequence[int] | None) -> list[tuple[str, tuple[int, ...]]]:
    """(unit, output shape) in execution order, for units with a tensor output, from one forward pass."""
    units = _units(model)
    modules = dict(model.named_modules())
    order: list[tuple[str, tuple[int, ...]]] = []
    handles = [modules[u].register_forward_hook(
        lambda _m, _i, o, u=u: order.append((u, tuple(o.shape[1:]))) if isinstance(o, torch.Tensor) else None)
        for u in units]
    was = model.training
    model.eval()
    try:
        p = next(model.parameters(), None)
        with torch.no_grad():
            model(torch.zeros(1, *input_size_of(model, input_size), device=p.device if p is not None else "cpu"))
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return order


def _final_feature_layer(model: nn.Module, input_size: Sequence[int] | None = None) -> str | None:
    """The last unit with a spatial (C, H, W) output before any global pooling to 1x1."""
    modules = dict(model.named_modules())
    spatial = [(u, s) for u, s in _unit_shapes(model, input_size) if len(s) == 3]
    while spatial and _is_global_pool(modules[spatial[-1][0]]):
        spatial.pop()  # a global pooling layer, not a feature layer
    return spatial[-1][0] if spatial else None


def _is_global_pool(m: nn.Module) -> bool:
    name = type(m).__name__
    return isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) or "Adaptive" in name or "GlobalPool" in name


def auto_taps(model: nn.Module, input_size: Sequence[int] | None = None) -> list[str]:
    """One tap at the end of every stage where the spatial size halves, plus the final feature layer.

    Works on any model from one forward pass with hooks on its units (top-level children, and
    the layers inside plain ``nn.Sequential`` containers). Raises a :class:`UserError` naming
    the candidates when the model has no spatial (C, H, W) outputs to tap.
    """
    shapes = [(u, s) for u, s in _unit_shapes(model, input_size) if len(s) == 3]
    if not shapes:
        candidates = ", ".join(_units(model)[:20])
        raise UserError(
            f"{type(model).__name__} has no convolutional (C, H, W) outputs to tap automatically (token or flat "
            f"features are not supported); name taps with --taps (module paths, `compress taps MODEL --all`); "
            f"top-level modules: {candidates}"
        )
    taps = [u for (u, s), (_, nxt) in zip(shapes, shapes[1:]) if nxt[1] < s[1]]
    final = _final_feature_layer(model, input_size)
    if final and final not in taps:
        taps.append(final)
    seen: set[str] = set()
    return [t for t in taps if not (t in seen or seen.add(t))]


def resolve_taps(model: nn.Module, names: Sequence[str] | None, input_size: Sequence[int] | None = None) -> list[str]:
    """Turn tap names and globs into module paths, in network (registration) order.

    Args:
        model: the network.
        names: module paths or globs such as ``features.pool*``; ``None`` or empty means the
            model's default taps.
    """
    if not names:
        return default_taps(model, input_size)
    return match_modules(model, names, "tap")


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
