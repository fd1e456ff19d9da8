"""The deployment runtime: open an exported ONNX file, read its metadata, preprocess image files
from that metadata alone and return the top labels with their probabilities.

This module needs only onnxruntime, numpy and Pillow (no PyTorch, no compress model code), so it
is the path a user's service takes. The metadata an exported file carries (``metadata_props``,
all strings; JSON where noted) is written by :func:`compress.deploy.export.export_onnx`:

- ``input_size``: JSON ``[C, H, W]``; images are resized to ``H x W`` (bilinear) and converted to
  RGB (or grey when ``C == 1``);
- ``channel_order``: ``RGB`` or ``BGR``;
- ``scale``, ``mean``, ``std``: each channel becomes ``(pixel * scale - mean) / std`` (JSON lists);
- ``layout``: ``NCHW``; ``input_name``, ``output_name``; ``output``: ``logits`` (softmax applied here);
- ``label_names``: JSON list, one name per output unit;
- ``preprocessing``: the same in words.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from compress.errors import UserError, shorten
from compress.images import decode_image

__all__ = ["DEPLOY_KEYS", "DeployMeta", "open_session", "read_deploy_meta", "parse_deploy_props", "normalize_pixels",
           "preprocess_images", "softmax", "predict_images", "session_providers"]

DEPLOY_KEYS = ("input_size", "channel_order", "scale", "mean", "std", "label_names")
MAX_SIDE = 4096  # pixels of an input's height or width
MAX_LABELS = 100_000
MAX_LABEL_CHARS = 1000
MAX_BATCH_BYTES = 256 << 20  # one input batch


@dataclass(frozen=True)
class DeployMeta:
    """What a deployment needs to feed the model: the parsed ``metadata_props`` of an ONNX file."""

    input_size: tuple[int, int, int]
    channel_order: str
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    label_names: tuple[str, ...]
    input_name: str
    output_name: str
    fixed_batch: int | None
    extra: dict[str, str]

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


def session_providers(device: str = "cpu") -> list[str]:
    """ONNX Runtime providers for ``device`` (``cpu`` or ``cuda``); ``cuda`` needs onnxruntime-gpu."""
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UserError("onnxruntime has no CUDAExecutionProvider here; install onnxruntime-gpu "
                            "(make install does where nvidia-smi is present)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise UserError(f"unknown onnxruntime device {device!r}; valid: cpu, cuda")


def open_session(path: str | os.PathLike, device: str = "cpu", threads: int | None = None,
                 config: dict[str, str] | None = None):
    """An ``onnxruntime.InferenceSession`` on ``path``; a missing, corrupt or truncated file is a
    :class:`UserError` naming it.

    Args:
        path: the ONNX file.
        device: ``cpu`` or ``cuda``.
        threads: intra-op threads (default: onnxruntime's choice).
        config: session configuration entries (e.g. ``{"session.intra_op.allow_spinning": "0"}``).
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX file {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise UserError(f"ONNX file {str(path)!r} is empty")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: no provider warnings on stderr
    if threads:
        opts.intra_op_num_threads = threads
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    try:
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=session_providers(device))
    except UserError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"ONNX file {str(path)!r} cannot be loaded ({first}); is it corrupt or truncated? "
                        f"Export it again with `compress export`") from None
    if device == "cuda" and "CUDAExecutionProvider" not in sess.get_providers():
        raise UserError("onnxruntime could not start its CUDA provider (CUDA/cuDNN libraries missing or "
                        "mismatched); use the CPU provider")
    return sess


def _json(meta: dict[str, str], key: str, path: str):
    try:
        return json.loads(meta[key])
    except (ValueError, TypeError, RecursionError):
        raise UserError(f"ONNX file {path!r}: metadata {key!r} is not valid JSON ({shorten(meta[key], 60)})") from None


def _finite_numbers(values: Any, n: int, positive: bool = False) -> bool:
    return (isinstance(values, list) and len(values) == n
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
            and (not positive or all(v > 0 for v in values)))


def parse_deploy_props(props: dict[str, str], path: str) -> dict[str, Any]:
    """Check the deployment metadata of an ONNX file (the strings of ``metadata_props``) and
    return it parsed: ``input_size``, ``channel_order``, ``scale``, ``mean``, ``std``,
    ``label_names``. Every value is untrusted: types, sizes (an input of at most
    :data:`MAX_SIDE` pixels a side, at most :data:`MAX_LABELS` labels) and numbers are checked
    before anything is allocated from them.

    Raises:
        UserError: naming the file, the key and what is valid.
    """
    missing = [k for k in DEPLOY_KEYS if k not in props]
    if missing:
        raise UserError(f"ONNX file {path!r} lacks the deployment metadata {', '.join(missing)}; "
                        f"export it with `compress export` so that it carries its preprocessing and labels")
    size = _json(props, "input_size", path)
    mean, std, labels = (_json(props, k, path) for k in ("mean", "std", "label_names"))
    if not (isinstance(size, list) and len(size) == 3 and all(isinstance(v, int) and not isinstance(v, bool)
                                                               for v in size)
            and size[0] in (1, 3) and all(1 <= v <= MAX_SIDE for v in size[1:])):
        raise UserError(f"ONNX file {path!r}: metadata input_size {shorten(props['input_size'])} is not [C, H, W] "
                        f"with C 1 or 3 and 1 <= H, W <= {MAX_SIDE}")
    c = size[0]
    if not _finite_numbers(mean, c) or not _finite_numbers(std, c, positive=True):
        raise UserError(f"ONNX file {path!r}: metadata mean {shorten(mean)} and std {shorten(std)} must be {c} "
                        f"finite numbers each (std above 0), one per input channel")
    if (not isinstance(labels, list) or not 1 <= len(labels) <= MAX_LABELS
            or not all(isinstance(v, str) and len(v) <= MAX_LABEL_CHARS for v in labels)):
        raise UserError(f"ONNX file {path!r}: metadata label_names {shorten(labels)} is not a list of 1 to "
                        f"{MAX_LABELS:,} names of at most {MAX_LABEL_CHARS} characters")
    order = props["channel_order"].upper()
    if order not in ("RGB", "BGR"):
        raise UserError(f"ONNX file {path!r}: channel_order {shorten(props['channel_order'])} is not RGB or BGR")
    try:
        scale = float(props["scale"])
    except ValueError:
        scale = math.nan
    if not (math.isfinite(scale) and scale > 0):
        raise UserError(f"ONNX file {path!r}: scale {shorten(props['scale'])} is not a positive finite number")
    return {"input_size": size, "channel_order": order, "scale": scale, "mean": [float(v) for v in mean],
            "std": [float(v) for v in std], "label_names": labels}


