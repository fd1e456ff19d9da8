"""Phase 3 at large K (issue 17): fields from class sums, chunked clusters and SNR, sparse decision
matrices, the compact artifact (and the old one), the bounded memory and the report at K = 1,000."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.analysis import (AnalysisConfig, AnalysisResult, analyze_tap, clip_fields, field_matrices,
                               find_clusters_batched, label_snr, load_analysis, noise_batched, normalize_fields)
from compress.analysis.features import FeatureCache, extract_features
from compress.analysis.fields import (class_sums, decision_filters, decision_matrices, fields_from_sums,
                                      scan_fields)
from compress.analysis.result import PackedMatrices, SparseMatrices, pack_rows
from compress.errors import OptionError
from compress.reports.analysis import write_report

from conftest import tiny_vgg


def random_tap(n: int, k: int, c: int, h: int = 1, w: int = 1, seed: int = 0):
    """Features with clusters and noise like a trained probe's: relu(sparse class means + noise)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.rand(k, c, h, w, generator=g) * (torch.rand(k, c, 1, 1, generator=g) < 0.2) * 3.0
    labels = torch.randperm(n, generator=g) % k
    feats = torch.relu(mu[labels] + torch.randn(n, c, h, w, generator=g) - 0.5)
    weight = (mu - mu.mean(0)).reshape(k, -1) + 0.3 * torch.randn(k, c * h * w, generator=g)
    return FeatureCache(features={"tap": feats}, labels=labels), weight


def per_image_fields(feats: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, k: int):
    """The computation before issue 17: every image's (C, K) fields, summed per true label (here in
    float64), and the counts of each image's largest field (float32 fields, as before)."""
    n, c = feats.shape[:2]
    a, w = feats.reshape(n, c, -1), weight.reshape(k, c, -1)
    sums = torch.zeros(k, c, k, dtype=torch.float64).index_add_(0, labels, torch.einsum("ncs,kcs->nck", a.double(),
                                                                                        w.double()))
    f = torch.einsum("ncs,kcs->nck", a.float(), w.float())
    counts = torch.zeros(c, k, k, dtype=torch.float64)
    nonzero = (f != 0).any(2)
    for cc in range(c):
        counts[cc].index_put_((labels[nonzero[:, cc]], f[nonzero[:, cc], cc].argmax(1)),
                              torch.tensor(1.0, dtype=torch.float64), accumulate=True)
    return sums.permute(1, 0, 2), counts / counts.sum(2, keepdim=True).clamp_min(1)


@pytest.mark.parametrize("k,h,w", [(3, 2, 3), (10, 2, 2), (37, 3, 1), (120, 1, 1)])
def test_fields_from_class_sums_equal_per_image_sums(k, h, w):
    test, weight = random_tap(400, k, 6, h, w, seed=k)
    feats = test.features["tap"]
    expected, _ = per_image_fields(feats, test.labels, weight, k)
    got = fields_from_sums(class_sums(feats, test.labels, k, budget=4096), weight)  # many small chunks
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))


def test_fields_from_class_sums_on_a_tiny_model(small_digits):
    model = tiny_vgg().eval()
    cache = extract_features(model, small_digits, small_digits.test, ["features.pool2"], progress=False)
    feats = cache.features["features.pool2"]
    assert feats.shape[2] * feats.shape[3] > 1
    weight = torch.randn(10, feats[0].numel(), generator=torch.Generator().manual_seed(0))
    expected, decision = per_image_fields(feats, cache.labels, weight, 10)
    fields, got_decision = field_matrices(feats, cache.labels, weight, 10)
    torch.testing.assert_close(fields, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))
    torch.testing.assert_close(got_decision, decision, rtol=0, atol=1e-6)


