"""Runs a recipe: obtain the model, analyse it, apply the steps in order, and write one run folder.

Layout of a run folder::

    recipe.yaml            the resolved recipe (after --set overrides)
    train/                 phase 1, when the recipe trains (checkpoint.pt, history.json)
    analysis/              analysis.json, arrays/*.npz, report.md/html
    steps/NN-<step>/       model.pt after the step (and the fine-tuning checkpoint)
    model.pt, model.onnx   the final model
    summary.json           before/after figures of every step, rewritten after each step
    report.md, report.html the chain report
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import yaml

from compress.analysis import AnalysisConfig, AnalysisResult, analyze_model, analyze_tap
from compress.data import DataBundle
from compress.errors import UserError, unknown_name
from compress.features import extract_features
from compress.io import atomic_write_text, ensure_writable_dir
from compress.models.serialize import save_model
from compress.pipeline import DataSpec, ModelSpec, analyze, build_model, environment, model_meta, train
from compress.recipes import ExportOptions, Recipe, TrimOptions
from compress.training import default_device, evaluate, fit

__all__ = ["RunState", "run_recipe", "dry_run", "register_step", "measure"]

StepFn = Callable[["RunState", Any, Path], dict[str, Any]]
_STEPS: dict[str, StepFn] = {}


def register_step(name: str):
    """Register the function that carries out a recipe step: ``fn(state, options, folder) -> info``."""

    def deco(fn: StepFn) -> StepFn:
        if name in _STEPS:
            raise ValueError(f"step {name!r} is already registered")
        _STEPS[name] = fn
        return fn

    return deco


@dataclass
class RunState:
    """What the steps share: the current model, its data and analysis, and the masks to keep."""

    recipe: Recipe
    model: nn.Module
    bundle: DataBundle
    meta: dict[str, Any]
    analysis: AnalysisResult
    out: Path
    progress: bool = True
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    stale: set[str] = field(default_factory=set)  # taps whose analysis no longer matches the model
    artifacts: dict[str, str] = field(default_factory=dict)

    @property
    def analysis_config(self) -> AnalysisConfig:
        a = dataclasses.asdict(self.recipe.analysis)
        a.pop("taps")
        return AnalysisConfig(**a)

    def resolve_tap(self, tap: str) -> str:
        names = [t.name for t in self.analysis.taps]
        if tap == "plateau":
            return self.analysis.plateau
        if tap == "last":
            return names[-1]
        if tap not in names:
            raise unknown_name("analysed tap", tap, names + ["plateau", "last"])
        return tap

    def tap_analysis(self, tap: str):
        """The analysis of ``tap``, re-run for that tap alone when an earlier step changed its filters."""
        if tap in self.stale:
            fresh = analyze_model(self.model, self.bundle, [tap], self.analysis_config, progress=self.progress)
            self.analysis.taps = [fresh.taps[0] if t.name == tap else t for t in self.analysis.taps]
            self.stale.discard(tap)
        return self.analysis.tap(tap)

    def keeper(self) -> Callable[[nn.Module], None] | None:
        if not self.masks:
            return None
        from compress.compression.afcc import MaskKeeper

        return MaskKeeper(self.masks)


def measure(model: nn.Module, bundle: DataBundle) -> dict[str, float]:
    """Parameters (dense and non-zero), FLOPs (fvcore) and test accuracy of ``model``."""
    from compress.bench import count_flops

    params = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    return {"params": params, "nonzero_params": nonzero, "flops": count_flops(model, bundle.input_size),
            "accuracy": evaluate(model, bundle)}


def _obtain_model(recipe: Recipe, bundle_spec: DataSpec, out: Path, progress: bool) -> tuple[nn.Module, DataBundle]:
    m = recipe.model
    spec = ModelSpec(m.name, dict(m.options), m.checkpoint, m.pretrained, tuple(m.checkpoint_skip))
    if m.train is not None:  # from scratch, or transfer learning from a checkpoint / pretrained weights
        model, _, bundle = train(spec, bundle_spec, m.train.config(), out / "train", progress=progress)
        return model, bundle
    bundle = bundle_spec.load()
    return build_model(spec, bundle), bundle


def _write_summary(state: RunState, records: list[dict[str, Any]]) -> None:
    doc = {"recipe": state.recipe.name, "environment": environment(), "steps": records, "artifacts": state.artifacts}
    atomic_write_text(state.out / "summary.json", json.dumps(doc, indent=2, default=str))


def run_recipe(recipe: Recipe, out: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Carry out ``recipe`` and write its run folder (see the module docstring).

    Every intermediate model is saved as soon as its step ends, and ``summary.json`` is rewritten
    after every step, so a failure keeps everything finished before it.

    Returns:
        The summary (also in ``summary.json``).
    """
    out = ensure_writable_dir(out)
    atomic_write_text(out / "recipe.yaml", yaml.safe_dump(_resolved(recipe), sort_keys=False))
    data_spec = DataSpec(**dataclasses.asdict(recipe.data))
    model, bundle = _obtain_model(recipe, data_spec, out, progress)
    spec = ModelSpec(recipe.model.name, dict(recipe.model.options), recipe.model.checkpoint, recipe.model.pretrained)
    a = dataclasses.asdict(recipe.analysis)
    taps = a.pop("taps")
    result = analyze(spec, data_spec, AnalysisConfig(**a), out / "analysis", taps=taps, model=model, bundle=bundle,
                     progress=progress)
    meta = model_meta(spec, bundle)
    state = RunState(recipe, model, bundle, meta, result, out, progress)
    records: list[dict[str, Any]] = []
    original = save_model(model, out / "steps" / "00-original" / "model.pt", meta)
    state.artifacts["original"] = str(original)
    current = measure(model, bundle)
    records.append({"step": "original", "after": current, "info": {}})
    _write_summary(state, records)
    for i, step in enumerate(recipe.steps, start=1):
        folder = out / "steps" / f"{i:02d}-{step.name}"
        t0 = time.perf_counter()
        info = _STEPS[step.name](state, step.options, folder) or {}
        for p in state.model.parameters():
            p.requires_grad_(True)
        after = measure(state.model, bundle) if step.name not in ("export", "bench") else current
        if step.name not in ("export", "bench"):
            state.artifacts[f"{i:02d}-{step.name}"] = str(save_model(state.model, folder / "model.pt", meta))
        records.append({"step": step.name, "options": dataclasses.asdict(step.options), "before": current,
                        "after": after, "info": info, "seconds": time.perf_counter() - t0})
        current = after
        _write_summary(state, records)
    state.artifacts["final"] = str(save_model(state.model, out / "model.pt", meta))
    _write_summary(state, records)
    from compress.run_report import write_run_report

    write_run_report(out, records, state.artifacts, recipe.name, result)
    return json.loads((out / "summary.json").read_text())


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
            "loss": float(loss.detach()), "steps": [s.name for s in recipe.steps]}


