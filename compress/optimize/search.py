"""``compress optimize``: meet a latency budget with the toolkit's own mechanisms.

The model is analysed (probes per tap, on the validation split), candidates are built from what
the analysis says (:mod:`compress.optimize.candidates`), exported, timed together on the budget's
backend (:mod:`compress.optimize.timing`), and walked from the fastest: the first whose
validation accuracy is within ``max_drop`` points of the original's (known from its probe, from
onnxruntime for INT8, or from a short fine-tune with distillation) is chosen, fine-tuned, and
written with its ONNX files. Layout of ``--out``::

    config.yaml                 the settings (a rerun with other settings is refused)
    analysis/                   the analysis of the original
    candidates/<id>/            every structure: model.pt, model.onnx, model.int8.onnx, estimate/, final/
    timing.json                 the latency of every candidate (read back by a rerun)
    candidates.json, .md, .html the table of every candidate; figures/candidates.png the plot
    model.pt, model.onnx        the chosen model (model.int8.onnx when INT8 was chosen)
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml
from compress.progress import tqdm

from compress.analysis import AnalysisConfig, load_analysis
from compress.compression.serialize import load_model, read_model_meta, save_model
from compress.data import DataConfig
from compress.deploy.export import check_data_fits
from compress.deploy.quantize import onnx_split_accuracy
from compress.errors import UserError, shorten
from compress.io import atomic_write_text, run_folder_lock
from compress.jobs import analyze, check_resume, settings
from compress.models import ModelConfig
from compress.models.introspect import count_flops
from compress.optimize import candidates as C
from compress.optimize.config import OptimizeConfig
from compress.optimize.report import rows, write_report
from compress.optimize.timing import check_backend, time_variants
from compress.recipe.steps.finetune import finetune
from compress.system import environment, int8_fast_path
from compress.training import default_device, evaluate

__all__ = ["optimize", "check_inputs"]

CONFIG = "config.yaml"


def check_inputs(checkpoint: str | Path, cfg: OptimizeConfig) -> dict[str, Any]:
    """Refuse a missing or unreadable checkpoint and a backend this machine lacks, before anything
    is written; returns the checkpoint's metadata."""
    path = Path(checkpoint)
    if not str(checkpoint).strip() or not path.is_file():
        raise UserError(f"checkpoint {shorten(str(checkpoint))} does not exist (or is not a file); give a model file "
                        f"or training checkpoint, e.g. runs/x/model.pt")
    meta = read_model_meta(path)
    if "model" not in meta:
        raise UserError(f"checkpoint {shorten(str(checkpoint))} carries no model description; give a model file "
                        f"written by compress (compress train, compress run)")
    check_backend(cfg.backend)
    return meta


def optimize(checkpoint: str | Path, data_cfg: DataConfig, analysis_cfg: AnalysisConfig, cfg: OptimizeConfig,
             out: str | Path, *, progress: bool = True, resume: bool = True,
             report: bool = True) -> dict[str, Any]:
    """Find the fastest candidate that meets the budget on validation, fine-tune it and write it
    (see the module docstring); ``report`` also writes the analysis report (``analysis/report.html``).

    Returns:
        The document of ``candidates.json``.

    Raises:
        UserError: bad input (before anything is written), or no candidate meets the budget (after
            the candidate table is written), naming the best candidate found.
    """
    meta = check_inputs(checkpoint, cfg)
    if data_cfg.mean is None and data_cfg.std is None and meta.get("mean") and meta.get("std"):
        data_cfg = dataclasses.replace(data_cfg, mean=list(meta["mean"]), std=list(meta["std"]))
    if analysis_cfg.split == "val" and not data_cfg.val_fraction:
        raise UserError("--val-fraction 0 holds out no validation images to choose on; give a fraction above 0 "
                        "(default 0.1), or --split test (choices on the test split, the papers' setting)")
    with run_folder_lock(out) as out:
        recorded = settings(checkpoint=str(checkpoint), data=data_cfg, analysis=analysis_cfg, optimize=cfg)
        if resume and ((out / CONFIG).is_file() or (out / "candidates").is_dir()):
            check_resume(out / CONFIG, recorded, "optimize settings")
        bundle = data_cfg.load()  # the data and the model are checked before anything is written
        model, meta = load_model(checkpoint, device=default_device())
        check_data_fits(meta, bundle, f"checkpoint {shorten(str(checkpoint))}")
        choices = bundle.for_choices(analysis_cfg.split)
        atomic_write_text(out / CONFIG, yaml.safe_dump({**recorded, "environment": environment(cfg.threads)},
                                                       sort_keys=False))
        original = (bundle, choices, model, meta)
        return _search(checkpoint, original, data_cfg, analysis_cfg, cfg, out, progress, resume, report)


