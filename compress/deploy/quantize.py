"""INT8 quantization of an exported ONNX model with onnxruntime, behind an accuracy gate.

Static quantization (the default) runs ``quant_pre_process`` (shape inference and graph
optimisation), calibrates the activations on training images (``minmax``, ``percentile`` or
``entropy``) and writes QDQ format (QuantizeLinear/DequantizeLinear around every quantized
operator) with per-channel weights; dynamic quantization quantizes the weights only and the
activations at run time. The deployment metadata of the FP32 file is carried over unchanged, so
``compress predict`` runs the INT8 file as it runs the FP32 one.

The gate: the INT8 model's accuracy on the validation images may be at most ``max_drop``
accuracy points below the FP32 model's (both run with onnxruntime). Past it, onnxruntime's QDQ
debugging helpers (:mod:`onnxruntime.quantization.qdq_loss_debug`) rank the layers by the
quantization error they add, and the worst are either left in FP32 (``nodes_to_exclude``) and
the quantization tried again, or the run stops naming them. Nothing is written unless the gate
passes: the output is written to a temporary name and renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from compress.checks import integer, number, one_of
from compress.checks import seed as check_seed
from compress.data import DataBundle, ImageSet
from compress.errors import UserError, clip
from compress.io import staged_file
from compress.deploy.export import load_model_data, load_onnx, onnx_metadata
from compress.deploy.predict import DeployMeta, normalize_pixels, open_session, read_deploy_meta

__all__ = ["METHODS", "MODES", "ON_FAIL", "QuantizeSettings", "QuantizeGateError", "quantize_onnx", "rank_layers",
           "onnx_split_accuracy", "quantized_ops", "load_quantize_data", "settings_dict"]

METHODS = ("minmax", "percentile", "entropy")
MODES = ("static", "dynamic")
ON_FAIL = ("exclude", "stop")
# operators whose quantization adds error of its own (weights or arithmetic); the candidates for exclusion
RANKED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Sub", "Concat", "AveragePool",
              "GlobalAveragePool", "ReduceMean", "ReduceSum", "Sigmoid", "HardSigmoid", "HardSwish", "Softmax",
              "Resize", "Gather", "ScatterElements", "Where")
_FOLLOW = ("Relu", "Clip", "LeakyRelu")  # fused into the operator before them in QDQ graphs
BATCH = 32  # images per calibration or evaluation batch


class QuantizeGateError(UserError):
    """The INT8 model stays more than ``max_drop`` points below the FP32 model on validation."""


@dataclass(frozen=True)
class QuantizeSettings:
    """How to quantize (see :func:`quantize_onnx`); checked when built.

    Attributes:
        mode: static (activations calibrated on training images, QDQ format) or dynamic (weights only).
        method: calibration of static mode: minmax, percentile or entropy.
        calibration_images: training images the static calibration runs on.
        per_channel: one scale per output channel of every weight.
        max_drop: largest accepted validation accuracy drop, in points (null: no gate).
        on_fail: past the gate, exclude (leave the worst layers in FP32 and retry) or stop.
        retries: exclusion rounds before giving up (on_fail: exclude).
        exclude_per_round: layers left in FP32 per round.
        debug_images: validation images the per-layer error is measured on.
        seed: seed of the choice of calibration images.
    """

    mode: str = "static"
    method: str = "minmax"
    calibration_images: int = 300
    per_channel: bool = True
    max_drop: float | None = 1.0
    on_fail: str = "exclude"
    retries: int = 3
    exclude_per_round: int = 2
    debug_images: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        one_of("mode", self.mode, MODES)
        one_of("method", self.method, METHODS)
        one_of("on_fail", self.on_fail, ON_FAIL)
        integer("calibration_images", self.calibration_images, low=1, high=1_000_000,
                hint="training images the calibration runs on, e.g. 300")
        if self.max_drop is not None:
            number("max_drop", self.max_drop, low=0, high=100,
                   hint="accuracy points the INT8 model may lose on validation, e.g. 1 (null: no gate)")
        integer("retries", self.retries, low=0, high=100, hint="exclusion rounds, e.g. 3")
        integer("exclude_per_round", self.exclude_per_round, low=1, high=1000, hint="layers per round, e.g. 2")
        integer("debug_images", self.debug_images, low=1, high=10_000, hint="e.g. 32")
        check_seed("seed", self.seed)
        if not isinstance(self.per_channel, bool):
            raise UserError(f"per_channel {self.per_channel!r}: expected true or false")


# ----------------------------------------------------------------------------- data


def load_quantize_data(meta: dict[str, Any], name: str | None = None, *, root: str | None = None,
                       download: bool = False, num_labels: int | None = None, image_size: int | None = None,
                       limit_train: int | None = None, val_fraction: float = 0.1, split_seed: int = 0,
                       limit_test: int | None = 1) -> DataBundle:
    """The data to quantize a model file on: its training images (calibration) and the validation
    split held out of them as training does, so the gate sees images the model was not trained on."""
    return load_model_data(meta, name, root=root, download=download, num_labels=num_labels, image_size=image_size,
                           limit_train=limit_train, limit_test=limit_test, val_fraction=val_fraction,
                           split_seed=split_seed)


def _inputs(images: torch.Tensor, meta: DeployMeta) -> np.ndarray:
    """uint8 images -> the float32 model input the file's metadata describes (resized when needed)."""
    c, h, w = meta.input_size
    if tuple(images.shape[1:]) != (c, h, w):
        if images.shape[1] != c:
            raise UserError(f"the model takes {c}-channel inputs but the data gives {images.shape[1]} channels; use "
                            f"the data it was trained on")
        x = F.interpolate(images.float(), size=(h, w), mode="bicubic", align_corners=False).clamp(0, 255)
        images = x
    return normalize_pixels(images.numpy(), meta)


