"""Feature caches: one pass for all taps, float16 option, memory-mapped files when large."""

import torch

from compress.analysis.features import extract_features
from compress.models import run_to_taps
from compress.data import iterate_batches

from conftest import tiny_vgg

TAPS = ["features.pool1", "features.pool3", "features.pool5"]


def test_cache_equals_direct_forward(small_digits):
    model = tiny_vgg().eval()
    cache = extract_features(model, small_digits, small_digits.test, TAPS, batch_size=64, progress=False)
    x, _ = next(iterate_batches(small_digits, small_digits.test, 64))
    with torch.no_grad():
        direct = run_to_taps(model, x, TAPS)
    for t in TAPS:
        assert torch.equal(cache.features[t][:64], direct[t])
    assert torch.equal(cache.labels, small_digits.test.labels)
    assert not cache.on_disk


def test_float16_and_disk_cache(small_digits, tmp_path):
    model = tiny_vgg().eval()
    ref = extract_features(model, small_digits, small_digits.test, TAPS, progress=False)
    half = extract_features(model, small_digits, small_digits.test, TAPS, dtype="float16", progress=False)
    assert half.nbytes * 2 == ref.nbytes
    disk = extract_features(model, small_digits, small_digits.test, TAPS, max_memory_gb=1e-6, cache_dir=tmp_path,
                            progress=False)
    assert disk.on_disk and disk.folder.parent == tmp_path  # each cache in its own folder under cache_dir
    assert sorted(p.name for p in disk.folder.glob("*.npy")) == sorted(f"{t}.npy" for t in TAPS)
    for t in TAPS:
        assert torch.equal(disk.features[t], ref.features[t])
        assert torch.allclose(half.features[t].float(), ref.features[t], rtol=1e-2, atol=1e-2)
    again = extract_features(model, small_digits, small_digits.train, TAPS, max_memory_gb=1e-6, cache_dir=tmp_path,
                             progress=False)  # a second cache in the same cache_dir leaves the first intact
    assert again.folder != disk.folder
    for t in TAPS:
        assert torch.equal(disk.features[t], ref.features[t])
    folder = disk.folder
    del disk
    import gc

    gc.collect()
    assert not folder.exists()  # the files go with the cache


def test_tap_pooling(small_digits):
    model = tiny_vgg().eval()
    full = extract_features(model, small_digits, small_digits.test, ["features.pool1"], progress=False)
    pooled = extract_features(model, small_digits, small_digits.test, ["features.pool1"], pool=7, progress=False)
    assert pooled.features["features.pool1"].shape[1:] == (8, 3, 3)  # 16x16 -> ceil(16/7) = 3
    expected = torch.nn.functional.avg_pool2d(full.features["features.pool1"], 7, 7, ceil_mode=True)
    assert torch.allclose(pooled.features["features.pool1"], expected)
