"""``afcc``: keep only each filter's connections to the labels of its clusters in a linear head
(the papers' AFCC), fine-tune with the mask held, and store the head as its kept connections."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn as nn

from compress.analysis import analyze_tap
from compress.analysis.features import FeatureCache, extract_features, extract_inputs
from compress.compression.afcc import afcc_mask, afcc_report, apply_mask, compress_head, select_trainable
from compress.compression.blocks import list_stages
from compress.compression.cut import CUT_HEAD, cut_features, find_classifier, is_cut
from compress.compression.dilute import find_tap_conv
from compress.compression.trim import head_path as trimmed_head
from compress.compression.trim import sequential_trunk
from compress.errors import OptionError, UserError
from compress.models.introspect import get_module, match_modules
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

    Without head, the head is the one a trim left (head.out on the own VGGs, trim_head.out on
    any other model), right after tap; a model not yet cut there is trimmed there first (the
    tap's probe becoming the head). On a model that was never trimmed and with tap left at last,
    stage models (timm, torchvision, registered) use their linear classifier (timm's
    get_classifier(), else the last nn.Linear: fc, classifier.1, heads.head, ...), whose inputs
    after global pooling are the filters; the own VGGs are trimmed at their last tap.

    Attributes:
        tap: the tap feeding the head (plateau, last or a tap name); last on a stage model that
            was not trimmed means its own classifier.
        head: module path of the linear head (e.g. classifier, fc, head.fc, trim_head.out); unset:
            see above.
        train: what the masked fine-tuning trains: head, head+stage (the head and the conv stage
            before it), all, none, or a list of module paths or globs whose parameters train, where
            head stands for the AFCC head (e.g. [head, features.conv10]: the head and the 10th conv
            layer, the second paper's VGG-16 fine-tuning).
        finetune: the masked fine-tuning (the options of the finetune step; with distill the
            original model is the teacher).
        sparse: store the head as its kept connections only (smaller file, exported as such).
    """

    tap: str = "last"
    head: str | None = None
    train: Literal["head", "head+stage", "all", "none"] | list[str] = "head"
    finetune: Finetune = field(default_factory=lambda: Finetune(epochs=3, lr=0.001))
    sparse: bool = True

    all_ranks: ClassVar[bool] = True  # the masked fine-tuning; locating, masking and compressing run on rank 0

    def __post_init__(self) -> None:
        if isinstance(self.train, list):
            if not self.train or not all(isinstance(t, str) and t for t in self.train):
                raise OptionError("train", f"{self.train!r}: a list of module paths (or head) must name at least one "
                                           f"module, e.g. [head, features.conv10]")

    def check(self, ctx: CheckContext) -> None:
        if self.tap not in ("plateau", "last"):
            ctx.require_modules("tap", [self.tap])
        if isinstance(self.train, list):
            named = [t for t in self.train if t != "head"]
            if named:
                ctx.require_modules("train", named)
        trimmed = any(s.name == "trim" for s in ctx.previous) or self.tap != "last"
        if self.head is not None and not (trimmed and self.head.startswith(CUT_HEAD + ".")):
            ctx.require_modules("head", [self.head])

    def run(self, state: RunState, folder: Path) -> dict[str, Any]:
        info, spatial = state.on_main(lambda: self._mask(state))
        head_path = info["head"]
        if self.train != "none":
            if self.train == "head":
                select_trainable(state.model, [head_path])
            elif self.train == "head+stage":
                select_trainable(state.model, [head_path, *_last_stage(state.model, info.get("tap", head_path))])
            elif isinstance(self.train, list):
                info["trained"] = _select_listed(state.model, head_path, self.train)
            info["finetune"] = finetune(state, self.finetune, folder)
        if self.sparse:
            info["head_latency"] = state.on_main(lambda: _compress(state, head_path, spatial))
        return info

    def _mask(self, state: RunState) -> tuple[dict[str, Any], tuple[int, int]]:
        """Find the head, cluster its filters and zero every connection outside their clusters;
        returns the report so far and the spatial size of the tap feeding the head."""
        info: dict[str, Any] = {}
        head_path, tap, cache = self._locate(state, info)
        head = state.model.get_submodule(head_path)
        if not isinstance(head, nn.Linear):
            raise UserError(f"afcc.head {head_path!r} is a {type(head).__name__}, not an nn.Linear; AFCC runs once "
                            f"per linear head (name the classifier with afcc.head)")
        # Clusters of the head actually in place (the probe after a trim, or the trained classifier).
        current = analyze_tap(tap, head.weight.detach().cpu(), cache, state.bundle.num_classes,
                              state.analysis_config.threshold)
        mask = afcc_mask(current.cluster_ids, current.spatial)
        apply_mask(head, mask)
        state.masks[head_path] = mask
        info["head"] = head_path
        info.update(afcc_report(mask, current))
        info["accuracy_masked"] = evaluate(state.model, state.bundle)
        return info, tuple(current.spatial)

    def _locate(self, state: RunState, info: dict[str, Any]) -> tuple[str, str, FeatureCache]:
        """The head's module path, and the features its weight groups into filters: ``(head path,
        feature key, test features)``; trims the model first when the head must follow a tap."""
        model = state.model
        follows_trim = self.head is not None and (self.head == trimmed_head(model)
                                                  or self.head.startswith(CUT_HEAD + "."))
        if self.head is not None and not follows_trim:
            get_module(model, self.head, "afcc.head (module)")
            return self.head, self.head, extract_inputs(model, state.bundle, state.bundle.test, self.head)
        tap = state.resolve_tap(self.tap)
        if self.head is None and not (is_cut(model) or self.tap != "last" or sequential_trunk(model, tap)):
            try:  # a stage model: its own classifier, one position per filter after global pooling
                path = find_classifier(model)
            except UserError as e:
                raise UserError(f"afcc.head: {e}; name the linear head with afcc.head") from None
            return path, path, extract_inputs(model, state.bundle, state.bundle.test, path)
        info["tap"] = tap
        if not _ends_at(model, tap):
            info["trimmed"] = trim(state, tap)
        path = trimmed_head(model) or "head.out"  # an untrimmed own VGG ending at the tap: its output layer
        if self.head is not None and self.head != path:
            raise UserError(f"afcc.head {self.head!r}: the trim at afcc.tap {tap!r} left the head {path!r}")
        key = cut_features(model) if is_cut(model) else tap
        return path, key, extract_features(model, state.bundle, state.bundle.test, [key], progress=False)


