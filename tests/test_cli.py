"""The command line end to end on the digits, and its answers to bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest

from compress.analysis import load_analysis
from compress.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    assert main(["train", "--model", "vgg6", "--width", "0.25", "--fc-hidden", "none", "--epochs", "4",
                 "--lr", "0.03", "--momentum", "0.9", "--weight-decay", "5e-4", "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def analysed(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis")
    assert main(["analyze", "--checkpoint", str(trained / "checkpoint.pt"), "--probe-epochs", "30",
                 "--out", str(out), "--quiet"]) == 0
    return out


def test_end_to_end_analysis_on_digits(analysed):
    summary = json.loads((analysed / "analysis.json").read_text())
    assert summary["model"] == "vgg6"  # taken from the checkpoint's metadata
    taps = summary["taps"]
    assert [t["name"] for t in taps] == [f"features.pool{i}" for i in range(1, 6)]
    assert taps[-1]["accuracy"] > 0.6  # chance is 0.1
    assert summary["plateau"] in [t["name"] for t in taps]
    for name in ("report.md", "report.html", "config.yaml"):
        assert (analysed / name).is_file()
    assert "<table" in (analysed / "report.html").read_text()


def test_artifact_format(analysed):
    result = load_analysis(analysed)
    k = result.num_classes
    for t in result.taps:
        with np.load(analysed / "arrays" / f"{t.name}.npz") as z:
            c = t.n_filters
            assert z["probe_weight"].shape == (k, c, *t.spatial)
            assert z["fields"].shape == (c, k, k) and z["clipped_bits"].shape == (c, k, (k + 7) // 8)
            assert z["cluster_ids"].shape == (c, k)
            assert z["noise"].shape == (c,)
            assert set(np.unique(np.asarray(t.clipped))) <= {0, 1}
        assert sum(t.stats.label_counts) == int((t.cluster_ids >= 0).sum())


def test_report_command_rewrites_report(analysed):
    (analysed / "report.md").unlink()
    assert main(["report", str(analysed)]) == 0
    assert (analysed / "report.md").is_file()


def test_taps_command_lists_shapes(capsys):
    assert main(["taps", "vgg16", "--width", "0.25"]) == 0
    out = capsys.readouterr().out.split("\n")
    assert out[0].split() == ["features.pool2", "16x16x16"]
    assert out[4].split() == ["features.pool13", "128x1x1"]


@pytest.mark.parametrize("argv,expected", [
    (["taps", "vgg17"], "unknown model 'vgg17' (did you mean 'vgg16', 'avgg16', 'vgg6'?); valid: avgg16, timm:<name>, torchvision:<name>, vgg16, vgg6"),
    (["analyze", "--checkpoint", "CKPT", "--data", "cifar11", "--out", "OUT"], "unknown dataset 'cifar11'"),
    (["analyze", "--checkpoint", "CKPT", "--taps", "features.pool9", "--out", "OUT"], "unknown tap 'features.pool9'"),
    (["analyze", "--checkpoint", "CKPT", "--threshold", "1.5", "--out", "OUT"], "threshold 1.5 is outside (0, 1)"),
    (["analyze", "--checkpoint", "CKPT", "--labels", "5", "--out", "OUT"], "does not fit the model: shape mismatch: head.out.weight"),
    (["analyze", "--model", "vgg16", "--checkpoint", "CKPT", "--out", "OUT"], "does not fit the model: missing: "),
    (["analyze", "--checkpoint", "missing.pt", "--out", "OUT"], "checkpoint 'missing.pt' does not exist"),
])
def test_bad_input_gives_one_clear_line(argv, expected, trained, tmp_path, capsys):
    argv = [a.replace("CKPT", str(trained / "checkpoint.pt")).replace("OUT", str(tmp_path / "o")) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expected in err
    assert len(err.splitlines()) == 1


def test_user_error_exits_nonzero_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "compress.cli", "taps", "resnet"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "valid: avgg16" in proc.stderr
