"""Equal-latency baselines for ``cifar10_headtohead.py``: prune the base with a Torch-Pruning criterion
to the batch-1 latency of a mechanism model, bisecting on the latency measured on this machine.

The latency of a pruned model is not a function of its FLOPs alone (widths, layer shapes and the
kernels onnxruntime picks matter), so the FLOPs fraction handed to the ``prune`` step is bisected
until the pruned model's onnxruntime CPU latency at batch 1, timed interleaved with the reference
model's in one process, is within ``--latency-tol`` of it. Every trial is recorded (FLOPs fraction,
both medians, their ratio) in the variant's ``steps/NN-prune/bisect.json`` and in the step's info.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from compress.deploy.bench import ORT_CONFIG, load_candidates, ort_runner, time_interleaved
from compress.deploy.predict import open_session
from compress.recipe.state import RunState, measure
from compress.recipe.steps.prune import Prune


def time_pair(reference_onnx: str, trial_onnx: str, input_size, threads: int, repeats: int) -> tuple[float, float]:
    """Median batch-1 latency (ms) of the reference and the trial, timed interleaved in this process."""
    fns = {name: ort_runner(open_session(path, "cpu", threads, ORT_CONFIG), input_size, 1, "cpu")
           for name, path in (("reference", reference_onnx), ("trial", trial_onnx))}
    stats = time_interleaved(fns, batch=1, warmup=20, repeats=repeats)
    return stats["reference"].median_ms, stats["trial"].median_ms


@dataclasses.dataclass(frozen=True)
class LatencyBudget:
    """A ``prune`` step to the batch-1 latency of the model in ``reference`` (a variant's ``model.pt``)."""

    criterion: str
    reference: Path
    name = "prune"

    def run(self, state: RunState, folder: Path, args) -> dict[str, Any]:
        folder.mkdir(parents=True, exist_ok=True)
        work = folder / "bisect"
        size = tuple(state.bundle.input_size)
        ref = load_candidates([str(self.reference)], work, names=["reference"])[0].onnx_path
        record = folder / "bisect.json"
        trials: list[dict[str, Any]] = json.loads(record.read_text()) if record.is_file() else []
        lo, hi = args.latency_lo, 1.0
        best: tuple[float, Any, dict] | None = None

        def trial(fraction: float):
            attempt = copy.copy(state)
            attempt.model = copy.deepcopy(state.model)
            attempt.stale = set(state.stale)
            step = Prune(criterion=self.criterion, target=fraction, metric="flops", tolerance=args.tol,
                         round_to=args.round_to, gradient_batches=args.taylor_batches)
            info = step.run(attempt, folder / "trial")
            path = load_candidates([("trial", attempt.model, state.meta)], work, names=["trial"])[0].onnx_path
            ref_ms, ms = time_pair(ref, path, size, args.threads, args.latency_repeats)
            return attempt, info, {"fraction": fraction, "flops": measure(attempt.model, state.bundle)["flops"],
                                   "reference_ms": ref_ms, "ms": ms, "ratio": ms / ref_ms}

        for i in range(args.latency_steps):
            fraction = math.sqrt(lo * hi)  # latency falls roughly with the log of the FLOPs fraction
            attempt, info, row = trial(fraction)
            trials.append(row)
            record.write_text(json.dumps(trials, indent=2))
            if best is None or abs(row["ratio"] - 1) < abs(best[2]["ratio"] - 1):
                best = (fraction, attempt, row, info)
            if abs(row["ratio"] - 1) <= args.latency_tol:
                break
            if row["ratio"] > 1:
                hi = fraction
            else:
                lo = fraction
        fraction, attempt, row, info = best
        state.model = attempt.model
        state.stale = attempt.stale
        info = dict(info)
        info["latency"] = {"reference": str(self.reference), "reference_ms": row["reference_ms"], "ms": row["ms"],
                           "ratio": row["ratio"], "tolerance": args.latency_tol, "trials": trials,
                           "fraction": fraction}
        return info


def latency_note(info: dict) -> str:
    """How close the bisection came, for the report's variant list."""
    lat = info.get("latency")
    if not lat:
        return ""
    return (f"; latency {lat['ms']:.4f} ms against the reference's {lat['reference_ms']:.4f} ms "
            f"(ratio {lat['ratio']:.3f}, {len(lat['trials'])} bisection trials, FLOPs fraction {lat['fraction']:.3f})")
