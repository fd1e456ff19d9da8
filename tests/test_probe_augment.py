"""Probes on augmented copies (issue 15, point 2): ``probe_augment: N`` caches the features of N
augmented copies of every training image beside the plain ones, and each probe epoch draws, per
image, one of its 1+N versions; 0 trains exactly today's probes."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
import yaml

from compress.analysis import AnalysisConfig, analyze_model
from compress.analysis.features import _copy_seed, extract_features
from compress.analysis.probes import LinearProbe
from compress.cli import main
from compress.cli.flags import analysis_config
from compress.cli.main import build_parser
from compress.config import from_dict
from compress.data import augment
from compress.errors import UserError
from compress.jobs import check_resume, settings
from compress.models import run_to_taps

from conftest import tiny_vgg

TAPS = ["features.pool3", "features.pool5"]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_vgg().eval()


def _reference_fit(features: torch.Tensor, labels: torch.Tensor, cfg: AnalysisConfig, k: int) -> torch.Tensor:
    """The probe training as it was before ``probe_augment`` (``LinearProbe.fit`` on the CPU, copied
    from that version): the weights ``probe_augment: 0`` must reproduce bit for bit."""
    gen = torch.Generator().manual_seed(cfg.seed)
    x_all = features.reshape(len(features), -1)
    d = x_all.shape[1]
    w = (torch.rand(k, d, generator=gen) * 2 - 1).mul_(1.0 / math.sqrt(d)).requires_grad_(True)
    opt = torch.optim.SGD([w], lr=cfg.probe_lr, momentum=cfg.probe_momentum, weight_decay=cfg.probe_weight_decay,
                          nesterov=True)
    if cfg.probe_lr_step == 1:
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=cfg.probe_lr_decay)
    else:
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.probe_lr_step, gamma=cfg.probe_lr_decay)
    n = len(labels)
    for _ in range(cfg.probe_epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, cfg.probe_batch_size):
            idx = order[start:start + cfg.probe_batch_size]
            loss = F.cross_entropy(x_all[idx].float() @ w.t(), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return w.detach()


@pytest.mark.parametrize("preset", [None, "tzach-vgg16"])
def test_probe_augment_0_trains_todays_probes_bit_for_bit(small_digits, preset, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the reference runs on the CPU
    model = _model()
    cfg = AnalysisConfig(probe_epochs=3, probe_preset=preset, probe_augment=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = analyze_model(model, small_digits, TAPS, cfg, progress=False)
    plain = extract_features(model, small_digits, small_digits.train, TAPS, batch_size=cfg.batch_size, progress=False)
    assert plain.versions == 1
    k = small_digits.num_classes
    for tap in result.taps:
        expected = _reference_fit(plain.features[tap.name], plain.labels, cfg, k)
        assert torch.equal(torch.from_numpy(tap.probe_weight).reshape(k, -1), expected), tap.name
    with warnings.catch_warnings():  # and the copies do change the probes (the comparison can fail)
        warnings.simplefilter("ignore")
        augmented = analyze_model(model, small_digits, TAPS, AnalysisConfig(probe_epochs=3, probe_preset=preset,
                                                                            probe_augment=2), progress=False)
    assert not any((a.probe_weight == b.probe_weight).all() for a, b in zip(result.taps, augmented.taps))


def test_the_cache_holds_the_plain_rows_then_each_copy(small_digits, tmp_path):
    model = _model()
    n = len(small_digits.train)
    plain = extract_features(model, small_digits, small_digits.train, TAPS, batch_size=64, progress=False)
    cache = extract_features(model, small_digits, small_digits.train, TAPS, batch_size=64, augment=2, seed=3,
                             progress=False)
    assert cache.versions == 3 and len(cache) == n and torch.equal(cache.labels, plain.labels)
    for t in TAPS:
        assert cache.features[t].shape == (3 * n, *plain.features[t].shape[1:])  # three times the training rows
        assert torch.equal(cache.plain(t), plain.features[t])  # the plain images first, unchanged
        assert not torch.equal(cache.features[t][n:2 * n], plain.features[t])
        assert not torch.equal(cache.features[t][2 * n:], cache.features[t][n:2 * n])  # two different copies
    # copy v of a batch is the training augmentation (flip and 4-pixel translation) from its seed
    images = small_digits.train.images[64:128]
    x = augment(images, torch.Generator().manual_seed(_copy_seed(3, 2, 64)))
    with torch.no_grad():
        direct = run_to_taps(model, small_digits.normalize(x), TAPS)
    for t in TAPS:
        assert torch.equal(cache.features[t][2 * n + 64:2 * n + 128], direct[t])
    # seeded: the same seed gives the same copies (in memory or on disk, same dtype), another seed others
    again = extract_features(model, small_digits, small_digits.train, TAPS, batch_size=64, augment=2, seed=3,
                             max_memory_gb=1e-6, cache_dir=tmp_path, progress=False)
    other = extract_features(model, small_digits, small_digits.train, TAPS, batch_size=64, augment=2, seed=4,
                             progress=False)
    assert again.on_disk and again.versions == 3
    for t in TAPS:
        assert torch.equal(again.features[t], cache.features[t])
        assert not torch.equal(other.features[t][n:], cache.features[t][n:])
    half = extract_features(model, small_digits, small_digits.train, TAPS, batch_size=64, augment=1, seed=3,
                            dtype="float16", progress=False)
    assert half.features[TAPS[0]].dtype == torch.float16 and half.features[TAPS[0]].shape[0] == 2 * n
    with pytest.raises(UserError, match="augment"):
        extract_features(model, small_digits, small_digits.train, TAPS, augment=-1, progress=False)


def test_probe_draws_one_version_per_image_each_epoch():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(150, 8, generator=g), torch.randint(0, 3, (150,), generator=g)
    base = LinearProbe(3, epochs=4, batch_size=32, device="cpu").fit(x, y)
    same = LinearProbe(3, epochs=4, batch_size=32, device="cpu").fit(torch.cat([x, x, x]), y)
    assert torch.equal(base.coef_, same.coef_)  # identical versions: the same steps as the plain images
    other = torch.randn(150, 8, generator=g)
    mixed = LinearProbe(3, epochs=4, batch_size=32, device="cpu").fit(torch.cat([x, other]), y)
    assert not torch.equal(base.coef_, mixed.coef_)
    again = LinearProbe(3, epochs=4, batch_size=32, device="cpu").fit(torch.cat([x, other]), y)
    assert torch.equal(mixed.coef_, again.coef_)  # seeded
    # only the other version (the plain rows zero): the draws reach the copies, about half the time
    def still(features: torch.Tensor) -> LinearProbe:  # no decay: zero features leave the weights at their start
        return LinearProbe(3, epochs=1, batch_size=150, momentum=0.5, weight_decay=0.0, device="cpu").fit(features, y)

    start = still(torch.zeros_like(x)).coef_
    assert torch.equal(still(torch.cat([torch.zeros_like(x), torch.zeros_like(x)])).coef_, start)
    assert not torch.equal(still(torch.cat([torch.zeros_like(x), other])).coef_, start)
    with pytest.raises(ValueError, match="whole number of versions"):
        LinearProbe(3, epochs=1, device="cpu").fit(torch.randn(151, 8), y)


def test_the_option_in_flags_recipes_and_checks(capsys):
    assert AnalysisConfig().probe_augment == 0
    args = build_parser().parse_args(["analyze", "--out", "x", "--probe-augment", "4"])
    assert analysis_config(args).probe_augment == 4
    assert from_dict(AnalysisConfig, {"probe_augment": 2}, "recipe.analysis").probe_augment == 2
    for bad in (-1, 1.5, True):
        with pytest.raises(UserError, match="probe_augment"):
            from_dict(AnalysisConfig, {"probe_augment": bad}, "recipe.analysis")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["analyze", "--help"])
    assert "--probe-augment N" in capsys.readouterr().out


def test_bad_flag_gives_one_error_line(tmp_path, capsys):
    assert main(["analyze", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "o"),
                 "--probe-augment", "-2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--probe-augment -2: must be from 0 to" in err[0], err


def test_resume_and_the_recorded_setting(small_digits, tmp_path):
    from compress.data import DataConfig
    from compress.jobs import analyze
    from compress.models import ModelConfig

    now = settings(analysis=AnalysisConfig())
    assert now["analysis"]["probe_augment"] == 0
    old = {"analysis": {k: v for k, v in now["analysis"].items() if k != "probe_augment"}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    check_resume(tmp_path / "config.yaml", now)  # recorded before the option: the plain probes, the same run
    with pytest.raises(UserError, match=r"analysis\.probe_augment: missing there, 2 now"):
        check_resume(tmp_path / "config.yaml", settings(analysis=AnalysisConfig(probe_augment=2)))

    cfg = AnalysisConfig(taps=TAPS, probe_epochs=2, probe_augment=1, split="test", decision="none", save_fields="none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = analyze(ModelConfig(name="vgg6", options={"width": 0.125, "fc_hidden": []}), DataConfig(name="digits"),
                         cfg, tmp_path / "run", model=_model(), bundle=small_digits, progress=False, report=False)
    assert result.config["analysis"]["probe_augment"] == 1
    recorded = json.loads((tmp_path / "run" / "analysis.json").read_text())["config"]["analysis"]
    assert recorded["probe_augment"] == 1
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["analysis"]["probe_augment"] == 1
    from compress.reports.analysis import _probe_note

    assert "1 augmented copy of each image" in _probe_note(result.config["analysis"])
    assert "plain (unaugmented)" in _probe_note({**result.config["analysis"], "probe_augment": 0})
