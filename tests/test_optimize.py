"""``compress optimize`` on the digits with a tiny VGG: a small budget is met (the chosen model meets
it on validation, the candidate table and the plot are written, a rerun reuses the candidates),
a budget no candidate can meet ends with one ``error:`` line naming the best candidate, and bad
flags are refused before anything is written."""

from __future__ import annotations

import json
import math

import pytest

from compress.cli import main
from compress.optimize.config import OptimizeConfig
from compress.optimize.report import pareto

DATA = ["--limit-train", "500", "--limit-test", "200"]
FAST = [*DATA, "--probe-epochs", "5", "--warmup", "2", "--repeats", "10", "--calibration-images", "50",
        "--no-analysis-report", "--quiet"]
SEARCH = ["--prune-ratios", "0.5", "--estimate-epochs", "1", "--max-estimates", "2", "--finetune-epochs", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    argv = ["train", "--model", "vgg6", "--width", "0.125", "--fc-hidden", "none", *DATA, "--epochs", "4",
            "--lr", "0.03", "--momentum", "0.9", "--weight-decay", "5e-4", "--out", str(folder), "--quiet"]
    assert main(argv) == 0
    return folder / "model.pt"


@pytest.fixture(scope="module")
def optimized(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("opt") / "run"
    argv = ["optimize", str(trained), "--speedup", "1.2", "--max-drop", "10", *SEARCH, *FAST, "--out", str(out)]
    assert main(argv) == 0
    return argv, out


def test_a_small_budget_is_met_on_validation(optimized, capsys):
    _, out = optimized
    for name in ("config.yaml", "candidates.json", "candidates.md", "candidates.html", "figures/candidates.png",
                 "model.pt", "model.onnx", "result.json", "timing.json", "analysis/analysis.json"):
        assert (out / name).is_file(), name
    doc = json.loads((out / "candidates.json").read_text())
    rows = doc["candidates"]
    kinds = {r["kind"] for r in rows}
    assert {"original", "cut", "prune", "cut+prune", "afcc"} <= kinds
    assert {r["precision"] for r in rows} == {"fp32", "int8"}
    assert sum(r["kind"] == "cut" and r["precision"] == "fp32" for r in rows) == 5  # a cut at every tap of VGG-6
    chosen = [r for r in rows if r["chosen"]]
    assert len(chosen) == 1 and doc["chosen"] == chosen[0]["name"]
    c, base = chosen[0], doc["original"]
    assert c["speedup"] >= 1.2 and c["latency_ms"] <= base["latency_ms"] / 1.2
    assert c["val_accuracy"] >= base["val_accuracy"] - 0.10
    final = doc["final"]
    assert final["meets_budget"] and final["val_accuracy"] >= base["val_accuracy"] - 0.10
    assert 0 <= final["test_accuracy"] <= 1 and 0 <= base["test_accuracy"] <= 1
    assert (out / "model.int8.onnx").is_file() == (c["precision"] == "int8")
    faster = [r for r in rows if r["latency_ms"] is not None and r["latency_ms"] < c["latency_ms"]]
    assert all(not (r["fast_enough"] and r["accurate_enough"]) for r in faster)  # nothing faster met the budget
    assert all(r["status"] for r in rows)  # every candidate says why it was not chosen
    md = (out / "candidates.md").read_text()
    assert "chosen or why not" in md and c["name"] in md


def test_pruned_candidates_keep_widths_in_multiples_of_round_to(optimized):
    """onnxruntime's fast x86 convolutions want multiples of 8: the default round_to keeps them."""
    import torch.nn as nn

    from compress.compression.serialize import load_model

    _, out = optimized
    folders = sorted((out / "candidates").glob("*prune-coverage-0.5-r8"))
    assert len(folders) == 2  # of the original and of the cut at the plateau
    for folder in folders:
        model = load_model(folder / "model.pt")[0]
        widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert widths and all(w % 8 == 0 for w in widths), (folder.name, widths)


def test_a_rerun_reuses_the_candidates(optimized, capsys):
    argv, out = optimized
    built = {p: p.stat().st_mtime_ns for p in (out / "candidates").glob("*/built.json")}
    timing = (out / "timing.json").read_bytes()
    chosen = json.loads((out / "candidates.json").read_text())["chosen"]
    capsys.readouterr()
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in built} == built and (out / "timing.json").read_bytes() == timing
    assert json.loads((out / "candidates.json").read_text())["chosen"] == chosen
    assert "test accuracy (reported once)" in capsys.readouterr().out


def test_other_settings_in_the_same_folder_are_refused(optimized, capsys):
    argv, out = optimized
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    changed = [("3" if a == "10" and argv[i - 1] == "--max-drop" else a) for i, a in enumerate(argv)]
    capsys.readouterr()
    assert main(changed) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "optimize.max_drop" in err, err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_an_impossible_budget_names_the_best_candidate(trained, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["optimize", str(trained), "--speedup", "1000", "--no-prune", "--no-afcc", "--no-int8",
            "--max-estimates", "0", "--taps", "features.pool1", "features.pool5", *FAST, "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: no candidate meets the budget"), err
    doc = json.loads((out / "candidates.json").read_text())
    assert doc["chosen"] is None and "the best found" in err
    best = err.split("the best found")[1]
    names = [r["name"] for r in doc["candidates"]]
    assert any(f" is {n}: " in best for n in names), best
    assert "x speed-up" in best and "validation accuracy" in best
    assert (out / "candidates.md").is_file() and (out / "figures" / "candidates.png").is_file()
    assert not (out / "model.pt").exists()


def test_a_short_fine_tune_estimates_pruned_candidates(trained, tmp_path, capsys):
    """Under a FLOPs budget only the pruned candidates are fast enough; below the accuracy budget
    before fine-tuning, one of them gets a short fine-tune (distilled), and no more than
    --max-estimates do."""
    out = tmp_path / "run"
    argv = ["optimize", str(trained), "--flops-ratio", "0.6", "--max-drop", "0", "--taps", "features.pool5",
            "--prune-ratios", "0.5", "--no-afcc", "--no-int8", "--estimate-epochs", "1", "--max-estimates", "1",
            "--finetune-epochs", "1", *FAST, "--out", str(out)]
    code = main(argv)
    assert code in (0, 2), capsys.readouterr().err
    doc = json.loads((out / "candidates.json").read_text())
    fast = [r for r in doc["candidates"] if r["fast_enough"]]
    assert fast and all(r["kind"] in ("prune", "cut+prune") for r in fast)
    estimated = [r for r in fast if r["estimated"]]
    assert len(estimated) == 1 and "short fine-tune (1 epochs, distilled)" in estimated[0]["accuracy_source"]
    assert (out / estimated[0]["folder"] / "estimate" / "model.pt").is_file()
    if code == 2:  # the estimate missed the budget: the other is left with the reason
        assert any("max_estimates" in r["status"] for r in fast if not r["estimated"])
    else:
        assert doc["chosen"] == estimated[0]["name"]


def _bad(trained, tmp):
    return {
        "zero speed-up": (["--speedup", "0"], ["--speedup 0.0", "(0, 1e+06]"]),
        "negative speed-up": (["--speedup", "-2"], ["--speedup -2.0"]),
        "NaN speed-up": (["--speedup", "nan"], ["--speedup nan", "finite"]),
        "infinite latency": (["--latency-ms", "inf"], ["--latency-ms inf", "finite"]),
        "FLOPs ratio above 1": (["--flops-ratio", "1.5"], ["--flops-ratio 1.5", "(0, 1]"]),
        "two budgets": (["--speedup", "2", "--latency-ms", "1"], ["exactly one budget", "--speedup, --latency-ms"]),
        "no budget": ([], ["exactly one budget"]),
        "negative max drop": (["--speedup", "2", "--max-drop", "-1"], ["--max-drop -1.0", "[0, 100]"]),
        "zero batch": (["--speedup", "2", "--batch-size", "0"], ["--batch-size 0", "from 1"]),
        "prune ratio 1": (["--speedup", "2", "--prune-ratios", "1"], ["--prune-ratios 1.0", "(0, 1)"]),
        "unknown criterion": (["--speedup", "2", "--criterion", "magic"], ["--criterion", "magic", "coverage"]),
        "unknown backend": (["--speedup", "2", "--backend", "tpu"], ["--backend", "invalid choice"]),
        "alpha above 1": (["--speedup", "2", "--alpha", "2"], ["--alpha 2.0", "[0, 1]"]),
        "zero repeats": (["--speedup", "2", "--repeats", "0"], ["--repeats 0", "from 1"]),
        "missing checkpoint": (["--speedup", "2", "CHECKPOINT", str(tmp / "missing.pt")],
                               ["checkpoint", "missing.pt", "does not exist"]),
        "damaged checkpoint": (["--speedup", "2", "CHECKPOINT", str(tmp / "damaged.pt")], ["damaged.pt"]),
    }


def test_bad_flags_are_refused_before_anything_is_written(trained, tmp_path, capsys):
    (tmp_path / "damaged.pt").write_bytes(b"PK\x03\x04 not a model")
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("model: an earlier run\n")
    for what, (flags, fragments) in _bad(trained, tmp_path).items():
        checkpoint = str(trained)
        if "CHECKPOINT" in flags:
            i = flags.index("CHECKPOINT")
            checkpoint, flags = flags[i + 1], flags[:i] + flags[i + 2:]
        assert main(["optimize", checkpoint, *flags, *DATA, "--out", str(out), "--quiet"]) == 2, what
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, (what, err)
        for fragment in fragments:
            assert fragment in err, (what, fragment, err)
        assert sorted(p.name for p in out.iterdir()) == ["config.yaml"], what
        assert (out / "config.yaml").read_text() == "model: an earlier run\n", what


def test_an_earlier_run_of_another_kind_is_not_overwritten(trained, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("model: {name: vgg6}\ntrain: {epochs: 1}\n")
    assert main(["optimize", str(trained), "--speedup", "2", *DATA, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "holds an earlier run" in err and "--no-resume" in err
    assert (out / "config.yaml").read_text() == "model: {name: vgg6}\ntrain: {epochs: 1}\n"


def test_the_budget_arithmetic():
    cfg = OptimizeConfig(speedup=2, max_drop=1)
    assert cfg.fast_enough(2.0, 1.0, 0.9) and not cfg.fast_enough(1.99, 1.0, 0.1)
    assert not cfg.fast_enough(None, None, None) and not cfg.fast_enough(math.nan, 1.0, 0.5)
    assert cfg.accurate_enough(0.90, 0.91) and not cfg.accurate_enough(0.8999, 0.91)
    assert not cfg.accurate_enough(None, 0.9)
    assert OptimizeConfig(latency_ms=0.5).fast_enough(None, 0.5, None)
    assert OptimizeConfig(flops_ratio=0.5).fast_enough(None, None, 0.5)
    assert "speed-up >= 2x at batch 1 on ort-cpu" in cfg.describe()
    assert pareto([(1.0, 0.5), (2.0, 0.4), (2.0, 0.9), (3.0, 0.8), (0.5, 0.1)]) == [(0.5, 0.1), (1.0, 0.5),
                                                                                    (2.0, 0.9)]


def test_a_recipe_target_trains_then_meets_the_budget(tmp_path, capsys):
    """``target:`` instead of ``steps:``: the recipe trains the model, then ``optimize`` chooses."""
    recipe = tmp_path / "target.yaml"
    recipe.write_text("""
name: target
model: {name: vgg6, options: {width: 0.125, fc_hidden: []}, train: {epochs: 2, lr: 0.03, momentum: 0.9}}
data: {name: digits, limit_train: 400, limit_test: 100}
analysis: {probe_epochs: 3}
target: {flops_ratio: 0.9, max_drop: 50, prune: false, int8: false, afcc: false, finetune_epochs: 0,
         warmup: 1, repeats: 3}
""")
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    doc = json.loads((out / "optimize" / "candidates.json").read_text())
    assert summary["optimize"]["chosen"] == doc["chosen"] and (out / "optimize" / "model.onnx").is_file()
    assert (out / "steps" / "00-original" / "model.pt").is_file() and (out / "train" / "model.pt").is_file()
    assert "chosen:" in capsys.readouterr().out


@pytest.mark.parametrize("target,match", [
    ({"speedup": 2, "latency_ms": 1}, "exactly one budget"),
    ({"speedup": -1}, "recipe.target"),
    ("fast", "expected a mapping"),
])
def test_a_bad_recipe_target_is_refused_naming_it(target, match):
    from compress.errors import UserError
    from compress.recipe import parse_recipe

    base = {"model": {"name": "vgg6", "options": {"width": 0.125}, "train": {"epochs": 1}}, "data": {"name": "digits"}}
    with pytest.raises(UserError, match=match):
        parse_recipe({**base, "target": target})
    with pytest.raises(UserError, match="either lists its steps or states a target"):
        parse_recipe({**base, "target": {"speedup": 2}, "steps": [{"finetune": {"epochs": 1}}]})


def test_estimates_go_from_the_slowest_fast_enough_candidate_towards_the_fastest(monkeypatch):
    """The short fine-tunes go first to the least compressed fast-enough candidate; once one meets
    the budget only faster ones are estimated, and the fastest within the budget is chosen."""
    from types import SimpleNamespace

    from compress.optimize import candidates as C
    from compress.optimize import search
    from compress.optimize.config import OptimizeConfig

    after = {"p10": 0.70, "p20": 0.95, "p30": 0.96, "p40": 0.97}  # validation accuracy after a short fine-tune
    variants = [C.Variant(C.Structure(n, "prune"), "fp32", latency_ms=ms, speedup=10 / ms, accuracy=0.1)
                for n, ms in (("p10", 1.0), ("p20", 2.0), ("p30", 3.0), ("p40", 4.0), ("slow", 6.0))]
    order = []

    def fake_estimate(structure, vs, ctx):
        order.append(structure.id)
        for v in vs:
            v.accuracy, v.estimated = after[structure.id], True

    monkeypatch.setattr(C, "estimate", fake_estimate)
    cfg = OptimizeConfig(speedup=2, max_drop=1, max_estimates=3)
    chosen = search._choose(variants, SimpleNamespace(cfg=cfg, base_accuracy=0.96, progress=False))
    assert order == ["p40", "p30", "p20"]  # slowest first; "slow" (1.67x) is not fast enough
    assert chosen.structure.id == "p20"  # the fastest within 1 point of 0.96
    p10 = next(v for v in variants if v.structure.id == "p10")
    assert not p10.estimated and "max_estimates" in p10.status
