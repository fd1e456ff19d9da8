"""The step registry: a step is one class; bad classes and bad options are refused at load, before
any model is built; a step defined anywhere (here, in a test module) runs in `compress run`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from compress.cli import main
from compress.errors import UserError
from compress.recipe import Step, list_steps, parse_recipe, register_step
from compress.recipe.docs import steps_markdown

README = Path(__file__).resolve().parents[1] / "README.md"

BASE = {"model": {"name": "vgg6", "options": {"width": 0.125, "fc_hidden": []}, "train": {"epochs": 1}},
        "data": {"name": "digits"}}


def test_a_step_without_run_is_refused_naming_it():
    with pytest.raises(TypeError, match=r"step 'lazy' .*Lazy.* defines no run"):
        @register_step("lazy")
        @dataclass(frozen=True)
        class Lazy(Step):
            tap: str = "plateau"

    assert "lazy" not in list_steps()


def test_a_step_must_be_a_frozen_dataclass_and_unique():
    with pytest.raises(TypeError, match="frozen dataclass"):
        @register_step("loose")
        @dataclass
        class Loose(Step):
            def run(self, state, folder):
                return {}

    with pytest.raises(ValueError, match="'trim' is already registered"):
        @register_step("trim")
        @dataclass(frozen=True)
        class Trim2(Step):
            def run(self, state, folder):
                return {}


def test_an_unknown_option_is_refused_before_any_model_is_built(monkeypatch):
    built = []
    import compress.recipe.schema as schema

    monkeypatch.setattr(schema, "create_model", lambda *a, **k: built.append(a) or pytest.fail("model built"))
    with pytest.raises(UserError) as e:
        parse_recipe({**BASE, "steps": [{"trim": {}}, {"dilute": {"targte": 0.5}}]})
    assert "recipe.steps[1].dilute" in str(e.value) and "'targte'" in str(e.value)
    assert "did you mean 'target'" in str(e.value) and not built


def test_the_resolved_recipe_fills_every_default():
    r = parse_recipe({**BASE, "steps": [{"finetune": {"epochs": 2}}, "export"]})
    doc = r.to_dict()
    assert doc["steps"][0]["finetune"]["epochs"] == 2 and doc["steps"][0]["finetune"]["schedule"] == "cosine"
    assert doc["steps"][1] == {"export": {"opset": 17, "tolerance": 0.001}}
    assert doc["analysis"]["seed"] == 0 and doc["model"]["checkpoint_skip"] == []


def test_a_model_changing_step_after_export_is_refused():
    with pytest.raises(UserError, match=r"recipe.steps\[1\].finetune changes the model after export"):
        parse_recipe({**BASE, "steps": ["export", {"finetune": {"epochs": 1}}]})


def test_bench_refuses_a_model_the_run_does_not_make():
    with pytest.raises(UserError, match=r"recipe.steps\[1\].bench.models 'dilute' is not a model of this run"):
        parse_recipe({**BASE, "steps": [{"trim": {}}, {"bench": {"models": ["original", "dilute"]}}]})
    r = parse_recipe({**BASE, "steps": [{"trim": {}}, {"bench": {"models": ["original", "trim", "01-trim", "final"]}}]})
    assert r.steps[1].models == ["original", "trim", "01-trim", "final"]


@register_step("toy-halve-head")
@dataclass(frozen=True)
class ToyHalveHead(Step):
    """Multiply the output layer's weights by ``factor`` (a toy step defined in a test module).

    Attributes:
        factor: the multiplier.
    """

    factor: float = 0.5

    def run(self, state, folder):
        head = state.model.head.out
        before = float(head.weight.detach().abs().sum())
        with torch.no_grad():
            head.weight.mul_(self.factor)
        return {"weight_sum_before": before, "weight_sum_after": float(head.weight.detach().abs().sum())}


@register_step("toy-note")
@dataclass(frozen=True)
class ToyNote(Step):
    """Write a note into the step's folder; the model is unchanged.

    Attributes:
        text: what to write.
    """

    changes_model: ClassVar[bool] = False
    text: str = "hello"

    def run(self, state, folder):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "note.txt").write_text(self.text)
        return {"wrote": str(folder / "note.txt")}


def test_a_step_defined_in_a_test_module_runs_in_compress_run(tmp_path):
    recipe = tmp_path / "toy.yaml"
    recipe.write_text("""
name: toy
model: {name: vgg6, options: {width: 0.125, fc_hidden: []}, train: {epochs: 1, lr: 0.02, momentum: 0.9}}
data: {name: digits, limit_train: 120, limit_test: 60}
analysis: {probe_epochs: 1, taps: [features.pool3]}
steps:
  - toy-halve-head: {factor: 0.25}
  - toy-note: {text: done}
""")
    assert main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [s["step"] for s in summary["steps"]] == ["original", "toy-halve-head", "toy-note"]
    info = summary["steps"][1]["info"]
    assert info["weight_sum_after"] == pytest.approx(0.25 * info["weight_sum_before"], rel=1e-5)
    assert (tmp_path / "out" / "steps" / "01-toy-halve-head" / "model.pt").is_file()  # it changes the model
    assert not (tmp_path / "out" / "steps" / "02-toy-note" / "model.pt").exists()  # it does not
    assert (tmp_path / "out" / "steps" / "02-toy-note" / "note.txt").read_text() == "done"
    assert summary["steps"][1]["options"] == {"factor": 0.25}


def test_the_readme_lists_every_step_with_its_options():
    text = README.read_text()
    begin, end = "<!-- steps:begin (generated by `compress steps`; tests/test_steps.py checks it) -->", "<!-- steps:end -->"
    assert begin in text and end in text, "README.md lacks the generated step reference"
    section = text.split(begin, 1)[1].split(end, 1)[0].strip()
    assert section == steps_markdown(builtin_only=True).strip(), "README's step reference is out of date: paste the output of `compress steps`"