def _resolved(recipe: Recipe) -> dict[str, Any]:
    doc = {"name": recipe.name, "model": dataclasses.asdict(recipe.model), "data": dataclasses.asdict(recipe.data),
           "analysis": dataclasses.asdict(recipe.analysis),
           "steps": [{s.name: dataclasses.asdict(s.options)} for s in recipe.steps]}
    return json.loads(json.dumps(doc))  # tuples -> lists for YAML


# ------------------------------------------------------------------------------------ steps


def _finetune(state: RunState, opts, folder: Path) -> dict[str, Any]:
    history = fit(state.model, state.bundle, opts.config(), folder, resume=True, progress=state.progress,
                  after_step=state.keeper())
    return {"epochs": len(history), "final_test_acc": history[-1]["test_acc"] if history else None}


@register_step("finetune")
def _step_finetune(state: RunState, opts, folder: Path) -> dict[str, Any]:
    return _finetune(state, opts, folder)


@register_step("trim")
def _step_trim(state: RunState, opts, folder: Path) -> dict[str, Any]:
    from compress.compression.trim import trim_at, trim_report

    tap = state.resolve_tap(opts.tap)
    analysis = state.tap_analysis(tap)
    before = copy.deepcopy(state.model)
    trim_at(state.model, tap, torch.as_tensor(analysis.probe_weight))
    names = [t.name for t in state.analysis.taps]
    state.analysis.taps = state.analysis.taps[: names.index(tap) + 1]
    info = trim_report(before, state.model, tap)
    info["probe_accuracy"] = analysis.accuracy
    info["accuracy_before_finetune"] = evaluate(state.model, state.bundle)
    return info


