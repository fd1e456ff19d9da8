"""``bench``: measure the models of the run side by side (FLOPs, parameters, file size, latency
interleaved in one process, ONNX accuracy) and write the benchmark report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from compress.deploy.bench import run_bench
from compress.errors import OptionError, shorten
from compress.recipe.state import RunState
from compress.recipe.step import CheckContext, Step, register_step
from compress.recipe.steps.export import export
from compress.reports.bench import write_bench_report

__all__ = ["Bench"]


@register_step("bench")
@dataclass(frozen=True)
class Bench(Step):
    """Benchmark models of the run against each other; the first is the reference of every ratio.

    Attributes:
        models: which models: original, final (the model as it stands at this step), a step's name
            (its latest model) or its folder name (02-dilute), or a model file (.pt or .onnx).
        batch_sizes: batch sizes to time.
        warmup: untimed calls before timing.
        repeats: timed calls per model and batch size (interleaved rounds).
        torch_eager: also time PyTorch eager besides onnxruntime.
        threads: onnxruntime and PyTorch threads (default: the libraries' own).
        int8: also bench an INT8 variant of every model (onnxruntime static QDQ, per-channel, calibrated on
            training images, no gate); where the CPU has no fast INT8 path (no VNNI) the report says so.
    """

    changes_model: ClassVar[bool] = False

    models: list[str] = field(default_factory=lambda: ["original", "final"])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 64])
    warmup: int = 5
    repeats: int = 20
    torch_eager: bool = True
    threads: int | None = None
    int8: bool = False

    def __post_init__(self) -> None:
        if len(self.models) < 1:
            raise OptionError("models", "is empty; name at least one model, e.g. [original, final]")
        if any(b < 1 for b in self.batch_sizes) or not self.batch_sizes:
            raise OptionError("batch_sizes", f"{self.batch_sizes} must be positive batch sizes, e.g. [1, 64]")
        if self.warmup < 0 or self.repeats < 1:
            raise OptionError("repeats", f"warmup {self.warmup} / repeats {self.repeats}: need warmup >= 0, repeats >= 1")
        if self.threads is not None and self.threads < 1:
            raise OptionError("threads", f"{self.threads} must be at least 1 (or left out)")

    def check(self, ctx: CheckContext) -> None:
        known = {"original", "final"}
        for i, step in enumerate(ctx.previous, start=1):
            known |= {step.name, f"{i:02d}-{step.name}", *getattr(step, "model_names", lambda: [])()}
        for name in self.models:
            if name not in known and not name.endswith((".pt", ".pth", ".onnx", ".safetensors")):
                raise ctx.fail("models", f"{shorten(name)} is not a model of this run; valid: {', '.join(sorted(known))}, "
                                         f"or a model file (.pt, .onnx)")

    def run(self, state: RunState, folder: Path) -> dict[str, Any]:
        if "final" in self.models:
            state.models["final"] = str(state.save_current(state.out / "model.pt"))
            if "onnx" not in state.artifacts:
                export(state)
        paths = [state.models.get(name, name) for name in self.models]
        result = run_bench(paths, state.report_data or state.bundle, state.out / "bench", names=list(self.models),
                           batch_sizes=self.batch_sizes, warmup=self.warmup, repeats=self.repeats,
                           backends=None if self.torch_eager else ["ort-cpu"], threads=self.threads, int8=self.int8)
        write_bench_report(result, state.out / "bench")
        state.artifacts["bench"] = str(state.out / "bench" / "bench.html")
        info: dict[str, Any] = {"report": state.artifacts["bench"]}
        if self.int8:
            info["int8"] = result.settings["int8"]
        names = [m["name"] for m in result.models]
        for i, name in enumerate(names[1:], start=1):
            ratios = _ratios(result, i, self.batch_sizes)
            if len(names) == 2:
                info.update(ratios)
            else:
                info[name] = ratios
        return info


def _ratios(result, index: int, batch_sizes: list[int]) -> dict[str, float]:
    """Speed-ups and size ratios of model ``index`` against the first model."""
    out = {}
    for backend in result.settings["backends"]:
        for b in batch_sizes:
            r = result.ratio(index, "latency", backend, b)
            if r:
                out[f"speedup_{backend}_b{b}"] = round(1 / r, 3)
    for key in ("file_size", "flops", "params"):
        r = result.ratio(index, key)
        if r:
            out[f"{key}_ratio"] = round(r, 4)
    return out
