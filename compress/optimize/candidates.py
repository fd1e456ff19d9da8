"""The candidates of ``compress optimize``: model structures built from what the analysis says
(the original, a cut at every tap, pruning at a few ratios, AFCC) with the recipe's own steps,
each exported to ONNX in FP32 and INT8, timed together, and short-fine-tuned when its accuracy
must be estimated. Every structure lives in ``<out>/candidates/<id>/`` and is reused by a rerun."""

from __future__ import annotations

import copy
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn as nn

from compress.analysis import AnalysisConfig, AnalysisResult
from compress.compression.serialize import load_model, save_model
from compress.data import DataBundle
from compress.deploy.export import export_and_verify
from compress.deploy.quantize import QuantizeSettings, onnx_split_accuracy, quantize_onnx
from compress.distill import DistillConfig
from compress.errors import UserError, clip
from compress.io import atomic_write_text
from compress.models.introspect import count_flops, count_params
from compress.optimize.config import OptimizeConfig
from compress.recipe.state import RunState
from compress.recipe.steps.afcc import Afcc
from compress.recipe.steps.finetune import Finetune, finetune
from compress.recipe.steps.prune import Prune
from compress.recipe.steps.trim import trim
from compress.training import default_device, evaluate

__all__ = ["Context", "Structure", "Variant", "plan", "build", "variants", "estimate", "finetune_config",
           "export_model", "quantize_model", "release"]


@dataclass
class Context:
    """What building a candidate needs: the settings, the data, the original and its analysis."""

    cfg: OptimizeConfig
    analysis_cfg: AnalysisConfig
    out: Path
    bundle: DataBundle  # all splits (the test split only reports)
    choices: DataBundle  # its ``test`` is the validation split
    meta: dict[str, Any]
    analysis: AnalysisResult
    original: Path  # the original's model file (the teacher)
    base_accuracy: float  # the original's validation accuracy
    base_flops: int
    progress: bool = True
    resume: bool = True

    def state(self, model: nn.Module, folder: Path) -> RunState:
        """A :class:`RunState` on ``model`` for the recipe steps, with its own copy of the analysis."""
        recipe = SimpleNamespace(name="optimize", analysis=self.analysis_cfg)
        state = RunState(recipe, model, self.choices, self.meta, copy.deepcopy(self.analysis), folder, progress=False,
                         report_data=self.bundle, resume=self.resume)
        state.models["original"] = state.artifacts["original"] = str(self.original)
        return state


@dataclass
class Structure:
    """One model structure: how it is made and, once built, its model file and figures."""

    id: str
    kind: str  # original, cut, prune, cut+prune, afcc
    tap: str | None = None
    ratio: float | None = None
    folder: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    model: nn.Module | None = field(default=None, repr=False)

    @property
    def finetunable(self) -> bool:
        return self.kind != "original"


@dataclass
class Variant:
    """A timed candidate: a structure in FP32 or INT8."""

    structure: Structure
    precision: str  # fp32 or int8
    onnx: Path | None = None
    latency_ms: float | None = None
    speedup: float | None = None
    accuracy: float | None = None  # on validation
    source: str = ""  # where the accuracy comes from
    estimated: bool = False  # the accuracy is that of the short fine-tune
    error: str | None = None
    status: str = ""

    @property
    def name(self) -> str:
        return self.structure.id + (" int8" if self.precision == "int8" else "")

    @property
    def flops_ratio(self) -> float | None:
        flops = self.structure.info.get("flops")
        return None if flops is None else flops / max(1, self.structure.info["base_flops"])


def _folder_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", text)[:120]


