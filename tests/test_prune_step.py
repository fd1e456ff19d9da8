"""The ``prune`` step and the registry of importance criteria: every criterion reaches its budget,
the result reloads, and bad options are refused when the recipe is loaded."""

from __future__ import annotations

import copy
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from compress.analysis import AnalysisConfig, analyze_model
from compress.compression import importance
from compress.compression.importance import list_criteria, make_criterion, needs_gradients, register_criterion
from compress.compression.serialize import load_model, save_model
from compress.data import load_data
from compress.errors import UserError
from compress.models import create_model
from compress.models.introspect import count_flops, count_params
from compress.recipe import parse_recipe
from compress.recipe.state import RunState
from compress.recipe.steps.prune import Prune

OPTS = {"width": 0.125, "fc_hidden": []}
SIZE = (3, 32, 32)
TAPS = ["features.pool2", "features.pool3"]


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return create_model("vgg6", num_classes=10, **OPTS).eval()


@pytest.fixture(scope="module")
def bundle():
    return load_data("digits", limit_train=200, limit_test=100)


@pytest.fixture(scope="module")
def analysis(bundle):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return analyze_model(tiny(), bundle, TAPS, AnalysisConfig(probe_epochs=1), progress=False)


def make_state(bundle, analysis, folder) -> RunState:
    recipe = SimpleNamespace(analysis=AnalysisConfig(probe_epochs=1))
    meta = {"model": "vgg6", "options": OPTS, "num_classes": 10, "input_size": list(SIZE)}
    return RunState(recipe, tiny(), bundle, meta, copy.deepcopy(analysis), folder, progress=False)


def assert_reloads(state: RunState, folder) -> None:
    save_model(state.model, folder / "model.pt", state.meta)
    loaded, _ = load_model(folder / "model.pt")  # weights_only=True, the pruning replayed
    x = torch.randn(3, *SIZE)
    state.model.eval()
    with torch.inference_mode():
        assert torch.equal(loaded.eval()(x), state.model(x))


@pytest.mark.parametrize("criterion", ["l1", "l2", "taylor", "bn-scale", "random", "coverage"])
def test_each_criterion_reaches_the_flops_target_and_reloads(tmp_path, bundle, analysis, criterion):
    state = make_state(bundle, analysis, tmp_path)
    start = count_flops(state.model, SIZE)
    info = Prune(criterion=criterion, target=0.5, gradient_batches=2).run(state, tmp_path)
    assert abs(count_flops(state.model, SIZE) / start - 0.5) <= 0.02 * 0.5
    assert info["flops"] == count_flops(state.model, SIZE) and info["flops_before"] == start
    assert abs(info["achieved"] - 0.5) <= 0.01 and 0 < info["ratio"] < 1
    assert info["criterion"] == criterion and info["metric"] == "flops" and 0 <= info["accuracy_before_finetune"] <= 1
    assert state.model.head.out.out_features == 10 and info["ignored"] == ["head.out"]
    assert info["widths"]["features.conv1"] < info["widths_before"]["features.conv1"]
    assert state.stale == set(TAPS)
    assert all(p.grad is None for p in state.model.parameters())
    assert_reloads(state, tmp_path)


def test_coverage_reanalyses_stale_taps(tmp_path, bundle, analysis):
    state = make_state(bundle, analysis, tmp_path)
    first = Prune(criterion="l1", target=0.8, metric="channels").run(state, tmp_path)
    assert state.stale == set(TAPS)
    info = Prune(criterion="coverage", target=0.5).run(state, tmp_path / "second")
    assert abs(info["achieved"] - 0.5) <= 0.01
    # the coverage statistics describe the pruned layers: the taps were analysed again first
    assert [state.analysis.tap(t).n_filters for t in TAPS] == [first["widths"][c] for c in ("features.conv2",
                                                                                            "features.conv3")]
    assert info["flops"] < first["flops"] and state.stale == set(TAPS)  # stale again: the pruning changed them
    assert_reloads(state, tmp_path)


def test_params_metric(tmp_path, bundle, analysis):
    state = make_state(bundle, analysis, tmp_path)
    start = count_params(state.model)
    info = Prune(criterion="l1", target=0.4, metric="params", round_to=None).run(state, tmp_path)
    assert abs(count_params(state.model) / start - 0.4) <= 0.02 * 0.4
    assert info["params"] == count_params(state.model) and info["metric"] == "params"
    assert_reloads(state, tmp_path)


def test_channels_metric_prunes_every_layer_but_the_ignored(tmp_path, bundle, analysis):
    state = make_state(bundle, analysis, tmp_path)
    info = Prune(criterion="l1", target=0.5, metric="channels", ignored=["features.conv[12]"]).run(state, tmp_path)
    before, after = info["widths_before"], info["widths"]
    assert info["ignored"] == ["head.out", "features.conv1", "features.conv2"]
    assert [after[n] for n in ("features.conv1", "features.conv2", "head.out")] == [8, 16, 10]
    for n in ("features.conv3", "features.conv4", "features.conv5"):
        assert abs(after[n] - before[n] / 2) <= 1
    assert abs(info["achieved"] - 0.5) <= 0.05
    assert_reloads(state, tmp_path)


