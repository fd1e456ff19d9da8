"""Closer to the papers (issue 15): probe presets and flags, fields averaged per label, Eq. (1) from
the mean label count, the plateau relative to the model, AFCC fine-tuning by layer names, random
dilution as a control."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from compress.analysis import AnalysisConfig, AnalysisResult, analyze_tap, find_plateau, load_analysis, snr_estimates
from compress.analysis.features import FeatureCache
from compress.analysis.fields import class_sums, label_images, label_means, scan_fields
from compress.analysis.presets import PROBE_PRESETS
from compress.analysis.probes import LinearProbe
from compress.analysis.result import LayerStats
from compress.cli import main
from compress.cli.flags import analysis_config
from compress.cli.main import build_parser
from compress.config import from_dict
from compress.errors import UserError

from conftest import tiny_vgg

# The probe settings as the papers' text states them (../shared/papers/), typed in again here:
# (lr eta, momentum mu, weight decay alpha, q, dt); batch 100 in both papers' Methods.
PAPERS = {
    "tzach-vgg16": (0.1, 0.975, 1e-5, 0.6, 20),  # Tzach et al., Supplementary, Fig. 1
    "tzach-vgg6": (0.1, 0.975, 1e-5, 0.6, 20),  # Fig. 7
    "tzach-avgg16": (0.02, 0.995, 1e-8, 0.6, 20),  # Fig. 8
    "meir-cifar100": (0.005, 0.975, 1.5e-5, 0.65, 20),  # Meir et al., VGG-16 CIFAR-K/100
    "meir-cifar-k": (0.02, 0.995, 1e-7, 0.6, 20),  # VGG-16 CIFAR-K/10
    "meir-efficientnet": (0.005, 0.975, 1.5e-5, 0.975, 1),  # EfficientNet-B0
    "public-code": (0.01, 0.975, 1e-3, 0.975, 1),  # the public implementation
}
REQUIRED = {"tzach-vgg16", "tzach-avgg16", "meir-cifar-k", "meir-efficientnet", "public-code"}


def _probe(cfg: AnalysisConfig) -> tuple:
    return (cfg.probe_lr, cfg.probe_momentum, cfg.probe_weight_decay, cfg.probe_lr_decay, cfg.probe_lr_step)


# ---------------------------------------------------------------- point 1: presets and flags


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_each_preset_sets_the_documented_values(name):
    cfg = AnalysisConfig(probe_preset=name)
    assert _probe(cfg) == PAPERS[name]
    assert cfg.probe_batch_size == 100 and cfg.probe_epochs == 200
    preset = PROBE_PRESETS[name]
    assert preset.source and preset.setting  # every preset cites where its values are written
    probe = cfg.make_probe(10)
    assert (probe.lr, probe.momentum, probe.weight_decay, probe.lr_decay, probe.lr_step) == PAPERS[name]


def test_the_required_presets_exist_and_the_default_is_the_public_code():
    assert REQUIRED <= set(PROBE_PRESETS)
    assert _probe(AnalysisConfig()) == PAPERS["public-code"] and AnalysisConfig().probe_batch_size == 100
    assert AnalysisConfig() == AnalysisConfig(probe_preset=None, probe_lr=0.01, probe_lr_step=1)


def test_an_explicit_value_overrides_the_preset():
    cfg = AnalysisConfig(probe_preset="tzach-vgg16", probe_lr=0.05, probe_lr_step=10)
    assert _probe(cfg) == (0.05, 0.975, 1e-5, 0.6, 10)
    recipe = from_dict(AnalysisConfig, {"probe_preset": "tzach-avgg16", "probe_momentum": 0.9}, "recipe.analysis")
    assert _probe(recipe) == (0.02, 0.9, 1e-8, 0.6, 20)


def _flags(*argv: str) -> AnalysisConfig:
    args = build_parser().parse_args(["analyze", "--out", "x", *argv])
    return analysis_config(args)


def test_cli_flags_set_every_probe_value_and_override_the_preset():
    cfg = _flags("--probe-preset", "meir-cifar-k")
    assert _probe(cfg) == PAPERS["meir-cifar-k"]
    cfg = _flags("--probe-preset", "meir-cifar-k", "--probe-lr", "0.3", "--probe-momentum", "0.5",
                 "--probe-weight-decay", "0.01", "--probe-lr-decay", "0.5", "--probe-lr-step", "7",
                 "--probe-batch-size", "64", "--probe-epochs", "11")
    assert _probe(cfg) == (0.3, 0.5, 0.01, 0.5, 7) and cfg.probe_batch_size == 64 and cfg.probe_epochs == 11
    cfg = _flags("--probe-preset", "tzach-vgg16", "--probe-weight-decay", "0.002")
    assert _probe(cfg) == (0.1, 0.975, 0.002, 0.6, 20)
    assert _probe(_flags()) == PAPERS["public-code"]
    args = build_parser().parse_args(["cifar-k", "--out", "x", "--probe-preset", "meir-cifar-k", "--probe-lr-step", "5"])
    assert _probe(analysis_config(args)) == (0.02, 0.995, 1e-7, 0.6, 5)


@pytest.mark.parametrize("argv,expected", [
    (["--probe-preset", "tzach"], "invalid choice: 'tzach'"),
    (["--probe-lr-step", "0"], "--probe-lr-step 0: must be at least 1"),
])
def test_bad_probe_flags_give_one_error_line(argv, expected, tmp_path, capsys):
    assert main(["analyze", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and expected in err[0], err


def test_unknown_preset_in_a_recipe_is_refused():
    with pytest.raises(UserError, match="recipe.analysis.probe_preset"):
        from_dict(AnalysisConfig, {"probe_preset": "tzach"}, "recipe.analysis")


def test_lr_step_decays_every_dt_epochs():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(120, 6, generator=g), torch.randint(0, 3, (120,), generator=g)

    def fit(**kw):
        return LinearProbe(3, epochs=3, batch_size=20, device="cpu", **kw).fit(x, y).coef_

    # no decay happens within 3 epochs when dt is 5: the same weights as no decay at all
    assert torch.equal(fit(lr_decay=0.5, lr_step=5), fit(lr_decay=1.0))
    assert not torch.equal(fit(lr_decay=0.5, lr_step=1), fit(lr_decay=1.0))
    assert torch.equal(fit(lr_decay=0.5, lr_step=1), fit(lr_decay=0.5))  # dt 1 is the per-epoch decay of before


# ---------------------------------------------------------------- point 4: fields averaged per label


def _tap(labels: torch.Tensor, k: int = 6, c: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.rand(k, c, 2, 2, generator=g) * (torch.rand(k, c, 1, 1, generator=g) < 0.3) * 3.0
    feats = torch.relu(mu[labels] + torch.randn(len(labels), c, 2, 2, generator=g) - 0.5)
    weight = (mu - mu.mean(0)).reshape(k, -1) + 0.3 * torch.randn(k, c * 4, generator=g)
    return feats, weight


def test_duplicating_one_labels_images_leaves_the_normalised_matrices_unchanged():
    k = 6
    labels = torch.arange(600) % k
    feats, weight = _tap(labels, k)
    twice = labels == 2
    more_feats = torch.cat([feats, feats[twice]])
    more_labels = torch.cat([labels, labels[twice]])
    a = analyze_tap("tap", weight, FeatureCache({"tap": feats}, labels), k, 0.3)
    b = analyze_tap("tap", weight, FeatureCache({"tap": more_feats}, more_labels), k, 0.3)
    assert b.label_images.tolist() == [100, 100, 200, 100, 100, 100]
    np.testing.assert_allclose(b.normalized, a.normalized, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b.fields, a.fields, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(b.clipped), np.asarray(a.clipped))
    np.testing.assert_array_equal(b.cluster_ids, a.cluster_ids)
    np.testing.assert_array_equal(b.noise, a.noise)
    # summed instead, label 2's row doubles and the normalised matrices change
    summed = scan_fields(class_sums(more_feats, more_labels, k), weight, 0.3, keep="float32")
    assert not np.allclose(summed.normalized, a.normalized, rtol=1e-3)


def test_fields_are_per_label_means():
    k = 5
    labels = torch.tensor([0] * 30 + [1] * 10 + [2] * 55 + [3] * 5 + [4] * 20)
    feats, weight = _tap(labels, k, c=4, seed=3)
    tap = analyze_tap("tap", weight, FeatureCache({"tap": feats}, labels), k, 0.3)
    a, w = feats.reshape(len(labels), 4, 4).double(), weight.reshape(k, 4, 4).double()
    per_image = torch.einsum("ncs,kcs->nck", a, w)  # (N, C, K)
    means = torch.stack([per_image[labels == i].mean(0) for i in range(k)], 1)  # (C, K, K)
    np.testing.assert_allclose(tap.fields, means.numpy(), rtol=1e-5, atol=1e-6)
    assert tap.label_images.tolist() == [30, 10, 55, 5, 20]


def test_balanced_sets_give_the_clusters_of_the_sums_bit_for_bit():
    k = 8
    labels = torch.randperm(800, generator=torch.Generator().manual_seed(1)) % k
    feats, weight = _tap(labels, k, c=16, seed=1)
    tap = analyze_tap("tap", weight, FeatureCache({"tap": feats}, labels), k, 0.3)
    sums = class_sums(feats, labels, k)
    scaled, unit = label_means(sums, label_images(labels, k))
    assert scaled is sums and unit == 100  # balanced: exactly the sums, no rescaling
    ref = scan_fields(sums, weight, 0.3, keep="float32")
    np.testing.assert_array_equal(np.asarray(tap.clipped), np.asarray(ref.clipped))
    np.testing.assert_array_equal(tap.cluster_ids, ref.cluster_ids.numpy())
    np.testing.assert_array_equal(tap.noise, ref.noise.numpy())
    np.testing.assert_array_equal(tap.normalized, ref.normalized)
    np.testing.assert_allclose(tap.fields, ref.fields / 100, rtol=1e-6)
    np.testing.assert_allclose(tap.cluster_fields, ref.cluster_fields.numpy() / 100, rtol=1e-12)
    np.testing.assert_allclose(tap.snr["field"]["signal"], ref.snr["field"]["signal"].numpy() / 100, rtol=1e-12)
    np.testing.assert_array_equal(tap.snr["boolean"]["signal"], ref.snr["boolean"]["signal"].numpy())


def _result(tap, k: int, **kw) -> AnalysisResult:
    return AnalysisResult(model="m", dataset="d", label_names=[f"l{i}" for i in range(k)], taps=[tap],
                          plateau=tap.name, plateau_tolerance=0.5, **kw)


def test_artifact_format_3_round_trips_and_format_2_still_loads(tmp_path):
    k = 6
    labels = torch.arange(300) % k
    feats, weight = _tap(labels, k)
    tap = analyze_tap("tap", weight, FeatureCache({"tap": feats}, labels), k, 0.3)
    _result(tap, k, plateau_reference="model", model_accuracy=0.5).save(tmp_path / "new")
    summary = json.loads((tmp_path / "new" / "analysis.json").read_text())
    assert summary["artifact_version"] == 3 and summary["plateau_reference"] == "model"
    back = load_analysis(tmp_path / "new")
    assert back.plateau_reference == "model" and back.taps[0].label_images.tolist() == [50] * k
    np.testing.assert_array_equal(back.taps[0].fields, tap.fields)
    # format 2 (before issue 15): no label_images, no plateau_reference, fields summed
    old = tmp_path / "old"
    (old / "arrays").mkdir(parents=True)
    arrays = {key: v for key, v in tap.arrays().items() if key != "label_images"}
    arrays["fields"] = (np.asarray(tap.fields) * 50).astype(np.float32)
    np.savez_compressed(old / "arrays" / "tap.npz", **arrays)
    summary.update(artifact_version=2)
    del summary["plateau_reference"]
    (old / "analysis.json").write_text(json.dumps(summary))
    legacy = load_analysis(old)
    assert legacy.plateau_reference == "best_probe" and legacy.taps[0].label_images is None
    np.testing.assert_array_equal(legacy.taps[0].cluster_ids, tap.cluster_ids)
    from compress.reports.analysis import write_report

    write_report(legacy, tmp_path / "report", filters_per_tap=1)


def test_damaged_label_images_are_refused(tmp_path):
    k = 4
    labels = torch.arange(80) % k
    feats, weight = _tap(labels, k)
    tap = analyze_tap("tap", weight, FeatureCache({"tap": feats}, labels), k, 0.3)
    tap.label_images = np.arange(k + 1)
    _result(tap, k).save(tmp_path)
    with pytest.raises(UserError, match="damaged"):
        load_analysis(tmp_path)


# ---------------------------------------------------------------- point 6: Eq. (1), the plateau reference


def test_eq1_signal_is_the_mean_label_count():
    stats = LayerStats(noise=2.0, clusters_per_filter=2.0, cluster_size=1.5, size_fractions=[0.5, 0.5],
                       filters_without_cluster=6, label_counts=[3, 1, 2, 2, 0])
    est = snr_estimates(stats, n_filters=10, num_labels=5)
    assert est["signal"] == pytest.approx(8 / 5)  # not C_s N_c N_f / N_l = 6: 6 of the 10 filters have none
    assert est["noise_internal"] == pytest.approx(0.5 / 4 * 8 / 5)
    assert est["noise_external"] == pytest.approx(2.0 * 10 / 25)
    assert est["snr_external"] == pytest.approx((8 / 5) / (2.0 * 10 / 25))


def test_plateau_relative_to_the_model():
    accs = [0.70, 0.85, 0.90, 0.93]
    assert find_plateau(accs, 0.5) == 3
    assert find_plateau(accs, 0.5, reference=0.903) == 2  # within 0.5 points of the model's 0.903
    assert find_plateau(accs, 0.5, reference=0.99) == 3  # no tap that close: the best probe's rule
    assert find_plateau(accs, 0.5, reference=None) == 3
    assert AnalysisConfig().plateau_reference == "best_probe"
    with pytest.raises(UserError, match="plateau_reference"):
        from_dict(AnalysisConfig, {"plateau_reference": "full"}, "recipe.analysis")


def test_analyze_model_uses_the_model_accuracy_when_asked(small_digits):
    from compress.analysis import analyze_model

    torch.manual_seed(0)
    model = tiny_vgg().eval()
    taps = ["features.pool3", "features.pool5"]
    cfg = AnalysisConfig(probe_epochs=2, plateau_reference="model", plateau_tolerance=100.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = analyze_model(model, small_digits, taps, cfg, progress=False, model_accuracy=0.0)
    assert result.plateau == "features.pool3" and result.plateau_reference == "model"
    assert result.model_accuracy == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        measured = analyze_model(model, small_digits, taps, cfg, progress=False)
    assert measured.model_accuracy is not None and 0.0 <= measured.model_accuracy <= 1.0


# ---------------------------------------------------------------- points 5 and 8: AFCC scope, random dilution


def test_afcc_train_takes_module_paths():
    from compress.recipe.schema import load_recipe, parse_recipe

    from pathlib import Path

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "vgg16-cifar100-afcc.yaml")
    afcc = recipe.steps[0]
    assert afcc.name == "afcc" and afcc.train == ["head", "features.conv10"]
    assert recipe.analysis.probe_preset == "meir-cifar100" and recipe.analysis.probe_lr_step == 20
    base = {"name": "t", "model": {"name": "vgg6", "options": {"width": 0.125}, "train": {"epochs": 1}},
            "data": {"name": "digits"}}
    with pytest.raises(UserError, match=r"recipe.steps\[0\].afcc.train: .*'features.conv9'"):
        parse_recipe({**base, "steps": [{"afcc": {"tap": "features.pool4", "train": ["head", "features.conv9"]}}]})
    with pytest.raises(UserError, match=r"afcc.train"):
        parse_recipe({**base, "steps": [{"afcc": {"train": []}}]})
    with pytest.raises(UserError, match=r"afcc.train"):
        parse_recipe({**base, "steps": [{"afcc": {"train": "features.conv4"}}]})


def test_dilute_random_criterion_needs_a_target():
    from compress.recipe.schema import parse_recipe

    base = {"name": "t", "model": {"name": "vgg6", "options": {"width": 0.125}, "train": {"epochs": 1}},
            "data": {"name": "digits"}}
    with pytest.raises(UserError, match=r"dilute.target: 'auto' is the coverage criterion's"):
        parse_recipe({**base, "steps": [{"dilute": {"criterion": "random"}}]})
    r = parse_recipe({**base, "steps": [{"dilute": {"criterion": "random", "target": 0.5, "seed": 4}}]})
    assert r.steps[0].criterion == "random" and r.steps[0].seed == 4


def test_random_dilution_is_seeded_and_keeps_the_target(small_digits):
    from compress.analysis import analyze_model
    from compress.compression.dilute import dilute_by_coverage

    torch.manual_seed(0)
    model = tiny_vgg().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = analyze_model(model, small_digits, ["features.pool4", "features.pool5"],
                                 AnalysisConfig(probe_epochs=2), progress=False)
        runs = [dilute_by_coverage(tiny_vgg().eval(), analysis, layer="features.conv5", target=20, criterion="random",
                                   seed=s)[1] for s in (1, 1, 2)]
    assert runs[0]["filters_after"] == 20 and runs[0]["criterion"] == "random" and runs[0]["seed"] == 1
    assert runs[0]["removed"] == runs[1]["removed"] != runs[2]["removed"]
    assert len(runs[0]["coverage_after"]) == 10  # the coverage the random removal leaves is reported


RECIPE = """
name: afcc-scope
model:
  name: vgg6
  options: {width: 0.25, fc_hidden: []}
  train: {epochs: 2, lr: 0.03, momentum: 0.9, weight_decay: 5.0e-4}