def _batches(images: torch.Tensor, meta: DeployMeta, batch: int = BATCH):
    for start in range(0, len(images), batch):
        yield _inputs(images[start:start + batch], meta)


def _reader(images: torch.Tensor, meta: DeployMeta):
    """A fresh onnxruntime ``CalibrationDataReader`` over ``images``, in batches of one size (the
    histogram calibrations stack the batches: the largest divisor of the count up to :data:`BATCH`)."""
    from onnxruntime.quantization import CalibrationDataReader

    batch = max(d for d in range(1, min(BATCH, len(images)) + 1) if len(images) % d == 0)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = ({meta.input_name: x} for x in _batches(images, meta, batch))

        def get_next(self):
            return next(self._it, None)

    return Reader()


def onnx_split_accuracy(path: str | os.PathLike, split: ImageSet) -> float:
    """Top-1 accuracy of an ONNX file on ``split``, fed as its metadata says."""
    sess = open_session(path, "cpu")
    meta = read_deploy_meta(sess, path)
    correct = 0
    labels = split.labels.numpy()
    for i, x in enumerate(_batches(split.images, meta)):
        logits = sess.run([meta.output_name], {meta.input_name: x})[0]
        correct += int((logits.argmax(1) == labels[i * BATCH:i * BATCH + len(x)]).sum())
    return correct / max(1, len(labels))


def quantized_ops(proto) -> dict[str, int]:
    """How many operators of each kind the graph runs in INT8, by type: ``QLinearConv``,
    ``ConvInteger`` and the like, and in a QDQ graph every operator fed by a ``DequantizeLinear``
    with no FP32 weight (a layer left in FP32 keeps its float weights)."""
    import onnx

    dq = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    floats = {t.name for t in proto.graph.initializer
              if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)}
    out: dict[str, int] = {}
    for n in proto.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"):
            continue
        qdq = any(i in dq for i in n.input) and not any(i in floats for i in n.input)
        if n.op_type.startswith("QLinear") or n.op_type.endswith("Integer") or qdq:
            out[n.op_type] = out.get(n.op_type, 0) + 1
    return out


# ----------------------------------------------------------------------------- the quantization


def _quantize(pre: Path, dst: Path, settings: QuantizeSettings, calib: torch.Tensor, meta: DeployMeta,
              exclude: Sequence[str]) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    try:
        if settings.mode == "dynamic":
            # uint8 weights: onnxruntime's CPU ConvInteger has no int8-weight kernel
            quantize_dynamic(str(pre), str(dst), per_channel=settings.per_channel, weight_type=QuantType.QUInt8,
                             nodes_to_exclude=list(exclude))
        else:
            method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                      "entropy": CalibrationMethod.Entropy}[settings.method]
            with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrations print progress
                quantize_static(str(pre), str(dst), _reader(calib, meta), quant_format=QuantFormat.QDQ,
                                per_channel=settings.per_channel, activation_type=QuantType.QUInt8,
                                weight_type=QuantType.QInt8, calibrate_method=method, nodes_to_exclude=list(exclude))
    except UserError:
        raise
    except Exception as e:  # onnxruntime's quantizer raises anything on a graph it cannot handle
        raise UserError(f"onnxruntime cannot quantize this model ({type(e).__name__}: {clip(str(e), 160)}); try "
                        f"--dynamic or another --method") from None


def _set_metadata(path: Path, props: dict[str, str], doc: str) -> None:
    """Replace the file's ``metadata_props`` by exactly ``props`` (the FP32 file's)."""
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = doc
    onnx.save(proto, str(path))


