"""Runs a recipe: obtain the model, analyse it, apply the steps in order, and write one run folder.

The runner knows no step by name: it calls each step's ``run`` and, for a step that
``changes_model``, measures the model and saves it. Layout of a run folder::

    recipe.yaml            the resolved recipe (after --set overrides, every default filled in)
    train/                 phase 1, when the recipe trains (checkpoint.pt, history.json)
    analysis/              analysis.json, arrays/*.npz, report.md/html
    steps/NN-<step>/       model.pt after the step (and the fine-tuning checkpoint)
    model.pt, model.onnx   the final model
    summary.json           before/after figures of every step, rewritten after each step: accuracy on
                           the split choices are made on (validation), and the test accuracy of the
                           original and the final model (reported once each)
    report.md, report.html the chain report

Under ``torchrun`` with several processes every process runs the recipe together: training and
fine-tuning with ``DistributedDataParallel`` (:func:`~compress.training.fit`), the analysis
sharded (every process ends with the whole result), and each step either on every process (a
step whose ``all_ranks`` is true: it fine-tunes) or on rank 0 alone while the others wait and
then adopt rank 0's model (:meth:`~compress.recipe.state.RunState.on_main`). Only rank 0 writes:
the other processes touch nothing in the run folder, so they need no storage in common with it
(resuming reads the fine-tuning checkpoints on every process, which then needs it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml

from compress import distributed
from compress.compression.serialize import load_shared, share_model
from compress.config import to_dict
from compress.data import DataBundle
from compress.io import atomic_write_text, run_folder_lock
from compress.jobs import analyze, build_model, check_resume, model_meta, train
from compress.recipe.schema import Recipe
from compress.recipe.state import RunState, measure
from compress.system import environment
from compress.training import evaluate

__all__ = ["run_recipe", "dry_run"]


def _obtain_model(recipe: Recipe, out: Path, progress: bool, resume: bool) -> tuple[nn.Module, DataBundle]:
    cfg = recipe.model.config()
    if recipe.model.train is not None:  # from scratch, or transfer learning from a checkpoint / pretrained weights
        model, _, bundle = train(cfg, recipe.data, recipe.model.train, out / "train", resume=resume, progress=progress)
        return model, bundle
    bundle = recipe.data.load()
    # under torchrun rank 0 reads the checkpoint (or fetches the weights) and sends the model
    return share_model(lambda: build_model(cfg, bundle), model_meta(cfg, bundle)), bundle


def _write_summary(state: RunState, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Write ``summary.json`` (rank 0); returns its contents as they read back."""
    doc = {"recipe": state.recipe.name, "environment": environment() if distributed.is_main() else {},
           "steps": records, "artifacts": state.artifacts}
    text = json.dumps(doc, indent=2, default=str)
    atomic_write_text(state.out / "summary.json", text)
    return json.loads(text)


def _record_recipe(out: Path, resolved: dict[str, Any], resume: bool) -> None:
    """Refuse a folder holding a run of another recipe (with ``resume``), then write ``recipe.yaml``."""
    if resume and (out / "recipe.yaml").is_file():
        check_resume(out / "recipe.yaml", resolved, "recipe settings")
    atomic_write_text(out / "recipe.yaml", yaml.safe_dump(resolved, sort_keys=False))


def _start(recipe: Recipe, out: Path, progress: bool, resume: bool) -> RunState:
    """Train or load the model, analyse it and save it as the run's ``original``."""
    model, bundle = _obtain_model(recipe, out, progress, resume)
    result = analyze(recipe.model.config(), recipe.data, recipe.analysis, out / "analysis", model=model, bundle=bundle,
                     progress=progress)
    state = RunState(recipe, model, bundle.for_choices(recipe.analysis.split), model_meta(recipe.model.config(), bundle),
                     result, out, progress, report_data=bundle, resume=resume)
    original = str(state.save_current(out / "steps" / "00-original" / "model.pt"))
    state.artifacts["original"] = state.models["original"] = original
    return state


