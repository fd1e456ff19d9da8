"""The CIFAR-K protocol of the second paper (issue 15, point 3): the error tap, draws of labels
with their mean and spread, and CIFAR-100 draws spread over the 20 superclasses."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from compress.cli import main
from compress.data import DataConfig, label_groups
from compress.errors import OptionError, UserError
from compress.jobs import _error_tap
from compress.labelsets import (CIFAR100_FINE_LABELS, CIFAR100_SUPERCLASSES, choose_labels, nested_label_order,
                                superclass_groups, superclass_of)

# the dataset's own fine -> coarse index list (CIFAR-100 'train' file, coarse_labels of each fine label),
# as widely reproduced; checks the typed-in names against the index order
OFFICIAL_COARSE = [4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11, 6, 11, 5, 10, 7, 6, 13, 15, 3, 15,
                   0, 11, 1, 10, 12, 14, 16, 9, 11, 5, 5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4,
                   18, 17, 10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13, 16, 19, 2, 4, 6, 19,
                   5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13]


def test_the_superclasses_ship_with_the_package():
    assert len(CIFAR100_SUPERCLASSES) == 20 and all(len(v) == 5 for v in CIFAR100_SUPERCLASSES.values())
    assert len(CIFAR100_FINE_LABELS) == 100 == len(set(CIFAR100_FINE_LABELS))
    groups = superclass_groups(CIFAR100_FINE_LABELS)
    coarse = [next(j for j, g in enumerate(groups) if i in g) for i in range(100)]
    assert coarse == OFFICIAL_COARSE
    assert superclass_of("maple_tree") == "trees" and superclass_of("Pickup Truck") == "vehicles_1"
    assert superclass_groups(["0", "1"]) is None


@pytest.mark.parametrize("seed", range(5))
def test_cifar100_draws_take_labels_from_distinct_superclasses(seed):
    groups = superclass_groups(CIFAR100_FINE_LABELS)
    of = {i: j for j, g in enumerate(groups) for i in g}
    previous: set[int] = set()
    for k in (3, 10, 20, 40, 60, 100):
        labels = choose_labels(100, k, seed, groups)
        assert len(labels) == k == len(set(labels))
        counts = torch.bincount(torch.tensor([of[i] for i in labels]), minlength=20)
        assert int(counts.max()) - int(counts.min()) <= 1  # as evenly as possible over the 20 superclasses
        if k <= 20:
            assert len({of[i] for i in labels}) == k  # distinct superclasses
        assert previous <= set(labels)  # nested: the labels of a smaller K are inside
        previous = set(labels)
    assert choose_labels(100, 20, seed, groups) != choose_labels(100, 20, seed + 1, groups)


def test_the_plain_draw_is_the_one_made_before():
    for total, k, seed in ((10, 3, 0), (10, 6, 4), (100, 20, 7)):
        order = torch.randperm(total, generator=torch.Generator().manual_seed(seed)).tolist()
        assert choose_labels(total, k, seed) == sorted(order[:k])
        assert nested_label_order(total, seed) == order


def test_label_draw_option():
    assert label_groups(list(CIFAR100_FINE_LABELS), "auto") is not None
    assert label_groups(list(CIFAR100_FINE_LABELS), "random") is None
    assert label_groups([str(i) for i in range(10)], "auto") is None
    with pytest.raises(UserError, match="superclass"):
        label_groups([str(i) for i in range(10)], "superclass")
    with pytest.raises(OptionError):
        DataConfig(label_draw="evenly")
    assert DataConfig().label_draw == "auto"


def test_the_error_tap_rule():
    taps = [SimpleNamespace(name=n) for n in ("features.pool7", "features.pool10", "features.pool13")]
    result = SimpleNamespace(taps=taps, plateau="features.pool13")
    assert _error_tap(result, "auto") == "features.pool10"  # the paper's layer 10
    assert _error_tap(result, "plateau") == "features.pool13"
    assert _error_tap(result, "features.pool7") == "features.pool7"
    vgg6 = SimpleNamespace(taps=[SimpleNamespace(name=f"features.pool{i}") for i in range(1, 6)],
                           plateau="features.pool3")
    assert _error_tap(vgg6, "auto") == "features.pool3"  # no layer 10: the plateau, as before


def test_bad_tap_and_draws_are_refused_before_training(tmp_path, capsys):
    base = ["cifar-k", "--model", "vgg6", "--width", "0.125", "--ks", "2", "3", "--out", str(tmp_path / "x"), "--quiet"]
    assert main(base + ["--tap", "features.pool10"]) == 2
    err = capsys.readouterr().err
    assert "error: --tap 'features.pool10'" in err and "features.pool5" in err
    assert not (tmp_path / "x" / "K2").exists()
    assert main(base + ["--draws", "0"]) == 2
    assert "--draws 0" in capsys.readouterr().err


def test_cifar_k_with_two_draws_reports_both_and_their_mean(tmp_path, capsys):
    out = tmp_path / "ck"
    assert main(["cifar-k", "--model", "vgg6", "--width", "0.125", "--fc-hidden", "none", "--ks", "2", "3",
                 "--draws", "2", "--tap", "features.pool2", "--limit-train", "200", "--limit-test", "100",
                 "--epochs", "1", "--lr", "0.03", "--momentum", "0.9", "--probe-epochs", "2", "--out", str(out),
                 "--quiet"]) == 0
    summary = json.loads((out / "cifar_k.json").read_text())
    assert summary["draws"] == 2 and summary["tap_rule"] == "features.pool2"
    assert [r["K"] for r in summary["rows"]] == [2, 3]
    for r in summary["rows"]:
        assert r["n_draws"] == 2 and [d["draw"] for d in r["draws"]] == [0, 1]
        assert [d["label_seed"] for d in r["draws"]] == [0, 1] and [d["seed"] for d in r["draws"]] == [0, 1]
        assert r["tap"] == "features.pool2" and all(d["tap"] == "features.pool2" for d in r["draws"])
        accs = [d["accuracy"] for d in r["draws"]]
        assert r["accuracy"] == pytest.approx(sum(accs) / 2)
        assert r["std"]["accuracy"] == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5)
        assert [t["name"] for t in r["taps"]] == [f"features.pool{i}" for i in range(1, 6)]  # the per-layer table
        assert all({"N_f", "F_s", "FC_s", "accuracy", "n", "N_c", "C_s", "std"} <= set(t) for t in r["taps"])
    first, second = summary["rows"][0]["draws"][0], summary["rows"][1]["draws"][0]
    assert set(first["labels"]) <= set(second["labels"])  # nested within a draw
    assert len(summary["fit_draws"]) == 2
    assert (out / "K2" / "train" / "checkpoint.pt").is_file()  # draw 0 where a single draw puts it
    assert (out / "K2" / "draw1" / "analysis" / "analysis.json").is_file()
    report = (out / "report.md").read_text()
    assert "2 draws of labels per K" in report and " ± " in report and "## K = 3" in report
    assert "mean of 2 draws" in capsys.readouterr().out