def plan(ctx: Context) -> list[Structure]:
    """The structures the analysis suggests: the original, a cut at every analysed tap, the
    criterion's pruning at every ratio (of the original and of the cut at the plateau) and AFCC
    at the plateau."""
    cfg, taps, plateau = ctx.cfg, [t.name for t in ctx.analysis.taps], ctx.analysis.plateau
    out = [Structure("original", "original")]
    out += [Structure(f"cut@{t}", "cut", tap=t) for t in taps]
    if cfg.prune:
        rounded = f"-r{cfg.round_to}" if cfg.round_to and cfg.round_to > 1 else ""
        for r in cfg.prune_ratios:
            out.append(Structure(f"prune-{cfg.criterion}-{r:g}{rounded}", "prune", ratio=r))
            out.append(Structure(f"cut@{plateau}+prune-{cfg.criterion}-{r:g}{rounded}", "cut+prune", tap=plateau,
                                 ratio=r))
    if cfg.afcc:
        out.append(Structure(f"afcc@{plateau}", "afcc", tap=plateau))
    for s in out:
        s.folder = ctx.out / "candidates" / _folder_name(s.id)
    return out


def finetune_config(ctx: Context, epochs: int) -> Finetune:
    """The fine-tuning of a candidate: the finetune step's defaults, ``finetune_lr`` and, with
    ``distill``, the original model as teacher."""
    cfg = ctx.cfg
    distill = DistillConfig(temperature=cfg.temperature, alpha=cfg.alpha) if cfg.distill else None
    return Finetune(epochs=epochs, lr=cfg.finetune_lr, distill=distill)


def build(s: Structure, ctx: Context) -> None:
    """Build ``s`` from the original (or load it from an earlier run), save its model file and
    measure it; a structure that cannot be built keeps the reason in ``s.error``."""
    done = s.folder / "built.json"
    if ctx.resume and done.is_file() and (s.folder / "model.pt").is_file():
        s.info = json.loads(done.read_text())
        s.model = load_model(s.folder / "model.pt", device=default_device())[0]
        return
    model = load_model(ctx.original, device=default_device())[0]
    state = ctx.state(model, s.folder)
    info: dict[str, Any] = {}
    try:
        if s.kind in ("cut", "cut+prune"):
            cut = trim(state, s.tap)
            info["probe_accuracy"] = cut["probe_accuracy"]
        if s.kind in ("prune", "cut+prune"):
            step = Prune(criterion=ctx.cfg.criterion, target=s.ratio, metric="flops", round_to=ctx.cfg.round_to)
            with warnings.catch_warnings():  # a target missed within tolerance: the FLOPs reached are recorded
                warnings.simplefilter("ignore")
                pruned = step.run(state, s.folder / "prune")
            info["prune_achieved"] = pruned["achieved"]
        if s.kind == "afcc":
            step = Afcc(tap=s.tap, train="head", finetune=finetune_config(ctx, ctx.cfg.estimate_epochs))
            afcc = step.run(state, s.folder / "afcc")
            info["afcc_kept_weights"] = afcc.get("kept_weights")
    except UserError as e:
        s.error = f"could not be built: {clip(str(e), 200)}"
        return
    for p in state.model.parameters():
        p.requires_grad_(True)
    s.model = state.model
    info.update(params=count_params(s.model), flops=count_flops(s.model, ctx.choices.input_size),
                base_flops=ctx.base_flops, accuracy=evaluate(s.model, ctx.choices))
    save_model(s.model, s.folder / "model.pt", ctx.meta)
    atomic_write_text(done, json.dumps(info, indent=2))
    s.info = info


def export_model(model: nn.Module, ctx: Context, path: Path) -> Path:
    meta = dict(ctx.meta, transforms=list(getattr(model, "compress_transforms", [])))
    device = next(model.parameters()).device
    export_and_verify(model.cpu().eval(), meta, path, ctx.choices, max_samples=64,
                      extra_meta={"params": count_params(model), "flops": count_flops(model, ctx.choices.input_size)})
    model.to(device)
    return path


def quantize_model(src: Path, ctx: Context, dst: Path) -> Path:
    settings = QuantizeSettings(max_drop=None, calibration_images=ctx.cfg.calibration_images)
    quantize_onnx(src, dst, ctx.bundle, None, settings)
    return dst