def run_recipe(recipe: Recipe, out: str | Path, *, progress: bool = True, resume: bool = True) -> dict[str, Any]:
    """Carry out ``recipe`` and write its run folder (see the module docstring).

    Every intermediate model is saved as soon as its step ends, and ``summary.json`` is rewritten
    after every step, so a failure keeps everything finished before it. The folder is locked for
    the run; with ``resume``, a folder holding a run of another recipe (its ``recipe.yaml``) is
    refused before anything is written, and the training and fine-tuning checkpoints of the same
    recipe are continued.

    Returns:
        The summary (also in ``summary.json``).
    """
    with run_folder_lock(out) as out:
        resolved = yaml.safe_load(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        distributed.run_on_main(lambda: _record_recipe(out, resolved, resume))  # checked once, by the writer
        if recipe.target is not None:
            return _run_target(recipe, out, progress, resume)
        state = _start(recipe, out, progress, resume)
        records = _run_steps(recipe, state, out)
        state.artifacts["final"] = state.models["final"] = str(state.save_current(out / "model.pt"))
        for record in (records[0], records[-1]):  # the test split reports the two models the run is about, once each
            model = state.model if record is records[-1] else _load(state.models["original"], state.model)
            record["test_accuracy"] = evaluate(model, state.report_data)  # every process: a sharded count
        summary = _write_summary(state, records)
        if distributed.is_main():
            from compress.reports.run import write_run_report

            write_run_report(out, records, state.artifacts, recipe.name, state.analysis)
        return summary


def _run_target(recipe: Recipe, out: Path, progress: bool, resume: bool) -> dict[str, Any]:
    """A recipe with a ``target``: train or load the model, save it as the run's original, and let
    :func:`~compress.optimize.search.optimize` meet the budget in ``out/optimize``.

    Returns:
        The optimisation's document (``optimize/candidates.json``), also in ``summary.json``.
    """
    from compress.compression.serialize import save_model
    from compress.optimize.search import optimize

    model, bundle = _obtain_model(recipe, out, progress, resume)
    original = save_model(model.cpu(), out / "steps" / "00-original" / "model.pt",
                          model_meta(recipe.model.config(), bundle))

    def search() -> dict[str, Any]:  # under torchrun: on rank 0 alone, as in a single process
        doc = optimize(original, recipe.data, recipe.analysis, recipe.target, out / "optimize", progress=progress,
                       resume=resume)
        summary = {"recipe": recipe.name, "environment": environment(), "target": to_dict(recipe.target),
                   "artifacts": {"original": str(original), "optimize": str(out / "optimize")}, "optimize": doc}
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str))
        return summary

    return distributed.run_on_main(search)


def _run_steps(recipe: Recipe, state: RunState, out: Path) -> list[dict[str, Any]]:
    """Apply every step in order, measuring and saving the model after each one that changes it;
    returns one record per model state (the original first)."""
    current = measure(state.model, state.bundle)
    records: list[dict[str, Any]] = [{"step": "original", "after": current, "info": {}}]
    _write_summary(state, records)
    for i, step in enumerate(recipe.steps, start=1):
        label = f"{i:02d}-{step.name}"
        t0 = time.perf_counter()
        folder = out / "steps" / label
        if step.all_ranks:  # every process (it fine-tunes), then all take rank 0's model (its batch-norm statistics)
            info = step.run(state, folder) or {}
            if step.changes_model:
                state.share()
            info = distributed.broadcast_object(info)
        else:
            info = state.on_main(lambda: step.run(state, folder) or {}, model=step.changes_model)
        for p in state.model.parameters():
            p.requires_grad_(True)
        after = current
        if step.changes_model:
            after = measure(state.model, state.bundle)
            path = str(state.save_current(out / "steps" / label / "model.pt"))
            state.artifacts[label] = state.models[label] = state.models[step.name] = path
        records.append({"step": step.name, "options": to_dict(step), "before": current, "after": after, "info": info,
                        "seconds": time.perf_counter() - t0})
        current = after
        _write_summary(state, records)
    return records


def _load(path: str, like: nn.Module) -> nn.Module:
    return load_shared(path, device=next(like.parameters()).device)


def dry_run(recipe: Recipe) -> dict[str, Any]:
    """Check that a recipe starts: build its model on the CPU (random weights, nothing downloaded)
    and take one training step on a random batch of its input size; no data is read.

    Returns:
        ``{"model", "params", "input_size", "loss", "steps"}``.
    """
    from compress.models import create_model

    m, d = recipe.model, recipe.data
    size = d.image_size or 32
    model = create_model(m.name, num_classes=d.num_labels or (100 if d.name == "cifar100" else 10), img_size=size,
                         **m.options)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=m.train.lr if m.train else 0.01, momentum=0.9)
    x = torch.randn(2, 3, size, size)
    loss = torch.nn.functional.cross_entropy(model(x), torch.zeros(2, dtype=torch.long))
    loss.backward()
    opt.step()
    return {"model": m.name, "params": sum(p.numel() for p in model.parameters()), "input_size": [3, size, size],
            "loss": float(loss.detach()),
            "steps": [s.name for s in recipe.steps] or (["optimize (target)"] if recipe.target else [])}
