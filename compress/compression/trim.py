"""Depth trimming: cut the network right after a tap (the accuracy plateau) and let that tap's
trained probe become the new output layer.

Two forms of the same cut, chosen by :func:`trim_model`:

- :func:`trim_at`, the own VGGs' form (an ``nn.Sequential`` trunk followed by an
  ``nn.Sequential`` ``head``): the trunk is truncated after the tap and ``head`` becomes
  ``Sequential(out=Linear)``, recorded as a ``trim`` transform;
- :func:`compress.compression.cut.cut_at` for every other model (timm, torchvision, registered
  models), and for any model when the head is a global-pooling one or the probe saw a pooled
  tap: the forward pass stops at the tap and ``trim_head`` gives the logits, recorded as ``cut``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import torch
import torch.nn as nn

from compress.compression.cut import CUT_HEAD, HeadKind, cut_at
from compress.errors import UserError
from compress.models.introspect import input_size_of, set_module
from compress.models.transforms import record_transform, register_transform

__all__ = ["trim_at", "trim_model", "head_path", "sequential_trunk", "trim_report"]


def _sequential_split(model: nn.Module, tap: str) -> tuple[str, nn.Sequential, int]:
    parent, _, child = tap.rpartition(".")
    seq = model.get_submodule(parent) if parent else model
    if not isinstance(seq, nn.Sequential) or child not in seq._modules or not hasattr(model, "head"):
        raise UserError(
            f"trimming at {tap!r} needs the tap to be a direct child of an nn.Sequential trunk followed by a "
            f"`head` (the own VGGs: taps features.pool<i>); for stage models remove blocks instead"
        )
    return parent, seq, list(seq._modules).index(child)


def trim_at(model: nn.Module, tap: str, head_weight: torch.Tensor | None = None) -> nn.Module:
    """Remove every layer after ``tap`` and put a bias-free ``Linear(C*H*W -> K)`` head there.

    Args:
        model: a model whose trunk is an ``nn.Sequential`` holding ``tap`` (the own VGGs).
        tap: module path of the cut, e.g. ``features.pool10``.
        head_weight: the new head's weight, (K, C*H*W) or (K, C, H, W): normally the tap's
            trained probe, so that the trimmed model reproduces the probe's accuracy.

    Returns:
        The same model object, changed in place, with the transform recorded for replay.
    """
    parent, seq, idx = _sequential_split(model, tap)
    input_size = input_size_of(model)
    kept = OrderedDict(list(seq._modules.items())[: idx + 1])
    new_trunk = nn.Sequential(kept)
    if parent:
        set_module(model, parent, new_trunk)
    p = next(model.parameters())
    with torch.no_grad():
        was = new_trunk.training
        new_trunk.eval()
        in_features = new_trunk(torch.zeros(1, *input_size, device=p.device, dtype=p.dtype)).numel()
        new_trunk.train(was)
    num_classes = getattr(model, "num_classes", None) or model.get_classifier().out_features
    out = nn.Linear(in_features, num_classes, bias=False).to(p.device)
    if head_weight is not None:
        w = torch.as_tensor(head_weight, dtype=out.weight.dtype).reshape(num_classes, -1)
        if w.shape[1] != in_features:
            raise UserError(f"head weight has {w.shape[1]} inputs but tap {tap!r} gives {in_features}")
        out.weight.data.copy_(w)
    model.head = nn.Sequential(OrderedDict(out=out))
    if hasattr(model, "feature_info"):
        names = [f["module"] for f in model.feature_info]
        model.feature_info = model.feature_info[: names.index(tap) + 1] if tap in names else model.feature_info
    model.num_features = in_features
    record_transform(model, {"kind": "trim", "tap": tap})
    return model


@register_transform("trim")
def _replay_trim(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    model = trim_at(model, spec["tap"])
    return model


def sequential_trunk(model: nn.Module, tap: str) -> bool:
    """True when :func:`trim_at` can cut ``model`` at ``tap``: the tap is a direct child of an
    ``nn.Sequential`` trunk and the model's ``head`` is an ``nn.Sequential`` ending in its
    classifier (the own VGGs)."""
    parent, _, child = tap.rpartition(".")
    try:
        trunk = model.get_submodule(parent) if parent else model
    except AttributeError:
        return False
    head = getattr(model, "head", None)
    return (isinstance(trunk, nn.Sequential) and child in trunk._modules and isinstance(head, nn.Sequential)
            and len(head) > 0 and hasattr(model, "get_classifier") and model.get_classifier() is head[-1])


def trim_model(model: nn.Module, tap: str, head_weight: torch.Tensor | None = None, *, head: HeadKind = "probe",
               pool: int | None = None, input_size: Sequence[int] | None = None) -> nn.Module:
    """Cut ``model`` after ``tap`` with the tap's probe as the head, in the form that fits it.

    The own VGGs with a probe on the unpooled tap keep :func:`trim_at` (``head.out``); every
    other case is :func:`compress.compression.cut.cut_at` (``trim_head.out``).

    Args:
        model: the network, changed in place.
        tap: module path of the cut.
        head_weight: the tap's trained probe (K, D) or (K, C, H, W).
        head: ``probe`` (the probe itself) or ``pool`` (global average pooling and a linear layer
            initialised from the probe, to be fine-tuned).
        pool: the ``tap_pool`` the probe was trained with.
        input_size: (C, H, W) of the model's inputs (default: the model's own).
    """
    if head == "probe" and (pool or 1) == 1 and sequential_trunk(model, tap):
        return trim_at(model, tap, head_weight)
    return cut_at(model, tap, head_weight, head=head, pool=pool, input_size=input_size)


def head_path(model: nn.Module) -> str | None:
    """Module path of the linear head a trim left (``head.out`` or ``trim_head.out``), else ``None``."""
    specs = [t for t in getattr(model, "compress_transforms", []) if t.get("kind") in ("trim", "cut")]
    if not specs:
        return None
    return f"{CUT_HEAD}.out" if specs[-1]["kind"] == "cut" else "head.out"


def trim_report(before: nn.Module, after: nn.Module, tap: str) -> dict[str, Any]:
    """Which modules the cut removed (the outermost ones, by name) and the parameter counts before and after."""
    kept = {n for n, m in after.named_modules() if not isinstance(m, nn.Identity)}
    removed: list[str] = []
    for n, m in before.named_modules():
        if n and n not in kept and not isinstance(m, nn.Identity) and not any(n.startswith(r + ".") for r in removed):
            removed.append(n)
    return {"tap": tap, "removed_modules": removed,
            "params_before": sum(p.numel() for p in before.parameters()),
            "params_after": sum(p.numel() for p in after.parameters())}