def _head_fed_by(model: nn.Module, tap: str) -> bool:
    """True when the model ends at ``tap`` with a single linear output layer (``head.out``)."""
    trunk_path, _, child = tap.rpartition(".")
    try:
        trunk = model.get_submodule(trunk_path)
    except AttributeError:
        return False
    head = getattr(model, "head", None)
    return (isinstance(trunk, nn.Sequential) and list(trunk._modules)[-1] == child and isinstance(head, nn.Sequential)
            and list(head._modules) == ["out"])


@register_step("afcc")
def _step_afcc(state: RunState, opts, folder: Path) -> dict[str, Any]:
    from compress.compression.afcc import afcc_mask, afcc_report, apply_mask, compress_head, select_trainable
    from compress.features import extract_inputs

    cfg = state.analysis_config
    k = state.bundle.num_classes
    info: dict[str, Any] = {}
    if opts.head is None and hasattr(state.model, "head"):  # own VGGs: the head right after a tap
        tap = state.resolve_tap(opts.tap)
        info["tap"] = tap
        if not _head_fed_by(state.model, tap):
            info["trimmed"] = _step_trim(state, TrimOptions(tap=tap), folder)
        head_path = "head.out"
        cache = extract_features(state.model, state.bundle, state.bundle.test, [tap], progress=False)
    else:  # any model: the classifier's own inputs (after global pooling), one position per filter
        head_path = opts.head or next(n for n, m in state.model.named_modules() if m is state.model.get_classifier())
        tap = head_path
        cache = extract_inputs(state.model, state.bundle, state.bundle.test, head_path)
    head = state.model.get_submodule(head_path)
    if not isinstance(head, nn.Linear):
        raise UserError(f"{head_path!r} is a {type(head).__name__}, not an nn.Linear; AFCC runs once per linear head")
    # Clusters of the head actually in place (the probe after a trim, or the trained classifier).
    current = analyze_tap(tap, head.weight.detach().cpu(), cache, k, cfg.threshold)
    mask = afcc_mask(current.cluster_ids, current.spatial)
    apply_mask(head, mask)
    state.masks[head_path] = mask
    info.update(afcc_report(mask, current))
    info["accuracy_masked"] = evaluate(state.model, state.bundle)
    if opts.train != "none":
        if opts.train == "head":
            select_trainable(state.model, [head_path])
        elif opts.train == "head+stage":
            select_trainable(state.model, [head_path, *_last_stage(state.model, tap)])
        info["finetune"] = _finetune(state, opts.finetune, folder)
    if opts.sparse:
        dense = copy.deepcopy(state.model.get_submodule(head_path)).cpu()
        compress_head(state.model, head_path, mask, current.spatial)
        del state.masks[head_path]
        info["head_latency"] = _head_latency(dense, state.model.get_submodule(head_path))
    return info


def _head_latency(dense: nn.Module, sparse: nn.Module) -> dict[str, float]:
    """Median milliseconds of the dense masked head and of the stored kept connections alone
    (PyTorch, CPU), at batch 1 and 64: what AFCC's compact storage does to the head's speed."""
    from compress.bench import time_interleaved

    sparse = copy.deepcopy(sparse).cpu().eval()
    out = {}
    for b in (1, 64):
        x = torch.randn(b, dense.in_features)

        def run(m, x=x):
            with torch.inference_mode():
                return m(x)

        stats = time_interleaved({"dense": lambda: run(dense), "sparse": lambda: run(sparse)}, batch=b, warmup=5,
                                 repeats=30)
        out[f"dense_b{b}_ms"] = stats["dense"].median_ms
        out[f"sparse_b{b}_ms"] = stats["sparse"].median_ms
    return out


def _last_stage(model: nn.Module, tap: str) -> list[str]:
    """Module paths of the conv stage ending at ``tap``: the layers after the previous pooling."""
    trunk_path, _, child = tap.rpartition(".")
    trunk = model.get_submodule(trunk_path)
    names = list(trunk._modules)
    end = names.index(child)
    start = max((i for i, n in enumerate(names[:end]) if n.startswith("pool")), default=-1) + 1
    return [f"{trunk_path}.{n}" for n in names[start:end + 1] if list(trunk._modules[n].parameters())]


