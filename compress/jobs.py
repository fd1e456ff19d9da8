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

from compress import distributed, yamlsafe
from compress.analysis import AnalysisConfig, AnalysisResult, analyze_model
from compress.compression.serialize import save_model
from compress.config import to_dict
from compress.data import DataBundle, DataConfig
from compress.errors import UserError, shorten
from compress.io import atomic_write_text, run_folder_lock
from compress.models import ModelConfig, resolve_taps
from compress.models.introspect import check_finite
from compress.system import environment
from compress.training import CHECKPOINT, TrainConfig, default_device, evaluate, fit, read_meta

__all__ = ["build_model", "model_meta", "config_from_checkpoint", "train", "analyze", "run_label_scaling",
           "fit_error_line", "settings", "check_resume", "check_owner"]

CONFIG = "config.yaml"


def settings(**sections: Any) -> dict[str, Any]:
    """The settings a run folder records (``config.yaml``, ``recipe.yaml``): each section as plain
    YAML values, exactly as they read back from the file."""
    return yaml.safe_load(yaml.safe_dump({k: to_dict(v) for k, v in sections.items()}, sort_keys=False))


def _write_config(folder: Path, doc: dict[str, Any]) -> None:
    atomic_write_text(folder / CONFIG, yaml.safe_dump({**doc, "environment": environment()}, sort_keys=False))


# Options added since runs were first recorded, with the value that keeps the earlier behaviour: a
# record without the key matches that value (and null, for any option), so such a run still resumes.
ADDED_OPTIONS: dict[str, Any] = {"probe_lr_step": 1, "plateau_reference": "best_probe", "probe_preset": None,
                                 "label_draw": "auto", "stream": "auto", "max_memory_gb": 4.0, "int8": False,
                                 "probe_augment": 0, "channels_last": False, "compile": False}


# Options that change how the work runs but not its results (the data loader's worker processes:
# augmentation is seeded per image): a resume with another value continues the same run.
NO_EFFECT_OPTIONS = frozenset({"workers"})


def _differences(there: Any, now: Any, key: str = "") -> list[str]:
    """The key paths where two recorded settings differ, each with both values (shortened)."""
    if isinstance(there, list) and isinstance(now, list) and len(there) == len(now):
        return [d for i, (a, b) in enumerate(zip(there, now))
                for d in _differences(a, b, f"{key}.{i}" if key else str(i))]
    if isinstance(there, dict) and isinstance(now, dict):
        out = []
        for k in list(now) + [k for k in there if k not in now]:
            sub = f"{key}.{k}" if key else str(k)
            if k in NO_EFFECT_OPTIONS:  # how the work is done, not what it gives: a resume may change it
                continue
            if k not in there and (now[k] is None or k in ADDED_OPTIONS and now[k] == ADDED_OPTIONS[k]):
                continue  # an option added since, at the earlier behaviour (e.g. finetune.distill: null)
            if k not in there or k not in now:
                out.append(f"{sub}: {'missing' if k not in there else shorten(there[k], 60)} there, "
                           f"{'missing' if k not in now else shorten(now[k], 60)} now")
            else:
                out += _differences(there[k], now[k], sub)
        return out
    return [] if there == now else [f"{key}: {shorten(there, 60)} there, {shorten(now, 60)} now"]


def check_resume(path: Path, current: dict[str, Any], what: str = "settings") -> None:
    """Refuse to resume in a run folder whose recorded settings (``path``: its ``config.yaml`` or
    ``recipe.yaml``) differ from ``current``, naming the differing keys; only the sections of
    ``current`` are compared. Nothing is written.

    Raises:
        UserError: the settings differ, or the folder has something to resume but no readable record.
    """
    again = "pass --no-resume to start again there (its files are replaced), or choose another --out"
    if not path.is_file():
        raise UserError(f"run folder {str(path.parent)!r} holds an earlier run but no {path.name} recording its "
                        f"{what}; {again}")
    recorded = yamlsafe.load_file(path, f"the run folder's {what}")
    if not isinstance(recorded, dict):
        raise UserError(f"{str(path)!r} is not a mapping of {what}; {again}")
    diffs = _differences({k: recorded.get(k) for k in current}, current)
    if diffs:
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise UserError(f"run folder {str(path.parent)!r} holds an earlier run with other {what} ({shown}); {again}")


