"""The benchmark: parameters and FLOPs (fvcore), latency with onnxruntime and PyTorch eager
(warm-up, repeats, median and p90, throughput, models timed interleaved in one process), test
accuracy of the exported ONNX model, and the environment every figure was taken in. Backends:
:data:`BACKENDS`; ``ort-trt`` is onnxruntime's TensorRT provider (:mod:`compress.deploy.trt`)."""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from compress.data import DataBundle
from compress.errors import UserError, shorten
from compress.deploy.export import check_data_fits, export_and_verify, load_onnx, onnx_metadata
from compress.io import atomic_write_text, run_folder_lock
from compress.models.introspect import count_flops, count_params
from compress.system import environment, int8_fast_path
from compress.deploy.predict import normalize_pixels, open_session, parse_deploy_props, read_deploy_meta
from compress.deploy.trt import open_trt_session, warmed

__all__ = ["BACKENDS", "LatencyStats", "Candidate", "BenchResult", "count_params", "count_flops",
           "measure_latency", "time_interleaved", "torch_runner", "ort_runner", "available_backends",
           "read_model_file_meta", "load_candidates", "onnx_accuracy", "environment", "run_bench"]

BACKENDS = ("ort-cpu", "ort-cuda", "ort-trt", "torch-cpu", "torch-cuda")
GENERIC_NAMES = {"model", "checkpoint", "best", "last"}
# no busy-waiting of idle onnxruntime workers: in interleaved timing they would steal the cores of the
# model timed next
ORT_CONFIG = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}
ModelRef = str | os.PathLike | tuple  # a file, or an in-memory ``(name, model, meta)``
MAX_BATCH_BYTES = 2 << 30  # one timed input batch


@dataclass
class LatencyStats:
    """Wall-clock times of one call (one batch), in milliseconds."""

    batch: int
    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    repeats: int
    throughput: float  # images per second at the median

    @classmethod
    def from_samples(cls, batch: int, samples_s: Sequence[float]) -> "LatencyStats":
        ms = np.asarray(samples_s, dtype=np.float64) * 1e3
        median = float(np.median(ms))
        return cls(batch, median, float(np.percentile(ms, 90)), float(ms.mean()), float(ms.min()), len(ms),
                   batch / (median / 1e3) if median > 0 else float("inf"))


@dataclass
class Candidate:
    """One model under test: its ONNX file, and its PyTorch model when it came from a model file."""

    name: str
    source: str
    onnx_path: str
    meta: dict[str, Any]
    params: int
    flops: int | None
    file_size: int
    model: nn.Module | None = field(default=None, repr=False)
    export_check: dict[str, Any] | None = None
    precision: str = "fp32"
    int8_of: str | None = None  # the FP32 model an INT8 variant was made from


@dataclass
class BenchResult:
    """Everything ``compress bench`` measured; ``models[0]`` is the original the ratios refer to."""

    models: list[dict[str, Any]]
    settings: dict[str, Any]
    environment: dict[str, str]

    def ratio(self, index: int, key: str, backend: str | None = None, batch: int | None = None) -> float | None:
        """``models[index]``'s value of ``key`` over the original's (latency: median of backend/batch)."""
        a, b = (_value(m, key, backend, batch) for m in (self.models[index], self.models[0]))
        if a is None or b is None or b == 0:
            return None
        return a / b

    def save(self, folder: str | Path) -> Path:
        return atomic_write_text(Path(folder) / "bench.json", json.dumps(asdict(self), indent=2))


def _value(entry: dict[str, Any], key: str, backend: str | None, batch: int | None) -> float | None:
    if key == "latency":
        stats = entry.get("latency", {}).get(backend, {}).get(str(batch))
        return None if stats is None else stats["median_ms"]
    v = entry.get(key)
    return None if v is None else float(v)


# ----------------------------------------------------------------------------- size and FLOPs


# ----------------------------------------------------------------------------- timing


