"""onnxruntime's TensorRT execution provider, the ``ort-trt`` backend of ``compress bench``:
offered only where ``onnxruntime.get_available_providers()`` lists ``TensorrtExecutionProvider``
(an onnxruntime-gpu built with TensorRT, and the TensorRT libraries)."""

from __future__ import annotations

import os
from typing import Any, Callable

from compress.errors import UserError

__all__ = ["TRT_PROVIDERS", "open_trt_session", "warmed"]

# TensorRT first; CUDA, then the CPU, run the nodes TensorRT does not take
TRT_PROVIDERS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def open_trt_session(path: str | os.PathLike, threads: int | None = None, config: dict[str, str] | None = None):
    """An onnxruntime session on ``path`` with :data:`TRT_PROVIDERS`, opened as
    :func:`~compress.deploy.predict.open_session` opens the CPU and CUDA ones. TensorRT builds its
    engine, in the model's own precision, on the first call of every batch size (see :func:`warmed`).

    Raises:
        UserError: onnxruntime has no TensorRT provider, could not start it, or cannot load the file.
    """
    import onnxruntime as ort

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        raise UserError("onnxruntime has no TensorrtExecutionProvider here (it needs onnxruntime-gpu built with "
                        "TensorRT, and the TensorRT libraries); use ort-cuda")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: no provider warnings on stderr
    if threads:
        opts.intra_op_num_threads = threads
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    try:
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=TRT_PROVIDERS)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"ONNX file {str(path)!r} cannot be loaded with onnxruntime's TensorRT provider ({first}); "
                        f"use ort-cuda") from None
    if "TensorrtExecutionProvider" not in sess.get_providers():
        raise UserError("onnxruntime could not start its TensorRT provider (TensorRT libraries missing or "
                        "mismatched); use ort-cuda")
    return sess


def warmed(fn: Callable[[], Any], enabled: bool = True) -> Callable[[], Any]:
    """``fn`` after one untimed call when ``enabled`` (TensorRT builds its engine for the batch
    size on that call: without it, a bench with no warm-up would time the build)."""
    if enabled:
        fn()
    return fn
