"""Recipes: YAML files loaded into frozen, validated dataclasses before any model is built.

A recipe names the model (and checkpoint, or how to train one), the data, the analysis
settings and an ordered list of steps, each a one-key mapping ``- <step>: {options}``::

    name: digits-demo
    model: {name: vgg16, options: {width: 0.25, fc_hidden: []}, train: {epochs: 12}}
    data: {name: digits}
    analysis: {probe_epochs: 100}
    steps:
      - trim: {tap: plateau}
      - finetune: {epochs: 3}
      - export: {}

Unknown keys, wrong types, unknown steps and taps the model does not have are refused with a
:class:`~compress.errors.UserError` that names the key path.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from compress.errors import UserError, unknown_name

__all__ = ["Recipe", "load_recipe", "parse_recipe", "apply_overrides", "STEP_OPTIONS", "register_step_options"]


# ---------------------------------------------------------------- typed loading


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (and build nested dataclasses)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        if len(arms) == 1:  # Optional[X]: X's own error is the precise one
            return _convert(value, arms[0], where)
        for arg in arms:
            try:
                return _convert(value, arg, where)
            except UserError:
                pass
        raise UserError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise UserError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise UserError(f"{where}: expected null, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise UserError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        (arg,) = typing.get_args(tp)[:1]
        items = [_convert(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool or tp is str:
        if isinstance(value, tp):
            return value
    raise UserError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def from_dict(cls: type, data: Any, where: str = "recipe") -> Any:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            e = unknown_name(f"key in {where}", str(key), names)
            raise UserError(str(e))
        kwargs[key] = _convert(value, hints[key], f"{where}.{key}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise UserError(f"{where}: {e}") from None


# ---------------------------------------------------------------- the recipe schema


@dataclass(frozen=True)
class TrainOptions:
    """Phase-1 or fine-tuning hyper-parameters (see :class:`compress.training.TrainConfig`)."""

    epochs: int = 30
    batch_size: int = 100
    lr: float = 0.028
    momentum: float = 0.975
    weight_decay: float = 1.5e-3
    lr_fc: float | None = None
    momentum_fc: float | None = None
    weight_decay_fc: float | None = None
    schedule: Literal["step", "cosine", "onecycle"] = "step"
    lr_decay: float = 0.6
    lr_step: int = 20
    augment: bool = True
    amp: bool = True
    seed: int = 0
    lr_factors: dict[str, float] = field(default_factory=dict)

    def config(self):
        from compress.training import TrainConfig

        return TrainConfig(**dataclasses.asdict(self))


@dataclass(frozen=True)
class ModelSection:
    """The model: a factory name and options, and where its weights come from.

    ``checkpoint`` alone: analyse those weights. ``checkpoint`` or ``pretrained`` with ``train``:
    transfer learning (``checkpoint_skip`` leaves e.g. the 1,000-label classifier out of the load).
    ``train`` alone: train from scratch.
    """

    name: str = "vgg16"
    options: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    checkpoint_skip: list[str] = field(default_factory=list)
    pretrained: bool = False
    train: TrainOptions | None = None


@dataclass(frozen=True)
class DataSection:
    name: str = "digits"
    root: str | None = None
    download: bool = False
    num_labels: int | None = None
    label_seed: int = 0
    image_size: int | None = None
    limit_train: int | None = None
    limit_test: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None


@dataclass(frozen=True)
class AnalysisSection:
    threshold: float = 0.3
    probe_epochs: int = 200
    probe_batch_size: int = 100
    probe_lr: float = 0.01
    probe_momentum: float = 0.975
    probe_weight_decay: float = 1e-3
    probe_lr_decay: float = 0.975
    plateau_tolerance: float = 0.5
    feature_dtype: Literal["float32", "float16"] = "float32"
    max_memory_gb: float = 4.0
    tap_pool: int | None = None
    taps: list[str] | None = None


STEP_OPTIONS: dict[str, type] = {}


def register_step_options(name: str):
    """Register the options dataclass of a recipe step."""

    def deco(cls):
        if name in STEP_OPTIONS:
            raise ValueError(f"step {name!r} is already registered")
        STEP_OPTIONS[name] = cls
        return cls

    return deco


@register_step_options("finetune")
@dataclass(frozen=True)
class FinetuneOptions(TrainOptions):
    """Fine-tune the whole current model (masks from earlier AFCC steps are kept)."""

    epochs: int = 5
    lr: float = 0.005
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Literal["step", "cosine", "onecycle"] = "cosine"


@register_step_options("trim")
@dataclass(frozen=True)
class TrimOptions:
    """Cut the network after ``tap`` ("plateau", "last" or a tap name); its probe becomes the head."""

    tap: str = "plateau"


@register_step_options("afcc")
@dataclass(frozen=True)
class AfccOptions:
    """Keep only each filter's connections to its cluster labels in the model's linear head.

    For the own VGGs the head is ``head.out`` right after ``tap`` (the network is trimmed there
    first when needed, the tap's probe becoming the head). For other models name the
    classifier with ``head`` (e.g. ``classifier``): its inputs after global pooling are the filters.
    """

    tap: str = "last"
    head: str | None = None
    train: Literal["head", "head+stage", "all", "none"] = "head"
    finetune: FinetuneOptions = field(default_factory=lambda: FinetuneOptions(epochs=3, lr=0.001))
    sparse: bool = True


@register_step_options("dilute")
@dataclass(frozen=True)
class DiluteOptions:
    """Remove filters of a conv layer while every label stays in at least ``min_coverage`` clusters.

    ``target``: filters to keep, as a count (``350``), a fraction of the layer (``0.7``), or
    ``auto`` (the fewest filters that keep every label covered ``min_coverage`` times).
    ``round_to``: keep a multiple of this many filters (rounded up), for faster conv kernels.
    """

    layer: str | None = None
    tap: str = "plateau"
    target: int | float | Literal["auto"] = "auto"
    min_coverage: int = 1
    round_to: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.target, float) and not 0 < self.target < 1:
            raise UserError(f"dilute.target {self.target} must be a count, a fraction in (0, 1) or 'auto'")
        if self.round_to is not None and self.round_to < 1:
            raise UserError(f"dilute.round_to {self.round_to} must be a positive number of filters (e.g. 8)")


@register_step_options("remove_blocks")
@dataclass(frozen=True)
class RemoveBlocksOptions:
    """Keep the first blocks of stages (``keep: {blocks.1: 1}``, or ``auto`` for the stages the
    plateau says add nothing) and drop layers (``drop: [conv_head, bn2]``, the classifier is resized)."""

    keep: dict[str, int] | Literal["auto"] = field(default_factory=dict)
    drop: list[str] = field(default_factory=list)


@register_step_options("export")
@dataclass(frozen=True)
class ExportOptions:
    opset: int = 17
    tolerance: float = 1e-3


@register_step_options("bench")
@dataclass(frozen=True)
class BenchOptions:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 64])
    warmup: int = 5
    repeats: int = 20
    torch_eager: bool = True


@dataclass(frozen=True)
class Step:
    name: str
    options: Any


@dataclass(frozen=True)
class Recipe:
    """A whole compression chain; see the module docstring for the YAML form."""

    name: str
    model: ModelSection
    data: DataSection
    analysis: AnalysisSection
    steps: tuple[Step, ...]
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


_TOP = ["name", "model", "data", "analysis", "steps"]


def _parse_steps(steps: Any) -> tuple[Step, ...]:
    if steps is None:
        return ()
    if not isinstance(steps, list):
        raise UserError(f"recipe.steps: expected a list of one-key mappings like '- trim: {{tap: plateau}}', got {steps!r}")
    out = []
    for i, item in enumerate(steps):
        where = f"recipe.steps[{i}]"
        if isinstance(item, str):
            item = {item: {}}
        if not isinstance(item, dict) or len(item) != 1:
            raise UserError(f"{where}: expected a one-key mapping like '- finetune: {{epochs: 3}}', got {item!r}")
        (name, opts), = item.items()
        if name not in STEP_OPTIONS:
            raise UserError(str(unknown_name(f"step in {where}", str(name), STEP_OPTIONS)))
        out.append(Step(name, from_dict(STEP_OPTIONS[name], opts, f"{where}.{name}")))
    return tuple(out)


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate a recipe mapping (already parsed from YAML)."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: a recipe is a YAML mapping with keys {', '.join(_TOP)}")
    for key in data:
        if key not in _TOP:
            raise UserError(str(unknown_name("key in recipe", str(key), _TOP)))
    name = data.get("name", Path(source).stem)
    if not isinstance(name, str):
        raise UserError(f"recipe.name: expected str, got {name!r}")
    recipe = Recipe(name=name, model=from_dict(ModelSection, data.get("model"), "recipe.model"),
                    data=from_dict(DataSection, data.get("data"), "recipe.data"),
                    analysis=from_dict(AnalysisSection, data.get("analysis"), "recipe.analysis"),
                    steps=_parse_steps(data.get("steps")), raw=data)
    if not 0 < recipe.analysis.threshold < 1:
        raise UserError(f"recipe.analysis.threshold: {recipe.analysis.threshold} is outside (0, 1)")
    if recipe.model.checkpoint is None and recipe.model.train is None and not recipe.model.pretrained:
        raise UserError("recipe.model: give a checkpoint, a train section, or pretrained: true")
    _check_taps(recipe)
    return recipe


def _check_taps(recipe: Recipe) -> None:
    """Refuse taps and layers the model does not have, on a weightless ('meta') copy of the model."""
    import torch

    from compress.models import create_model

    num_classes = recipe.data.num_labels or 10
    with torch.device("meta"):
        model = create_model(recipe.model.name, num_classes=num_classes, img_size=recipe.data.image_size or 32,
                             **recipe.model.options)
    modules = [n for n, _ in model.named_modules() if n]
    names = list(recipe.analysis.taps or [])
    for step in recipe.steps:
        for attr in ("tap", "layer"):
            value = getattr(step.options, attr, None)
            if value is not None and value not in ("plateau", "last"):
                names.append(value)
        keep = getattr(step.options, "keep", None)
        names += list(keep) if isinstance(keep, dict) else []
        names += list(getattr(step.options, "drop", []))
    import fnmatch

    for n in names:
        hits = fnmatch.filter(modules, n) if any(ch in n for ch in "*?[") else [n] if n in modules else []
        if not hits:
            raise UserError(str(unknown_name(f"tap or layer of {recipe.model.name}", n, modules)))
    _check_dilute_targets(recipe, model)


def _check_dilute_targets(recipe: Recipe, model) -> None:
    """Refuse a dilution count larger than the layer it would dilute (the widest candidate
    layer when the tap is ``plateau``, which is known only after the analysis)."""
    import torch

    from compress.compression.dilute import find_tap_conv
    from compress.models import resolve_taps

    for i, step in enumerate(recipe.steps):
        opts = step.options
        if step.name != "dilute" or not isinstance(opts.target, int):
            continue
        if opts.layer is not None:
            layers = [opts.layer]
        elif opts.tap not in ("plateau", "last"):
            layers = [find_tap_conv(model, opts.tap)]
        else:
            taps = resolve_taps(model, recipe.analysis.taps, (3, *(2 * [recipe.data.image_size or 32])))
            layers = [find_tap_conv(model, t) for t in (taps[-1:] if opts.tap == "last" else taps)]
        widths = {name: getattr(model.get_submodule(name), "out_channels", 0) for name in layers}
        if not isinstance(model.get_submodule(layers[0]), torch.nn.Conv2d):
            raise UserError(f"recipe.steps[{i}].dilute.layer {layers[0]!r} is a "
                            f"{type(model.get_submodule(layers[0])).__name__}, not a Conv2d")
        widest = max(widths, key=widths.get)
        if opts.target > widths[widest]:
            which = f"layer {widest}" if len(layers) == 1 else f"the widest layer a plateau tap can have ({widest})"
            raise UserError(f"recipe.steps[{i}].dilute.target {opts.target} is larger than {which} with "
                            f"{widths[widest]} filters; choose 1..{widths[widest]}, a fraction in (0, 1) or 'auto'")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML; list items by index: ``steps.0.trim.tap=...``)."""
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key.path=value")
        path, text = item.split("=", 1)
        value = yaml.safe_load(text)
        keys = path.split(".")
        node: Any = data
        for key in keys[:-1]:
            if isinstance(node, list):
                node = node[_index(key, node, path)]
            else:
                if not isinstance(node.get(key), (dict, list)):
                    node[key] = {}
                node = node[key]
        last = keys[-1]
        if isinstance(node, list):
            node[_index(last, node, path)] = value
        else:
            node[last] = value
    return data


def _index(key: str, node: list, path: str) -> int:
    try:
        i = int(key)
        node[i]
        return i
    except (ValueError, IndexError):
        raise UserError(f"--set {path}: {key!r} is not an index of a list of {len(node)} items") from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe with the safe loader, apply ``--set`` overrides and validate it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"recipe {str(path)!r} is not valid YAML: {str(e).splitlines()[0]}; a recipe is plain "
                        f"YAML (mappings, lists, numbers, strings), no !!python tags") from None
    return parse_recipe(apply_overrides(data or {}, overrides or []), str(path))
