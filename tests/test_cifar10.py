"""The analysis on a 2,000-image subset of the real CIFAR-10 (skipped where the folder is absent)."""

import json

import pytest

from compress.cli import main

from conftest import CIFAR10

pytestmark = pytest.mark.skipif(not (CIFAR10 / "train").is_dir(), reason=f"real CIFAR-10 not found at {CIFAR10}")


def test_analysis_on_cifar10_subset(tmp_path):
    data = ["--data", f"imagefolder:{CIFAR10}", "--limit-train", "2000", "--limit-test", "500"]
    assert main(["train", "--model", "vgg6", "--width", "0.125", "--fc-hidden", "none", "--epochs", "2",
                 "--lr", "0.03", "--momentum", "0.9", *data, "--out", str(tmp_path / "t"), "--quiet"]) == 0
    assert main(["analyze", "--checkpoint", str(tmp_path / "t" / "checkpoint.pt"), *data, "--probe-epochs", "10",
                 "--out", str(tmp_path / "a"), "--quiet"]) == 0
    summary = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert summary["label_names"][:3] == ["airplane", "automobile", "bird"]
    assert len(summary["taps"]) == 5
    assert max(t["accuracy"] for t in summary["taps"]) > 0.2  # chance is 0.1
    assert (tmp_path / "a" / "report.html").is_file()