@register_step("dilute")
def _step_dilute(state: RunState, opts, folder: Path) -> dict[str, Any]:
    from compress.compression.dilute import dilute_by_coverage, find_tap_conv

    tap = state.resolve_tap(opts.tap)
    layer = opts.layer or find_tap_conv(state.model, tap)
    for t in state.analysis.taps:
        if find_tap_conv(state.model, t.name) == layer:
            state.tap_analysis(t.name)
    target = opts.target
    if target == "auto":
        target = None
    elif isinstance(target, float):
        target = max(1, round(target * state.model.get_submodule(layer).out_channels))
    _, info = dilute_by_coverage(state.model, state.analysis, layer=layer, target=target,
                                 min_coverage=opts.min_coverage, round_to=opts.round_to)
    info["accuracy_before_finetune"] = evaluate(state.model, state.bundle)
    # Every tap at or after the diluted conv now has other filters.
    names = [n for n, _ in state.model.named_modules()]
    pos = names.index(layer)
    state.stale |= {t.name for t in state.analysis.taps if names.index(t.name) > pos}
    return info


@register_step("remove_blocks")
def _step_remove_blocks(state: RunState, opts, folder: Path) -> dict[str, Any]:
    from compress.compression.blocks import drop_layers, list_stages, plateau_stages, remove_blocks

    size = state.bundle.input_size
    before = list_stages(state.model)
    keep = plateau_stages(state.model, state.analysis) if opts.keep == "auto" else dict(opts.keep)
    if keep:
        remove_blocks(state.model, keep, size)
    if opts.drop:
        drop_layers(state.model, opts.drop, size)
    names = [n for n, _ in state.model.named_modules()]
    state.stale |= {t.name for t in state.analysis.taps}  # block indices and widths may have moved
    state.analysis.taps = [t for t in state.analysis.taps if t.name in names]
    return {"stages_before": before, "kept_blocks": keep, "dropped": list(opts.drop),
            "stages_after": list_stages(state.model), "accuracy_before_finetune": evaluate(state.model, state.bundle)}


@register_step("export")
def _step_export(state: RunState, opts, folder: Path) -> dict[str, Any]:
    from compress.export import export_and_verify

    meta = dict(state.meta, transforms=list(getattr(state.model, "compress_transforms", [])))
    info = export_and_verify(state.model.cpu().eval(), meta, state.out / "model.onnx", state.bundle,
                             opset=opts.opset, tol=opts.tolerance)
    original = export_and_verify(_load(state.artifacts["original"]), state.meta, state.out / "original.onnx",
                                 state.bundle, opset=opts.opset, tol=opts.tolerance)
    state.model.to(default_device())
    state.artifacts["onnx"] = str(state.out / "model.onnx")
    state.artifacts["original_onnx"] = str(state.out / "original.onnx")
    return {"model": info, "original": original}


def _load(path: str) -> nn.Module:
    from compress.models.serialize import load_model

    return load_model(path)[0]


@register_step("bench")
def _step_bench(state: RunState, opts, folder: Path) -> dict[str, Any]:
    from compress.bench import run_bench

    if "onnx" not in state.artifacts:
        _step_export(state, ExportOptions(), folder)
    compressed = save_model(state.model, state.out / "model.pt", state.meta)
    result = run_bench([state.artifacts["original"], str(compressed)], state.bundle, state.out / "bench",
                       names=["original", "compressed"], batch_sizes=opts.batch_sizes, warmup=opts.warmup,
                       repeats=opts.repeats, backends=None if opts.torch_eager else ["ort-cpu"])
    state.artifacts["bench"] = str(state.out / "bench" / "bench.html")
    info: dict[str, Any] = {"report": state.artifacts["bench"]}
    for backend in result.settings["backends"]:
        for b in opts.batch_sizes:
            r = result.ratio(1, "latency", backend, b)
            if r:
                info[f"speedup_{backend}_b{b}"] = round(1 / r, 3)
    for key in ("file_size", "flops", "params"):
        r = result.ratio(1, key)
        if r:
            info[f"{key}_ratio"] = round(r, 4)
    return info