def check_owner(folder: Path, kind: str) -> None:
    """Refuse to write a ``kind`` run (``train`` or ``analysis``) into a folder whose
    ``config.yaml`` records the other kind: its settings would be replaced."""
    path = folder / CONFIG
    if not path.is_file():
        return
    try:
        recorded = yamlsafe.load_file(path, "the run folder's settings")
    except UserError:
        return  # not ours to judge: it is replaced like any other earlier file
    other = {"train": "analysis", "analysis": "train"}[kind]
    if isinstance(recorded, dict) and other in recorded and kind not in recorded:
        raise UserError(f"run folder {str(folder)!r} holds a {'training' if other == 'train' else 'analysis'} run "
                        f"({CONFIG} records its settings); writing the {kind} there would replace them: choose "
                        f"another --out")


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
        raise UserError(f"checkpoint {shorten(cfg.checkpoint)} does not exist")
    meta = read_meta(cfg.checkpoint)
    name = cfg.name or meta.get("model") or "vgg16"
    options = cfg.options or (meta.get("options", {}) if name == meta.get("model") else {})
    try:
        return dataclasses.replace(cfg, name=name, options=options)
    except UserError as e:
        raise UserError(f"checkpoint {shorten(cfg.checkpoint)}: its metadata gives {e}") from None


