"""The one door to every model: ``create_model`` for own, ``timm:`` and ``torchvision:`` names,
and ``load_checkpoint`` that names mismatched keys."""

from __future__ import annotations

from collections import OrderedDict

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from compress.checks import MAX_CHANNELS, MAX_CLASSES, MAX_IMAGE_SIDE
from compress.errors import OptionError, UserError, clip, shorten, unknown_name
from compress.models.introspect import set_input_size
from compress.models.registry import get_builder, list_models, option_check

MAX_PARAMS = 2**30  # parameters of a model this toolkit builds (4 GiB of float32 weights)

__all__ = ["ModelConfig", "create_model", "load_checkpoint", "read_checkpoint", "read_state_dict", "available_models",
           "state_mismatch"]


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

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or len(self.name) > 200 or not self.name.isprintable():
            raise OptionError("name", f"{shorten(self.name)}: not a model name; valid: "
                                      f"{', '.join(available_models())}")
        if not isinstance(self.options, dict) or not all(isinstance(k, str) for k in self.options):
            raise OptionError("options", f"{shorten(self.options)}: expected a mapping of option names to values")
        check = option_check(self.name)
        if check is not None:
            check(self.options)
        if self.checkpoint is not None and (not isinstance(self.checkpoint, str) or not self.checkpoint.strip()):
            raise OptionError("checkpoint", f"{shorten(self.checkpoint)}: expected the path of a checkpoint file")

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
    _check_sizes(name, num_classes, in_chans, img_size)
    if name.startswith("timm:"):
        import timm

        arch = name.split(":", 1)[1]
        if not timm.is_model(arch):
            raise unknown_name("timm model", arch, timm.list_models())
        model = _built(name, lambda: timm.create_model(arch, pretrained=pretrained, num_classes=num_classes,
                                                       in_chans=in_chans, **kwargs))
    elif name.startswith("torchvision:"):
        import torchvision

        arch = name.split(":", 1)[1]
        valid = torchvision.models.list_models()
        if arch not in valid:
            raise unknown_name("torchvision model", arch, valid)
        if in_chans != 3:
            raise UserError(f"torchvision models take 3 input channels, got in_chans={in_chans}")
        model = _built(name, lambda: torchvision.models.get_model(arch, weights="DEFAULT" if pretrained else None,
                                                                  num_classes=num_classes, **kwargs))
    else:
        builder = get_builder(name)
        check = option_check(name)
        if check is not None:
            try:
                check(kwargs)
            except OptionError as e:
                raise UserError(f"model {name!r}: {e.key} {e.message}") from None

        def build() -> nn.Module:
            return builder(num_classes=num_classes, in_chans=in_chans, img_size=img_size or 32, **kwargs)

        _check_param_count(name, build)
        model = _built(name, build)
    if img_size is not None:
        set_input_size(model, (in_chans, img_size, img_size))
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, skip=checkpoint_skip)
    return model


def _check_sizes(name: str, num_classes: Any, in_chans: Any, img_size: Any) -> None:
    """Refuse sizes no model is built for (they come from files and flags), before building."""
    for label, value, high in (("num_classes", num_classes, MAX_CLASSES), ("in_chans", in_chans, MAX_CHANNELS),
                               ("img_size", img_size, MAX_IMAGE_SIDE)):
        if label == "img_size" and value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= high:
            raise UserError(f"model {shorten(name)}: {label} {shorten(value)} is outside 1..{high:,}")


def _built(name: str, build: Callable[[], nn.Module]) -> nn.Module:
    """``build()``, with the errors a builder raises for bad options as one :class:`UserError`."""
    try:
        return build()
    except UserError:
        raise
    except (TypeError, ValueError, AssertionError, KeyError, IndexError, AttributeError, RuntimeError,
            NotImplementedError) as e:
        raise UserError(f"model {shorten(name)} cannot be built with these options ({type(e).__name__}: "
                        f"{clip(str(e), 160)})") from None


def _check_param_count(name: str, build: Callable[[], nn.Module]) -> None:
    """Build the architecture on the 'meta' device (no memory) and refuse more than
    :data:`MAX_PARAMS` parameters, before a real build could take gigabytes."""
    try:
        with torch.device("meta"):
            count = sum(p.numel() for p in build().parameters())
    except UserError:
        raise
    except Exception:  # the real build reports the error
        return
    if count > MAX_PARAMS:
        raise UserError(f"model {shorten(name)} with these options and input size would have {count:,} parameters "
                        f"({count * 4 / 2**30:.0f} GiB), more than the {MAX_PARAMS:,} this toolkit builds; use a "
                        f"smaller width, input size or hidden layers")


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str | None]:
    """Read a checkpoint without running any pickled code (safetensors or ``weights_only``).

    Returns:
        ``(state_dict, meta)``: the tensors (a training checkpoint's ``"model"``) and the JSON
        text of its ``"meta"`` (``None`` when it has none).

    Raises:
        UserError: missing, unreadable, truncated, carrying code, or not a state dict of plain tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return _checked_tensors(load_file(str(path)), path), None
        except UserError:
            raise
        except Exception as e:  # safetensors raises its own error types
            raise UserError(f"checkpoint {str(path)!r} is not a valid safetensors file: {clip(str(e))}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = clip(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__, 160)
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise UserError(f"checkpoint {str(path)!r} carries pickled code and was refused; save a state dict "
                            f"(torch.save(model.state_dict(), ...)) or use safetensors") from None
        raise UserError(f"checkpoint {str(path)!r} cannot be read ({msg}); it is truncated or not a PyTorch file: "
                        f"give a complete .pt/.pth state dict or a .safetensors file") from None
    meta = obj.get("meta") if isinstance(obj, dict) and isinstance(obj.get("meta"), str) else None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"checkpoint {str(path)!r} holds no state dict of tensors")
    return _checked_tensors(obj, path), meta


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint (see :func:`read_checkpoint`)."""
    return read_checkpoint(path)[0]


