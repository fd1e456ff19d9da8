"""Recipes are validated before any model is built; the shipped ones load and validate."""

from pathlib import Path

import pytest
import yaml

from compress.errors import UserError
from compress.recipe.schema import apply_overrides, load_recipe, parse_recipe
from compress.recipe.steps.dilute import Dilute as DiluteOptions

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
BASE = {"name": "t", "model": {"name": "vgg6", "options": {"width": 0.125}, "train": {"epochs": 1}},
        "data": {"name": "digits"}, "steps": [{"trim": {"tap": "plateau"}}, {"finetune": {"epochs": 1}}]}


def test_valid_recipe_parses():
    r = parse_recipe(BASE)
    assert [s.name for s in r.steps] == ["trim", "finetune"]
    assert r.steps[1].epochs == 1 and r.model.train.epochs == 1


@pytest.mark.parametrize("change,message", [
    ({"modle": {}}, "unknown key in recipe 'modle' (did you mean 'model'?)"),
    ({"model": {"name": "vgg6", "train": {"epochs": 1}, "widht": 1}}, "unknown key in recipe.model 'widht'"),
    ({"model": {"name": "vgg6", "train": {"epochs": "ten"}}}, "recipe.model.train.epochs: expected int, got 'ten'"),
    ({"steps": [{"prnue": {}}]}, "unknown step in recipe.steps[0] 'prnue'"),
    ({"steps": [{"trim": {"tap": "features.pool9"}}]}, "unknown tap or layer of vgg6 'features.pool9'"),
    ({"steps": [{"dilute": {"target": 1.5}}]}, "must be a count, a fraction in (0, 1) or 'auto'"),
    ({"steps": [{"dilute": {"target": "half"}}]}, "recipe.steps[0].dilute.target: expected int or float or one of 'auto'"),
    ({"analysis": {"threshold": 2.0}}, "threshold: 2.0 is outside (0, 1)"),
    ({"model": {"name": "vgg17", "train": {}}}, "unknown model 'vgg17'"),
    ({"model": {"name": "vgg6"}}, "give a checkpoint, a train section, or pretrained: true"),
])
def test_bad_recipes_are_refused(change, message):
    with pytest.raises(UserError) as e:
        parse_recipe({**BASE, **change})
    assert message in str(e.value)


def test_overrides():
    data = apply_overrides(BASE, ["model.train.epochs=3", "steps.0.trim.tap=last", "analysis.probe_epochs=7"])
    r = parse_recipe(data)
    assert r.model.train.epochs == 3 and r.steps[0].tap == "last" and r.analysis.probe_epochs == 7
    assert BASE["model"]["train"]["epochs"] == 1  # the original is untouched
    with pytest.raises(UserError, match="not an index"):
        apply_overrides(BASE, ["steps.5.trim.tap=last"])


def test_recipe_files_load_with_safe_yaml(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(path)


def test_dilute_fraction_target():
    assert DiluteOptions(target=0.7).target == 0.7


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert recipe.steps
    assert yaml.safe_load(path.read_text())["name"] == recipe.name


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_start_on_cpu(path, capsys):
    from compress.cli import main

    assert main(["run", str(path), "--dry-run"]) == 0
    assert "is valid" in capsys.readouterr().out


def test_dilute_round_to_must_be_positive():
    with pytest.raises(UserError, match="round_to"):
        DiluteOptions(round_to=0)
    assert DiluteOptions(round_to=8).round_to == 8