@pytest.mark.parametrize("h,w", [(1, 1), (2, 2)])
def test_sparse_decision_matrices_equal_per_image_argmax(h, w):
    k, c = 40, 9
    test, weight = random_tap(600, k, c, h, w)
    weight = weight.reshape(k, c, -1)
    weight[:20, 0] = weight[20:, 0] = 0.5  # filter 0: every output ties (the first one wins)
    weight[:, 1] = 0.0  # filter 1: all fields zero, every input left out
    weight[::3, 2] = weight[1::3, 2].max() + 1  # filter 2: runs of ties at the largest weight
    feats = test.features["tap"]
    feats[::5, 3] = -feats[::5, 3]  # negative inputs: the largest field at the smallest weight
    _, expected = per_image_fields(feats, test.labels, weight, k)
    got = decision_matrices(feats, test.labels, weight.reshape(k, -1), k, budget=20_000)
    assert got.shape == (c, k, k)
    np.testing.assert_allclose(np.asarray(got), expected.numpy(), rtol=0, atol=1e-6)
    sample = decision_matrices(feats, test.labels, weight.reshape(k, -1), k, torch.tensor([5, 2]))
    assert 2 in sample and 3 not in sample
    np.testing.assert_allclose(sample[5], expected[5].numpy(), atol=1e-6)


def test_decision_filters_spec():
    ids = torch.tensor([[0, -1, -1], [0, 0, 1], [-1, -1, -1], [0, 1, -1]])
    assert decision_filters("auto", ids).tolist() == [0, 1, 2, 3]  # K = 3 <= 100
    assert decision_filters("none", ids) is None
    assert decision_filters("sample:2", ids).tolist() == [1, 3]  # most labels in clusters
    assert decision_filters("auto", torch.zeros(2, 101, dtype=torch.long)) is None
    for bad in ("sample:0", "some", "sample:x"):
        with pytest.raises(OptionError, match="decision"):
            AnalysisConfig(decision=bad)


