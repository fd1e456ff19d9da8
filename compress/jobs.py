"""The jobs behind the commands ``train``, ``analyze`` and ``cifar-k``: each builds the model and
the data from their configurations, does its work and writes a run folder with its report."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import yaml

from compress.analysis import AnalysisConfig, AnalysisResult, analyze_model
from compress.compression.serialize import save_model
from compress.config import to_dict
from compress.data import DataBundle, DataConfig
from compress.errors import UserError
from compress.io import atomic_write_text, ensure_writable_dir
from compress.models import ModelConfig, resolve_taps
from compress.system import environment
from compress.training import TrainConfig, default_device, evaluate, fit, read_meta

__all__ = ["build_model", "model_meta", "config_from_checkpoint", "train", "analyze", "run_label_scaling",
           "fit_error_line"]


def _write_config(folder: Path, **sections: Any) -> None:
    doc = {k: to_dict(v) for k, v in sections.items()}
    doc["environment"] = environment()
    atomic_write_text(folder / "config.yaml", yaml.safe_dump(doc, sort_keys=False))


def model_meta(cfg: ModelConfig, bundle: DataBundle) -> dict[str, Any]:
    """What a saved model carries besides its weights (see :mod:`compress.compression.serialize`)."""
    return {"model": cfg.name, "options": dict(cfg.options), "num_classes": bundle.num_classes,
            "input_size": list(bundle.input_size), "label_names": list(bundle.label_names),
            "mean": list(bundle.mean), "std": list(bundle.std), "channel_order": "RGB", "dataset": bundle.name}


def build_model(cfg: ModelConfig, bundle: DataBundle, device: torch.device | None = None) -> torch.nn.Module:
    """The model of ``cfg`` sized for ``bundle`` (classes, channels, resolution), with its weights."""
    return cfg.build(bundle.num_classes, bundle.input_size).to(device or default_device())


def config_from_checkpoint(cfg: ModelConfig) -> ModelConfig:
    """Fill the model name and options from the checkpoint's metadata when ``cfg`` leaves them out
    (an empty name)."""
    if cfg.checkpoint is None:
        return cfg if cfg.name else dataclasses.replace(cfg, name="vgg16")
    if not Path(cfg.checkpoint).is_file():
        raise UserError(f"checkpoint {cfg.checkpoint!r} does not exist")
    meta = read_meta(cfg.checkpoint)
    name = cfg.name or meta.get("model") or "vgg16"
    options = cfg.options or (meta.get("options", {}) if name == meta.get("model") else {})
    return dataclasses.replace(cfg, name=name, options=options)


def train(model_cfg: ModelConfig, data_cfg: DataConfig, cfg: TrainConfig, out: str | Path, *,
          resume: bool = True, progress: bool = True) -> tuple[torch.nn.Module, list[dict[str, float]], DataBundle]:
    """Phase 1: train a model and leave ``checkpoint.pt``, ``model.pt``, ``history.json`` and
    ``config.yaml`` in ``out``. The accuracy logged every epoch is the validation split's when the
    data has one (``val_acc``); the test split is left for the report.

    Returns:
        ``(model, history, bundle)``, the bundle with all its splits.
    """
    out = ensure_writable_dir(out)
    bundle = data_cfg.load()
    torch.manual_seed(cfg.seed)  # the initial weights follow the seed too
    model = build_model(model_cfg, bundle)
    _write_config(out, model=model_cfg, data=data_cfg, train=cfg)
    meta = model_meta(model_cfg, bundle)
    choices = bundle.for_choices("val" if bundle.val is not None else "test")
    history = fit(model, choices, cfg, out, meta=meta, resume=resume, progress=progress)
    save_model(model, out / "model.pt", meta)
    return model, history, bundle


def analyze(model_cfg: ModelConfig, data_cfg: DataConfig, cfg: AnalysisConfig, out: str | Path, *,
            model: torch.nn.Module | None = None, bundle: DataBundle | None = None, progress: bool = True,
            report: bool = True) -> AnalysisResult:
    """Phases 2 and 3: probe every tap of ``cfg.taps``, analyse every filter, write the artifact
    (``analysis.json``, ``arrays/``) and, with ``report``, ``report.md`` and ``report.html``.

    Accuracies and field matrices come from ``cfg.split``: the validation split (default), or
    the test split (the papers' setting); ``result.config["split"]`` says which.

    Args:
        model_cfg: the model (with its checkpoint) to analyse; ignored when ``model`` is given.
        data_cfg: the data; ignored when ``bundle`` is given.
        cfg: analysis settings (taps included).
        out: the run folder.
        model: an already built model.
        bundle: already loaded data.
        progress: progress bars.
        report: also write the report.
    """
    out = ensure_writable_dir(out)
    bundle = bundle or data_cfg.load()
    if model is None:
        model_cfg = config_from_checkpoint(model_cfg)
        if model_cfg.checkpoint is None and not model_cfg.pretrained:
            raise UserError("analyze needs a trained model: pass --checkpoint (or --pretrained for timm/torchvision)")
        model = build_model(model_cfg, bundle)
    tap_names = resolve_taps(model, cfg.taps, bundle.input_size)
    _write_config(out, model=model_cfg, data=data_cfg, analysis=cfg, taps=tap_names)
    choices = bundle.for_choices(cfg.split)
    model_acc = evaluate(model, choices)
    result = analyze_model(model, choices, tap_names, cfg, model_name=model_cfg.name, progress=progress)
    result.model_accuracy = model_acc
    result.config = {"model": to_dict(model_cfg), "data": to_dict(data_cfg), "analysis": to_dict(cfg),
                     "split": choices.eval_split, "split_note": _split_note(choices, model_cfg)}
    result.save(out)
    if report:
        from compress.reports.analysis import write_report

        write_report(result, out)
    return result


def _split_note(choices: DataBundle, model_cfg: ModelConfig) -> str:
    """Where the analysis' accuracies and field matrices come from, in one sentence for the report."""
    if choices.eval_split == "test":
        return ("Probe and model accuracies, the plateau and the field matrices are computed on the test split "
                "(the papers' setting).")
    text = (f"Probe and model accuracies, the plateau and the field matrices are computed on the validation split "
            f"({len(choices.test)} images held out from the training images); the test split is kept for reporting.")
    if model_cfg.checkpoint is not None or model_cfg.pretrained:
        text += (" The model was trained elsewhere: the validation images may have been seen in its training, "
                 "which makes them look easier than new images.")
    return text


def fit_error_line(ks: Sequence[int], errors: Sequence[float]) -> dict[str, float]:
    """Least-squares line error = slope * K + intercept, with R^2 (needs two or more K)."""
    k = np.asarray(ks, dtype=float)
    e = np.asarray(errors, dtype=float)
    if len(k) < 2:
        raise UserError("the CIFAR-K fit needs at least two values of K")
    slope, intercept = np.polyfit(k, e, 1)
    pred = slope * k + intercept
    ss_res = float(((e - pred) ** 2).sum())
    ss_tot = float(((e - e.mean()) ** 2).sum())
    return {"slope": float(slope), "intercept": float(intercept), "r2": 1 - ss_res / ss_tot if ss_tot > 0 else 1.0}


def run_label_scaling(model: ModelConfig, data: DataConfig, ks: Sequence[int], train_cfg: TrainConfig,
                      analysis_cfg: AnalysisConfig, out: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """The second paper's CIFAR-K experiment: train and analyse one model per K (nested label
    subsets of ``data``) and fit the error at the plateau tap against K.

    Each K gets ``out/K<k>/train`` (resumable) and ``out/K<k>/analysis``; ``out/cifar_k.json`` and
    ``out/report.{md,html}`` hold the per-K table, the fit and the plot.

    Returns:
        ``{"rows": [...], "fit": {...}}``, one row per K with the plateau tap, its error and
        N_f, accuracy, n, N_c, C_s there.
    """
    from compress.reports.cifar_k import write_cifar_k_report

    out = ensure_writable_dir(out)
    rows = []
    for k in sorted(set(int(k) for k in ks)):
        spec = dataclasses.replace(data, num_labels=k)
        folder = out / f"K{k}"
        trained, _, bundle = train(model, spec, train_cfg, folder / "train", progress=progress)
        result = analyze(model, spec, analysis_cfg, folder / "analysis", model=trained, bundle=bundle,
                         progress=progress)
        tap = result.tap(result.plateau)
        rows.append({"K": k, "labels": bundle.label_names, "plateau": tap.name, "model_accuracy": result.model_accuracy,
                     "accuracy": tap.accuracy, "error": 1 - tap.accuracy, "N_f": tap.n_filters,
                     "n": tap.stats.noise, "N_c": tap.stats.clusters_per_filter, "C_s": tap.stats.cluster_size,
                     "taps": [{"name": t.name, "accuracy": t.accuracy, "n": t.stats.noise,
                               "N_c": t.stats.clusters_per_filter, "C_s": t.stats.cluster_size} for t in result.taps]})
        atomic_write_text(out / "cifar_k.json", json.dumps({"rows": rows}, indent=2))
    fit = fit_error_line([r["K"] for r in rows], [r["error"] for r in rows]) if len(rows) >= 2 else None
    summary = {"model": to_dict(model), "data": to_dict(data), "rows": rows, "fit": fit}
    atomic_write_text(out / "cifar_k.json", json.dumps(summary, indent=2))
    write_cifar_k_report(out, summary)
    return summary
