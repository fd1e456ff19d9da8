"""Distillation in fine-tuning: alpha 0 is plain fine-tuning bit for bit, alpha above 0 adds the
teacher term of Hinton et al. computed on the same augmented batch, every fine-tuning path of a
recipe uses the run's original model as teacher, and bad values are refused naming the key."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from compress.cli import main
from compress.data import iterate_batches
from compress.distill import distillation_loss
from compress.errors import OptionError, UserError
from compress.recipe import parse_recipe
from compress.training import DistillConfig, TrainConfig, fit

from conftest import tiny_vgg

CFG = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine", seed=5, amp=False)
BASE = {"model": {"name": "vgg6", "options": {"width": 0.125, "fc_hidden": []}, "train": {"epochs": 1}},
        "data": {"name": "digits"}}


def _models(seed: int = 0):
    torch.manual_seed(seed)
    return tiny_vgg()


def _teacher() -> nn.Module:
    torch.manual_seed(123)
    return tiny_vgg().eval()


class _Refuse(nn.Module):
    """A teacher that must never run."""

    def forward(self, x):
        raise AssertionError("the teacher ran with alpha 0")


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_alpha_zero_is_plain_finetuning_bit_for_bit(tmp_path, small_digits):
    plain, distilled = _models(), _models()
    h1 = fit(plain, small_digits, TrainConfig(epochs=2, **CFG), tmp_path / "plain", progress=False)
    cfg = TrainConfig(epochs=2, distill=DistillConfig(temperature=4, alpha=0.0), **CFG)
    h2 = fit(distilled, small_digits, cfg, tmp_path / "distilled", progress=False, teacher=_Refuse())
    assert _same(plain, distilled)
    assert [h["loss"] for h in h1] == [h["loss"] for h in h2]
    # alpha 0 needs no teacher at all
    again = _models()
    fit(again, small_digits, cfg, tmp_path / "no-teacher", progress=False)
    assert _same(plain, again)


def test_alpha_above_zero_adds_the_teacher_term(tmp_path, small_digits):
    """One optimiser step on the whole (unaugmented) training split: the logged loss is the formula
    computed by hand, and it is not the plain cross-entropy."""
    n = len(small_digits.train)
    student, teacher = _models(), _teacher()
    before = copy.deepcopy(student)
    d = DistillConfig(temperature=3.0, alpha=0.7)
    cfg = TrainConfig(epochs=1, batch_size=n, augment=False, distill=d, **CFG)
    history = fit(student, small_digits, cfg, tmp_path / "d", progress=False, teacher=teacher)

    (x, y), = list(iterate_batches(small_digits, small_digits.train, n))
    before.train()
    with torch.no_grad():
        s, t = before(x), teacher(x)
    ce = F.cross_entropy(s, y)
    p_t = torch.softmax(t / 3.0, dim=1)
    kl = (p_t * (torch.log_softmax(t / 3.0, dim=1) - torch.log_softmax(s / 3.0, dim=1))).sum(1).mean()
    expected = 0.3 * ce + 0.7 * 9.0 * kl
    assert history[0]["loss"] == pytest.approx(expected.item(), rel=1e-4)
    assert abs(history[0]["loss"] - ce.item()) > 1e-3  # the teacher term is really there
    assert kl.item() > 1e-3

    plain = _models()
    fit(plain, small_digits, TrainConfig(epochs=1, batch_size=n, augment=False, **CFG), tmp_path / "p", progress=False)
    assert not _same(plain, student)


def test_the_loss_function_matches_hinton():
    torch.manual_seed(0)
    s, t, y = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    T = 2.5
    kl = F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction="batchmean")
    assert distillation_loss(s, t, y, DistillConfig(T, 1.0)).item() == pytest.approx(T * T * kl.item(), rel=1e-5)
    assert torch.equal(distillation_loss(s, t, y, DistillConfig(T, 0.0)), F.cross_entropy(s, y))
    mixed = 0.75 * F.cross_entropy(s, y) + 0.25 * T * T * kl
    assert distillation_loss(s, t, y, DistillConfig(T, 0.25)).item() == pytest.approx(mixed.item(), rel=1e-5)
    assert distillation_loss(t, t, y, DistillConfig(T, 1.0)).item() == pytest.approx(0.0, abs=1e-6)


def test_the_teacher_sees_the_same_augmented_batch_in_eval_mode_without_grad(tmp_path, small_digits):
    seen: dict[str, list] = {"student": [], "teacher": []}
    student, teacher = _models(), _teacher().train()  # fit must put it in eval mode
    student.register_forward_pre_hook(lambda m, a: seen["student"].append(a[0].detach().clone()))

    def record(m, a):
        seen["teacher"].append((a[0].detach().clone(), m.training, torch.is_grad_enabled()))

    teacher.register_forward_pre_hook(record)
    cfg = TrainConfig(epochs=1, batch_size=100, distill=DistillConfig(alpha=0.5), **CFG)
    fit(student, small_digits, cfg, tmp_path, progress=False, teacher=teacher)
    train_batches = len(seen["teacher"])
    assert train_batches == math.ceil(len(small_digits.train) / 100)
    for xs, (xt, training, grad) in zip(seen["student"], seen["teacher"]):
        assert torch.equal(xs, xt)
        assert not training and not grad
    assert all(p.grad is None for p in teacher.parameters())


def test_a_distilled_run_resumes_where_an_uninterrupted_one_ends(tmp_path, small_digits):
    d = DistillConfig(alpha=0.8)
    opts = {**CFG, "schedule": "step", "lr_step": 1, "lr_decay": 0.5}  # a schedule that does not depend on epochs
    a, b = _models(), _models()
    fit(a, small_digits, TrainConfig(epochs=2, distill=d, **opts), tmp_path / "a", progress=False, teacher=_teacher())
    fit(b, small_digits, TrainConfig(epochs=1, distill=d, **opts), tmp_path / "b", progress=False, teacher=_teacher())
    b2 = _models()
    hist = fit(b2, small_digits, TrainConfig(epochs=2, distill=d, **opts), tmp_path / "b", progress=False,
               teacher=_teacher())
    assert len(hist) == 2 and _same(a, b2)


def test_a_teacher_is_required_and_must_have_the_same_outputs(tmp_path, small_digits):
    cfg = TrainConfig(epochs=1, distill=DistillConfig(alpha=0.5), **CFG)
    with pytest.raises(UserError, match="distill: distillation needs a teacher"):
        fit(_models(), small_digits, cfg, tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()
    torch.manual_seed(0)
    other = tiny_vgg(num_classes=7)
    with pytest.raises(UserError, match=r"distill: the model being fine-tuned has 10 outputs but the teacher .* has 7"):
        fit(_models(), small_digits, cfg, tmp_path / "b", progress=False, teacher=other)


@pytest.mark.parametrize("bad, key", [({"alpha": 1.5}, "distill.alpha"), ({"alpha": -0.1}, "distill.alpha"),
                                      ({"temperature": 0}, "distill.temperature"),
                                      ({"temperature": float("nan")}, "distill.temperature"),
                                      ({"temperature": "hot"}, "distill.temperature"),
                                      ({"alpah": 0.5}, "finetune.distill 'alpah'"), (0.9, "finetune.distill")])
def test_bad_distill_values_are_refused_naming_the_key(bad, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        parse_recipe({**BASE, "steps": [{"finetune": {"distill": bad}}]})
    with pytest.raises(UserError, match=r"recipe\.steps\[0\]\.afcc\.finetune\.distill"):
        parse_recipe({**BASE, "steps": [{"afcc": {"finetune": {"distill": bad}}}]})


def test_distill_config_checks_its_values():
    with pytest.raises(OptionError) as e:
        DistillConfig(alpha=2)
    assert e.value.key == "alpha"
    with pytest.raises(OptionError) as e:
        DistillConfig(temperature=-1.0)
    assert e.value.key == "temperature"
    with pytest.raises(OptionError) as e:
        TrainConfig(distill={"alpha": 0.5})
    assert e.value.key == "distill"
    assert TrainConfig(distill=DistillConfig()).train_options()["distill"] == {"temperature": 4.0, "alpha": 0.9}


def test_training_from_scratch_refuses_distill(tmp_path, capsys):
    with pytest.raises(UserError, match=r"recipe\.model\.train\.distill"):
        parse_recipe({**BASE, "model": {**BASE["model"], "train": {"epochs": 1, "distill": {}}}, "steps": []})
    assert main(["train", "--model", "vgg6", "--width", "0.125", "--data", "digits", "--epochs", "1",
                 "--distill", "{alpha: 0.5}", "--out", str(tmp_path / "t"), "--quiet"]) == 2
    assert "distill" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_a_recipe_distils_in_every_fine_tuning_from_one_loaded_teacher(tmp_path, monkeypatch):
    import compress.recipe.state as state_module

    loads = []
    real = state_module.load_shared  # the teacher's loader (under torchrun rank 0's file, sent to all)

    def counting(path, device="cpu"):
        loads.append(str(path))
        return real(path, device=device)

    monkeypatch.setattr(state_module, "load_shared", counting)
    calls = []
    import compress.recipe.steps.finetune as finetune_module  # every recipe fine-tuning goes through finetune()

    original_fit = finetune_module.fit

    def spy(*args, teacher=None, **kw):
        calls.append(teacher)
        return original_fit(*args, teacher=teacher, **kw)

    monkeypatch.setattr(finetune_module, "fit", spy)
    recipe = tmp_path / "distil.yaml"
    recipe.write_text("""
