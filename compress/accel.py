"""The speed settings of a GPU, resolved in one place: mixed precision (``torch.autocast`` and
its gradient scaler), the channels-last memory format, and ``torch.compile``. Training
(:mod:`compress.training`) and feature extraction (:mod:`compress.analysis.features`) use them.

- ``amp`` (:func:`amp_dtype`): ``True`` is float16 autocast on CUDA and float32 elsewhere (what
  the earlier boolean meant), ``False`` float32, ``"bf16"`` bfloat16 autocast on any device (CPU
  included) without loss scaling, ``"fp16"`` float16 autocast with loss scaling, on CUDA only.
- channels-last (:func:`channels_last`, :func:`channels_last_module`): 4-D weights and batches
  stored NHWC, which the tensor-core convolutions of recent GPUs read fastest.
- :func:`compile_module`: ``torch.compile`` (inductor) of a module, with the errors of a machine
  that cannot compile turned into one :class:`~compress.errors.UserError` line.
- :func:`inference_forward`: a forward pass for feature extraction, under float16 autocast with
  channels-last inputs on CUDA, and exactly the plain call elsewhere.

A leaf: it imports nothing of the package but :mod:`compress.errors`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn as nn

from compress.errors import OptionError, UserError, clip, shorten

__all__ = ["AMP_VALUES", "check_amp", "amp_dtype", "grad_scaler", "channels_last", "channels_last_module",
           "compile_module", "compile_failure", "COMPILE_ERRORS", "inference_forward"]

AMP_VALUES = (True, False, "bf16", "fp16")
_VALID = "true (float16 on CUDA, float32 elsewhere), false, bf16 or fp16"


def check_amp(key: str, value: Any) -> Any:
    """``value`` must be one of :data:`AMP_VALUES` (``1`` and ``0`` are not booleans here)."""
    if not (isinstance(value, bool) or isinstance(value, str) and value in ("bf16", "fp16")):
        raise OptionError(key, f"{shorten(value)}: valid: {_VALID}")
    return value


def amp_dtype(amp: Any, device: torch.device | str, key: str = "amp") -> torch.dtype | None:
    """The autocast dtype of the ``amp`` setting on ``device``; ``None``: no autocast (float32).

    Raises:
        OptionError: ``fp16`` on a device other than CUDA (float16 training without a GPU would be
            slow and is not what was asked for; ``true`` is the setting that means "float16 where
            CUDA is, float32 elsewhere", and ``bf16`` runs on the CPU).
    """
    check_amp(key, amp)
    kind = torch.device(device).type
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if kind != "cuda":
            raise OptionError(key, f"fp16: float16 training with loss scaling needs CUDA, and this run is on {kind}; "
                                   f"use true (float16 on CUDA, float32 elsewhere), bf16 (runs on the CPU too) or "
                                   f"false")
        return torch.float16
    return torch.float16 if amp is True and kind == "cuda" else None


def grad_scaler(dtype: torch.dtype | None, device: torch.device | str) -> torch.amp.GradScaler:
    """The gradient scaler of an autocast dtype: enabled for float16 only (bfloat16 has float32's
    range, so its gradients need no scaling)."""
    kind = torch.device(device).type
    return torch.amp.GradScaler(kind if kind == "cuda" else "cpu", enabled=dtype == torch.float16)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """A 4-D batch in the channels-last memory format (other tensors as they are)."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


@contextmanager
def channels_last_module(*modules: nn.Module | None, enabled: bool = True) -> Iterator[None]:
    """Hold the 4-D weights and buffers of ``modules`` in the channels-last memory format inside
    the block, and in the usual contiguous format again after it (an exception included), so a
    state dict taken after the block is laid out as before. The parameters stay the same objects
    (an optimiser built on them keeps working). ``None`` entries are skipped."""
    todo = [m for m in modules if m is not None] if enabled else []
    for m in todo:
        m.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        for m in todo:
            m.to(memory_format=torch.contiguous_format)


def _compile_errors() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = []
    try:
        from torch._dynamo.exc import BackendCompilerFailed

        found.append(BackendCompilerFailed)
    except ImportError:
        pass
    try:
        from torch._inductor.exc import InductorError

        found.append(InductorError)
    except ImportError:
        pass
    return tuple(found)


COMPILE_ERRORS = _compile_errors()  # what a backend that cannot compile raises on the first call


def compile_failure(error: BaseException, key: str = "compile") -> UserError:
    """The one-line error of a ``torch.compile`` that failed (no C++ compiler, no Triton, ...)."""
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return UserError(f"{key}: torch.compile could not compile the model ({clip(first, 200)}); its inductor backend "
                     f"needs a working C++ compiler (gcc or clang) on the CPU and Triton on CUDA: install them, or "
                     f"run without compile ({key}: false, --no-{key})")


def compile_module(module: nn.Module, key: str = "compile") -> nn.Module:
    """``torch.compile(module)``: a wrapper that shares the module's parameters; the module itself
    is unchanged, so its ``state_dict`` keeps its keys (the wrapper's would carry ``_orig_mod.``).
    Compiling happens on the first call: catch :data:`COMPILE_ERRORS` there and report them with
    :func:`compile_failure`.

    Raises:
        UserError: ``torch.compile`` is not supported here (e.g. by this Python version).
    """
    try:
        return torch.compile(module)
    except (RuntimeError, NotImplementedError) as e:
        raise compile_failure(e, key) from None


def inference_forward(model: nn.Module, x: torch.Tensor) -> Any:
    """``model(x)`` for feature extraction. On CUDA under float16 autocast with ``x`` channels-last
    (the convolutions run on tensor cores; callers cast what they keep to their own dtype, so a
    float32 cache stays float32). float16 rather than bfloat16: it keeps the 10-bit mantissa of
    the TF32 convolutions CUDA runs by default, and the activations of a trained network stay far
    below its range. On any other device: exactly ``model(x)``, bit for bit."""
    if x.device.type != "cuda":
        return model(x)
    with torch.autocast("cuda", dtype=torch.float16):
        return model(channels_last(x))