def quantize_onnx(src: str | os.PathLike, dst: str | os.PathLike, bundle: DataBundle, validation: ImageSet | None,
                  settings: QuantizeSettings = QuantizeSettings(), *, split_name: str = "validation") -> dict[str, Any]:
    """Quantize the ONNX file ``src`` to ``dst`` (see the module docstring).

    Args:
        src: an FP32 ONNX file with deployment metadata (``compress export``).
        dst: the INT8 file; written only when the gate passes (an earlier file is kept otherwise).
        bundle: its ``train`` images calibrate (a seeded subset of ``settings.calibration_images``).
        validation: the images of the gate and of the layer ranking (``None``: no gate, whatever
            ``settings.max_drop`` says).
        settings: the :class:`QuantizeSettings`.
        split_name: what ``validation`` is, in messages.

    Returns:
        ``path``, ``mode``, ``method``, ``calibration_images``, ``per_channel``, ``excluded``
        (nodes left in FP32), ``rounds`` (accuracy and drop of every try), ``fp32_accuracy``,
        ``int8_accuracy``, ``drop_points``, ``max_drop``, ``fp32_size``, ``int8_size``,
        ``quantized_ops`` and ``worst_layers`` (the ranking, when the gate was missed once).

    Raises:
        QuantizeGateError: the gate is missed and ``on_fail`` is ``stop``, or still missed after
            the retries; nothing is written.
        UserError: a missing, corrupt or non-ONNX ``src``, ``dst`` equal to ``src`` or a folder,
            data that does not fit the model.
    """
    src, dst = Path(src), Path(dst)
    if dst.is_dir():
        raise UserError(f"output {str(dst)!r} is a folder; give the ONNX file to write, e.g. model.int8.onnx")
    if src.exists() and dst.exists() and src.resolve() == dst.resolve():
        raise UserError(f"output {str(dst)!r} is the input file itself; give another file, e.g. model.int8.onnx")
    proto = load_onnx(src)
    props = onnx_metadata(proto)
    meta = read_deploy_meta(open_session(src, "cpu"), src)
    if list(meta.label_names) != list(bundle.label_names):
        raise UserError(f"ONNX model {str(src)!r} has labels {list(meta.label_names)[:5]}... but the data "
                        f"{bundle.name!r} has {list(bundle.label_names)[:5]}...; use the data it was trained on")
    if meta.fixed_batch:
        raise UserError(f"ONNX model {str(src)!r} takes batches of exactly {meta.fixed_batch}; export it with a "
                        f"dynamic batch axis (`compress export` does)")
    gen = torch.Generator().manual_seed(settings.seed)
    n_cal = min(settings.calibration_images, len(bundle.train))
    calib = bundle.train.images[torch.randperm(len(bundle.train), generator=gen)[:n_cal]]
    gate = validation is not None and settings.max_drop is not None
    info: dict[str, Any] = {"mode": settings.mode, "method": settings.method if settings.mode == "static" else None,
                            "format": "QDQ" if settings.mode == "static" else "QOperator (dynamic)",
                            "calibration_images": n_cal if settings.mode == "static" else 0,
                            "per_channel": settings.per_channel, "max_drop": settings.max_drop if gate else None,
                            "split": split_name, "fp32_size": src.stat().st_size, "rounds": [], "excluded": []}
    with tempfile.TemporaryDirectory(prefix="compress-quantize-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            quant_pre_process(str(src), str(pre))
        except Exception as e:
            raise UserError(f"onnxruntime's quant_pre_process fails on {str(src)!r} ({type(e).__name__}: "
                            f"{clip(str(e), 160)})") from None
        fp32 = onnx_split_accuracy(src, validation) if validation is not None else None
        info["fp32_accuracy"] = fp32
        exclude: list[str] = []
        best: dict[str, Any] | None = None
        for round_ in range(settings.retries + 1):
            q = Path(tmp) / f"int8-{round_}.onnx"
            _quantize(pre, q, settings, calib, meta, exclude)
            _set_metadata(q, props, proto.doc_string)
            acc = onnx_split_accuracy(q, validation) if validation is not None else None
            drop = None if acc is None else 100 * (fp32 - acc)
            record = {"excluded": list(exclude), "accuracy": acc, "drop_points": drop}
            info["rounds"].append(record)
            if best is None or (drop is not None and drop < best["drop_points"]):
                best = {**record, "file": q}
            if not gate or drop <= settings.max_drop:
                break
            ranking = rank_layers(pre, q, validation.images[:settings.debug_images], meta)
            info.setdefault("worst_layers", ranking[:10])
            fresh = [r["node"] for r in ranking if r["node"] not in exclude]
            worst = ", ".join(f"{r['node']} ({r['op_type']}, {r['snr_db']:.1f} dB)" for r in
                              [r for r in ranking if r["node"] in fresh][:3]) or "none left to exclude"
            if settings.on_fail == "stop":
                raise QuantizeGateError(
                    f"INT8 {split_name} accuracy {acc:.4f} is {drop:.2f} points below FP32 {fp32:.4f}, past max_drop "
                    f"{settings.max_drop:g}; layers with the largest quantization error: {worst}; nothing written "
                    f"(on_fail: exclude leaves them in FP32 and retries)")
            if round_ == settings.retries or not fresh:
                raise QuantizeGateError(
                    f"INT8 {split_name} accuracy stays past max_drop {settings.max_drop:g} points after "
                    f"{round_ + 1} tries: the best drop reached is {best['drop_points']:.2f} points with "
                    f"{len(best['excluded'])} layers in FP32 ({', '.join(best['excluded']) or 'none'}); next worst: "
                    f"{worst}; nothing written (raise max_drop or retries, or try another method)")
            exclude = exclude + fresh[:settings.exclude_per_round]
        chosen = info["rounds"][-1]
        final = Path(tmp) / f"int8-{len(info['rounds']) - 1}.onnx"
        open_session(final, "cpu")  # loads in onnxruntime, or a UserError
        import onnx

        qproto = onnx.load(str(final))
        with staged_file(dst) as staged:
            staged.write_bytes(qproto.SerializeToString())
            size = staged.stat().st_size
    info.update(path=str(dst), excluded=chosen["excluded"], int8_accuracy=chosen["accuracy"],
                drop_points=chosen["drop_points"], int8_size=size, quantized_ops=quantized_ops(qproto))
    return info


# ----------------------------------------------------------------------------- per-layer error


def rank_layers(pre: str | os.PathLike, quantized: str | os.PathLike, images: torch.Tensor,
                meta: DeployMeta) -> list[dict[str, Any]]:
    """The layers of ``pre`` (the FP32 model after ``quant_pre_process``) by the quantization error
    they add in ``quantized``, worst first.

    Both models run on ``images`` with every intermediate tensor saved
    (``modify_model_output_intermediate_tensors``, ``collect_activations``); for a QDQ model
    ``create_activation_matching`` and ``compute_activation_error`` give each activation's
    signal-to-quantization-noise ratio against the FP32 model (after its QuantizeLinear /
    DequantizeLinear pair), otherwise tensors of the same name are compared. A layer's score is
    the relative noise power at its output minus the largest at its inputs: the error it adds.

    Returns:
        ``[{"node", "op_type", "snr_db" (at its output), "added_noise", "weight_snr_db"}, ...]``.
    """
    import onnx
    from onnxruntime.quantization.qdq_loss_debug import (collect_activations, compute_activation_error,
                                                         compute_signal_to_quantization_noice_ratio as sqnr,
                                                         compute_weight_error, create_activation_matching,
                                                         create_weight_matching,
                                                         modify_model_output_intermediate_tensors)

    with tempfile.TemporaryDirectory(prefix="compress-qdebug-") as tmp:
        acts = []
        for i, path in enumerate((pre, quantized)):
            aug = Path(tmp) / f"aug{i}.onnx"
            modify_model_output_intermediate_tensors(str(path), str(aug))
            acts.append(collect_activations(str(aug), _reader(images, meta)))
        try:
            weights = compute_weight_error(create_weight_matching(str(pre), str(quantized)))
        except Exception:  # a dynamic (QOperator) model has no DequantizeLinear weights
            weights = {}
    fp32_acts, q_acts = acts
    matched = {k: v for k, v in create_activation_matching(q_acts, fp32_acts).items() if "float" in v}
    snr = {k: v["xmodel_err"] for k, v in compute_activation_error(matched).items()}
    for name in fp32_acts.keys() & q_acts.keys() - snr.keys():
        a, b = fp32_acts[name], q_acts[name]
        if all(x.shape == y.shape for x, y in zip(a, b)):
            snr[name] = sqnr(a, b)
    graph = onnx.load(str(pre)).graph
    consumers: dict[str, list] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    params = {t.name for t in graph.initializer}
    noise = {k: 10 ** (-v / 10) for k, v in snr.items() if np.isfinite(v)}
    out = []
    for node in graph.node:
        if node.op_type not in RANKED_OPS or not node.output or not node.name:
            continue
        y = node.output[0]
        while y not in noise and len(consumers.get(y, [])) == 1 and consumers[y][0].op_type in _FOLLOW:
            y = consumers[y][0].output[0]
        if y not in noise:
            continue
        before = max([noise.get(i, 0.0) for i in node.input if i and i not in params] or [0.0])
        w = [weights[i] for i in node.input if i in weights]
        out.append({"node": node.name, "op_type": node.op_type, "snr_db": round(float(snr[y]), 2),
                    "added_noise": float(noise[y] - before), "weight_snr_db": round(float(min(w)), 2) if w else None})
    return sorted(out, key=lambda r: -r["added_noise"])


def settings_dict(settings: QuantizeSettings) -> dict[str, Any]:
    """The settings as plain values (for a JSON record)."""
    return asdict(settings)
