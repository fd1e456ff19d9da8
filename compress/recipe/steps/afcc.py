"""``afcc``: keep only each filter's connections to the labels of its clusters in a linear head
(the papers' AFCC), fine-tune with the mask held, and store the head as its kept connections."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

from compress.analysis import analyze_tap
from compress.analysis.features import extract_features, extract_inputs
from compress.compression.afcc import afcc_mask, afcc_report, apply_mask, compress_head, select_trainable
from compress.errors import UserError
from compress.recipe.state import RunState
from compress.recipe.step import CheckContext, Step, register_step
from compress.recipe.steps.finetune import Finetune, finetune
from compress.recipe.steps.trim import trim
from compress.training import evaluate

__all__ = ["Afcc"]


@register_step("afcc")
@dataclass(frozen=True)
class Afcc(Step):
    """Keep only each filter's connections to its cluster labels in the model's linear head.

    For the own VGGs the head is ``head.out`` right after ``tap`` (the network is trimmed there
    first when needed, the tap's probe becoming the head). For other models name the classifier
    with ``head``: its inputs after global pooling are the filters.

    Attributes:
        tap: the tap feeding the head of the own VGGs (plateau, last or a tap name).
        head: module path of the linear classifier of any other model (e.g. classifier, fc, head.fc).
        train: what the masked fine-tuning trains: head, head+stage (the head and the conv stage
            before it), all, or none.
        finetune: the masked fine-tuning (the options of the finetune step).
        sparse: store the head as its kept connections only (smaller file, exported as such).
    """

    tap: str = "last"
    head: str | None = None
    train: Literal["head", "head+stage", "all", "none"] = "head"
    finetune: Finetune = field(default_factory=lambda: Finetune(epochs=3, lr=0.001))
    sparse: bool = True

    def check(self, ctx: CheckContext) -> None:
        if self.tap not in ("plateau", "last"):
            ctx.require_modules("tap", [self.tap])
        if self.head is not None:
            ctx.require_modules("head", [self.head])

    def run(self, state: RunState, folder: Path) -> dict[str, Any]:
        k = state.bundle.num_classes
        info: dict[str, Any] = {}
        if self.head is None and hasattr(state.model, "head"):  # own VGGs: the head right after a tap
            tap = state.resolve_tap(self.tap)
            info["tap"] = tap
            if not _head_fed_by(state.model, tap):
                info["trimmed"] = trim(state, tap)
            head_path = "head.out"
            cache = extract_features(state.model, state.bundle, state.bundle.test, [tap], progress=False)
        else:  # any model: the classifier's own inputs (after global pooling), one position per filter
            head_path = self.head or _classifier_path(state.model)
            tap = head_path
            cache = extract_inputs(state.model, state.bundle, state.bundle.test, head_path)
        head = state.model.get_submodule(head_path)
        if not isinstance(head, nn.Linear):
            raise UserError(f"{head_path!r} is a {type(head).__name__}, not an nn.Linear; AFCC runs once per linear "
                            f"head (name the classifier with afcc.head)")
        # Clusters of the head actually in place (the probe after a trim, or the trained classifier).
        current = analyze_tap(tap, head.weight.detach().cpu(), cache, k, state.analysis_config.threshold)
        mask = afcc_mask(current.cluster_ids, current.spatial)
        apply_mask(head, mask)
        state.masks[head_path] = mask
        info.update(afcc_report(mask, current))
        info["accuracy_masked"] = evaluate(state.model, state.bundle)
        if self.train != "none":
            if self.train == "head":
                select_trainable(state.model, [head_path])
            elif self.train == "head+stage":
                select_trainable(state.model, [head_path, *_last_stage(state.model, tap)])
            info["finetune"] = finetune(state, self.finetune, folder)
        if self.sparse:
            dense = copy.deepcopy(state.model.get_submodule(head_path)).cpu()
            compress_head(state.model, head_path, mask, current.spatial)
            del state.masks[head_path]
            info["head_latency"] = _head_latency(dense, state.model.get_submodule(head_path))
        return info


def _classifier_path(model: nn.Module) -> str:
    if not hasattr(model, "get_classifier"):
        raise UserError(f"{type(model).__name__} has no get_classifier(); name its linear classifier with afcc.head")
    classifier = model.get_classifier()
    return next(n for n, m in model.named_modules() if m is classifier)


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


def _last_stage(model: nn.Module, tap: str) -> list[str]:
    """Module paths of the conv stage ending at ``tap``: the layers after the previous pooling."""
    trunk_path, _, child = tap.rpartition(".")
    trunk = model.get_submodule(trunk_path)
    names = list(trunk._modules)
    end = names.index(child)
    start = max((i for i, n in enumerate(names[:end]) if n.startswith("pool")), default=-1) + 1
    return [f"{trunk_path}.{n}" for n in names[start:end + 1] if list(trunk._modules[n].parameters())]


def _head_latency(dense: nn.Module, sparse: nn.Module) -> dict[str, float]:
    """Median milliseconds of the dense masked head and of the stored kept connections alone
    (PyTorch, CPU), at batch 1 and 64: what AFCC's compact storage does to the head's speed."""
    from compress.deploy.bench import time_interleaved

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