def _original(checkpoint, original, data_cfg, analysis_cfg, out: Path, progress: bool, resume: bool, report: bool):
    """Save the original as the candidates' teacher and analyse it (or read an earlier run's analysis)."""
    bundle, choices, model, meta = original
    path = out / "candidates" / "original" / "model.pt"
    save_model(model, path, meta)
    analysis = None
    if resume and (out / "analysis" / "analysis.json").is_file():
        try:
            analysis = load_analysis(out / "analysis")
        except UserError:
            analysis = None
    if analysis is None:
        model_cfg = ModelConfig(name=meta["model"], options=dict(meta.get("options", {})), checkpoint=str(checkpoint))
        analysis = analyze(model_cfg, data_cfg, analysis_cfg, out / "analysis", model=model, bundle=bundle,
                           progress=progress, report=report)
    return bundle, choices, model, meta, path, analysis


def _search(checkpoint, original, data_cfg, analysis_cfg, cfg: OptimizeConfig, out: Path, progress: bool,
            resume: bool, report: bool) -> dict[str, Any]:
    bundle, choices, model, meta, original_path, analysis = _original(checkpoint, original, data_cfg, analysis_cfg,
                                                                       out, progress, resume, report)
    base_acc = evaluate(model, choices)
    ctx = C.Context(cfg, analysis_cfg, out, bundle, choices, meta, analysis, original_path, base_acc,
                    count_flops(model, choices.input_size), progress, resume)
    structures = C.plan(ctx)
    variants: list[C.Variant] = []
    for s in tqdm(structures, desc="candidates", unit="candidate", disable=not progress):
        C.build(s, ctx)
        variants += C.variants(s, ctx)
    reference = variants[0]  # the original in FP32
    if reference.onnx is None:
        raise UserError(f"the original cannot be exported to ONNX ({reference.error}); nothing to time")
    time_variants(variants, reference, cfg, choices.input_size, out / "timing.json", resume)
    C.release(structures)
    chosen = _choose(variants, ctx)
    doc = _document(variants, ctx, reference)
    if chosen is None:
        doc["error"] = _no_candidate(variants, ctx, out)
        write_report(out, doc, cfg)
        raise UserError(doc["error"])
    doc["final"] = _finish(chosen, ctx)
    doc["original"]["test_accuracy"] = evaluate(model, bundle)
    write_report(out, doc, cfg)
    return doc