data: {name: digits, limit_train: 400, limit_test: 150}
analysis: {probe_epochs: 4, probe_preset: tzach-vgg6, probe_lr: 0.02}
steps:
  - dilute: {layer: features.conv4, tap: features.pool4, criterion: random, target: 0.5, seed: 3}
  - afcc: {tap: features.pool4, train: [head, features.conv4], finetune: {epochs: 1, lr: 0.01}, sparse: false}
"""


def test_recipe_with_afcc_by_layer_names_and_random_dilution(tmp_path):
    from compress.compression.serialize import load_model

    (tmp_path / "r.yaml").write_text(RECIPE)
    assert main(["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    dilute, afcc = summary["steps"][1]["info"], summary["steps"][2]["info"]
    assert dilute["criterion"] == "random" and dilute["filters_after"] == dilute["filters_before"] // 2
    assert afcc["trained"] == ["head.out", "features.conv4"]
    original = load_model(out / "steps" / "00-original" / "model.pt")[0].state_dict()
    diluted = load_model(next((out / "steps").glob("01-*")) / "model.pt")[0].state_dict()
    final = load_model(out / "model.pt")[0].state_dict()
    assert torch.equal(final["features.conv3.weight"], original["features.conv3.weight"])  # frozen
    assert torch.equal(final["features.bn4.weight"], diluted["features.bn4.weight"])  # not named: frozen
    assert not torch.equal(final["features.conv4.weight"], diluted["features.conv4.weight"])  # named: trained
    config = json.loads((out / "analysis" / "analysis.json").read_text())["config"]["analysis"]
    assert (config["probe_preset"], config["probe_lr"], config["probe_lr_step"]) == ("tzach-vgg6", 0.02, 20)
