"""Facts about a model that every part of the toolkit needs, each computed in one place: its
parameter and FLOP counts, its input size, module lookup by path or glob, and module replacement.

A leaf of :mod:`compress.models`: it imports nothing above :mod:`compress.errors`.
"""

from __future__ import annotations

import fnmatch
import logging
import warnings
from typing import Sequence

import torch
import torch.nn as nn

from compress.errors import UserError, unknown_name

__all__ = ["count_params", "count_nonzero", "count_flops", "input_size_of", "set_input_size", "get_module",
           "set_module", "match_modules", "non_finite", "check_finite"]


def count_params(model: nn.Module) -> int:
    """Every stored parameter of ``model``."""
    return sum(p.numel() for p in model.parameters())


def count_nonzero(model: nn.Module) -> int:
    """Parameters that are not exactly zero (weights held at zero by a mask are left out)."""
    return sum(int(torch.count_nonzero(p)) for p in model.parameters())


def non_finite(model: nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers of ``model`` holding a NaN or an infinity."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return [name for name, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t.detach()).all())]


def check_finite(model: nn.Module, what: str) -> None:
    """Refuse a model with NaN or infinite weights: what it computes is garbage.

    Args:
        model: the network.
        what: the model in the message (``"model file 'runs/x/model.pt'"``) and what was refused
            (``"; it cannot be exported"``).

    Raises:
        UserError: naming ``what`` and the first tensors at fault.
    """
    bad = non_finite(model)
    if bad:
        shown = ", ".join(bad[:3]) + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else "")
        raise UserError(f"{what} has non-finite weights (NaN or infinite) in {shown}; its outputs are meaningless: "
                        f"train it again (a lower learning rate keeps training from diverging)")


def count_flops(model: nn.Module, input_size: Sequence[int] | None = None) -> int:
    """FLOPs of one image as fvcore counts them (one multiply-add is one FLOP).

    Args:
        model: the network (left in the mode it was in).
        input_size: (C, H, W); default :func:`input_size_of`.
    """
    size = input_size_of(model, input_size)
    device = next(iter(model.parameters())).device
    was_training = model.training
    model.eval()
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and deprecation notices from fvcore's jit trace
            from fvcore.nn import FlopCountAnalysis

            analysis = FlopCountAnalysis(model, torch.zeros(1, *size, device=device))
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
            return int(analysis.total())
    finally:
        model.train(was_training)


def set_input_size(model: nn.Module, input_size: Sequence[int]) -> nn.Module:
    """Record the (C, H, W) the model is run at (the factory does this for every model it builds)."""
    model.compress_input_size = tuple(int(s) for s in input_size)
    return model


def input_size_of(model: nn.Module, input_size: Sequence[int] | None = None) -> tuple[int, int, int]:
    """The (C, H, W) of one input image: ``input_size`` when given, else what the factory recorded
    (the data's size), else timm's ``default_cfg`` / ``pretrained_cfg``.

    Raises:
        UserError: none of them says; the message names ``input_size``.
    """
    if input_size is not None:
        size = tuple(int(s) for s in input_size)
    else:
        size = getattr(model, "compress_input_size", None)
        if size is None:
            cfg = getattr(model, "default_cfg", None) or getattr(model, "pretrained_cfg", None) or {}
            size = cfg.get("input_size")
        if size is None:
            raise UserError(f"{type(model).__name__} declares no input size; build it with compress.create_model "
                            f"(which records the data's size) or pass input_size=(C, H, W)")
        size = tuple(int(s) for s in size)
    if len(size) != 3 or min(size) < 1:
        raise UserError(f"input size {list(size)} is not (channels, height, width) of positive sizes")
    return size  # type: ignore[return-value]


def get_module(model: nn.Module, path: str, kind: str = "module") -> nn.Module:
    """The submodule at ``path``, or an error naming the valid paths ("did you mean")."""
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        raise unknown_name(kind, path, [n for n, _ in model.named_modules() if n]) from None


def set_module(model: nn.Module, path: str, module: nn.Module) -> nn.Module:
    """Replace the submodule at ``path`` (which must exist) with ``module``; returns ``model``."""
    get_module(model, path)
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, name, module)
    return model


def match_modules(model: nn.Module, names: Sequence[str], kind: str = "module") -> list[str]:
    """Module paths of ``model`` matched by ``names`` (exact paths or globs such as
    ``features.pool*``), in network (registration) order.

    Raises:
        UserError: a name matches nothing; the message lists the valid paths.
    """
    modules = [n for n, _ in model.named_modules() if n]
    chosen: set[str] = set()
    for name in names:
        hits = fnmatch.filter(modules, name) if any(ch in name for ch in "*?[") else [name] if name in modules else []
        if not hits:
            raise unknown_name(kind, name, modules)
        chosen.update(hits)
    return [n for n in modules if n in chosen]
