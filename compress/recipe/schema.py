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

Instead of ``steps``, a recipe can state a ``target`` (the options of ``compress optimize``:
``{speedup | latency_ms | flops_ratio, max_drop, batch_size, backend, ...}``): the toolkit then
builds, times and chooses the model itself (:func:`compress.optimize.search.optimize`).

The sections are the library's own configuration classes (:class:`~compress.models.ModelConfig`
with a ``train`` :class:`~compress.training.TrainConfig`, :class:`~compress.data.DataConfig`,
:class:`~compress.analysis.AnalysisConfig`) and each step is its registered class
(:mod:`compress.recipe.steps`). Unknown keys, wrong types, unknown steps and taps or layers the
model does not have are refused with a :class:`~compress.errors.UserError` that names the key path.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress import yamlsafe
from compress.analysis import AnalysisConfig
from compress.config import from_dict, to_dict
from compress.data import DataConfig
from compress.errors import UserError, clip, shorten, unknown_name
from compress.models import ModelConfig, create_model
from compress.optimize.config import OptimizeConfig
from compress.recipe import steps as builtin_steps
from compress.recipe.step import CheckContext, Step, get_step, list_steps
from compress.training import TrainConfig

__all__ = ["Recipe", "RecipeModel", "load_recipe", "parse_recipe", "apply_overrides", "check_name"]

MAX_NAME = 100  # characters of a recipe name (it becomes a folder name)


@dataclass(frozen=True)
class RecipeModel(ModelConfig):
    """The model of a recipe: a :class:`~compress.models.ModelConfig` and how to train it.

    ``checkpoint`` alone: analyse those weights. ``checkpoint`` or ``pretrained`` with ``train``:
    transfer learning (``checkpoint_skip`` leaves e.g. the 1,000-label classifier out of the load).
    ``train`` alone: train from scratch.

    Attributes:
        train: training settings (phase 1), when the recipe trains the model.
    """

    train: TrainConfig | None = None

    def config(self) -> ModelConfig:
        """The model's configuration without the training settings."""
        return ModelConfig(self.name, dict(self.options), self.checkpoint, list(self.checkpoint_skip), self.pretrained)


@dataclass(frozen=True)
class Recipe:
    """A whole compression chain; see the module docstring for the YAML form."""

    name: str
    model: RecipeModel
    data: DataConfig
    analysis: AnalysisConfig
    steps: tuple[Step, ...]
    target: OptimizeConfig | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe (every default filled in) as plain YAML values."""
        doc = {"name": self.name, "model": to_dict(self.model), "data": to_dict(self.data),
               "analysis": to_dict(self.analysis), "steps": [{s.name: to_dict(s)} for s in self.steps]}
        if self.target is not None:
            doc["target"] = to_dict(self.target)
        return doc


_TOP = ["name", "model", "data", "analysis", "steps", "target"]


def _parse_steps(steps: Any) -> tuple[Step, ...]:
    if steps is None:
        return ()
    if not isinstance(steps, list):
        raise UserError(f"recipe.steps: expected a list of one-key mappings like '- trim: {{tap: plateau}}', got "
                        f"{shorten(steps)}")
    builtin_steps.load_plugins()
    out = []
    for i, item in enumerate(steps):
        where = f"recipe.steps[{i}]"
        if isinstance(item, str):
            item = {item: {}}
        if not isinstance(item, dict) or len(item) != 1:
            raise UserError(f"{where}: expected a one-key mapping like '- finetune: {{epochs: 3}}', got "
                            f"{shorten(item)}")
        (name, opts), = item.items()
        cls = get_step(str(name))
        if cls is None:
            raise unknown_name(f"step in {where}", str(name), list_steps())
        out.append(from_dict(cls, opts, f"{where}.{name}"))
    return tuple(out)


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate a recipe mapping (already parsed from YAML) and check it against a weightless
    copy of its model: every tap and layer a step names must exist."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: a recipe is a YAML mapping with keys {', '.join(_TOP)}, got {shorten(data)}")
    for key in data:
        if key not in _TOP:
            raise unknown_name("key in recipe", str(key), _TOP)
    name = check_name(data["name"]) if "name" in data else check_name(Path(source).stem, " (from the file name)")
    recipe = Recipe(name=name, model=from_dict(RecipeModel, data.get("model"), "recipe.model"),
                    data=from_dict(DataConfig, data.get("data"), "recipe.data"),
                    analysis=from_dict(AnalysisConfig, data.get("analysis"), "recipe.analysis"),
                    steps=_parse_steps(data.get("steps")), target=_parse_target(data), raw=data)
    if recipe.model.checkpoint is None and recipe.model.train is None and not recipe.model.pretrained:
        raise UserError("recipe.model: give a checkpoint, a train section, or pretrained: true")
    if recipe.model.train is not None and recipe.model.train.distill is not None:
        raise UserError("recipe.model.train.distill: training the model has no teacher; distil in its fine-tuning "
                        "(a finetune step's distill, or afcc.finetune.distill), where the original model teaches")
    _check_order(recipe)
    _check_steps(recipe)
    return recipe


def _parse_target(data: dict[str, Any]) -> OptimizeConfig | None:
    """The recipe's ``target`` (a latency budget the toolkit meets itself), or None."""
    if data.get("target") is None:
        return None
    if data.get("steps"):
        raise UserError("recipe.target and recipe.steps: a recipe either lists its steps or states a target "
                        "(the toolkit then chooses the steps itself); remove one of them")
    if not isinstance(data["target"], dict):
        raise UserError(f"recipe.target: expected a mapping like {{speedup: 2, max_drop: 1}}, got "
                        f"{shorten(data['target'])}")
    try:
        return from_dict(OptimizeConfig, data["target"], "recipe.target")
    except UserError as e:
        msg = str(e)
        raise UserError(msg if msg.startswith("recipe.target") else f"recipe.target: {msg}") from None


