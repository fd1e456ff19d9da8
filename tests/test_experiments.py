"""The CIFAR-K command on a small subset: per-K table, linear fit, report."""

import json

import pytest

from compress.cli import main
from compress.jobs import fit_error_line


def test_fit_error_line():
    fit = fit_error_line([3, 6, 10], [0.03, 0.06, 0.10])
    assert fit["slope"] == pytest.approx(0.01) and fit["intercept"] == pytest.approx(0.0, abs=1e-9)
    assert fit["r2"] == pytest.approx(1.0)


@pytest.mark.slow
def test_cifar_k_command(tmp_path, capsys):
    out = tmp_path / "ck"
    assert main(["cifar-k", "--model", "vgg6", "--width", "0.125", "--fc-hidden", "none", "--ks", "3", "6",
                 "--limit-train", "400", "--limit-test", "200", "--epochs", "2", "--lr", "0.03", "--momentum", "0.9",
                 "--probe-epochs", "3", "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "cifar_k.json").read_text())
    assert [r["K"] for r in summary["rows"]] == [3, 6]
    assert set(summary["rows"][0]["labels"]) <= set(summary["rows"][1]["labels"])  # nested subsets
    for r in summary["rows"]:
        assert {"N_f", "accuracy", "n", "N_c", "C_s", "plateau"} <= set(r)
    assert {"slope", "intercept", "r2"} == set(summary["fit"])
    assert (out / "report.html").is_file() and (out / "figures" / "cifar_k_error.png").is_file()
    assert "error = " in capsys.readouterr().out