def _with_int8(ctx: Context) -> bool:
    return ctx.cfg.int8 and ctx.cfg.backend.startswith("ort")


def variants(s: Structure, ctx: Context) -> list[Variant]:
    """The FP32 (and INT8) candidates of a built structure, exported (or found from an earlier
    run) in its folder, with the validation accuracy known without fine-tuning: the model's own
    (a cut reproduces its tap's probe), and the INT8 file's run with onnxruntime."""
    out = [Variant(s, "fp32")] + ([Variant(s, "int8")] if _with_int8(ctx) else [])
    if s.error:
        for v in out:
            v.error = s.error
        return out
    fp32 = s.folder / "model.onnx"
    try:
        if not (ctx.resume and fp32.is_file()):
            export_model(s.model, ctx, fp32)
        out[0].onnx = fp32
    except UserError as e:
        for v in out:
            v.error = f"ONNX export failed: {clip(str(e), 200)}"
        return out
    out[0].accuracy = s.info["accuracy"]
    out[0].source = {"original": "measured", "cut": "probe (the cut's head is its tap's probe)",
                     "afcc": "after AFCC's masked fine-tune"}.get(s.kind, "before fine-tuning")
    if len(out) > 1:
        int8 = s.folder / "model.int8.onnx"
        try:
            if not (ctx.resume and int8.is_file()):
                quantize_model(fp32, ctx, int8)
            out[1].onnx = int8
            cached = _cached(s.folder / "int8.json", "accuracy")
            out[1].accuracy = cached if cached is not None else onnx_split_accuracy(int8, ctx.choices.test)
            atomic_write_text(s.folder / "int8.json", json.dumps({"accuracy": out[1].accuracy}))
            out[1].source = out[0].source + ", INT8 (onnxruntime)"
        except UserError as e:
            out[1].error = f"INT8 quantization failed: {clip(str(e), 200)}"
    if s.kind in ("prune", "cut+prune"):
        for v in out:  # the accuracy of a pruned model before fine-tuning says little
            v.source = "pruned, before fine-tuning (a short fine-tune estimates it)"
    return out


def _cached(path: Path, key: str) -> Any:
    try:
        return json.loads(path.read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def estimate(s: Structure, vs: list[Variant], ctx: Context) -> None:
    """A short fine-tune of ``s`` (distillation from the original by default) in
    ``<folder>/estimate``; the accuracies of its variants become those of the fine-tuned model
    (its INT8 file quantized again). Resumable: a finished estimate is read back."""
    folder = s.folder / "estimate"
    record = folder / "estimate.json"
    found = json.loads(record.read_text()) if ctx.resume and record.is_file() else None
    if found is None:
        model = load_model(s.folder / "model.pt", device=default_device())[0]
        state = ctx.state(model, folder)
        finetune(state, finetune_config(ctx, ctx.cfg.estimate_epochs), folder)
        save_model(state.model, folder / "model.pt", ctx.meta)
        found = {"fp32": evaluate(state.model, ctx.choices), "epochs": ctx.cfg.estimate_epochs}
        if any(v.precision == "int8" and v.onnx is not None for v in vs):
            export_model(state.model, ctx, folder / "model.onnx")
            try:
                quantize_model(folder / "model.onnx", ctx, folder / "model.int8.onnx")
                found["int8"] = onnx_split_accuracy(folder / "model.int8.onnx", ctx.choices.test)
            except UserError:
                found["int8"] = None
        atomic_write_text(record, json.dumps(found, indent=2))
    for v in vs:
        if v.onnx is not None and found.get(v.precision) is not None:
            v.accuracy = found[v.precision]
            v.estimated = True
            v.source = f"after a short fine-tune ({found['epochs']} epochs{', distilled' if ctx.cfg.distill else ''})"


def release(structures: list[Structure]) -> None:
    """Drop the models held in memory (a large search would otherwise keep every one)."""
    for s in structures:
        s.model = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