name: distil
model: {name: vgg6, options: {width: 0.125, fc_hidden: []}, train: {epochs: 1, lr: 0.02, momentum: 0.9}}
data: {name: digits, limit_train: 200, limit_test: 60}
analysis: {probe_epochs: 1, taps: [features.pool3, features.pool5]}
steps:
  - afcc: {tap: last, finetune: {epochs: 1, distill: {temperature: 2, alpha: 0.5}}}  # untrimmed: its own head.out
  - finetune: {epochs: 1, distill: {temperature: 4, alpha: 0.9}}
  - finetune: {epochs: 1, distill: {alpha: 0}}
""")
    assert main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [s["step"] for s in summary["steps"]] == ["original", "afcc", "finetune", "finetune"]
    assert summary["steps"][2]["options"]["distill"] == {"temperature": 4.0, "alpha": 0.9}
    assert loads == [summary["artifacts"]["original"]]  # loaded once, kept in memory
    assert len(calls) == 3 and calls[0] is not None and calls[1] is calls[0] and calls[2] is None
    assert not calls[0].training and not any(p.requires_grad for p in calls[0].parameters())


def test_a_run_recorded_before_distill_existed_still_resumes(tmp_path):
    import yaml

    from compress.jobs import check_resume, settings

    now = settings(train=TrainConfig(epochs=2))
    old = {"train": {k: v for k, v in now["train"].items() if k != "distill"}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    check_resume(tmp_path / "config.yaml", now)  # distill unset now: the same run
    with pytest.raises(UserError, match=r"train\.distill: missing there"):
        check_resume(tmp_path / "config.yaml", settings(train=TrainConfig(epochs=2, distill=DistillConfig())))


def test_a_run_recorded_before_the_probe_options_existed_still_resumes(tmp_path):
    import yaml

    from compress.analysis import AnalysisConfig
    from compress.jobs import check_resume, settings

    now = settings(analysis=AnalysisConfig())
    added = ("probe_lr_step", "plateau_reference", "probe_preset")
    old = {"analysis": {k: v for k, v in now["analysis"].items() if k not in added}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    check_resume(tmp_path / "config.yaml", now)  # the earlier behaviour: the same run
    with pytest.raises(UserError, match=r"analysis\.probe_lr_step: missing there, 20 now"):
        check_resume(tmp_path / "config.yaml", settings(analysis=AnalysisConfig(probe_lr_step=20)))
