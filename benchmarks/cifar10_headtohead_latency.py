"""Equal-latency baselines for ``cifar10_headtohead.py``: prune the base with a Torch-Pruning criterion
to the batch-1 latency of a mechanism model, bisecting on the latency measured on this machine.

The latency of a pruned model is not a function of its FLOPs alone (widths, layer shapes and the
kernels onnxruntime picks matter: on x86 its fast NCHWc convolutions want channel counts that are
multiples of 8, and a width of 61 runs slower than one of 64), so

- the widths are rounded to ``--latency-round-to`` (8 by default; the reference's widths are
  multiples of 8 as well), which makes latency fall steadily with the FLOPs fraction;
- the FLOPs fraction handed to the ``prune`` step is bisected until the pruned model's onnxruntime
  CPU latency at batch 1, timed interleaved with the reference model's in one process, is within
  ``--latency-tol`` of it; a trial's ratio is the median of the ratios of several blocks of rounds,
  so that a burst of load in one block does not decide it;
- the bisection runs once per reference: uniform pruning removes the same number of channels from
  every layer whatever the criterion ranks by, so the architecture at a fraction (and its latency)
  is the same for every criterion. The first ``@latency`` variant built bisects and records the
  fraction and the widths it reached in ``<out>/latency/<reference>-r<round_to>.json``; the others
  prune to that fraction, check that they reached the same widths, and time the pair once more for
  the record.

Every trial is recorded (FLOPs fraction, both medians, the ratio, the block ratios) in the shared
file and in the step's info.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from compress.deploy.bench import ORT_CONFIG, load_candidates, ort_runner, time_interleaved
from compress.deploy.predict import open_session
from compress.recipe.state import RunState, measure
from compress.recipe.steps.prune import Prune

BLOCK = 50  # interleaved rounds per block of a latency trial


def time_pair(reference_onnx: str, trial_onnx: str, input_size, threads: int, repeats: int) -> dict[str, Any]:
    """Batch-1 latency of the reference and the trial, timed interleaved in this process in blocks of
    :data:`BLOCK` rounds: both medians (ms) over every round, and the median of the blocks' ratios."""
    fns = {name: ort_runner(open_session(path, "cpu", threads, ORT_CONFIG), input_size, 1, "cpu")
           for name, path in (("reference", reference_onnx), ("trial", trial_onnx))}
    ref, trial, ratios = [], [], []
    for b in range(max(1, repeats // BLOCK)):
        stats = time_interleaved(fns, batch=1, warmup=20 if b == 0 else 2, repeats=BLOCK)
        ref.append(stats["reference"].median_ms)
        trial.append(stats["trial"].median_ms)
        ratios.append(trial[-1] / ref[-1])
    return {"reference_ms": float(np.median(ref)), "ms": float(np.median(trial)),
            "ratio": float(np.median(ratios)), "block_ratios": [round(r, 4) for r in ratios]}


def widths(model: nn.Module) -> list[int]:
    """Output channels of every convolution, in order: the architecture a uniform pruning reaches."""
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


@dataclasses.dataclass(frozen=True)
class LatencyBudget:
    """A ``prune`` step to the batch-1 latency of the model in ``reference`` (a variant's ``model.pt``),
    the FLOPs fraction bisected once per reference and shared through the file ``shared``."""

    criterion: str
    reference: Path
    shared: Path
    name = "prune"

    def run(self, state: RunState, folder: Path, args) -> dict[str, Any]:
        folder.mkdir(parents=True, exist_ok=True)
        work = folder / "bisect"
        size = tuple(state.bundle.input_size)
        ref = load_candidates([str(self.reference)], work, names=["reference"])[0].onnx_path

        def trial(fraction: float):
            attempt = copy.copy(state)
            attempt.model = copy.deepcopy(state.model)
            attempt.stale = set(state.stale)
            step = Prune(criterion=self.criterion, target=fraction, metric="flops", tolerance=args.tol,
                         round_to=args.latency_round_to, gradient_batches=args.taylor_batches)
            info = step.run(attempt, folder / "trial")
            path = load_candidates([("trial", attempt.model, state.meta)], work, names=["trial"])[0].onnx_path
            row = {"fraction": fraction, "flops": measure(attempt.model, state.bundle)["flops"],
                   "widths": widths(attempt.model)}
            row.update(time_pair(ref, path, size, args.threads, args.latency_repeats))
            return attempt, info, row

        found = json.loads(self.shared.read_text()) if self.shared.is_file() else None
        if found is not None:
            attempt, info, row = trial(found["fraction"])
            if row["widths"] != found["widths"]:
                raise SystemExit(f"error: {self.criterion} at FLOPs fraction {found['fraction']:.4f} reached widths "
                                 f"{row['widths']}, not the {found['widths']} of the shared bisection in "
                                 f"{self.shared}; remove that file to bisect again")
            trials = found["trials"]
            by = found["criterion"]
        else:
            attempt, info, row, trials = self._bisect(trial, args)
            by = self.criterion
            self.shared.parent.mkdir(parents=True, exist_ok=True)
            self.shared.write_text(json.dumps({"reference": str(self.reference), "criterion": by,
                                               "round_to": args.latency_round_to, "fraction": row["fraction"],
                                               "widths": row["widths"], "trials": trials}, indent=2))
        (folder / "bisect.json").write_text(json.dumps({"shared": str(self.shared), "final": row}, indent=2))
        state.model = attempt.model
        state.stale = attempt.stale
        info = dict(info)
        info["latency"] = {"reference": str(self.reference), "reference_ms": row["reference_ms"], "ms": row["ms"],
                           "ratio": row["ratio"], "block_ratios": row["block_ratios"], "tolerance": args.latency_tol,
                           "trials": trials, "bisected_with": by, "fraction": row["fraction"],
                           "round_to": args.latency_round_to, "widths": row["widths"]}
        return info

    @staticmethod
    def _bisect(trial, args):
        lo, hi = args.latency_lo, 1.0
        trials: list[dict[str, Any]] = []
        best = None
        for _ in range(args.latency_steps):
            fraction = math.sqrt(lo * hi)  # latency falls roughly with the log of the FLOPs fraction
            attempt, info, row = trial(fraction)
            trials.append(row)
            if best is None or abs(row["ratio"] - 1) < abs(best[2]["ratio"] - 1):
                best = (attempt, info, row)
            if abs(row["ratio"] - 1) <= args.latency_tol:
                break
            if row["ratio"] > 1:
                hi = fraction
            else:
                lo = fraction
        return (*best, trials)


def latency_note(info: dict) -> str:
    """How close the bisection came, for the report's variant list."""
    lat = info.get("latency")
    if not lat:
        return ""
    shared = f", bisected once with {lat['bisected_with']}" if lat.get("bisected_with") else ""
    return (f"; latency {lat['ms']:.4f} ms against the reference's {lat['reference_ms']:.4f} ms "
            f"(ratio {lat['ratio']:.3f}, median of blocks; {len(lat['trials'])} bisection trials{shared}; "
            f"FLOPs fraction {lat['fraction']:.3f}, widths rounded to {lat.get('round_to') or 1})")
