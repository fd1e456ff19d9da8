"""Run folders are owned and nothing is lost: one process per folder (a second is refused while
the first lives, a killed one's lock is taken over), a run that diverges keeps its last good
checkpoint, a crash nobody foresaw is one line with the traceback saved, and names read from
files never reach the terminal raw."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from badinput import SENTINELS, TINY
from compress.cli import main
from compress.data import load_data
from compress.errors import UserError
from compress.io import LOCK_NAME, run_folder_lock
from compress.training import TrainConfig, fit
from conftest import tiny_vgg
from forkserver import ForkServer, wait_for

LONG = [*TINY, "--limit-train", "600", "--limit-test", "100", "--epochs", "12", "--quiet"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ForkServer(tmp_path_factory.mktemp("server"))
    yield s
    s.close()


def test_a_second_process_on_the_same_folder_is_refused_and_the_first_finishes(server, tmp_path):
    out = tmp_path / "run"
    first = server.submit(["train", *LONG, "--out", str(out)])
    wait_for(lambda: (out / "history.json").is_file(), what="the first run's first epoch")  # it holds the lock
    owner = (out / LOCK_NAME).read_text().strip()
    assert owner == str(server.pid(first))
    second = server.result(server.submit(["train", *LONG, "--out", str(out)]))
    err = second.stderr.strip()
    assert second.returncode == 2 and err.splitlines() == [err] and "Traceback" not in second.stderr
    assert f"in use by another compress process (PID {owner}" in err and LOCK_NAME in err
    done = server.result(first)
    assert done.returncode == 0, done.stderr
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, 13))  # one run's epochs, none mixed in
    assert not (out / LOCK_NAME).exists()  # released and removed at the end


def test_the_lock_of_a_killed_run_is_taken_over(server, tmp_path):
    out = tmp_path / "run"
    first = server.submit(["train", *LONG, "--out", str(out)])
    wait_for(lambda: (out / LOCK_NAME).is_file(), what="the lock")
    os.kill(server.pid(first), 9)
    assert server.result(first).returncode == -9
    assert (out / LOCK_NAME).is_file()  # left behind, with a dead PID in it
    again = server.result(server.submit(["train", *LONG[:-3], "--epochs", "1", "--quiet", "--out", str(out),
                                         "--no-resume"]))
    assert again.returncode == 0, again.stderr
    assert not (out / LOCK_NAME).exists()


def test_the_lock_is_reentrant_within_a_process_and_exclusive_across(tmp_path):
    with run_folder_lock(tmp_path / "a") as folder:
        with run_folder_lock(folder):  # a run locks its folder, its training locks it again: fine
            assert (folder / LOCK_NAME).read_text().strip() == str(os.getpid())
        assert (folder / LOCK_NAME).is_file()
        code = ("import sys; from compress.io import run_folder_lock\n"
                f"with run_folder_lock({str(folder)!r}): pass")
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert other.returncode == 1 and f"PID {os.getpid()}" in other.stderr
    assert not (tmp_path / "a" / LOCK_NAME).exists()


def test_a_diverging_fit_stops_before_saving_and_keeps_the_last_good_checkpoint(small_digits, tmp_path):
    model = tiny_vgg()
    cfg = TrainConfig(epochs=2, lr=0.05, momentum=0.9)
    fit(model, small_digits, TrainConfig(epochs=1, lr=0.05, momentum=0.9), tmp_path, progress=False)
    good = (tmp_path / "checkpoint.pt").read_bytes()

    def poison(m):  # the second epoch diverges
        with torch.no_grad():
            m.head.out.weight.fill_(float("nan"))

    with pytest.raises(UserError, match=r"diverged in epoch 2: the loss became nan; the checkpoint of epoch 1"):
        fit(model, small_digits, cfg, tmp_path, progress=False, after_step=poison)
    assert (tmp_path / "checkpoint.pt").read_bytes() == good
    assert len(json.loads((tmp_path / "history.json").read_text())) == 1


def test_an_unforeseen_error_is_one_line_with_the_traceback_saved(monkeypatch, tmp_path, capsys):
    import compress.jobs

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(compress.jobs, "train", broken)
    out = tmp_path / "run"
    out.mkdir()
    assert main(["train", *TINY, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "Traceback" not in err
    assert err.startswith("error: internal error (KeyError: 'a bug'); this is a bug — the full traceback is in ")
    saved = Path(err.rsplit(" ", 1)[1])
    assert saved.parent == out and "Traceback" in saved.read_text() and "broken" in saved.read_text()


def test_a_full_disk_outside_a_write_helper_is_one_line(monkeypatch, tmp_path, capsys):
    import errno

    import compress.jobs

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(compress.jobs, "train", full)
    assert main(["train", *TINY, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "No space left on device" in err and str(tmp_path / "x") in err


def test_label_names_with_control_characters_are_printed_escaped(tmp_path, capsys):
    import onnx
    from PIL import Image

    from compress.compression.serialize import save_model
    from compress.deploy.export import export_and_verify
    from compress.jobs import model_meta
    from compress.models import ModelConfig

    bundle = load_data("digits", limit_train=64, limit_test=8)
    model = tiny_vgg()
    meta = model_meta(ModelConfig("vgg6", {"width": 0.125, "fc_hidden": []}), bundle)
    meta["label_names"] = [f"\x1b[2J\x1b]0;pwned\x07{i}\nnext" for i in range(10)]  # clear screen, set title
    save_model(model, tmp_path / "m.pt", meta)
    export_and_verify(model, meta, tmp_path / "m.onnx", torch.zeros(2, 3, 32, 32))
    Image.new("RGB", (32, 32), (9, 9, 9)).save(tmp_path / "x.png")
    assert main(["predict", str(tmp_path / "m.onnx"), str(tmp_path / "x.png"), "--top-k", "2"]) == 0
    printed = capsys.readouterr().out
    assert "\x1b" not in printed and "\x07" not in printed and printed.count("\n") == 1
    assert "\\x1b[2J" in printed and "\\n" in printed
    assert onnx.load(str(tmp_path / "m.onnx")).metadata_props  # the names stay as they are in the file


@pytest.mark.skipif(os.geteuid() == 0, reason="permissions do not stop root (the file case covers it)")
def test_read_only_output_folder(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    (out / "config.yaml").write_bytes(SENTINELS["config.yaml"])
    out.chmod(0o500)
    try:
        proc = subprocess.run([sys.executable, "-m", "compress.cli", "train", *TINY, "--out", str(out)],
                              capture_output=True, text=True, timeout=300)
    finally:
        out.chmod(0o700)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "not writable" in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "config.yaml").read_bytes() == SENTINELS["config.yaml"]


def test_resume_with_the_same_settings_continues_and_no_resume_starts_again(server, tmp_path):
    out = tmp_path / "run"
    base = [*TINY, "--limit-train", "200", "--limit-test", "100", "--quiet", "--out", str(out)]
    assert server.result(server.submit(["train", *base, "--epochs", "1"])).returncode == 0
    checkpoint = (out / "checkpoint.pt").read_bytes()
    same = server.result(server.submit(["train", *base, "--epochs", "1"]))
    assert same.returncode == 0 and (out / "checkpoint.pt").read_bytes() == checkpoint  # nothing left to do
    other = server.result(server.submit(["train", *base, "--epochs", "1", "--lr", "0.01", "--no-resume"]))
    assert other.returncode == 0, other.stderr
    assert "lr: 0.01" in (out / "config.yaml").read_text()
    assert np.isclose(json.loads((out / "history.json").read_text())[0]["lr"], 0.01)


def test_a_run_folder_of_the_same_recipe_resumes_and_of_another_is_refused(tmp_path):
    import yaml

    from compress.jobs import check_resume
    from compress.recipe import parse_recipe

    model = {"name": "vgg6", "options": {"width": 0.125, "fc_hidden": []}, "train": {"epochs": 1}}
    data = {"name": "r", "model": model,
            "steps": [{"trim": {"tap": "plateau"}}, {"finetune": {"epochs": 1}}]}
    resolved = yaml.safe_load(yaml.safe_dump(parse_recipe(data).to_dict()))
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    check_resume(tmp_path / "recipe.yaml", resolved, "recipe settings")  # the same recipe: nothing to refuse
    data["steps"][1]["finetune"]["lr"] = 0.5
    other = yaml.safe_load(yaml.safe_dump(parse_recipe(data).to_dict()))
    with pytest.raises(UserError, match=r"other recipe settings \(steps\.1\.finetune\.lr: 0\.005 there, 0\.5 now\); "
                                        r"pass --no-resume"):
        check_resume(tmp_path / "recipe.yaml", other, "recipe settings")
