"""``export``: write the current model (and the original) as verified ONNX files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from compress.compression.serialize import load_model
from compress.deploy.export import export_and_verify
from compress.errors import OptionError
from compress.recipe.state import RunState
from compress.recipe.step import Step, register_step
from compress.training import default_device

__all__ = ["Export", "export"]


def export(state: RunState, opset: int = 17, tolerance: float = 1e-3) -> dict[str, Any]:
    """Export the current model to ``model.onnx`` and the original to ``original.onnx`` in the run
    folder, each checked against PyTorch on test images."""
    meta = dict(state.meta, transforms=list(getattr(state.model, "compress_transforms", [])))
    info = export_and_verify(state.model.cpu().eval(), meta, state.out / "model.onnx", state.bundle,
                             opset=opset, tol=tolerance)
    original = export_and_verify(load_model(state.models["original"])[0], state.meta, state.out / "original.onnx",
                                 state.bundle, opset=opset, tol=tolerance)
    state.model.to(default_device())
    state.artifacts["onnx"] = str(state.out / "model.onnx")
    state.artifacts["original_onnx"] = str(state.out / "original.onnx")
    return {"model": info, "original": original}


@register_step("export")
@dataclass(frozen=True)
class Export(Step):
    """Export the current model and the original to ONNX (dynamic batch axis, deployment metadata),
    each verified against PyTorch; a file that does not match is removed.

    Attributes:
        opset: ONNX opset version.
        tolerance: largest accepted |onnxruntime - PyTorch| difference of the logits.
    """

    changes_model: ClassVar[bool] = False

    opset: int = 17
    tolerance: float = 1e-3

    def __post_init__(self) -> None:
        if not 17 <= self.opset <= 30:
            raise OptionError("opset", f"{self.opset}: not an ONNX opset this exporter writes; use 17 or newer "
                                       f"(default 17)")
        if not self.tolerance > 0:
            raise OptionError("tolerance", f"{self.tolerance} must be a positive number (default 1e-3)")

    def run(self, state: RunState, folder: Path) -> dict[str, Any]:
        return export(state, self.opset, self.tolerance)