def _choose(variants: list[C.Variant], ctx: C.Context) -> C.Variant | None:
    """The fastest candidate fast enough for the budget and within the accuracy budget on validation.

    Candidates whose accuracy is already known to be within the budget (probes, INT8 files, AFCC)
    need nothing more. The short fine-tunes (at most ``max_estimates``) go to the others from the
    slowest fast-enough candidate towards the fastest: the least compressed are the likeliest to
    hold their accuracy, and once one does, only faster candidates are worth an estimate. Every
    candidate gets its status."""
    cfg, base = ctx.cfg, ctx.base_accuracy
    by_structure: dict[str, list[C.Variant]] = {}
    for v in variants:
        by_structure.setdefault(v.structure.id, []).append(v)
    ok = [v for v in variants if v.error is None and cfg.fast_enough(v.speedup, v.latency_ms, v.flops_ratio)]

    def best() -> C.Variant | None:
        good = [v for v in ok if cfg.accurate_enough(v.accuracy, base)]
        return min(good, key=lambda v: (v.latency_ms, v.name)) if good else None

    left, chosen = cfg.max_estimates, best()
    pending = [v for v in ok if not cfg.accurate_enough(v.accuracy, base) and v.structure.finetunable
               and not v.estimated]
    pending.sort(key=lambda v: (-v.latency_ms, v.name))
    bar = tqdm(total=min(left, len(pending)), desc="estimates", unit="fine-tune",
               disable=not ctx.progress or not pending)
    for v in pending:
        if chosen is not None and v.latency_ms >= chosen.latency_ms:
            continue  # a faster candidate already meets the budget
        if v.estimated:  # estimated with another candidate of its structure (its FP32 / INT8 twin)
            chosen = best()
            continue
        if left <= 0:
            v.status = (f"fast enough, accuracy not estimated: the limit of {cfg.max_estimates} short "
                        f"fine-tunes (max_estimates) was reached")
            continue
        C.estimate(v.structure, by_structure[v.structure.id], ctx)
        left -= 1
        bar.update(1)
        chosen = best()
    bar.close()
    for v in variants:
        if v.status:
            continue
        v.status = _why_not(v, chosen, ctx)
    return chosen


def _why_not(v: C.Variant, chosen: C.Variant | None, ctx: C.Context) -> str:
    cfg, base = ctx.cfg, ctx.base_accuracy
    if v is chosen:
        return "chosen: the fastest candidate that meets the budget on validation"
    if v.error:
        return v.error
    if not cfg.fast_enough(v.speedup, v.latency_ms, v.flops_ratio):
        kind = cfg.budget_kind
        if kind == "speedup":
            return f"too slow: {v.speedup:.2f}x < {cfg.speedup:g}x"
        if kind == "latency_ms":
            return f"too slow: {v.latency_ms:.4f} ms > {cfg.latency_ms:g} ms"
        return f"too many FLOPs: {v.flops_ratio:.3f} of the original's > {cfg.flops_ratio:g}"
    if chosen is not None and v.latency_ms is not None and v.latency_ms > chosen.latency_ms:
        if cfg.accurate_enough(v.accuracy, base):
            return "meets the budget, but slower than the chosen candidate"
        return "slower than the chosen candidate (and not within the accuracy budget on validation)"
    if not cfg.accurate_enough(v.accuracy, base):
        if v.accuracy is None:
            return "fast enough; accuracy unknown"
        drop = 100 * (base - v.accuracy)
        return f"fast enough, but {drop:.2f} points below the original on validation (max {cfg.max_drop:g})"
    return "meets the budget"


def _latency_limit(ctx: C.Context, reference: C.Variant) -> float | None:
    cfg = ctx.cfg
    if cfg.speedup is not None:
        return reference.latency_ms / cfg.speedup
    return cfg.latency_ms


def _document(variants: list[C.Variant], ctx: C.Context, reference: C.Variant) -> dict[str, Any]:
    cfg = ctx.cfg
    table = rows(variants, cfg, ctx.base_accuracy)
    doc: dict[str, Any] = {
        "budget": cfg.describe(), "settings": dataclasses.asdict(cfg),
        "original": {"val_accuracy": ctx.base_accuracy, "latency_ms": reference.latency_ms,
                     "flops": ctx.base_flops, "latency_limit_ms": _latency_limit(ctx, reference),
                     "split": ctx.choices.eval_split},
        "candidates": table, "chosen": next((r["name"] for r in table if r["chosen"]), None),
        "environment": environment(cfg.threads)}
    if any(v.precision == "int8" for v in variants):
        fast, note = int8_fast_path()
        if not fast:
            doc["int8_note"] = f"INT8 rows: {note}."
    return doc


