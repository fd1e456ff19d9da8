"""The papers' published per-layer tables (issue 15, point 7): shipped as data with their sources,
checked against the papers' text where it is present, matched to an analysis by an explicit rule,
and shown beside the measured values in the analysis report."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from compress.analysis.published import (PUBLISHED, compare, compare_result, dataset_of, match_tables,
                                         measured_from_result, tap_for)
from compress.analysis.result import AnalysisResult
from compress.reports.analysis import write_report

PAPERS = Path(__file__).resolve().parents[2] / "shared" / "papers"
REQUIRED = {"tzach-vgg16-cifar10", "meir-table1", "meir-table2", "meir-table3",
            *[f"meir-table4-k{k}" for k in (10, 20, 40, 60)], *[f"meir-table5-k{k}" for k in (10, 20, 40, 60)],
            *[f"meir-table6-k{k}" for k in (3, 6, 8, 10)]}


def test_the_tables_load_with_their_sources():
    assert REQUIRED <= set(PUBLISHED)
    for t in PUBLISHED.values():
        assert t.paper and t.source and t.rows, t.key
        assert t.architecture in ("vgg16", "vgg6", "avgg16", "efficientnet_b0") and t.k >= 3
        assert all("accuracy" in row for row in t.rows.values())
    t6 = PUBLISHED["meir-table6-k10"]
    assert "Table 6" in t6.source and "Universality" in t6.paper
    assert t6.rows[10] == {"N_f": 512, "F_s": "2x2", "FC_s": 2048, "accuracy": 0.94, "n": 3.8, "N_c": 3.2, "C_s": 1.6}
    tz = PUBLISHED["tzach-vgg16-cifar10"]
    assert "Fig. 2A" in tz.source and "Fig. 5A" in tz.source
    assert tz.rows[13]["accuracy"] == 0.94 and tz.rows[13]["accuracy_std"] == 0.002 and tz.rows[13]["n"] == 1.5
    for row in tz.rows.values():
        assert sum(row["size_fractions"]) == pytest.approx(1.0, abs=0.02)
    assert sorted(PUBLISHED["meir-table2"].rows) == [1, 3, 4, 5, 7, 9]


def _text_rows(path: Path) -> set[tuple]:
    rows = set()
    for line in path.read_text().splitlines():
        if re.match(r"^\d+\t", line):
            rows.add(tuple(v if "x" in v else float(v) for v in line.replace(",", "").split("\t")))
    return rows


@pytest.mark.skipif(not PAPERS.is_dir(), reason="the papers' text (../shared/papers) is not here")
def test_every_row_is_the_papers_text():
    meir = _text_rows(next(PAPERS.glob("001_*.txt")))
    tzach = _text_rows(next(PAPERS.glob("000_*.txt")))
    for t in PUBLISHED.values():
        for layer, row in t.rows.items():
            if t.paper.startswith("Meir"):
                cells = (float(layer), float(row["N_f"]), row["F_s"], float(row["FC_s"]), row["accuracy"], row["n"],
                         row["N_c"], row["C_s"])
                assert cells in meir, (t.key, layer)
            elif "size_fractions" in row:  # Tzach: the SR figure's row and the statistics figure's row
                assert (float(layer), float(row["N_f"]), row["F_s"], float(row["FC_s"]), row["accuracy"],
                        row["accuracy_std"]) in tzach, (t.key, layer)
                assert (float(layer), row["n"], row["N_c"], row["C_s"], *row["size_fractions"]) in tzach, (t.key, layer)


def test_the_matching_rule():
    keys = lambda *a: {t.key for t in match_tables(*a)}  # noqa: E731
    assert keys("vgg16", "imagefolder:../shared/data/cifar10", 10) == {"tzach-vgg16-cifar10", "meir-table6-k10"}
    assert keys("vgg16", "cifar10", 3) == {"meir-table6-k3"}
    assert keys("vgg16", "imagefolder:/data/CIFAR-100/", 40) == {"meir-table4-k40"}
    assert keys("vgg16", "cifar100", 100) == {"meir-table1"}
    assert keys("timm:efficientnet_b0", "cifar100", 100) == {"meir-table2"}
    assert keys("timm:efficientnet_b0.ra_in1k", "imagefolder:/x/imagenet", 1000) == {"meir-table3"}
    assert keys("vgg6", "cifar10", 10) == {"tzach-vgg6-cifar10"}
    assert keys("vgg16", "digits", 10) == set() and keys("vgg16", "cifar10", 5) == set()
    assert keys("timm:resnet18", "cifar100", 100) == set()
    assert dataset_of("imagefolder:data/cifar_10") == "cifar10"
    assert tap_for("vgg16", 10) == "features.pool10" and tap_for("timm:efficientnet_b0", 9) == "bn2"
    assert tap_for("torchvision:efficientnet_b0", 3) == "features.2" and tap_for("vgg16", 11) is None


def _result(model="vgg16", dataset="cifar10", k=10):
    from test_report import _make_tap

    rng = np.random.default_rng(0)
    taps = [_make_tap(name, k, 6, rng) for name in ("features.pool7", "features.pool10", "features.relu12")]
    taps[1].accuracy = 0.931
    return AnalysisResult(model=model, dataset=dataset, label_names=[f"l{i}" for i in range(k)], taps=taps,
                          plateau="features.pool10", plateau_tolerance=0.5, model_accuracy=0.93,
                          config={"split": "test", "model": {"name": model, "options": {"width": 0.25}}})


def test_compare_gives_measured_published_and_difference():
    result = _result()
    (tz, rows), (t6, _) = compare_result(result)
    assert tz.key == "tzach-vgg16-cifar10" and t6.key == "meir-table6-k10"
    by_layer = {r["layer"]: r for r in rows}
    assert [r["layer"] for r in rows] == [13, 10, 7, 4, 2]
    ten = by_layer[10]
    assert ten["tap"] == "features.pool10" and ten["analysed"] and not by_layer[13]["analysed"]
    acc = ten["columns"]["accuracy"]
    assert acc["measured"] == 0.931 and acc["published"] == 0.94 and acc["difference"] == pytest.approx(-0.009)
    assert ten["columns"]["N_f"] == {"measured": 6, "published": 512, "difference": -506}
    assert ten["columns"]["F_s"]["difference"] == "same"
    assert set(ten["columns"]) == {"N_f", "F_s", "FC_s", "accuracy", "n", "N_c", "C_s", "1", "2", "3", "4", "5", "6"}
    measured = measured_from_result(result)["features.pool10"]
    assert ten["columns"]["n"]["difference"] == pytest.approx(measured["n"] - 3.8)
    assert by_layer[13]["columns"]["accuracy"]["measured"] is None
    assert by_layer[13]["columns"]["accuracy"]["difference"] is None
    assert compare(PUBLISHED["meir-table6-k3"], {}, "vgg16")[0]["analysed"] is False


def test_the_report_shows_published_beside_measured(tmp_path):
    write_report(_result(), tmp_path, filters_per_tap=0)
    md = (tmp_path / "report.md").read_text()
    assert "## Published values beside these" in md
    assert "Fig. 2A" in md and "Table 6, 'VGG-16 on CIFAR-10/10'" in md
    assert "0.931 / 0.940 (-0.009)" in md  # accuracy at layer 10, both tables
    assert "features.pool13 (not analysed)" in md and "width 0.25" in md
    assert "Published values" in (tmp_path / "report.html").read_text()
    other = tmp_path / "other"
    write_report(_result(dataset="digits"), other, filters_per_tap=0)
    assert "Published values" not in (other / "report.md").read_text()
