"""ONNX export: a PyTorch model and its metadata -> an ONNX file (opset 17+, dynamic batch axis)
that carries what a deployment needs, checked with ``onnx.checker`` and verified against PyTorch
on real test inputs.

The deployment metadata written here is read back by :mod:`compress.deploy.predict` (see its module
docstring for the keys).
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from compress._version import __version__
from compress.data import DataBundle, load_data
from compress.errors import UserError, clip, shorten
from compress.io import atomic_write_bytes, staged_file
from compress.models.introspect import check_finite
from compress.deploy.predict import open_session

__all__ = ["OPSET", "ExportMismatchError", "deploy_metadata", "export_onnx", "check_onnx", "load_onnx",
           "onnx_metadata", "verify_onnx", "export_and_verify", "load_model_data", "load_test_data", "check_data_fits"]

OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


class ExportMismatchError(UserError):
    """ONNX Runtime's outputs differ from PyTorch's beyond the tolerance."""


def deploy_metadata(meta: dict[str, Any], *, input_name: str = INPUT_NAME, output_name: str = OUTPUT_NAME,
                    extra: dict[str, Any] | None = None) -> dict[str, str]:
    """The ``metadata_props`` of an exported file, from a model file's ``meta`` (all values strings)."""
    c, h, w = (int(v) for v in meta["input_size"])
    labels = list(meta.get("label_names") or [str(i) for i in range(int(meta["num_classes"]))])
    mean = [float(v) for v in meta.get("mean", [0.5] * c)][:c]
    std = [float(v) for v in meta.get("std", [0.5] * c)][:c]
    order = str(meta.get("channel_order", "RGB")).upper()
    props = {
        "input_size": json.dumps([c, h, w]),
        "channel_order": order,
        "layout": "NCHW",
        "scale": repr(1.0 / 255.0),
        "mean": json.dumps(mean),
        "std": json.dumps(std),
        "label_names": json.dumps(labels),
        "num_classes": str(len(labels)),
        "input_name": input_name,
        "output_name": output_name,
        "output": "logits",
        "resize": "bilinear",
        "preprocessing": (f"decode, convert to {'grey' if c == 1 else order}, resize to {h}x{w} (bilinear), "
                          f"x = (pixel / 255 - mean) / std per channel with mean {mean} and std {std}, "
                          f"layout NCHW float32; outputs are logits, apply softmax for probabilities"),
        "model": str(meta.get("model", "")),
        "options": json.dumps(meta.get("options", {})),
        "dataset": str(meta.get("dataset", "")),
        "compress_version": __version__,
    }
    for k, v in (extra or {}).items():
        props[k] = v if isinstance(v, str) else json.dumps(v)
    return props