def test_global_allocation(tmp_path, bundle, analysis):
    state = make_state(bundle, analysis, tmp_path)
    start = count_flops(state.model, SIZE)
    Prune(criterion="l2", target=0.5, allocation="global").run(state, tmp_path)
    assert abs(count_flops(state.model, SIZE) / start - 0.5) <= 0.02 * 0.5
    assert_reloads(state, tmp_path)


# ------------------------------------------------------------------------------- recipe loading


def recipe(step: dict, before: list | None = None) -> dict:
    return {"name": "t", "model": {"name": "vgg6", "options": OPTS, "train": {"epochs": 1}},
            "data": {"name": "digits"}, "steps": [*(before or []), {"prune": step}]}


def test_recipe_with_a_prune_step_parses():
    r = parse_recipe(recipe({"criterion": "taylor", "target": 0.3, "metric": "params", "ignored": ["features.conv1"],
                             "round_to": 8, "allocation": "global"}))
    (step,) = r.steps
    assert isinstance(step, Prune) and step.criterion == "taylor" and step.target == 0.3 and step.round_to == 8
    assert r.to_dict()["steps"][0]["prune"]["ignored"] == ["features.conv1"]
    assert parse_recipe(recipe({})).steps[0] == Prune()


@pytest.mark.parametrize("step,match", [
    ({"criterion": "l7"}, r"recipe\.steps\[0\]\.prune\.criterion.*'l7'.*bn-scale, .*coverage, .*l1, "),
    ({"target": 1.5}, r"recipe\.steps\[0\]\.prune\.target: 1\.5.*\(0, 1\)"),
    ({"target": 0}, r"recipe\.steps\[0\]\.prune\.target"),
    ({"target": -0.2}, r"recipe\.steps\[0\]\.prune\.target"),
    ({"ignored": ["features.nope"]}, r"recipe\.steps\[0\]\.prune\.ignored.*features\.nope"),
    ({"metric": "latency"}, r"recipe\.steps\[0\]\.prune\.metric"),
    ({"round_to": 0}, r"recipe\.steps\[0\]\.prune\.round_to"),
    ({"criterion": "coverage", "allocation": "global"}, r"recipe\.steps\[0\]\.prune\.allocation"),
    ({"criterion": "l1", "min_coverage": 2}, r"recipe\.steps\[0\]\.prune\.min_coverage"),
])
def test_bad_options_are_refused_at_load(step, match):
    with pytest.raises(UserError, match=match):
        parse_recipe(recipe(step))


def test_prune_after_afcc_is_refused():
    with pytest.raises(UserError, match=r"recipe\.steps\[1\]\.prune.*afcc"):
        parse_recipe(recipe({}, before=[{"afcc": {"sparse": False}}]))


# ------------------------------------------------------------------------------- criteria registry


def test_registry_refuses_a_duplicate_and_takes_a_new_criterion(monkeypatch, tmp_path, bundle, analysis):
    assert {"l1", "l2", "taylor", "bn-scale", "bn-scale-only", "random", "coverage"} <= set(list_criteria())
    with pytest.raises(ValueError, match="already registered"):
        register_criterion("l1")(lambda *, model=None, analysis=None: None)
    monkeypatch.setattr(importance, "_CRITERIA", dict(importance._CRITERIA))

    @register_criterion("l1-again")
    def _again(*, model=None, analysis=None):
        """L1 once more."""
        import torch_pruning as tp

        return tp.importance.GroupMagnitudeImportance(p=1)

    assert "l1-again" in list_criteria() and importance.get_criterion("l1-again").summary == "L1 once more."
    state = make_state(bundle, analysis, tmp_path)
    assert Prune(criterion="l1-again", target=0.5, metric="channels").run(state, tmp_path)["criterion"] == "l1-again"


def test_make_criterion_errors_and_gradients(analysis):
    with pytest.raises(UserError, match="needs the model's analysis"):
        make_criterion("coverage", tiny())
    with pytest.raises(UserError, match="unknown pruning criterion 'l7'"):
        make_criterion("l7")
    with pytest.raises(UserError, match="option of pruning criterion 'l1'"):
        make_criterion("l1", p=3)
    cov = make_criterion("coverage", tiny(), analysis, min_coverage=2)
    assert cov.min_coverage == 2 and set(cov.stats) == {"features.conv2", "features.conv3"}
    assert needs_gradients(make_criterion("taylor")) and not needs_gradients(cov)
    assert not needs_gradients(make_criterion("bn-scale")) and not needs_gradients(make_criterion("random"))