def read_deploy_meta(session, path: str | os.PathLike = "<onnx>") -> DeployMeta:
    """Parse and check the deployment metadata of an open session (see the module docstring)."""
    path = str(path)
    props = dict(session.get_modelmeta().custom_metadata_map)
    parsed = parse_deploy_props(props, path)
    size, labels = parsed["input_size"], parsed["label_names"]
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        raise UserError(f"ONNX file {path!r} has {len(inputs)} inputs; an image classifier has one")
    graph_shape = list(inputs[0].shape)
    static = [d for d in graph_shape[1:] if isinstance(d, int)]
    if len(graph_shape) != 4 or (len(static) == 3 and static != size):
        raise UserError(f"ONNX file {path!r}: graph input shape {shorten(graph_shape)} does not fit its metadata "
                        f"input_size {size}")
    out_dim = outputs[0].shape[-1] if outputs and outputs[0].shape else None
    if isinstance(out_dim, int) and out_dim != len(labels):
        raise UserError(f"ONNX file {path!r}: {out_dim} outputs but {len(labels)} label names")
    fixed = graph_shape[0] if isinstance(graph_shape[0], int) else None
    if fixed is not None and not 1 <= fixed * math.prod(size) * 4 <= MAX_BATCH_BYTES:
        raise UserError(f"ONNX file {path!r}: its graph takes batches of exactly {fixed:,} images of "
                        f"{'x'.join(map(str, size))}, more than {MAX_BATCH_BYTES >> 20} MiB a batch; export it with "
                        f"a dynamic batch axis (`compress export` does)")
    extra = {k: v for k, v in props.items() if k not in DEPLOY_KEYS}
    return DeployMeta(tuple(size), parsed["channel_order"], parsed["scale"], tuple(parsed["mean"]),
                      tuple(parsed["std"]), tuple(labels), inputs[0].name, outputs[0].name, fixed, extra)


def normalize_pixels(pixels: np.ndarray, meta: DeployMeta) -> np.ndarray:
    """uint8 or float pixels ``(N, C, H, W)`` in RGB order -> the float32 model input of the metadata."""
    c = meta.input_size[0]
    x = np.asarray(pixels, dtype=np.float32)
    if meta.channel_order == "BGR" and c == 3:
        x = x[:, ::-1]
    mean = np.asarray(meta.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(meta.std, dtype=np.float32).reshape(1, -1, 1, 1)
    return np.ascontiguousarray((x * np.float32(meta.scale) - mean) / std, dtype=np.float32)


def preprocess_images(files: Sequence[str | os.PathLike], meta: DeployMeta) -> np.ndarray:
    """Image files -> float32 batch ``(N, C, H, W)`` exactly as the metadata says (decoded as
    :func:`compress.images.decode_image` does for the training data)."""
    c, h, w = meta.input_size
    pixels = np.empty((len(files), c, h, w), dtype=np.uint8)
    for i, f in enumerate(files):
        pixels[i] = decode_image(f, c, (w, h)).transpose(2, 0, 1)
    return normalize_pixels(pixels, meta)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def predict_images(onnx_path: str | os.PathLike, files: Sequence[str | os.PathLike], *, top_k: int = 5,
                   batch_size: int = 64, device: str = "cpu") -> list[dict[str, Any]]:
    """Classify image files with an exported model, using only the file's metadata.

    Returns:
        One dict per file: ``file``, ``top`` (``[(label, probability), ...]``, best first) and
        ``probabilities`` (all classes, in label order).
    """
    if top_k < 1:
        raise UserError(f"top-k must be at least 1, got {top_k}")
    if not files:
        raise UserError("give at least one image file")
    sess = open_session(onnx_path, device)
    meta = read_deploy_meta(sess, onnx_path)
    per_image = math.prod(meta.input_size) * 4
    batch_size = meta.fixed_batch or max(1, min(batch_size, MAX_BATCH_BYTES // per_image))
    results = []
    for start in range(0, len(files), batch_size):
        chunk = list(files[start:start + batch_size])
        x = preprocess_images(chunk, meta)
        if meta.fixed_batch and len(chunk) < meta.fixed_batch:  # a graph exported without a batch axis
            x = np.concatenate([x, np.zeros((meta.fixed_batch - len(chunk), *x.shape[1:]), np.float32)])
        logits = sess.run([meta.output_name], {meta.input_name: x})[0][:len(chunk)]
        probs = softmax(logits.astype(np.float64))
        for f, p in zip(chunk, probs):
            order = np.argsort(-p, kind="stable")[:top_k]
            results.append({"file": str(f), "top": [(meta.label_names[j], float(p[j])) for j in order],
                            "probabilities": p.tolist()})
    return results