def test_chunked_scan_equals_the_dense_pipeline():
    k, c = 50, 12
    test, weight = random_tap(2000, k, c, 2, 2)
    weight.view(k, c, -1)[:, 4] = -1.0  # a dead filter: no positive field
    sums = class_sums(test.features["tap"], test.labels, k)
    fields = fields_from_sums(sums, weight)
    clipped = clip_fields(normalize_fields(fields), 0.3)
    ids = find_clusters_batched(clipped)
    scan = scan_fields(sums, weight, 0.3, keep="float32", budget=1)  # one filter per chunk and group
    assert torch.equal(scan.cluster_ids, ids) and (ids[4] == -1).all()
    assert torch.equal(scan.noise, noise_batched(clipped, ids))
    np.testing.assert_array_equal(np.asarray(scan.clipped), clipped.numpy())
    for kind, parts in label_snr(clipped, fields, ids).items():
        for part, value in parts.items():
            torch.testing.assert_close(scan.snr[kind][part], value, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(scan.fields, fields.numpy(), rtol=1e-6)
    inside = (ids.unsqueeze(2) == ids.unsqueeze(1)) & (ids.unsqueeze(2) >= 0)
    torch.testing.assert_close(scan.cluster_fields, (fields * inside).sum((1, 2)), rtol=1e-9, atol=1e-9)


def test_greedy_clusters_at_large_k_match_a_plain_transcription():
    gen = torch.Generator().manual_seed(3)
    k = 150
    m = torch.rand(20, k, k, generator=gen) < 0.05
    m |= (torch.rand(20, k, 1, generator=gen) < 0.3) & (torch.rand(20, 1, k, generator=gen) < 0.3)
    ids = find_clusters_batched(m, budget=k * k * 4)  # several chunks
    for c in range(20):
        mc, taken, n = m[c].numpy(), set(), 0
        while True:
            free = [i for i in range(k) if mc[i, i] and i not in taken]
            if not free:
                break
            cluster = [free[0]] + []
            for j in free[1:]:
                if all(mc[j, a] and mc[a, j] for a in cluster):
                    cluster.append(j)
            assert sorted(torch.nonzero(ids[c] == n).flatten().tolist()) == cluster
            taken.update(cluster)
            n += 1
        assert int(ids[c].max()) + 1 == n


def test_pack_rows_equals_numpy_packbits():
    rng = np.random.default_rng(0)
    for k in (1, 7, 8, 9, 100, 1001):
        m = rng.random((3, 4, k)) < 0.4
        np.testing.assert_array_equal(pack_rows(m), np.packbits(m, axis=-1))
        packed = PackedMatrices.from_dense(m)
        assert packed.shape == m.shape and np.array_equal(packed[1], m[1]) and np.array_equal(packed[2, 3], m[2, 3])


def _result(taps, k: int) -> AnalysisResult:
    return AnalysisResult(model="random", dataset="random", label_names=[f"l{i}" for i in range(k)], taps=taps,
                          plateau=taps[0].name, plateau_tolerance=0.5)


def _assert_same_tap(a, b) -> None:
    np.testing.assert_array_equal(a.cluster_ids, b.cluster_ids)
    np.testing.assert_array_equal(a.noise, b.noise)
    np.testing.assert_array_equal(np.asarray(a.clipped), np.asarray(b.clipped))
    assert a.stats == b.stats and a.estimates == pytest.approx(b.estimates)
    for kind, parts in a.snr.items():
        for part, value in parts.items():
            np.testing.assert_allclose(b.snr[kind][part], value, rtol=1e-12)


@pytest.mark.parametrize("k,cfg,files", [
    (10, AnalysisConfig(), {"fields", "normalized", "decision_index"}),
    (120, AnalysisConfig(), set()),
    (120, AnalysisConfig(decision="sample:3", save_fields="float16"), {"fields", "normalized", "decision_index"}),
])
def test_compact_artifact_round_trips(tmp_path, k, cfg, files):
    test, weight = random_tap(1500, k, 8, 2, 1)
    tap = analyze_tap("tap", weight, test, k, 0.3, cfg=cfg)
    _result([tap], k).save(tmp_path)
    with np.load(tmp_path / "arrays" / "tap.npz") as z:
        optional = {"fields", "normalized", "decision", "decision_index"}
        assert optional & set(z.files) == files
        assert "clipped" not in z.files and z["clipped_bits"].shape == (8, k, (k + 7) // 8)
        if "fields" in files:
            assert z["fields"].dtype == np.dtype(cfg.save_fields if cfg.save_fields != "auto" else "float32")
    assert json.loads((tmp_path / "analysis.json").read_text())["artifact_version"] == 3  # 3: averaged fields (issue 15)
    back = load_analysis(tmp_path).taps[0]
    _assert_same_tap(tap, back)
    np.testing.assert_allclose(back.cluster_fields, tap.cluster_fields)
    if tap.decision is None:
        assert back.decision is None
    else:
        assert isinstance(back.decision, SparseMatrices)
        np.testing.assert_array_equal(np.asarray(back.decision), np.asarray(tap.decision))
    if tap.fields is None:
        assert back.fields is None and back.normalized is None
    else:
        np.testing.assert_array_equal(back.fields, tap.fields)


def _save_format_1(tap, folder: Path, k: int) -> None:
    """The writer before issue 17: dense float64 fields, float32 decision and normalised matrices,
    0/1 uint8 clipped matrices, artifact_version 1."""
    (folder / "arrays").mkdir(parents=True)
    arrays = {"probe_weight": tap.probe_weight.astype(np.float32), "fields": np.asarray(tap.fields, np.float64),
              "decision": np.asarray(tap.decision, np.float32), "normalized": np.asarray(tap.normalized, np.float32),
              "clipped": np.asarray(tap.clipped).astype(np.uint8), "cluster_ids": tap.cluster_ids.astype(np.int16),
              "noise": tap.noise.astype(np.int32), "label_counts": np.asarray(tap.stats.label_counts, np.int64)}
    arrays.update({f"snr_{kind}_{p}": np.asarray(v, np.float64) for kind, ps in tap.snr.items() for p, v in ps.items()})
    np.savez_compressed(folder / "arrays" / f"{tap.name}.npz", **arrays)
    summary = _result([tap], k).summary()
    summary["artifact_version"] = 1
    (folder / "analysis.json").write_text(json.dumps(summary))


def test_old_format_artifact_still_loads(tmp_path):
    k = 10
    test, weight = random_tap(800, k, 6, 2, 2)
    tap = analyze_tap("tap", weight, test, k, 0.3)
    _save_format_1(tap, tmp_path / "old", k)
    old = load_analysis(tmp_path / "old")
    back = old.taps[0]
    _assert_same_tap(tap, back)
    assert back.fields.dtype == np.float64 and back.clipped.dtype == bool and back.cluster_fields is None
    np.testing.assert_allclose(back.decision, np.asarray(tap.decision))
    write_report(old, tmp_path / "report", filters_per_tap=1)
    old.save(tmp_path / "new")  # read in format 1, written in format 2
    _assert_same_tap(tap, load_analysis(tmp_path / "new").taps[0])


def test_report_at_1000_labels_shows_the_clusters(tmp_path):
    k = 1000
    test, weight = random_tap(3000, k, 4, 1, 1)
    tap = analyze_tap("tap", weight, test, k, 0.3, cfg=AnalysisConfig(decision="sample:1"))
    assert tap.fields is None and tap.normalized is None and len(tap.decision.filters) == 1
    result = _result([tap], k)
    result.save(tmp_path / "run")
    paths = write_report(load_analysis(tmp_path / "run"), tmp_path / "report", filters_per_tap=2)
    md = paths["markdown"].read_text()
    assert "Only the" in md and "labels of the clusters are drawn (of 1000)" in md
    assert len(list((tmp_path / "report" / "figures").glob("filter_*.png"))) == 2


_MEMORY_PROBE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    sys.path.insert(0, {tests!r})
    from test_phase3_scale import random_tap, phase3_before
    from compress.analysis import AnalysisConfig, analyze_tap

    def status(key):
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key + ":"))
        return int(line.split()[1]) * 1024

    torch.set_num_threads(1)
    test, weight = random_tap(6000, 300, 64)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak of phase 3 alone
    base = status("VmRSS")
    if sys.argv[1] == "before":
        phase3_before(test, weight, 300)
    else:
        analyze_tap("tap", weight, test, 300, 0.3, cfg=AnalysisConfig(max_memory_gb=1.0))
    print(json.dumps(status("VmHWM") - base))
