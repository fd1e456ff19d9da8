"""``quantize``: INT8 ONNX of the exported model (onnxruntime static QDQ or dynamic), behind an
accuracy gate on the validation split."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from compress.deploy.quantize import QuantizeSettings, onnx_split_accuracy, quantize_onnx, settings_dict
from compress.errors import OptionError
from compress.io import atomic_write_text
from compress.recipe.state import RunState
from compress.recipe.step import CheckContext, Step, register_step

__all__ = ["Quantize"]


@register_step("quantize")
@dataclass(frozen=True)
class Quantize(Step):
    """Quantize the exported model to INT8 ONNX (model.int8.onnx) with onnxruntime, behind an
    accuracy gate on the validation split.

    Static mode runs quant_pre_process, calibrates the activations on training images and writes
    QDQ format with per-channel weights; dynamic mode quantizes the weights only. The FP32 file's
    deployment metadata is carried over unchanged, so compress predict runs the INT8 file as it
    is. Past max_drop, onnxruntime's QDQ debugging helpers rank the layers by the quantization
    error they add; on_fail: exclude leaves the worst in FP32 and retries, stop ends the run
    naming them. Needs an earlier export step; a later bench can name the INT8 model quantize
    (and original-int8 with original: true), or set int8: true to get INT8 of every model.

    Attributes:
        mode: static (activations calibrated on training images, QDQ format) or dynamic (weights
            only, activations quantized at run time).
        method: the static calibration: minmax, percentile or entropy.
        calibration_images: training images the calibration runs on (a seeded random subset).
        per_channel: one scale per output channel of every weight.
        max_drop: largest accepted drop of the validation accuracy, INT8 against FP32 ONNX, in
            points (null: no gate).
        on_fail: past max_drop, exclude (leave the layers with the largest error in FP32 and
            retry) or stop (end the run naming them).
        retries: exclusion rounds before the run stops (on_fail: exclude).
        exclude_per_round: layers left in FP32 per round.
        original: also quantize original.onnx to original.int8.onnx (gated the same way), for a
            bench of FP32 and INT8 of both.
    """

    changes_model: ClassVar[bool] = False

    mode: Literal["static", "dynamic"] = "static"
    method: Literal["minmax", "percentile", "entropy"] = "minmax"
    calibration_images: int = 300
    per_channel: bool = True
    max_drop: float | None = 1.0
    on_fail: Literal["exclude", "stop"] = "exclude"
    retries: int = 3
    exclude_per_round: int = 2
    original: bool = False

    def __post_init__(self) -> None:
        self.settings()  # every value checked when the recipe loads

    def settings(self) -> QuantizeSettings:
        return QuantizeSettings(mode=self.mode, method=self.method, calibration_images=self.calibration_images,
                                per_channel=self.per_channel, max_drop=self.max_drop, on_fail=self.on_fail,
                                retries=self.retries, exclude_per_round=self.exclude_per_round)

    def model_names(self) -> list[str]:
        """The names a later bench step can give its models: this INT8 file (and the original's)."""
        return ["quantize", "original-int8"] if self.original else ["quantize"]

    def check(self, ctx: CheckContext) -> None:
        if not any(step.name == "export" for step in ctx.previous):
            raise OptionError(ctx.where, "needs an earlier export step (it quantizes model.onnx); add '- export: {}' "
                                         "before it")

    def run(self, state: RunState, folder: Path) -> dict[str, Any]:
        settings = self.settings()
        report = state.report_data or state.bundle
        split = "validation" if state.bundle.eval_split == "val" else "test"
        jobs = [("model", state.artifacts["onnx"], state.out / "model.int8.onnx")]
        if self.original:
            jobs.append(("original", state.artifacts["original_onnx"], state.out / "original.int8.onnx"))
        info: dict[str, Any] = {"settings": settings_dict(settings)}
        for name, src, dst in jobs:
            result = quantize_onnx(src, dst, state.bundle, state.bundle.test, settings, split_name=split)
            if report.eval_split == "test" and report is not state.bundle:  # reported, never chosen on
                result["fp32_test_accuracy"] = onnx_split_accuracy(src, report.test)
                result["int8_test_accuracy"] = onnx_split_accuracy(dst, report.test)
            info[name] = result
        state.artifacts["int8_onnx"] = state.models["quantize"] = str(state.out / "model.int8.onnx")
        if self.original:
            path = str(state.out / "original.int8.onnx")
            state.artifacts["original_int8_onnx"] = state.models["original-int8"] = path
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "quantize.json", json.dumps(info, indent=2, default=str))
        return info