def check_name(name: Any, origin: str = "") -> str:
    """A recipe name, which names the run folder ``runs/<name>``: a non-empty printable string of at
    most :data:`MAX_NAME` characters without path separators, not ``.`` or ``..``, so it can never
    place the run outside the runs folder.

    Raises:
        UserError: naming ``recipe.name`` and the value.
    """
    why = None
    if not isinstance(name, str):
        why = "expected a string"
    elif not name.strip():
        why = "is empty"
    elif len(name) > MAX_NAME:
        why = f"is longer than {MAX_NAME} characters"
    elif not name.isprintable():
        why = "contains control characters"
    elif any(sep in name for sep in ("/", "\\", ":")) or name in (".", "..") or name.startswith("-"):
        why = "would not be a plain folder name under runs/ (no /, \\, :, a leading -, '.' or '..')"
    if why:
        raise UserError(f"recipe.name {shorten(name)}{origin}: {why}; the name becomes the run folder runs/<name>: "
                        f"use letters, digits, '-', '_' and '.', e.g. digits-demo")
    return name


def _check_order(recipe: Recipe) -> None:
    """Export and bench measure the model as it stands: a step that changes it afterwards would
    leave them describing a model that is not the final one."""
    seen: str | None = None
    for i, step in enumerate(recipe.steps):
        if not step.changes_model:
            seen = seen or f"{step.name} (recipe.steps[{i}])"
        elif seen:
            raise UserError(f"recipe.steps[{i}].{step.name} changes the model after {seen}, which would then describe "
                            f"a model that is not the final one; move export and bench to the end")


def _check_steps(recipe: Recipe) -> None:
    """Refuse taps and layers the model does not have, on a weightless ('meta') copy of the model."""
    import torch

    size = recipe.data.image_size or 32
    num_classes = recipe.data.num_labels or (100 if recipe.data.name == "cifar100" else 10)
    with torch.device("meta"):  # the architecture alone: no weights are read or allocated
        model = create_model(recipe.model.name, num_classes=num_classes, img_size=size, **recipe.model.options)
    ctx = CheckContext(recipe, model, (3, size, size), -1, "recipe.analysis")
    if recipe.analysis.taps:
        ctx.require_modules("taps", recipe.analysis.taps)
    for i, step in enumerate(recipe.steps):
        ctx = CheckContext(recipe, model, (3, size, size), i, f"recipe.steps[{i}].{step.name}", recipe.steps[:i])
        step.check(ctx)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML; list items by index: ``steps.0.trim.tap=...``)."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {shorten(item)}: expected key.path=value, e.g. model.train.epochs=2")
        path, text = item.split("=", 1)
        value = yamlsafe.loads(text, f"--set {clip(path, 80)} value {shorten(text)}")
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
        raise UserError(f"--set {clip(path, 80)}: {shorten(key)} is not an index of a list of {len(node)} "
                        f"items") from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe with the strict safe loader (:mod:`compress.yamlsafe`), apply ``--set``
    overrides and validate it."""
    data = yamlsafe.load_file(path, "recipe")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return parse_recipe(data, str(path))  # refuses it, naming what a recipe is
    return parse_recipe(apply_overrides(data, overrides or []), str(path))