""")


def phase3_before(test, weight, k):
    """Phase 3 as before issue 17: (images, C, K) fields per batch of 1,000, dense float64 stacks."""
    feats, labels = test.features["tap"], test.labels
    c = feats.shape[1]
    sums = torch.zeros(k, c, k, dtype=torch.float64)
    counts = torch.zeros(k * c * k, dtype=torch.float64)
    w = weight.reshape(k, c, -1)
    for start in range(0, len(feats), 1000):
        f = torch.einsum("ncs,kcs->nck", feats[start:start + 1000].reshape(-1, c, w.shape[2]), w)
        y = labels[start:start + 1000]
        sums.index_add_(0, y, f.double())
        flat = (y.view(-1, 1) * c + torch.arange(c).view(1, -1)) * k + f.argmax(2)
        counts += torch.bincount(flat.flatten(), weights=(f != 0).any(2).flatten().double(), minlength=k * c * k)
    fields = sums.permute(1, 0, 2).contiguous()
    decision = counts.view(k, c, k).permute(1, 0, 2) / counts.view(k, c, k).permute(1, 0, 2).sum(2, keepdim=True)
    normalized = normalize_fields(fields)
    clipped = clip_fields(normalized, 0.3)
    ids = find_clusters_batched(clipped)
    return ids, noise_batched(clipped, ids), label_snr(clipped, fields, ids), decision


def _phase3_peak(which: str) -> int:
    code = _MEMORY_PROBE.format(tests=str(Path(__file__).parent))
    proc = subprocess.run([sys.executable, "-c", code, which], check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc/self/clear_refs")
def test_phase3_memory_is_bounded_where_the_old_way_is_not():
    bound = 128 * 2**20  # K = 300, C = 64: one dense (C, K, K) float64 array is 46 MB
    after, before = _phase3_peak("after"), _phase3_peak("before")
    assert after < bound < before, (after / 2**20, before / 2**20)
