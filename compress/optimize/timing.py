"""Latency of every candidate on the budget's backend, all timed interleaved in one process with
the bench's timing helpers, as a ratio to the original timed alongside."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from compress.deploy.bench import ORT_CONFIG, available_backends, ort_runner, time_interleaved, torch_runner
from compress.deploy.predict import open_session
from compress.deploy.trt import open_trt_session, warmed
from compress.errors import UserError
from compress.io import atomic_write_text
from compress.optimize.candidates import Variant
from compress.optimize.config import OptimizeConfig

__all__ = ["check_backend", "time_variants"]


def check_backend(backend: str) -> None:
    """Refuse a backend this machine cannot time."""
    have = available_backends()
    if backend not in have:
        raise UserError(f"--backend {backend}: not available on this machine (available: {', '.join(have)})")


def _runner(v: Variant, cfg: OptimizeConfig, input_size) -> Callable[[], Any] | None:
    engine, device = cfg.backend.split("-")
    if engine == "torch":
        if v.precision != "fp32" or v.structure.model is None:
            return None
        return torch_runner(v.structure.model, input_size, cfg.batch_size, device)
    if device == "trt":  # TensorRT reads and writes CUDA memory; its engine is built on the first call
        session = open_trt_session(v.onnx, cfg.threads, ORT_CONFIG)
        return warmed(ort_runner(session, input_size, cfg.batch_size, "cuda"), True)
    session = open_session(v.onnx, device, cfg.threads, ORT_CONFIG)
    return ort_runner(session, input_size, cfg.batch_size, device)


def time_variants(variants: list[Variant], reference: Variant, cfg: OptimizeConfig, input_size,
                  record: Path, resume: bool = True) -> dict[str, Any]:
    """Time ``variants`` (the ``reference`` among them) interleaved, ``cfg.warmup`` untimed calls
    each and ``cfg.repeats`` rounds; set each one's ``latency_ms`` (median) and ``speedup`` (the
    reference's median over its own). The figures go to ``record``; a rerun over the same
    candidates reads them back instead of timing again (the choice stays the same).

    Returns:
        ``{name: LatencyStats as a dict}``.
    """
    timed = [v for v in variants if v.onnx is not None and v.error is None]
    names = [v.name for v in timed]
    stats: dict[str, Any] | None = None
    if resume and record.is_file():
        try:
            found = json.loads(record.read_text())
            if sorted(found.get("names", [])) == sorted(names):
                stats = found["stats"]
        except (OSError, ValueError, KeyError, AttributeError):
            stats = None
    if stats is None:
        before = torch.get_num_threads()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        try:
            fns = {v.name: _runner(v, cfg, input_size) for v in timed}
            for v in timed:
                if fns[v.name] is None:
                    v.error = f"{v.precision.upper()} cannot be timed on {cfg.backend} (INT8 runs on onnxruntime)"
            fns = {n: f for n, f in fns.items() if f is not None}
            results = time_interleaved(fns, batch=cfg.batch_size, warmup=cfg.warmup, repeats=cfg.repeats)
        finally:
            torch.set_num_threads(before)
        stats = {n: asdict(s) for n, s in results.items()}
        atomic_write_text(record, json.dumps({"names": names, "stats": stats}, indent=2))
    if reference.name not in stats:
        raise UserError(f"the original could not be timed on {cfg.backend}; nothing to compare the candidates with")
    base = stats[reference.name]["median_ms"]
    for v in timed:
        if v.name in stats:
            v.latency_ms = stats[v.name]["median_ms"]
            v.speedup = base / v.latency_ms if v.latency_ms > 0 else float("inf")
    return stats
