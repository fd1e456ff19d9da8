"""Contract tests of the analysis report: files, self-contained HTML, Markdown links, escaping."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from compress.analysis.result import AnalysisResult, LayerStats, TapAnalysis
from compress.reports.analysis import write_report

DATA_URI = "data:image/png;base64,"


def _greedy_clusters(clipped: np.ndarray) -> np.ndarray:
    """(K,) cluster index per label: in label order, a label joins the current cluster only if the
    whole set stays an all-ones square block; labels with a zero diagonal get -1."""
    k = clipped.shape[0]
    ids = np.full(k, -1, dtype=np.int64)
    n = 0
    for i in range(k):
        if ids[i] >= 0 or not clipped[i, i]:
            continue
        members = [i]
        for j in range(i + 1, k):
            if ids[j] < 0 and clipped[j, j] and clipped[np.ix_(members + [j], members + [j])].all():
                members.append(j)
        ids[members] = n
        n += 1
    return ids


def _make_tap(name: str, k: int, n_filters: int, rng: np.random.Generator, empty: tuple[int, ...] = ()) -> TapAnalysis:
    fields = rng.normal(size=(n_filters, k, k)) + 2.0 * np.eye(k) * rng.random((n_filters, 1, 1))
    normalized = fields / np.abs(fields).max(axis=(1, 2), keepdims=True)
    clipped = normalized > 0.3
    for c in empty:  # a filter without any diagonal one has no cluster
        clipped[c, np.arange(k), np.arange(k)] = False
    cluster_ids = np.stack([_greedy_clusters(m) for m in clipped])
    sizes = [np.bincount(row[row >= 0], minlength=1) for row in cluster_ids]  # [0] for no cluster
    noise = np.array([int(m.sum()) - int((s**2).sum()) for m, s in zip(clipped, sizes)])
    has = (cluster_ids >= 0).any(axis=1)
    all_sizes = np.concatenate([s for s, h in zip(sizes, has) if h] or [np.zeros(0, dtype=np.int64)])
    frac = (np.bincount(all_sizes, minlength=k + 1)[1:] / max(len(all_sizes), 1)).tolist()
    stats = LayerStats(
        noise=float(noise[has].mean()) if has.any() else float("nan"),
        clusters_per_filter=float((cluster_ids.max(axis=1) + 1)[has].mean()) if has.any() else float("nan"),
        cluster_size=float(all_sizes.mean()) if len(all_sizes) else float("nan"),
        size_fractions=frac,
        filters_without_cluster=int((~has).sum()),
        label_counts=(cluster_ids >= 0).sum(axis=0).tolist(),
    )
    decision = rng.random((n_filters, k, k))
    decision /= decision.sum(axis=2, keepdims=True)
    snr = {kind: {part: rng.random(k) * scale for part in ("signal", "noise_internal", "noise_external")}
           for kind, scale in (("boolean", 10.0), ("field", 100.0))}
    snr["boolean"]["noise_internal"][:] = 0.0  # exercises the zero-division guard
    return TapAnalysis(
        name=name, n_filters=n_filters, spatial=(2, 2), accuracy=float(rng.random()), train_accuracy=0.9,
        threshold=0.3, probe_weight=rng.normal(size=(k, n_filters, 2, 2)), fields=fields, decision=decision,
        normalized=normalized, clipped=clipped, cluster_ids=cluster_ids, noise=noise, stats=stats, snr=snr,
        estimates={"signal": 3.0, "noise_internal": 0.5, "noise_external": 0.0, "snr_external": float("inf")},
    )


def _make_result(k: int = 10, taps: tuple[tuple[str, int], ...] = (("features.4", 5), ("features.9", 4),
                 ("features.16", 6)), labels: list[str] | None = None, empty_in_last: tuple[int, ...] = ()):
    rng = np.random.default_rng(0)
    made = [_make_tap(name, k, c, rng, empty_in_last if i == len(taps) - 1 else ()) for i, (name, c) in
            enumerate(taps)]
    return AnalysisResult(
        model="vgg16", dataset="cifar10", label_names=labels or [f"label{i}" for i in range(k)], taps=made,
        plateau=made[1].name if len(made) > 1 else made[0].name, plateau_tolerance=0.5, model_accuracy=0.93,
    )


def _check_report(paths: dict[str, Path], folder: Path) -> tuple[str, str]:
    md_path, html_path = paths["markdown"], paths["html"]
    assert md_path.is_file() and html_path.is_file()
    md, page = md_path.read_text(encoding="utf-8"), html_path.read_text(encoding="utf-8")
    pngs = sorted((folder / "figures").glob("*.png"))
    assert pngs
    assert page.count(DATA_URI) == len(pngs)
    assert "<table>" in page and '<meta charset="utf-8">' in page and "<title>" in page
    for forbidden in ("http://", "https://", 'src="figures', "<script"):
        assert forbidden not in page
    linked = re.findall(r"!\[[^\n]*?\]\((figures/[^)]+\.png)\)", md)
    assert sorted(set(linked)) == sorted(f"figures/{p.name}" for p in pngs)
    assert all((folder / p).is_file() for p in linked)
    return md, page


def test_report_is_complete_and_self_contained(tmp_path):
    result = _make_result()
    paths = write_report(result, tmp_path, filters_per_tap=2)
    assert set(paths) == {"markdown", "html"}
    md, page = _check_report(paths, tmp_path)
    for text in (md, page):
        assert "Analysis of vgg16 on cifar10 (10 labels)" in text and "0.930" in text
        assert "features.9 (plateau)" in text
        assert "within 0.5 accuracy points" in text
    assert '<tr class="plateau"><td>features.9 (plateau)</td>' in page
    names = {p.name for p in (tmp_path / "figures").glob("*.png")}
    assert {"accuracy.png", "noise_cluster_size.png", "snr_01_features.9.png"} <= names
    assert {f"clusters_{i:02d}_{t.name}.png" for i, t in enumerate(result.taps)} <= names
    for i, t in enumerate(result.taps):
        picked = sorted(n for n in names if n.startswith(f"filter_{i:02d}_"))
        assert len(picked) == min(2, int(((t.cluster_ids >= 0).any(axis=1)).sum()))
    # sections come in the required order
    order = ["Accuracy and filter statistics", "Probe accuracy per tap", "Noise and cluster size",
             "Signal and noise", "Clusters per tap", "Single-filter matrices"]
    assert [md.index(h) for h in order] == sorted(md.index(h) for h in order)
    assert "| inf |" in md  # SNR_I with zero noise_I


def test_filter_choice_prefers_most_clustered_labels(tmp_path):
    result = _make_result(taps=(("only", 6),))
    write_report(result, tmp_path, filters_per_tap=1)
    tap = result.taps[0]
    labelled = (tap.cluster_ids >= 0).sum(axis=1)
    best = int(np.argmax(labelled))
    assert [p.name for p in (tmp_path / "figures").glob("filter_*.png")] == [f"filter_00_only_{best}.png"]


def test_two_labels_and_a_filter_without_clusters(tmp_path):
    result = _make_result(k=2, taps=(("a", 3), ("b", 1)), empty_in_last=(0,))
    assert result.taps[-1].stats.filters_without_cluster == 1
    md, page = _check_report(write_report(result, tmp_path), tmp_path)
    assert "No filter of this tap has a cluster." in page
    assert not list((tmp_path / "figures").glob("filter_01_*.png"))


def test_many_labels(tmp_path):
    result = _make_result(k=100, taps=(("deep", 2),))
    _check_report(write_report(result, tmp_path, filters_per_tap=1), tmp_path)
    assert all(p.stat().st_size < 400_000 for p in (tmp_path / "figures").glob("*.png"))


@pytest.mark.parametrize("special", ["<cat&dog>", "$x$ \"q\" 'a'"])
def test_user_strings_are_escaped(tmp_path, special):
    labels = [special] + [f"l{i}" for i in range(1, 5)]
    result = _make_result(k=5, taps=(("t<1>", 3), ("t&2", 3)), labels=labels)
    result.model = "net<b>"
    md, page = _check_report(write_report(result, tmp_path), tmp_path)
    assert "&lt;b&gt;" in page and "<b>" not in page
    assert "t&lt;1&gt;" in page and "t&amp;2" in page
    if special.startswith("<"):
        assert "&lt;cat&amp;dog&gt;" in page and "<cat&dog>" not in page
        assert "\\<cat&dog\\>" in md and "<cat&dog>" not in md