def time_interleaved(fns: dict[str, Callable[[], Any]], *, batch: int, warmup: int = 10,
                     repeats: int = 50, burst: int = 1) -> dict[str, LatencyStats]:
    """Time several callables in one process, interleaved: each round gives every one a turn, in a
    rotating order, so drifts (clock boost, heat, other load) hit all of them alike.

    With ``burst`` 1 a turn is one timed call, so every call starts with the caches holding the
    model timed before it (the latency of a server switching between models: at batch 1 up to
    twice the steady-state one). With ``burst`` > 1 a turn is ``burst`` calls in a row, the first
    half untimed: the steady-state latency of a model served alone, still interleaved.

    Args:
        fns: name -> a callable that runs one batch and returns when its work is done.
        batch: images per call (for the throughput).
        warmup: untimed calls of each before the first round.
        repeats: timed calls of each.
        burst: calls per turn (the first ``burst // 2`` untimed).
    """
    if repeats < 1 or warmup < 0 or burst < 1:
        raise UserError(f"repeats and burst must be at least 1 and warm-up at least 0 (got {repeats}, {burst}, "
                        f"{warmup})")
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    settle = burst // 2
    timed = burst - settle
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(math.ceil(repeats / timed)):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            for _ in range(settle):
                fns[name]()
            for _ in range(min(timed, repeats - len(samples[name]))):
                t0 = time.perf_counter()
                fns[name]()
                samples[name].append(time.perf_counter() - t0)
    return {n: LatencyStats.from_samples(batch, s) for n, s in samples.items()}


def measure_latency(fn: Callable[[], Any], *, batch: int, warmup: int = 10, repeats: int = 50) -> LatencyStats:
    """Latency of one callable (see :func:`torch_runner` and :func:`ort_runner` to build one)."""
    return time_interleaved({"fn": fn}, batch=batch, warmup=warmup, repeats=repeats)["fn"]


def torch_runner(model: nn.Module, input_size: Sequence[int], batch: int, device: str = "cpu") -> Callable[[], Any]:
    """A callable running ``model`` on one batch under ``torch.inference_mode`` (CUDA: synchronised)."""
    dev = torch.device(device)
    model = model.to(dev).eval()
    x = torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(0)).to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def run():
        with torch.inference_mode():
            out = model(x)
        sync()
        return out

    return run


def ort_runner(session, input_size: Sequence[int], batch: int, device: str = "cpu") -> Callable[[], Any]:
    """A callable running an onnxruntime session on one batch; on CUDA, inputs and outputs stay on the
    GPU (I/O binding), as PyTorch's do."""
    x = np.random.default_rng(0).standard_normal((batch, *input_size)).astype(np.float32)
    name, out = session.get_inputs()[0].name, session.get_outputs()[0].name
    if device == "cuda":
        import onnxruntime as ort

        binding = session.io_binding()
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
        binding.bind_output(out, "cuda")
        return lambda: session.run_with_iobinding(binding)
    return lambda: session.run([out], {name: x})


def available_backends() -> list[str]:
    """The backends this machine can time: ONNX Runtime and PyTorch on CPU, and on CUDA where
    present; ONNX Runtime's TensorRT provider where onnxruntime lists it."""
    import onnxruntime as ort

    found = ["ort-cpu", "torch-cpu"]
    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" in providers:
        found.insert(1, "ort-cuda")
        if "TensorrtExecutionProvider" in providers:
            found.insert(2, "ort-trt")
    if torch.cuda.is_available():
        found.append("torch-cuda")
    return found


# ----------------------------------------------------------------------------- models


def _names(models: Sequence[Any], names: Sequence[str] | None) -> list[str]:
    if names:
        if len(names) != len(models) or len(set(names)) != len(names):
            raise UserError(f"--names needs {len(models)} distinct names, one per model (got {shorten(list(names))})")
        for name in names:
            if not isinstance(name, str) or not name or len(name) > 200 or not name.isprintable():
                raise UserError(f"--names {shorten(name)}: a display name is 1 to 200 printable characters")
        return list(names)
    out: list[str] = []
    for item in models:
        if isinstance(item, tuple):
            base = str(item[0])
        else:
            path = Path(item)
            base = path.parent.name if path.stem in GENERIC_NAMES and path.parent.name else path.stem
        name, i = base, 2
        while name in out:
            name, i = f"{base}_{i}", i + 1
        out.append(name)
    return out


def _meta_from_onnx(props: dict[str, str], path: str | os.PathLike) -> dict[str, Any]:
    """A model file's ``meta`` keys from an ONNX file's checked deployment metadata."""
    parsed = parse_deploy_props(props, str(path))
    return {"model": props.get("model", ""), "dataset": props.get("dataset", ""),
            "input_size": parsed["input_size"], "label_names": parsed["label_names"], "mean": parsed["mean"],
            "std": parsed["std"], "num_classes": len(parsed["label_names"])}


def _count(props: dict[str, str], key: str) -> int | None:
    """A non-negative integer the ONNX metadata records (``params``, ``flops``), else ``None``."""
    value = props.get(key, "")
    return int(value) if value.isdigit() and len(value) < 20 else None