_INTEGER_DTYPES = {torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16,
                   torch.uint32, torch.uint64}


def _checked_tensors(state: dict[Any, Any], path: Path) -> dict[str, torch.Tensor]:
    """Refuse a state dict with non-string keys or tensors a model never holds (complex,
    quantized or sparse): such a file was not written by a model's ``state_dict``."""
    for key, t in state.items():
        if not isinstance(key, str):
            raise UserError(f"checkpoint {str(path)!r} has a key {shorten(key)} that is not a string; it is not a "
                            f"model's state dict")
        if not isinstance(t, torch.Tensor):
            raise UserError(f"checkpoint {str(path)!r}: {clip(key, 80)} is a {type(t).__name__}, not a tensor")
        if t.layout != torch.strided or not (t.dtype.is_floating_point or t.dtype in _INTEGER_DTYPES):
            raise UserError(f"checkpoint {str(path)!r}: tensor {clip(key, 80)} has dtype {t.dtype} ({t.layout}); "
                            f"a model's weights are dense floating-point or integer tensors")
    return state


def load_checkpoint(model: nn.Module, path: str | os.PathLike, skip: Sequence[str] = (), *,
                    checkpoint: tuple[dict[str, torch.Tensor], str | None] | None = None) -> nn.Module:
    """Load a checkpoint into ``model``; any missing, unexpected or mis-shaped key is an error naming it.

    Args:
        model: the network.
        path: the checkpoint.
        skip: module-path prefixes left as they are (e.g. ``["classifier"]`` when fine-tuning
            ImageNet weights on 100 labels): their keys are neither loaded nor checked.
        checkpoint: what :func:`read_checkpoint` returned for ``path``, when already read.
    """
    state, meta = checkpoint if checkpoint is not None else read_checkpoint(path)
    versions = getattr(state, "_metadata", None)
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DDP

    def skipped(key: str) -> bool:
        return any(key == p or key.startswith(p + ".") for p in skip)

    current = model.state_dict()
    state = OrderedDict((k, v) for k, v in state.items() if not skipped(k))
    # The modules' state-dict versions (torchvision's MNASNet refuses a state without them): the
    # file's where it kept them, else this model's own, which wrote the file in this toolkit.
    state._metadata = versions if versions is not None else getattr(current, "_metadata", None)  # type: ignore[attr-defined]
    own = {k: v for k, v in current.items() if not skipped(k)}
    problem = state_mismatch(own, state)
    if problem:
        raise UserError(f"checkpoint {str(path)!r} does not fit the model: {problem}{_saved_for(meta)}")
    model.load_state_dict(state, strict=not skip)
    return model


def state_mismatch(own: dict[str, torch.Tensor], state: dict[str, Any]) -> str | None:
    """What keeps ``state`` from loading into a model whose state dict is ``own``: the missing,
    unexpected and mis-shaped keys (a few of each), or ``None`` when it fits."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(getattr(state[k], "shape", ())) != tuple(own[k].shape)]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            parts.append(f"{label}: " + ", ".join(clip(i, 120) for i in items[:6])
                         + (f" (+{len(items) - 6} more)" if len(items) > 6 else ""))
    return "; ".join(parts) or None


def _saved_for(meta_text: str | None) -> str:
    """What a checkpoint says it was saved for (its ``meta``), as a hint for a mismatch."""
    import json

    try:
        meta = json.loads(meta_text) if meta_text else {}
    except ValueError:
        meta = {}
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), str) or not meta["model"]:
        return "; pass the --model and options (and --labels) it was trained with"
    options = meta.get("options") if isinstance(meta.get("options"), dict) else {}
    opts = clip(" ".join(f"{k}={v}" for k, v in options.items()), 120)
    labels = meta.get("label_names")
    classes = meta.get("num_classes", len(labels) if isinstance(labels, list) else "?")
    return (f"; it was saved for model {shorten(meta['model'])}" + (f" ({opts})" if opts else "")
            + f" with {shorten(classes)} classes: use that model and data")