def train(model_cfg: ModelConfig, data_cfg: DataConfig, cfg: TrainConfig, out: str | Path, *,
          resume: bool = True, progress: bool = True) -> tuple[torch.nn.Module, list[dict[str, float]], DataBundle]:
    """Phase 1: train a model and leave ``checkpoint.pt``, ``model.pt``, ``history.json`` and
    ``config.yaml`` in ``out``. The accuracy logged every epoch is the validation split's when the
    data has one (``val_acc``); the test split is left for the report.

    The folder is locked for the run (:func:`compress.io.run_folder_lock`). With ``resume`` a
    checkpoint there is continued only when its ``config.yaml`` records the same settings
    (:func:`check_resume`); nothing in the folder is written before that check and the checkpoint
    load have passed.

    Returns:
        ``(model, history, bundle)``, the bundle with all its splits.
    """
    if cfg.distill is not None:
        raise UserError("distill: training a model has no teacher to distil from; distillation is for the "
                        "fine-tuning of a recipe, with the original model as teacher (finetune: {distill: {...}})")
    with run_folder_lock(out) as out:
        check_owner(out, "train")
        bundle = data_cfg.load()
        torch.manual_seed(cfg.seed)  # the initial weights follow the seed too
        model = build_model(model_cfg, bundle)
        recorded = settings(model=model_cfg, data=data_cfg, train=cfg)
        if resume and (out / CHECKPOINT).is_file():
            check_resume(out / CONFIG, recorded)
        meta = model_meta(model_cfg, bundle)
        choices = bundle.for_choices("val" if bundle.val is not None else "test")
        history = fit(model, choices, cfg, out, meta=meta, resume=resume, progress=progress,
                      started=lambda: _write_config(out, recorded))
        distributed.broadcast_state_(model)  # under torchrun: rank 0's batch-norm statistics (those saved) everywhere
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

    The folder is locked for the run; a model with non-finite weights is refused.
    """
    with run_folder_lock(out) as out:
        check_owner(out, "analysis")
        bundle = bundle or data_cfg.load()
        if model is None:
            model_cfg = config_from_checkpoint(model_cfg)
            if model_cfg.checkpoint is None and not model_cfg.pretrained:
                raise UserError("analyze needs a trained model: pass --checkpoint (or --pretrained for "
                                "timm/torchvision)")
            model = build_model(model_cfg, bundle)
        check_finite(model, f"model {model_cfg.checkpoint or model_cfg.name!r}")
        tap_names = resolve_taps(model, cfg.taps, bundle.input_size)
        choices = bundle.for_choices(cfg.split)
        _write_config(out, settings(model=model_cfg, data=data_cfg, analysis=cfg, taps=tap_names))
        model_acc = evaluate(model, choices, batch_size=cfg.batch_size)  # the analysis's forward batch, its memory
        result = analyze_model(model, choices, tap_names, cfg, model_name=model_cfg.name, progress=progress,
                               model_accuracy=model_acc)
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


MAX_DRAWS = 100
# The second paper reads the CIFAR-K error at VGG-16's layer 10 (Figs. 3 and 5): the tap after pool 10.
PAPER_TAP = "features.pool10"


def run_label_scaling(model: ModelConfig, data: DataConfig, ks: Sequence[int], train_cfg: TrainConfig,
                      analysis_cfg: AnalysisConfig, out: str | Path, *, tap: str = "auto", draws: int = 1,
                      resume: bool = True, progress: bool = True) -> dict[str, Any]:
    """The second paper's CIFAR-K experiment: train and analyse one model per K and draw (nested
    label subsets of ``data``) and fit the error at ``tap`` against K.

    Args:
        tap: where the error is read: ``auto`` (the paper's layer 10, ``features.pool10``, when the
            analysis has that tap, as for VGG-16; each analysis' plateau otherwise), ``plateau``, or a
            tap name among the analysed ones.
        draws: draws of labels per K; draw d takes its labels with seed ``data.label_seed + d`` (nested
            over K within a draw; spread over CIFAR-100's superclasses as ``data.label_draw`` says) and
            trains with seed ``train_cfg.seed + d``. Draw 0 is the run of a single draw.

    Draw 0 of each K gets ``out/K<k>/train`` and ``out/K<k>/analysis`` (resumed when ``resume``
    and its settings match), draw d > 0 ``out/K<k>/draw<d>/train`` and ``.../analysis``;
    ``out/cifar_k.json`` and ``out/report.{md,html}`` hold the per-K table (mean and standard
    deviation over the draws), every draw, the per-layer table of every K, the fit and the plot.
    ``out`` is locked for the run.

    Returns:
        ``{"rows": [...], "fit": {...}, "fit_draws": [...], ...}``, one row per K (see :func:`_k_row`).
    """
    from compress.reports.cifar_k import write_cifar_k_report

    if isinstance(draws, bool) or not isinstance(draws, int) or not 1 <= draws <= MAX_DRAWS:
        raise UserError(f"--draws {draws}: the draws of labels per K must be a whole number from 1 to {MAX_DRAWS}")
    if not isinstance(tap, str) or not tap.strip():
        raise UserError(f"--tap {shorten(tap)}: name a tap, or auto (layer 10 for VGG-16, else the plateau) or plateau")
    ks = sorted(set(int(k) for k in ks))
    _check_tap_early(model, data, analysis_cfg, tap, ks)
    with run_folder_lock(out) as out:
        rows: list[dict[str, Any]] = []
        head = {"model": to_dict(model), "data": to_dict(data), "tap_rule": tap, "draws": draws}
        for k in ks:
            found = []
            for d in range(draws):
                spec = dataclasses.replace(data, num_labels=k, label_seed=data.label_seed + d)
                folder = out / f"K{k}" / (f"draw{d}" if d else "")
                trained, _, bundle = train(model, spec, dataclasses.replace(train_cfg, seed=train_cfg.seed + d),
                                           folder / "train", resume=resume, progress=progress)
                _check_tap(trained, bundle, analysis_cfg, tap)
                result = analyze(model, spec, analysis_cfg, folder / "analysis", model=trained, bundle=bundle,
                                 progress=progress)
                found.append(_draw_row(d, spec.label_seed, train_cfg.seed + d, bundle, result, tap))
                atomic_write_text(out / "cifar_k.json", json.dumps({**head, "rows": rows + [_k_row(k, found)]},
                                                                   indent=2))
            rows.append(_k_row(k, found))
        fit = fit_error_line([r["K"] for r in rows], [r["error"] for r in rows]) if len(rows) >= 2 else None
        fit_draws = [fit_error_line([r["K"] for r in rows], [r["draws"][d]["error"] for r in rows])
                     for d in range(draws)] if len(rows) >= 2 and draws > 1 else []
        summary = {**head, "rows": rows, "fit": fit, "fit_draws": fit_draws}
        atomic_write_text(out / "cifar_k.json", json.dumps(summary, indent=2))
        if distributed.is_main():  # under torchrun rank 0 draws and writes the report
            write_cifar_k_report(out, summary)
    return summary


def _check_tap_early(model: ModelConfig, data: DataConfig, cfg: AnalysisConfig, tap: str, ks: list[int]) -> None:
    """Refuse a ``tap`` the analysis will not have before anything trains, where the taps can be
    known cheaply: the own VGGs, built untrained at the data's size (32 unless given)."""
    if tap in ("auto", "plateau") or model.name not in ("vgg16", "vgg6", "avgg16") or not ks:
        return
    size = data.image_size or 32
    try:
        net = dataclasses.replace(model, checkpoint=None, pretrained=False).build(ks[0], (3, size, size))
    except UserError:
        return  # training will say what is wrong with the model
    names = resolve_taps(net, cfg.taps, (3, size, size))
    if tap not in names:
        raise UserError(_tap_message(tap, names))


def _tap_message(tap: str, names: Sequence[str]) -> str:
    return (f"--tap {shorten(tap)}: not among the analysed taps ({', '.join(names)}); name one of them, auto or "
            f"plateau, or add it to the analysed taps with --taps")


def _check_tap(model: torch.nn.Module, bundle: DataBundle, cfg: AnalysisConfig, tap: str) -> None:
    if tap in ("auto", "plateau"):
        return
    names = resolve_taps(model, cfg.taps, bundle.input_size)
    if tap not in names:
        raise UserError(_tap_message(tap, names))


def _error_tap(result: AnalysisResult, rule: str) -> str:
    names = [t.name for t in result.taps]
    if rule == "auto":
        return PAPER_TAP if PAPER_TAP in names else result.plateau
    return result.plateau if rule == "plateau" else rule


def _tap_values(t: Any) -> dict[str, Any]:
    return {"name": t.name, "N_f": t.n_filters, "F_s": t.filter_size, "FC_s": t.fc_size, "accuracy": t.accuracy,
            "n": t.stats.noise, "N_c": t.stats.clusters_per_filter, "C_s": t.stats.cluster_size,
            "size_fractions": list(t.stats.size_fractions)}


def _draw_row(d: int, label_seed: int, seed: int, bundle: DataBundle, result: AnalysisResult,
              rule: str) -> dict[str, Any]:
    """One draw of one K: its labels and seeds, the error tap's figures and every tap's."""
    from compress.labelsets import superclass_of

    tap = result.tap(_error_tap(result, rule))
    labels = list(bundle.label_names)
    row = {"draw": d, "label_seed": label_seed, "seed": seed, "labels": labels, "plateau": result.plateau,
           "tap": tap.name, "model_accuracy": result.model_accuracy, "accuracy": tap.accuracy,
           "error": 1 - tap.accuracy, "N_f": tap.n_filters, "n": tap.stats.noise,
           "N_c": tap.stats.clusters_per_filter, "C_s": tap.stats.cluster_size,
           "taps": [_tap_values(t) for t in result.taps]}
    coarse = [superclass_of(n) for n in labels]
    if bundle.meta.get("labels_kept") and all(coarse):
        row["superclasses"] = coarse
    return row


def _mean_std(values: Sequence[Any]) -> tuple[float, float | None]:
    """Mean over the finite values and their sample standard deviation (None below two values)."""
    v = [float(x) for x in values if x is not None and np.isfinite(float(x))]
    if not v:
        return float("nan"), None
    return (v[0] if len(v) == 1 else float(np.mean(v))), (float(np.std(v, ddof=1)) if len(v) > 1 else None)


_STATS = ("accuracy", "error", "n", "N_c", "C_s", "model_accuracy")


def _k_row(k: int, draws: list[dict[str, Any]]) -> dict[str, Any]:
    """One K's row of the CIFAR-K table: means over the draws (one draw: its values), their
    standard deviations (``std``, None with one draw), every draw, and the per-layer table
    (``taps``: Tables 4-6, means and ``std`` over the draws)."""
    first = draws[0]
    row: dict[str, Any] = {"K": k, "labels": first["labels"], "tap": first["tap"], "plateau": first["plateau"],
                           "N_f": first["N_f"], "n_draws": len(draws)}
    row["std"] = {}
    for key in _STATS:
        row[key], row["std"][key] = _mean_std([d[key] for d in draws])
    if len({d["tap"] for d in draws}) > 1:
        row["tap"] = "/".join(sorted({d["tap"] for d in draws}))
    taps = []
    for t in first["taps"]:
        same = [x for d in draws for x in d["taps"] if x["name"] == t["name"]]
        entry = {key: t[key] for key in ("name", "N_f", "F_s", "FC_s")}
        entry["std"] = {}
        for key in ("accuracy", "n", "N_c", "C_s"):
            entry[key], entry["std"][key] = _mean_std([x[key] for x in same])
        fractions = [x["size_fractions"] for x in same]
        width = max(len(f) for f in fractions)
        entry["size_fractions"] = [_mean_std([f[i] if i < len(f) else 0.0 for f in fractions])[0]
                                   for i in range(width)]
        taps.append(entry)
    row["taps"] = taps
    row["draws"] = draws
    return row
