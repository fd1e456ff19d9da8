"""The one door to every model: ``create_model`` for own, ``timm:`` and ``torchvision:`` names,
and ``load_checkpoint`` that names mismatched keys."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from compress.errors import UserError, unknown_name
from compress.models.introspect import set_input_size
from compress.models.registry import get_builder, list_models

__all__ = ["ModelConfig", "create_model", "load_checkpoint", "read_state_dict", "available_models"]


@dataclass(frozen=True)
class ModelConfig:
    """Which model to build: a factory name, its options, and where its weights come from.

    Attributes:
        name: vgg16, vgg6, avgg16, timm:<name> or torchvision:<name>.
        options: architecture options passed to the builder (own VGGs: width, batch_norm, fc_hidden).
        checkpoint: state dict (.pt/.pth, a training checkpoint) or .safetensors to load.
        checkpoint_skip: module prefixes left out of the checkpoint load (e.g. a 1,000-label classifier).
        pretrained: timm/torchvision pretrained weights (downloads).
    """

    name: str = "vgg16"
    options: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    checkpoint_skip: list[str] = field(default_factory=list)
    pretrained: bool = False

    def build(self, num_classes: int, input_size: Sequence[int]) -> nn.Module:
        """The model sized for ``num_classes`` labels and (C, H, W) ``input_size``, with its weights."""
        c, h, _ = input_size
        return create_model(self.name, num_classes=num_classes, in_chans=c, img_size=h, pretrained=self.pretrained,
                            checkpoint=self.checkpoint, checkpoint_skip=tuple(self.checkpoint_skip), **self.options)


def available_models() -> list[str]:
    """Own architecture names plus the two prefixes for external libraries."""
    return list_models() + ["timm:<name>", "torchvision:<name>"]


def create_model(name: str, *, num_classes: int = 10, in_chans: int = 3, img_size: int | None = None,
                 pretrained: bool = False, checkpoint: str | os.PathLike | None = None,
                 checkpoint_skip: Sequence[str] = (), **kwargs: Any) -> nn.Module:
    """Build a model by name and optionally load a checkpoint into it.

    Args:
        name: ``vgg16``, ``vgg6``, ``avgg16`` (this project), ``timm:<name>`` or
            ``torchvision:<name>``.
        num_classes: output units.
        in_chans: input channels (own and timm models).
        img_size: input resolution (own models size their head from it; default 32). When given,
            it is recorded as the model's input size (:func:`~compress.models.introspect.input_size_of`).
        pretrained: ask timm/torchvision for pretrained weights (downloads; never used in tests).
        checkpoint: a ``.pt``/``.pth`` state dict (or a training checkpoint holding one under
            ``"model"``) or a ``.safetensors`` file.
        checkpoint_skip: module prefixes not loaded from the checkpoint (see :func:`load_checkpoint`).
        **kwargs: architecture options (own models: ``width``, ``batch_norm``, ``fc_hidden``).
    """
    if name.startswith("timm:"):
        import timm

        arch = name.split(":", 1)[1]
        if not timm.is_model(arch):
            raise unknown_name("timm model", arch, timm.list_models())
        model = timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)
    elif name.startswith("torchvision:"):
        import torchvision

        arch = name.split(":", 1)[1]
        valid = torchvision.models.list_models()
        if arch not in valid:
            raise unknown_name("torchvision model", arch, valid)
        if in_chans != 3:
            raise UserError(f"torchvision models take 3 input channels, got in_chans={in_chans}")
        model = torchvision.models.get_model(arch, weights="DEFAULT" if pretrained else None, num_classes=num_classes,
                                             **kwargs)
    else:
        builder = get_builder(name)
        try:
            model = builder(num_classes=num_classes, in_chans=in_chans, img_size=img_size or 32, **kwargs)
        except TypeError as e:
            raise UserError(f"bad option for model {name!r}: {e}") from None
    if img_size is not None:
        set_input_size(model, (in_chans, img_size, img_size))
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, skip=checkpoint_skip)
    return model


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict without running any pickled code (safetensors or ``weights_only``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise UserError(f"checkpoint {str(path)!r} is not a valid safetensors file: {e}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise UserError(f"checkpoint {str(path)!r} carries pickled code and was refused; save a state dict "
                            f"(torch.save(model.state_dict(), ...)) or use safetensors") from None
        raise UserError(f"checkpoint {str(path)!r} cannot be read ({msg}); it is truncated or not a PyTorch file: "
                        f"give a complete .pt/.pth state dict or a .safetensors file") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"checkpoint {str(path)!r} holds no state dict of tensors")
    return obj


def load_checkpoint(model: nn.Module, path: str | os.PathLike, skip: Sequence[str] = ()) -> nn.Module:
    """Load a checkpoint into ``model``; any missing, unexpected or mis-shaped key is an error naming it.

    Args:
        model: the network.
        path: the checkpoint.
        skip: module-path prefixes left as they are (e.g. ``["classifier"]`` when fine-tuning
            ImageNet weights on 100 labels): their keys are neither loaded nor checked.
    """
    state = read_state_dict(path)
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DDP

    def skipped(key: str) -> bool:
        return any(key == p or key.startswith(p + ".") for p in skip)

    state = {k: v for k, v in state.items() if not skipped(k)}
    own = {k: v for k, v in model.state_dict().items() if not skipped(k)}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                parts.append(f"{label}: " + ", ".join(items[:6]) + (f" (+{len(items) - 6} more)" if len(items) > 6 else ""))
        raise UserError(f"checkpoint {str(path)!r} does not fit the model: " + "; ".join(parts) + _saved_for(path))
    model.load_state_dict(state, strict=not skip)
    return model


def _saved_for(path: str | os.PathLike) -> str:
    """What a checkpoint says it was saved for (its ``meta``), as a hint for a mismatch."""
    import json

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        meta = json.loads(obj["meta"]) if isinstance(obj, dict) and isinstance(obj.get("meta"), str) else {}
    except Exception:
        return ""
    if not meta.get("model"):
        return "; pass the --model and options (and --labels) it was trained with"
    opts = " ".join(f"{k}={v}" for k, v in meta.get("options", {}).items())
    classes = meta.get("num_classes", len(meta.get("label_names", [])))
    return (f"; it was saved for model {meta['model']!r}" + (f" ({opts})" if opts else "")
            + f" with {classes} classes: use that model and data")
