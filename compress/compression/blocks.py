"""Depth trimming inside stage models (timm, torchvision): remove repeated blocks of a stage and
drop whole layers, the second paper's EfficientNet-B0 simplifications.

A stage is an ``nn.Sequential`` of blocks (timm's ``blocks.<i>``, torchvision's ``layer<i>``).
Its first block changes width or resolution; the later ones map the stage's shape to itself,
so keeping the first ``n`` blocks keeps every shape valid.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from compress.analysis import AnalysisResult
from compress.errors import UserError
from compress.models.transforms import record_transform, register_transform
from compress.models.introspect import input_size_of, set_module

__all__ = ["list_stages", "remove_blocks", "drop_layers", "plateau_stages"]


def _forward_ok(model: nn.Module, what: str, input_size: Sequence[int] | None = None) -> None:
    p = next(model.parameters())
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *(input_size or input_size_of(model)), device=p.device, dtype=p.dtype))
    except RuntimeError as e:
        raise UserError(f"{what} leaves a model that does not run: {str(e).splitlines()[0]}") from None
    finally:
        model.train(was)


def list_stages(model: nn.Module) -> dict[str, int]:
    """Module paths of the stages (``nn.Sequential`` of two or more residual-style blocks) with their block counts."""
    stages = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Sequential) and len(m) >= 2 and name:
            kinds = {type(b) for b in m}
            container = isinstance(m[0], (nn.Sequential, nn.ModuleList))  # a list of stages, not a stage
            if len(kinds) == 1 and not container and not isinstance(m[0], (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Linear)):
                stages[name] = len(m)
    return stages


def remove_blocks(model: nn.Module, keep: Mapping[str, int], input_size: Sequence[int] | None = None) -> nn.Module:
    """Keep the first ``keep[stage]`` blocks of each named stage, in place, and record the change.

    Args:
        model: a stage model (timm EfficientNet/MobileNet/ResNet, torchvision ResNet, ...).
        keep: ``{stage path: blocks to keep}``, e.g. ``{"blocks.1": 1, "blocks.2": 1, "blocks.3": 2}``.
        input_size: (C, H, W) of the check forward pass (default: the model's own config).
    """
    stages = list_stages(model)
    for path, n in keep.items():
        if path not in stages:
            from compress.errors import unknown_name

            raise unknown_name("stage", path, stages or ["(this model has no stage of repeated blocks)"])
        if not 1 <= n <= stages[path]:
            raise UserError(f"stage {path!r} has {stages[path]} blocks; keep between 1 and {stages[path]}, got {n}")
    trial = copy.deepcopy(model)  # check on a copy: a refused change leaves the model as it was
    for target in (trial, model):
        for path, n in keep.items():
            stage = target.get_submodule(path)
            for idx in range(len(stage) - 1, n - 1, -1):
                del stage[idx]
        if target is trial:
            _forward_ok(trial, f"removing blocks {dict(keep)}", input_size)
    record_transform(model, {"kind": "remove_blocks", "keep": dict(keep), "input_size": list(input_size or [])})
    return model


def drop_layers(model: nn.Module, layers: Sequence[str], input_size: Sequence[int] | None = None) -> nn.Module:
    """Replace ``layers`` with ``nn.Identity`` and give the classifier a new input width.

    Dropping EfficientNet-B0's stage 9 is ``drop_layers(model, ["conv_head", "bn2"])``: stage 8's
    320 filters then feed a new ``Linear(320 -> K)`` that needs training (or AFCC fine-tuning).
    """
    modules = dict(model.named_modules())
    for path in layers:
        if path not in modules or not path:
            from compress.errors import unknown_name

            raise unknown_name("layer", path, [n for n in modules if n])
    for path in layers:
        set_module(model, path, nn.Identity())
    head_path, head = _classifier(model)
    size = input_size or input_size_of(model)
    with torch.no_grad():
        was = model.training
        model.eval()
        feats = _features_before(model, head, size)
        model.train(was)
    if feats != head.in_features:
        new = nn.Linear(feats, head.out_features, bias=head.bias is not None).to(head.weight.device)
        set_module(model, head_path, new)
        if hasattr(model, "num_features"):
            model.num_features = feats
    _forward_ok(model, f"dropping {list(layers)}", size)
    record_transform(model, {"kind": "drop_layers", "layers": list(layers), "input_size": list(input_size or [])})
    return model


def _classifier(model: nn.Module) -> tuple[str, nn.Linear]:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Linear):
        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise UserError("the model has no linear classifier to reconnect")
        return linears[-1]
    name = next(n for n, m in model.named_modules() if m is head)
    return name, head


def _features_before(model: nn.Module, head: nn.Linear, size: Sequence[int]) -> int:
    seen: list[int] = []
    handle = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[-1]))
    try:
        p = next(model.parameters())
        try:
            model(torch.zeros(1, *size, device=p.device, dtype=p.dtype))
        except RuntimeError:
            pass  # the old classifier no longer fits: its input width is already recorded
    finally:
        handle.remove()
    if not seen:
        raise UserError("the classifier was not reached in a forward pass; cannot size its new input")
    return seen[0]


def plateau_stages(model: nn.Module, analysis: AnalysisResult, tolerance: float | None = None) -> dict[str, int]:
    """Stages whose tap adds less than ``tolerance`` accuracy points over the previous tap: keep one block each.

    Only taps that are stages (as :func:`list_stages` finds them) qualify.
    """
    tol = analysis.plateau_tolerance if tolerance is None else tolerance
    stages = list_stages(model)
    keep = {}
    for prev, tap in zip(analysis.taps, analysis.taps[1:]):
        if tap.name in stages and stages[tap.name] > 1 and 100 * (tap.accuracy - prev.accuracy) < tol:
            keep[tap.name] = 1
    return keep


def _size(spec: Mapping[str, Any]) -> Sequence[int] | None:
    return spec.get("input_size") or None


@register_transform("remove_blocks", keys=("keep",))
def _replay_remove(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    remove_blocks(model, spec["keep"], _size(spec))
    return model


@register_transform("drop_layers", keys=("layers",))
def _replay_drop(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    drop_layers(model, spec["layers"], _size(spec))
    return model