def _compress(state: RunState, head_path: str, spatial: tuple[int, int]) -> dict[str, Any]:
    """Store the masked head as its kept connections (the mask is dropped: nothing to keep any
    more); returns the dense and sparse heads' latencies."""
    dense = copy.deepcopy(state.model.get_submodule(head_path)).cpu()
    compress_head(state.model, head_path, state.masks.pop(head_path), spatial)
    return _head_latency(dense, state.model.get_submodule(head_path))


def _select_listed(model: nn.Module, head_path: str, names: list[str]) -> list[str]:
    """Train only the modules of ``afcc.train`` given as a list (``head`` = the AFCC head; paths
    or globs); returns the module paths. A module whose parameters an earlier step removed (e.g.
    after a trim) is an error naming it."""
    named = [n for n in names if n != "head"]
    paths = match_modules(model, named, "afcc.train module") if named else []
    if "head" in names and head_path not in paths:
        paths = [head_path, *paths]
    empty = [p for p in paths if not any(True for _ in model.get_submodule(p).parameters())]
    if empty:
        raise UserError(f"afcc.train {empty!r}: no parameters left to train there (removed by an earlier step such as "
                        f"trim?); name modules the model still has")
    select_trainable(model, paths)
    return paths


def _ends_at(model: nn.Module, tap: str) -> bool:
    """True when the model already ends at ``tap`` with a linear head left by a trim."""
    if is_cut(model):
        return model.cut_tap == tap
    return _head_fed_by(model, tap)


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
    """Module paths of the conv stage that ends at ``tap`` (a tap, or a classifier's path).

    On a sequential trunk (the own VGGs): the layers after the previous pooling. Elsewhere: the
    last stage of repeated blocks (:func:`~compress.compression.blocks.list_stages`) at or before
    ``tap`` and every layer with parameters between it and ``tap`` (e.g. EfficientNet's
    ``conv_head``); without stages, the last conv before ``tap``.
    """
    trunk_path, _, child = tap.rpartition(".")
    trunk = model.get_submodule(trunk_path) if trunk_path else model
    if not is_cut(model) and sequential_trunk(model, tap):
        names = list(trunk._modules)
        end = names.index(child)
        start = max((i for i, n in enumerate(names[:end]) if n.startswith("pool")), default=-1) + 1
        return [f"{trunk_path}.{n}" for n in names[start:end + 1] if list(trunk._modules[n].parameters())]
    order = [n for n, _ in model.named_modules()]
    end = order.index(tap)
    stages = [s for s in list_stages(model) if order.index(s) <= end]
    if not stages:
        return [find_tap_conv(model, tap)]
    last = stages[-1]
    between = [n for n, m in model.named_modules() if order.index(last) < order.index(n) < end
               and not n.startswith(last + ".") and list(m.parameters(recurse=False))]
    return [last, *between]


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