def _no_candidate(variants: list[C.Variant], ctx: C.Context, out: Path) -> str:
    """The error of a budget no candidate meets, naming the best candidate found: the fastest
    accurate enough, else the most accurate fast enough, else the most accurate."""
    cfg, base = ctx.cfg, ctx.base_accuracy
    timed = [v for v in variants if v.error is None and v.latency_ms is not None]
    accurate = [v for v in timed if cfg.accurate_enough(v.accuracy, base)]
    fast = [v for v in timed if cfg.fast_enough(v.speedup, v.latency_ms, v.flops_ratio) and v.accuracy is not None]
    if accurate:
        best, why = min(accurate, key=lambda v: v.latency_ms), "the fastest within the accuracy budget"
    elif fast:
        best, why = max(fast, key=lambda v: v.accuracy), "the most accurate within the speed budget"
    else:
        best, why = max((v for v in timed if v.accuracy is not None), key=lambda v: v.accuracy,
                        default=None), "the most accurate"
    found = "no candidate was timed"
    if best is not None:
        found = (f"the best found ({why}) is {best.name}: {best.speedup:.2f}x speed-up, {best.latency_ms:.4f} ms, "
                 f"FLOPs {best.flops_ratio:.3f} of the original's, validation accuracy {best.accuracy:.4f} "
                 f"({100 * (best.accuracy - base):+.2f} points)")
    return (f"no candidate meets the budget ({cfg.describe()}; the original: validation accuracy {base:.4f}); "
            f"{found}; every candidate is in {str(out / 'candidates.md')!r}")


def _finish(chosen: C.Variant, ctx: C.Context) -> dict[str, Any]:
    """Fine-tune the chosen candidate (kept only if its validation accuracy does not fall), write
    ``model.pt``, ``model.onnx`` (and ``model.int8.onnx``) and report its test accuracy once."""
    cfg, s, out = ctx.cfg, chosen.structure, ctx.out
    start = s.folder / ("estimate" if chosen.estimated else "") / "model.pt"
    model = load_model(start, device=default_device())[0]
    what = "its short fine-tune" if chosen.estimated else "no fine-tuning"
    accuracy = chosen.accuracy
    if cfg.finetune_epochs > 0 and s.finetunable:
        folder = s.folder / "final"
        state = ctx.state(copy.deepcopy(model), folder)  # the model before stays, should the fine-tune not help
        finetune(state, C.finetune_config(ctx, cfg.finetune_epochs), folder)
        tuned = state.model
        after = evaluate(tuned, ctx.choices)
        if chosen.precision == "int8":
            C.export_model(tuned, ctx, folder / "model.onnx")
            C.quantize_model(folder / "model.onnx", ctx, folder / "model.int8.onnx")
            after = onnx_split_accuracy(folder / "model.int8.onnx", ctx.choices.test)
        epochs = f"{cfg.finetune_epochs} epochs{' with distillation' if cfg.distill else ''}"
        if after >= accuracy:
            model, accuracy, what = tuned, after, f"fine-tuning ({epochs})"
        else:
            what += f" (the final fine-tune, {epochs}, reached only {after:.4f} on validation and was not kept)"
    save_model(model, out / "model.pt", ctx.meta)
    C.export_model(model, ctx, out / "model.onnx")
    final = {"name": chosen.name, "structure": s.id, "precision": chosen.precision, "speedup": chosen.speedup,
             "latency_ms": chosen.latency_ms, "flops_ratio": chosen.flops_ratio, "finetune": what,
             "model": str(out / "model.pt"), "onnx": str(out / "model.onnx")}
    if chosen.precision == "int8":
        C.quantize_model(out / "model.onnx", ctx, out / "model.int8.onnx")
        final["int8_onnx"] = str(out / "model.int8.onnx")
        final["val_accuracy"] = onnx_split_accuracy(out / "model.int8.onnx", ctx.choices.test)
        final["test_accuracy"] = onnx_split_accuracy(out / "model.int8.onnx", ctx.bundle.test)
    else:
        (out / "model.int8.onnx").unlink(missing_ok=True)  # an earlier run's choice
        final["val_accuracy"] = evaluate(model, ctx.choices)
        final["test_accuracy"] = evaluate(model, ctx.bundle)
    final["meets_budget"] = ctx.cfg.accurate_enough(final["val_accuracy"], ctx.base_accuracy)
    atomic_write_text(out / "result.json", json.dumps(final, indent=2))
    return final
