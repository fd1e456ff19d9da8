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
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from compress.errors import UserError

__all__ = ["DEPLOY_KEYS", "DeployMeta", "open_session", "read_deploy_meta", "normalize_pixels", "preprocess_images", "softmax",
           "predict_images", "session_providers"]

DEPLOY_KEYS = ("input_size", "channel_order", "scale", "mean", "std", "label_names")


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
    except (json.JSONDecodeError, TypeError):
        raise UserError(f"ONNX file {path!r}: metadata {key!r} is not valid JSON ({meta[key][:60]!r})") from None


def read_deploy_meta(session, path: str | os.PathLike = "<onnx>") -> DeployMeta:
    """Parse and check the deployment metadata of an open session (see the module docstring)."""
    path = str(path)
    props = dict(session.get_modelmeta().custom_metadata_map)
    missing = [k for k in DEPLOY_KEYS if k not in props]
    if missing:
        raise UserError(f"ONNX file {path!r} lacks the deployment metadata {', '.join(missing)}; "
                        f"export it with `compress export` so that it carries its preprocessing and labels")
    size = _json(props, "input_size", path)
    mean, std, labels = (_json(props, k, path) for k in ("mean", "std", "label_names"))
    if not (isinstance(size, list) and len(size) == 3 and all(isinstance(v, int) and v > 0 for v in size)):
        raise UserError(f"ONNX file {path!r}: input_size {props['input_size']!r} is not [C, H, W]")
    if not all(isinstance(v, list) for v in (mean, std, labels)):
        raise UserError(f"ONNX file {path!r}: metadata mean, std and label_names must be JSON lists")
    c = size[0]
    if c not in (1, 3) or len(mean) != c or len(std) != c or any(float(s) == 0 for s in std):
        raise UserError(f"ONNX file {path!r}: {c} input channels with mean {mean} and std {std} do not fit")
    order = props["channel_order"].upper()
    if order not in ("RGB", "BGR"):
        raise UserError(f"ONNX file {path!r}: channel_order {order!r} is not RGB or BGR")
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        raise UserError(f"ONNX file {path!r} has {len(inputs)} inputs; an image classifier has one")
    graph_shape = list(inputs[0].shape)
    static = [d for d in graph_shape[1:] if isinstance(d, int)]
    if len(graph_shape) != 4 or (len(static) == 3 and static != size):
        raise UserError(f"ONNX file {path!r}: graph input shape {graph_shape} does not fit its metadata "
                        f"input_size {size}")
    out_dim = outputs[0].shape[-1] if outputs[0].shape else None
    if isinstance(out_dim, int) and out_dim != len(labels):
        raise UserError(f"ONNX file {path!r}: {out_dim} outputs but {len(labels)} label names")
    try:
        scale = float(props["scale"])
    except ValueError:
        raise UserError(f"ONNX file {path!r}: scale {props['scale']!r} is not a number") from None
    extra = {k: v for k, v in props.items() if k not in DEPLOY_KEYS}
    return DeployMeta(tuple(size), order, scale, tuple(float(v) for v in mean), tuple(float(v) for v in std),
                      tuple(str(v) for v in labels), inputs[0].name, outputs[0].name,
                      graph_shape[0] if isinstance(graph_shape[0], int) else None, extra)


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
    """Image files -> float32 batch ``(N, C, H, W)`` exactly as the metadata says."""
    from PIL import Image, UnidentifiedImageError

    c, h, w = meta.input_size
    pixels = np.empty((len(files), c, h, w), dtype=np.uint8)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                im = im.convert("L" if c == 1 else "RGB")
                if im.size != (w, h):
                    im = im.resize((w, h), Image.BILINEAR)
                pixels[i] = np.asarray(im, dtype=np.uint8).reshape(h, w, c).transpose(2, 0, 1)
        except FileNotFoundError:
            raise UserError(f"image file {str(f)!r} does not exist") from None
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"image file {str(f)!r} cannot be decoded ({e.__class__.__name__})") from None
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
    batch_size = meta.fixed_batch or batch_size
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