def check_onnx(model_proto) -> None:
    """Run ``onnx.checker`` (with shape inference); a failure is a :class:`UserError`."""
    import onnx

    try:
        onnx.checker.check_model(model_proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        first = (str(e).strip().splitlines() or ["invalid"])[0][:200]
        raise UserError(f"ONNX model fails onnx.checker: {first}") from None


class _PoolAsMatmul(nn.Module):
    """``AdaptiveAvgPool2d`` at one fixed input size as a product with its (out, in) averaging
    matrix: the same numbers, and an operator ONNX has for any pair of sizes (the exporter refuses
    adaptive pooling whose output size does not divide the input size)."""

    def __init__(self, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> None:
        super().__init__()
        rows = [_pool_weights(i, o) for i, o in zip(in_hw, out_hw)]
        self.out_hw = out_hw
        self.register_buffer("matrix", torch.kron(rows[0], rows[1]).T.contiguous())  # (in_h*in_w, out_h*out_w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x.flatten(2), self.matrix.to(x.dtype))
        return y.reshape(*x.shape[:2], *self.out_hw)


def _pool_weights(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) weights of 1-d adaptive average pooling: PyTorch's windows [floor(i n / m), ceil((i+1) n / m))."""
    w = torch.zeros(n_out, n_in)
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        w[i, lo:hi] = 1.0 / (hi - lo)
    return w


def _exportable(model: nn.Module, dummy: torch.Tensor) -> nn.Module:
    """``model``, or a copy whose adaptive average pools that ONNX cannot express at this input size
    (output size not dividing the input size, e.g. torchvision's AlexNet and VGG at 32 or 64
    pixels) are replaced by :class:`_PoolAsMatmul`."""
    sizes: dict[str, tuple[int, int]] = {}
    def record(name: str):
        return lambda module, inputs, output: sizes.__setitem__(name, tuple(inputs[0].shape[-2:]))

    hooks = [m.register_forward_hook(record(name)) for name, m in model.named_modules()
             if isinstance(m, nn.AdaptiveAvgPool2d)]
    try:
        with torch.inference_mode():
            model(dummy)
    finally:
        for h in hooks:
            h.remove()
    swap = {}
    for name, (h, w) in sizes.items():
        out = model.get_submodule(name).output_size
        oh, ow = (out, out) if isinstance(out, int) else (out[0] or h, out[1] or w)  # None: the input's size
        if h % oh or w % ow:
            swap[name] = _PoolAsMatmul((h, w), (oh, ow))
    if not swap:
        return model
    model = copy.deepcopy(model)
    for name, module in swap.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module.to(dummy.device))
    return model


def export_onnx(model: nn.Module, meta: dict[str, Any], path: str | os.PathLike, *, opset: int = OPSET,
                extra_meta: dict[str, Any] | None = None) -> Path:
    """Export ``model`` to ``path`` with a dynamic batch axis and the deployment metadata, checked.

    Args:
        model: the network; exported in eval mode on its own device (its mode is restored).
        meta: the model file's metadata (``input_size``, ``label_names``, ``mean``, ``std``, ...).
        path: the ONNX file, written atomically.
        opset: ONNX opset, at least 17.
        extra_meta: more ``metadata_props`` (e.g. ``params``, ``flops``).
    """
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not OPSET <= opset <= newest:
        raise UserError(f"opset {opset} is not one this exporter writes; use {OPSET} to {newest}")
    c, h, w = (int(v) for v in meta["input_size"])
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dummy = torch.zeros(2, c, h, w, device=device)  # batch 2, so nothing specialises on a batch of 1
    buf = io.BytesIO()
    was_training = model.training
    model.eval()
    try:
        exported = _exportable(model, dummy)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
            torch.onnx.export(exported, (dummy,), buf, dynamo=False, opset_version=opset, do_constant_folding=True,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    except (RuntimeError, ValueError, TypeError, NotImplementedError, torch.onnx.errors.OnnxExporterError) as e:
        raise UserError(f"the model cannot be exported to ONNX opset {opset} ({type(e).__name__}: "
                        f"{clip(str(e), 160)})") from None
    finally:
        model.train(was_training)
    proto = onnx.load_from_string(buf.getvalue())
    for key, value in deploy_metadata(meta, extra=extra_meta).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = f"{meta.get('model', 'model')} exported by compress {__version__}"
    check_onnx(proto)
    return atomic_write_bytes(path, proto.SerializeToString())


def load_onnx(path: str | os.PathLike):
    """Read and check an ONNX file; a missing, corrupt, truncated or invalid one is a :class:`UserError`."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX file {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise UserError(f"ONNX file {str(path)!r} is empty")
    try:
        proto = onnx.load(str(path))
    except (DecodeError, RuntimeError, ValueError) as e:
        raise UserError(f"ONNX file {str(path)!r} cannot be parsed ({type(e).__name__}); it is corrupt or "
                        f"truncated, export it again with `compress export`") from None
    if not proto.graph.node:
        raise UserError(f"ONNX file {str(path)!r} holds no graph; it is corrupt or not an ONNX model")
    try:
        check_onnx(proto)
    except UserError as e:
        raise UserError(f"ONNX file {str(path)!r}: {e}; it is corrupt, truncated or from an incompatible exporter") from None
    return proto


def onnx_metadata(proto) -> dict[str, str]:
    """``metadata_props`` of a loaded ONNX model as a dict."""
    return {p.key: p.value for p in proto.metadata_props}


def _session_input(sess) -> tuple[str, list]:
    inp = sess.get_inputs()[0]
    return inp.name, list(inp.shape)


def _check_shape(graph_shape: list, got: tuple[int, ...], where: str) -> None:
    want = graph_shape[1:]
    if len(want) != len(got) or any(isinstance(a, int) and a != b for a, b in zip(want, got)):
        shown = "x".join(str(v) for v in want)
        raise UserError(f"{where} expects inputs of {shown} but the data gives {'x'.join(map(str, got))}; "
                        f"use the data the model was trained on (or --image-size for image folders)")


@torch.inference_mode()
def verify_onnx(onnx_path: str | os.PathLike, model: nn.Module, data: DataBundle | torch.Tensor, *,
                tol: float = 1e-3, max_samples: int = 256, batch_size: int = 64,
                raise_on_failure: bool = True) -> dict[str, Any]:
    """Compare ONNX Runtime (CPU) with PyTorch on the same real inputs.

    Args:
        onnx_path: the exported file.
        model: the PyTorch model it came from (run on the CPU, a copy if it lives on a GPU).
        data: a bundle (its first ``max_samples`` test images, normalised) or a float input batch.
        tol: largest allowed absolute difference of any output.
        max_samples: inputs compared.
        batch_size: batch of both runs.
        raise_on_failure: raise :class:`ExportMismatchError` past the tolerance.

    Returns:
        ``samples``, ``max_abs_diff``, ``mean_abs_diff``, ``argmax_agreement`` (fraction),
        ``argmax_disagreements``, ``tolerance`` and ``passed``. Argmax disagreements count as failures
        only where PyTorch's two best outputs are more than ``2 * tol`` apart (not a near-tie).
    """
    if isinstance(data, DataBundle):
        x_all = data.normalize(data.test.images[:max_samples])
    else:
        x_all = torch.as_tensor(data, dtype=torch.float32)[:max_samples]
    if len(x_all) == 0:
        raise UserError("no inputs to verify the ONNX export on")
    sess = open_session(onnx_path, "cpu")
    name, graph_shape = _session_input(sess)
    _check_shape(graph_shape, tuple(x_all.shape[1:]), f"ONNX model {str(onnx_path)!r}")
    # the reference runs on the CPU like onnxruntime here (a GPU's TF32 convolutions alone differ by ~1e-3)
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    reference = model if on_cpu else copy.deepcopy(model).cpu()
    was_training = model.training
    reference.eval()
    ref, got = [], []
    try:
        for start in range(0, len(x_all), batch_size):
            x = x_all[start:start + batch_size].cpu()
            ref.append(reference(x).float().numpy())
            got.append(sess.run(None, {name: x.numpy()})[0])
    finally:
        model.train(was_training)
    ref_a, got_a = np.concatenate(ref), np.concatenate(got)
    if ref_a.shape != got_a.shape:
        raise ExportMismatchError(f"ONNX output shape {got_a.shape} differs from PyTorch's {ref_a.shape}")
    diff = np.abs(ref_a.astype(np.float64) - got_a)
    agree = ref_a.argmax(1) == got_a.argmax(1)
    top2 = np.sort(ref_a, axis=1)[:, -2:] if ref_a.shape[1] > 1 else np.zeros((len(ref_a), 2))
    clear = (top2[:, 1] - top2[:, 0]) > 2 * tol  # a flip there is not explained by the tolerance
    bad_flips = int((~agree & clear).sum())
    result = {"samples": len(ref_a), "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
              "argmax_agreement": float(agree.mean()), "argmax_disagreements": int((~agree).sum()),
              "tolerance": float(tol)}
    result["passed"] = bool(result["max_abs_diff"] <= tol and bad_flips == 0 and np.isfinite(diff).all())
    if raise_on_failure and not result["passed"]:
        raise ExportMismatchError(
            f"ONNX Runtime disagrees with PyTorch on {result['samples']} test inputs: max |diff| "
            f"{result['max_abs_diff']:.3g} (tolerance {tol:g}), argmax agreement {result['argmax_agreement']:.2%}")
    return result


def export_and_verify(model: nn.Module, meta: dict[str, Any], path: str | os.PathLike, data: DataBundle | torch.Tensor,
                      *, opset: int = OPSET, tol: float = 1e-3, max_samples: int = 256,
                      extra_meta: dict[str, Any] | None = None, what: str = "the model") -> dict[str, Any]:
    """Export, check and verify, then put the file in place: it is written to a temporary name and
    renamed to ``path`` only once verified, so a failure leaves an earlier ``path`` untouched.

    Args:
        what: the model in messages (e.g. ``model file 'runs/x/model.pt'``).

    Returns:
        The :func:`verify_onnx` figures plus ``path``, ``file_size`` (bytes) and ``opset``.

    Raises:
        UserError: non-finite weights, data that does not fit, an export or verification failure.
    """
    if not isinstance(max_samples, int) or max_samples < 1:
        raise UserError(f"verify samples {shorten(max_samples)}: must be at least 1; an export is written only "
                        f"once verified against PyTorch on test inputs")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise UserError(f"tolerance {shorten(tol)}: must be a positive finite number, e.g. 1e-3")
    check_finite(model, what)
    if isinstance(data, DataBundle):
        check_data_fits(meta, data, f"model {meta['model']!r}" if meta.get("model") else "the model")
    path = Path(path)
    with staged_file(path) as tmp:
        export_onnx(model, meta, tmp, opset=opset, extra_meta=extra_meta)
        try:
            result = verify_onnx(tmp, model, data, tol=tol, max_samples=max_samples)
        except ExportMismatchError as e:
            raise ExportMismatchError(f"{e}; {str(path)!r} was not written (an earlier file there is kept; raise "
                                      f"--tol only if the difference is expected)") from None
        size = tmp.stat().st_size
    return {**result, "path": str(path), "file_size": size, "opset": opset}


def check_data_fits(meta: dict[str, Any], bundle: DataBundle, what: str = "the model") -> None:
    """The data must have the model's input size and its labels, in the same order."""
    want = [int(v) for v in meta.get("input_size", [])]
    got = list(bundle.input_size)
    if want and want != got:
        raise UserError(f"{what} expects inputs of {'x'.join(map(str, want))} (C x H x W) but the data "
                        f"{bundle.name!r} gives {'x'.join(map(str, got))}; use the data it was trained on "
                        f"(or --image-size for image folders)")
    labels = meta.get("label_names")
    n = int(meta.get("num_classes", len(labels or [])) or 0)
    if n and n != bundle.num_classes:
        raise UserError(f"{what} has {n} classes but the data {bundle.name!r} has {bundle.num_classes} labels")
    if labels and list(labels) != list(bundle.label_names):
        raise UserError(f"{what} was trained on labels {list(labels)[:5]}... but the data {bundle.name!r} has "
                        f"{list(bundle.label_names)[:5]}...; use the same data (and --labels) as in training")


def load_model_data(meta: dict[str, Any], name: str | None = None, *, root: str | None = None,
                    download: bool = False, num_labels: int | None = None, image_size: int | None = None,
                    limit_train: int | None = 1, limit_test: int | None = None, val_fraction: float = 0.0,
                    split_seed: int = 0) -> DataBundle:
    """The data of a model file: ``name``, or else the dataset recorded in its metadata (at the
    recorded input size for an image folder). ``val_fraction`` and ``split_seed`` hold out the
    validation split as training does (:class:`~compress.data.DataConfig`)."""
    name = name or meta.get("dataset") or None
    if not name:
        raise UserError("the model does not record its dataset; pass --data (digits, cifar10, imagefolder:<path>)")
    if image_size is None and name.startswith("imagefolder:") and meta.get("input_size"):
        image_size = int(meta["input_size"][1])
    return load_data(name, root=root, download=download, num_labels=num_labels, image_size=image_size,
                     limit_train=limit_train, limit_test=limit_test, val_fraction=val_fraction, seed=split_seed)


def load_test_data(meta: dict[str, Any], name: str | None = None, *, root: str | None = None,
                   download: bool = False, num_labels: int | None = None, image_size: int | None = None,
                   limit_test: int | None = None) -> DataBundle:
    """The test data for a model (:func:`load_model_data`); one training image is loaded."""
    return load_model_data(meta, name, root=root, download=download, num_labels=num_labels, image_size=image_size,
                           limit_train=1, limit_test=limit_test)
