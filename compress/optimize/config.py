"""The settings of ``compress optimize``: the budget (how fast, how much accuracy may go, on which
backend and batch) and how the search builds, times and fine-tunes its candidates."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from compress.checks import integer, number, one_of
from compress.errors import OptionError, UserError, unknown_name

__all__ = ["OptimizeConfig", "BACKENDS", "BUDGET_KEYS"]

BACKENDS = ("ort-cpu", "ort-cuda", "ort-trt", "torch-cpu", "torch-cuda")
BUDGET_KEYS = ("speedup", "latency_ms", "flops_ratio")
_FLAGS = {"speedup": "--speedup X", "latency_ms": "--latency-ms MS", "flops_ratio": "--flops-ratio R"}


@dataclass(frozen=True)
class OptimizeConfig:
    """A latency budget and the search that meets it.

    Attributes:
        speedup: the budget as a speed-up: the model's median batch latency on the backend must be
            at most the original's divided by this (both measured in the same process), e.g. 2.
        latency_ms: the budget as a median batch latency in milliseconds on this machine.
        flops_ratio: the budget as FLOPs: at most this fraction of the original's, in (0, 1].
        max_drop: largest accepted drop of the validation accuracy against the original, in points.
        batch_size: images per timed call (the deployment's batch).
        backend: where latency is measured: ort-cpu, ort-cuda, ort-trt (onnxruntime's TensorRT
            provider, where installed), torch-cpu or torch-cuda (INT8 candidates need onnxruntime).
        threads: CPU threads of onnxruntime and PyTorch while timing (default: the libraries' own).
        prune: add pruned candidates (criterion at every prune_ratios, of the original and of the
            cut at the plateau).
        criterion: the pruning criterion: coverage (the analysis' clusters) or a Torch-Pruning one
            (l1, l2, taylor, bn-scale, bn-scale-only, random).
        prune_ratios: fractions of the FLOPs the pruned candidates keep, each in (0, 1).
        round_to: keep the pruned candidates' widths multiples of this (default 8: onnxruntime's
            fast x86 convolutions want channel counts that are multiples of 8, and a pruned model
            with odd widths can be slower than one with more FLOPs); 1: exact widths.
        afcc: add the AFCC candidate (cut at the plateau, head reduced to each filter's cluster
            connections).
        int8: add the INT8 variant of every candidate (onnxruntime static QDQ, per-channel).
        calibration_images: training images the INT8 calibration runs on.
        estimate_epochs: epochs of the short fine-tune that estimates a candidate's accuracy (and
            of AFCC's masked fine-tune).
        max_estimates: at most this many candidates get a short fine-tune.
        finetune_epochs: epochs of the final fine-tune of the chosen candidate (0: none).
        finetune_lr: learning rate of the fine-tunes.
        distill: fine-tune with the original model as teacher.
        temperature: distillation temperature.
        alpha: weight of the teacher term of distillation, in [0, 1].
        warmup: untimed calls of every candidate before timing.
        repeats: timed interleaved rounds over all candidates.
    """

    speedup: float | None = None
    latency_ms: float | None = None
    flops_ratio: float | None = None
    max_drop: float = 1.0
    batch_size: int = 1
    backend: Literal["ort-cpu", "ort-cuda", "ort-trt", "torch-cpu", "torch-cuda"] = "ort-cpu"
    threads: int | None = None
    prune: bool = True
    criterion: str = "coverage"
    prune_ratios: list[float] = field(default_factory=lambda: [0.5, 0.25])
    round_to: int | None = 8
    afcc: bool = True
    int8: bool = True
    calibration_images: int = 300
    estimate_epochs: int = 2
    max_estimates: int = 3
    finetune_epochs: int = 5
    finetune_lr: float = 0.005
    distill: bool = True
    temperature: float = 4.0
    alpha: float = 0.9
    warmup: int = 5
    repeats: int = 30

    def __post_init__(self) -> None:
        given = [k for k in BUDGET_KEYS if getattr(self, k) is not None]
        if len(given) != 1:
            got = ", ".join(_FLAGS[k].split()[0] for k in given) if given else "none"
            raise UserError(f"give exactly one budget: {', '.join(_FLAGS.values())} (got {got})")
        if self.speedup is not None:
            number("speedup", self.speedup, low=0, high=1e6, low_open=True,
                   hint="the speed-up over the original, e.g. 2 (twice as fast)")
        if self.latency_ms is not None:
            number("latency_ms", self.latency_ms, low=0, high=1e7, low_open=True,
                   hint="the median batch latency in milliseconds, e.g. 0.5")
        if self.flops_ratio is not None:
            number("flops_ratio", self.flops_ratio, low=0, high=1, low_open=True,
                   hint="the fraction of the original's FLOPs, e.g. 0.5")
        number("max_drop", self.max_drop, low=0, high=100, hint="accuracy points that may be lost, e.g. 1")
        integer("batch_size", self.batch_size, low=1, high=65_536, hint="images per timed call, e.g. 1")
        one_of("backend", self.backend, BACKENDS)
        if self.threads is not None:
            integer("threads", self.threads, low=1, high=1024, hint="CPU threads, e.g. 1")
        from compress.compression.importance import list_criteria  # torch-pruning: only when a config is built

        if self.criterion not in list_criteria():
            raise OptionError("criterion", str(unknown_name("pruning criterion", self.criterion, list_criteria())))
        if not isinstance(self.prune_ratios, list) or not self.prune_ratios:
            raise OptionError("prune_ratios", "needs at least one fraction, e.g. 0.5 0.25 (or --no-prune)")
        for r in self.prune_ratios:
            number("prune_ratios", r, low=0, high=1, low_open=True, high_open=True,
                   hint="fractions of the FLOPs to keep, each in (0, 1), e.g. 0.5 0.25")
        if len(set(self.prune_ratios)) != len(self.prune_ratios):
            raise OptionError("prune_ratios", f"{self.prune_ratios}: every ratio once")
        if self.round_to is not None:
            integer("round_to", self.round_to, low=1, high=4096, hint="channels, e.g. 8 (1: exact widths)")
        integer("calibration_images", self.calibration_images, low=1, high=1_000_000, hint="e.g. 300")
        integer("estimate_epochs", self.estimate_epochs, low=1, high=10_000, hint="e.g. 2")
        integer("max_estimates", self.max_estimates, low=0, high=10_000, hint="e.g. 3")
        integer("finetune_epochs", self.finetune_epochs, low=0, high=100_000, hint="e.g. 5 (0: none)")
        number("finetune_lr", self.finetune_lr, low=0, high=1000, low_open=True, hint="e.g. 0.005")
        number("temperature", self.temperature, low=0, low_open=True, high=1e4, hint="e.g. 4")
        number("alpha", self.alpha, low=0, high=1, hint="e.g. 0.9 (0: labels only)")
        integer("warmup", self.warmup, low=0, high=1_000_000, hint="e.g. 5")
        integer("repeats", self.repeats, low=1, high=1_000_000, hint="e.g. 30")
        for key in ("prune", "afcc", "int8", "distill"):
            if not isinstance(getattr(self, key), bool):
                raise OptionError(key, f"{getattr(self, key)!r}: expected true or false")

    # ------------------------------------------------------------------ the budget

    @property
    def budget_kind(self) -> str:
        return next(k for k in BUDGET_KEYS if getattr(self, k) is not None)

    def describe(self) -> str:
        """The budget in words, e.g. ``speed-up >= 2x at batch 1 on ort-cpu, at most 1 point lost``."""
        where = f"at batch {self.batch_size} on {self.backend}"
        lost = f"at most {self.max_drop:g} point{'s' if self.max_drop != 1 else ''} of validation accuracy lost"
        kind = self.budget_kind
        if kind == "speedup":
            what = f"speed-up >= {self.speedup:g}x {where}"
        elif kind == "latency_ms":
            what = f"median latency <= {self.latency_ms:g} ms {where}"
        else:
            what = f"FLOPs <= {self.flops_ratio:g} of the original's"
        return f"{what}, {lost}"

    def fast_enough(self, speedup: float | None, latency_ms: float | None, flops_ratio: float | None) -> bool:
        """Whether a candidate with these figures meets the speed part of the budget."""
        value = {"speedup": speedup, "latency_ms": latency_ms, "flops_ratio": flops_ratio}[self.budget_kind]
        if value is None or not math.isfinite(value):
            return False
        if self.budget_kind == "speedup":
            return value >= self.speedup
        if self.budget_kind == "latency_ms":
            return value <= self.latency_ms
        return value <= self.flops_ratio + 1e-9

    def accurate_enough(self, accuracy: float | None, base: float) -> bool:
        """Whether a validation accuracy is within ``max_drop`` points of the original's ``base``."""
        return accuracy is not None and 100 * (base - accuracy) <= self.max_drop + 1e-9