def _check_onnx_weights(proto, path: str | os.PathLike) -> None:
    """Refuse an ONNX file whose floating-point weights hold a NaN or an infinity."""
    from onnx import numpy_helper

    for t in proto.graph.initializer:
        a = numpy_helper.to_array(t)
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            raise UserError(f"ONNX file {str(path)!r} has non-finite weights (NaN or infinite) in {t.name!r}; its "
                            f"outputs are meaningless: train the model again and export it")


def read_model_file_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a model file / checkpoint, or the one an ONNX file carries (same keys)."""
    if str(path).lower().endswith(".onnx"):
        return _meta_from_onnx(onnx_metadata(load_onnx(path)), path)
    from compress.compression.serialize import read_model_meta

    return read_model_meta(path)


def load_candidates(models: Sequence[ModelRef], workdir: str | Path, *, names: Sequence[str] | None = None,
                    verify_data: DataBundle | None = None, tol: float = 1e-3) -> list[Candidate]:
    """Load each model: model files and in-memory ``(name, model, meta)`` tuples are exported to
    ``workdir/onnx/<name>.onnx`` (and verified on ``verify_data`` when given); ONNX files are
    checked and used as they are.
    """
    from compress.compression.serialize import load_model

    if not models:
        raise UserError("give at least one model (a model file, checkpoint or ONNX file)")
    out: list[Candidate] = []
    names = _names(models, names)
    files = dict(zip(names, _file_names(names)))
    for name, item in zip(names, models):
        if isinstance(item, tuple):
            out.append(_exported(name, f"<in memory: {item[0]}>", item[1], item[2], workdir, verify_data, tol,
                                 files[name]))
        elif str(item).lower().endswith(".onnx"):
            proto = load_onnx(item)
            props = onnx_metadata(proto)
            meta = _meta_from_onnx(props, item)
            _check_onnx_weights(proto, item)
            params = _count(props, "params")
            if params is None:
                params = sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
            out.append(Candidate(name, str(item), str(item), meta, params, _count(props, "flops"),
                                 os.path.getsize(item)))
        else:
            model, meta = load_model(item)
            out.append(_exported(name, str(item), model, meta, workdir, verify_data, tol, files[name]))
    return out


def _file_names(names: Sequence[str]) -> list[str]:
    """A plain, distinct file name per display name: a name never places a file outside the
    ``onnx/`` folder (no separators, no leading dot) and never reaches 100 characters."""
    out: list[str] = []
    for name in names:
        base = re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".")[:90] or "model"
        stem, i = base, 2
        while stem in out:
            stem, i = f"{base}_{i}", i + 1
        out.append(stem)
    return out


def _exported(name: str, source: str, model: nn.Module, meta: dict[str, Any], workdir: str | Path,
              verify_data: DataBundle | None, tol: float, file_name: str) -> Candidate:
    params, flops = count_params(model), count_flops(model, meta["input_size"])
    data = verify_data if verify_data is not None else torch.zeros(2, *meta["input_size"])
    check = export_and_verify(model, meta, Path(workdir) / "onnx" / f"{file_name}.onnx", data, tol=tol, max_samples=64,
                              extra_meta={"params": params, "flops": flops}, what=f"model {name!r} ({source})")
    return Candidate(name, source, check["path"], meta, params, flops, check["file_size"], model,
                     {k: check[k] for k in ("samples", "max_abs_diff", "argmax_agreement")})


def _with_int8(cands: list[Candidate], bundle: DataBundle, workdir: Path) -> list[Candidate]:
    """Each candidate followed by its INT8 variant (``<name> int8``), quantized into ``workdir/onnx``."""
    from compress.deploy.quantize import QuantizeSettings, quantize_onnx, quantized_ops

    if len(bundle.train) < 1:
        raise UserError("INT8 variants need training images to calibrate on; the data has none")
    out: list[Candidate] = []
    files = _file_names([c.name for c in cands])
    for c, file_name in zip(cands, files):
        if quantized_ops(load_onnx(c.onnx_path)):  # already INT8 (e.g. the quantize step's file)
            c.precision = "int8"
        if c.precision != "fp32":
            out.append(c)
            continue
        path = Path(workdir) / "onnx" / f"{file_name}.int8.onnx"
        info = quantize_onnx(c.onnx_path, path, bundle, None, QuantizeSettings(max_drop=None))
        out += [c, Candidate(f"{c.name} int8", f"INT8 of {c.name}", str(path), c.meta, c.params, c.flops,
                             info["int8_size"], precision="int8", int8_of=c.name)]
    return out


def onnx_accuracy(onnx_path: str | os.PathLike, bundle: DataBundle, *, batch_size: int = 256) -> float:
    """Top-1 accuracy of an ONNX model on ``bundle.test``, fed exactly as its metadata says."""
    sess = open_session(onnx_path, "cpu")
    meta = read_deploy_meta(sess, onnx_path)
    if list(meta.input_size) != list(bundle.input_size):
        raise UserError(f"ONNX model {str(onnx_path)!r} expects inputs of {'x'.join(map(str, meta.input_size))} "
                        f"but the data {bundle.name!r} gives {'x'.join(map(str, bundle.input_size))}")
    if meta.num_classes != bundle.num_classes:
        raise UserError(f"ONNX model {str(onnx_path)!r} has {meta.num_classes} classes but the data "
                        f"{bundle.name!r} has {bundle.num_classes} labels")
    batch_size = meta.fixed_batch or batch_size
    images, labels = bundle.test.images.numpy(), bundle.test.labels.numpy()
    correct = 0
    for start in range(0, len(labels), batch_size):
        x = normalize_pixels(images[start:start + batch_size], meta)
        n = len(x)
        if meta.fixed_batch and n < meta.fixed_batch:
            x = np.concatenate([x, np.zeros((meta.fixed_batch - n, *x.shape[1:]), np.float32)])
        logits = sess.run([meta.output_name], {meta.input_name: x})[0][:n]
        correct += int((logits.argmax(1) == labels[start:start + n]).sum())
    return correct / max(1, len(labels))


# ----------------------------------------------------------------------------- the run


def _time_backend(cands: list[Candidate], backend: str, batch_sizes: Sequence[int], warmup: int, repeats: int,
                  threads: int | None, burst: int = 1) -> dict[str, dict[str, dict[str, Any]]]:
    """``{model name: {batch: stats}}`` for one backend; models it cannot run are left out."""
    engine, device = backend.split("-")
    runners: dict[str, Callable[[int], Callable[[], Any]]] = {}
    for c in cands:
        size = c.meta["input_size"]
        if engine == "torch":
            if c.model is not None:
                runners[c.name] = lambda b, c=c, size=size: torch_runner(c.model, size, b, device)
        else:
            sess = (open_trt_session(c.onnx_path, threads, ORT_CONFIG) if device == "trt"
                    else open_session(c.onnx_path, device, threads, ORT_CONFIG))
            fixed = sess.get_inputs()[0].shape[0]
            on = "cuda" if device == "trt" else device  # TensorRT reads and writes CUDA memory: I/O binding
            runners[c.name] = lambda b, s=sess, size=size, f=fixed, on=on: (
                warmed(ort_runner(s, size, b, on), device == "trt") if not isinstance(f, int) or f == b else None)
    out: dict[str, dict[str, dict[str, Any]]] = {n: {} for n in runners}
    for b in batch_sizes:
        fns = {n: make(b) for n, make in runners.items()}
        stats = time_interleaved({n: f for n, f in fns.items() if f is not None}, batch=b, warmup=warmup,
                                 repeats=repeats, burst=burst)
        for n, s in stats.items():
            out[n][str(b)] = asdict(s)
    if engine == "torch":
        for c in cands:
            if c.model is not None:
                c.model.to("cpu")
    return {n: v for n, v in out.items() if v}


def run_bench(models: Sequence[ModelRef], bundle: DataBundle, out: str | Path, *,
              names: Sequence[str] | None = None, batch_sizes: Sequence[int] = (1, 64), warmup: int = 10,
              repeats: int = 50, backends: Sequence[str] | None = None, threads: int | None = None,
              tol: float = 1e-3, int8: bool = False, burst: int = 1) -> BenchResult:
    """Measure every model and write ``bench.json`` and the report under ``out``.

    Args:
        models: model files / checkpoints (exported to ONNX first), ONNX files, or in-memory
            ``(name, model, meta)`` tuples; the first is the original the ratios refer to.
        bundle: the test data (all models must fit it).
        out: the output folder.
        names: one display name per model (default: the run folder or the file stem).
        batch_sizes: batches timed.
        warmup: untimed calls per model, backend and batch before timing.
        repeats: timed calls of each model (interleaved rounds with ``burst`` 1).
        backends: subset of :data:`BACKENDS` (default: all this machine has; ``ort-trt`` only where
            onnxruntime lists its TensorRT provider, else it is refused naming the available ones).
        threads: CPU threads of PyTorch and onnxruntime (default: PyTorch's current count for both).
        tol: export verification tolerance.
        int8: also bench an INT8 variant of every model (:func:`compress.deploy.quantize.quantize_onnx`,
            static QDQ, calibrated on ``bundle.train``, no gate), right after it; ``settings["int8"]``
            says whether the CPU has a fast INT8 path.
        burst: calls per model and turn of a round, the first half untimed (see
            :func:`time_interleaved`): 1 times each call right after another model's (cold
            caches), more the steady state of a model served alone.

    The folder is locked for the run (:func:`compress.io.run_folder_lock`); the settings are
    checked before any model is loaded.
    """
    _check_settings(batch_sizes, warmup, repeats, threads, tol)
    if burst < 1:
        raise UserError(f"burst {burst}: must be at least 1 (calls per model and turn)")
    with run_folder_lock(out) as out:
        return _run_bench(models, bundle, out, names=names, batch_sizes=batch_sizes, warmup=warmup, repeats=repeats,
                          backends=backends, threads=threads, tol=tol, int8=int8, burst=burst)


def _check_settings(batch_sizes: Sequence[int], warmup: int, repeats: int, threads: int | None, tol: float) -> None:
    """Refuse settings no benchmark can run with, before any model is loaded."""

    if not batch_sizes or any(not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise UserError(f"batch sizes must be positive integers (got {list(batch_sizes)})")
    if repeats < 1 or warmup < 0:
        raise UserError(f"repeats must be at least 1 and warm-up at least 0 (got {repeats}, {warmup})")
    if threads is not None and threads < 1:
        raise UserError(f"threads {threads}: must be at least 1 (or left out: the libraries' own count)")
    if not (math.isfinite(tol) and tol > 0):
        raise UserError(f"tolerance {tol}: must be a positive finite number, e.g. 1e-3")


def _run_bench(models: Sequence[ModelRef], bundle: DataBundle, out: Path, *, names: Sequence[str] | None,
               batch_sizes: Sequence[int], warmup: int, repeats: int, backends: Sequence[str] | None,
               threads: int | None, tol: float, int8: bool = False, burst: int = 1) -> BenchResult:
    """:func:`run_bench` in its locked folder."""
    have = available_backends()
    backends = list(backends or have)
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        from compress.errors import unknown_name

        raise unknown_name("backend", unknown[0], BACKENDS)
    missing = [b for b in backends if b not in have]
    if missing:
        raise UserError(f"backend {missing[0]!r} is not available here (available: {', '.join(have)})")
    cands = load_candidates(models, out, names=names, verify_data=bundle, tol=tol)
    if int8:
        cands = _with_int8(cands, bundle, out)
    for c in cands:
        check_data_fits(c.meta, bundle, f"model {c.name!r}")
        need = max(batch_sizes) * int(np.prod(c.meta["input_size"])) * 4
        if need > MAX_BATCH_BYTES:
            raise UserError(f"a batch of {max(batch_sizes)} inputs of {'x'.join(map(str, c.meta['input_size']))} "
                            f"takes {need / 2**30:.1f} GiB; use smaller --batch-sizes")
    before = torch.get_num_threads()
    threads = threads or before
    latency: dict[str, dict[str, Any]] = {c.name: {} for c in cands}
    torch.set_num_threads(threads)
    try:
        for backend in backends:
            for name, per_batch in _time_backend(cands, backend, batch_sizes, warmup, repeats, threads, burst).items():
                latency[name][backend] = per_batch
        env = environment(threads)
    finally:
        torch.set_num_threads(before)
    models = []
    for c in cands:
        models.append({"name": c.name, "source": c.source, "onnx": c.onnx_path, "model": c.meta.get("model", ""),
                       "params": c.params, "flops": c.flops, "file_size": c.file_size,
                       "accuracy": onnx_accuracy(c.onnx_path, bundle), "latency": latency[c.name],
                       "export_check": c.export_check, "precision": c.precision, "int8_of": c.int8_of})
    settings = {"batch_sizes": [int(b) for b in batch_sizes], "warmup": warmup, "repeats": repeats,
                "backends": backends, "threads": threads, "data": bundle.name, "test_samples": len(bundle.test),
                "burst": burst,
                "timing": f"interleaved rounds in one process, rotating order, {burst} call(s) per model and turn, "
                          f"the first {burst // 2} untimed; PyTorch under inference_mode; onnxruntime without spinning",
                "flops": "fvcore, one image, one multiply-add = 1 FLOP"}
    if int8:
        fast, note = int8_fast_path()
        settings["int8"] = {"fast_path": fast, "note": note, "method": "onnxruntime static QDQ, per-channel, "
                            f"minmax calibration on {min(300, len(bundle.train))} training images, no gate"}
    result = BenchResult(models, settings, env)
    result.save(out)
    return result
