"""Streamed image folders (:mod:`compress.streaming`): the same images and labels as the
in-memory path, augmentation seeded per epoch (a resumed run ends where an uninterrupted one
would, at any number of workers), damaged files as one-line errors, and resident memory that
does not grow with the folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compress.data import DataConfig, iterate_batches, load_data
from compress.errors import OptionError, UserError
from compress.streaming import StreamSet
from compress.training import TrainConfig, fit

from conftest import tiny_vgg

ROOT = Path(__file__).resolve().parents[1]


def _folder(root: Path, classes: int = 3, per: tuple[int, int] = (8, 4), side: int = 40, smooth: bool = False,
            seed: int = 0) -> str:
    """An ImageNet-layout folder of small JPEGs (random noise, or smooth gradients that encode fast)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, side, dtype=np.float32)
    for split, n in zip(("train", "test"), per):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                if smooth:
                    k = rng.random(3, dtype=np.float32)
                    a = (255 * (ramp[:, None, None] * k + ramp[None, :, None] * (1 - k))).clip(0, 255)
                else:
                    a = rng.random((side, side, 3)) * 255
                Image.fromarray(a.astype(np.uint8)).save(d / f"{i:04d}.jpg", quality=90)
    return f"imagefolder:{root}"


def _batches(bundle, split, **kw):
    return list(iterate_batches(bundle, split, 5, **kw))


@pytest.mark.parametrize("size", [None, 32, 160])
def test_streamed_evaluation_equals_in_memory(tmp_path, size):
    name = _folder(tmp_path)
    mem = load_data(name, image_size=size, val_fraction=0.25, stream=False)
    streamed = load_data(name, image_size=size, val_fraction=0.25, stream=True, workers=2)
    assert isinstance(streamed.train, StreamSet) and not isinstance(mem.train, StreamSet)
    assert streamed.input_size == mem.input_size == (3, size or 40, size or 40)
    assert streamed.label_names == mem.label_names
    for split in ("train", "val", "test"):
        a, b = getattr(mem, split), getattr(streamed, split)
        assert torch.equal(a.labels, b.labels)
        assert torch.equal(a.images[2:5], b.images[2:5]) and torch.equal(a.images[1], b.images[1])
        got, want = _batches(streamed, b), _batches(mem, a)
        assert len(got) == len(want)
        for (x, y), (x0, y0) in zip(got, want):
            assert torch.equal(x, x0) and torch.equal(y, y0)


def test_auto_streams_above_the_memory_budget(tmp_path):
    name = _folder(tmp_path, per=(2, 1))
    assert not isinstance(DataConfig(name, image_size=32, val_fraction=0).load().train, StreamSet)
    small = DataConfig(name, image_size=32, val_fraction=0, max_memory_gb=1e-6).load()
    assert isinstance(small.train, StreamSet) and isinstance(small.test, StreamSet)
    assert not isinstance(DataConfig(name, val_fraction=0, max_memory_gb=1e-6, stream=False).load().train, StreamSet)
    with pytest.raises(OptionError):
        DataConfig(stream="sometimes")
    with pytest.raises(UserError, match="only image folders"):
        load_data("digits", stream=True)


@pytest.mark.parametrize("size", [32, 160])
def test_augmentation_is_seeded_not_tied_to_workers(tmp_path, size):
    name = _folder(tmp_path)
    streamed = {w: load_data(name, image_size=size, stream=True, workers=w) for w in (0, 2)}
    runs = {w: _batches(b, b.train, shuffle=True, augmented=True, generator=torch.Generator().manual_seed(7))
            for w, b in streamed.items()}
    for (x, y), (x2, y2) in zip(runs[0], runs[2]):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    b = streamed[0]
    other = _batches(b, b.train, shuffle=True, augmented=True, generator=torch.Generator().manual_seed(8))
    plain = torch.cat([x for x, _ in _batches(b, b.train)])
    aug = torch.cat([x for x, _ in runs[0]])
    assert aug.shape == plain.shape == (24, 3, size, size)
    assert not torch.equal(torch.cat([x for x, _ in other]), aug)  # another epoch, other crops and flips


def test_resumed_streaming_run_equals_uninterrupted(tmp_path):
    bundle = load_data(_folder(tmp_path / "data"), image_size=32, stream=True, workers=2, val_fraction=0.25)
    cfg = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, lr_step=1, lr_decay=0.5, seed=3, batch_size=6)
    torch.manual_seed(0)
    a = tiny_vgg(num_classes=3)
    fit(a, bundle, TrainConfig(epochs=2, **cfg), tmp_path / "a", progress=False)
    torch.manual_seed(0)
    b = tiny_vgg(num_classes=3)
    fit(b, bundle, TrainConfig(epochs=1, **cfg), tmp_path / "b", progress=False)  # "interrupted" after 1
    torch.manual_seed(0)
    b2 = tiny_vgg(num_classes=3)
    assert len(fit(b2, bundle, TrainConfig(epochs=2, **cfg), tmp_path / "b", progress=False)) == 2
    for k, v in a.state_dict().items():
        assert torch.equal(v, b2.state_dict()[k]), k


def test_damaged_file_is_one_line_error_naming_it(tmp_path):
    name = _folder(tmp_path / "data")
    bad = tmp_path / "data" / "train" / "class1" / "0003.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    bundle = load_data(name, image_size=32, stream=True, workers=2)
    with pytest.raises(UserError, match="0003.jpg") as e:
        _batches(bundle, bundle.train, shuffle=True, augmented=True)
    assert "Traceback" not in str(e.value) and "\n" not in str(e.value)
    out = subprocess.run([sys.executable, "-m", "compress.cli", "train", "--data", name, "--image-size", "32",
                          "--stream", "--workers", "2", "--model", "vgg6", "--width", "0.125", "--epochs", "1",
                          "--out", str(tmp_path / "run")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(bad) in lines[0], out.stderr


def test_a_file_of_another_size_is_named(tmp_path):
    name = _folder(tmp_path / "data", per=(3, 2))
    odd = tmp_path / "data" / "train" / "class2" / "0001.jpg"
    Image.new("RGB", (40, 48)).save(odd)
    bundle = load_data(name, stream=True, workers=0)
    with pytest.raises(UserError, match=r"0001\.jpg.*40x48.*--image-size"):
        _batches(bundle, bundle.train)


_MEASURE = r"""
import json, sys
import torch
from torch import nn
from compress.data import load_data
from compress.analysis.features import extract_features

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

torch.set_num_threads(1)
model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64, 3))
before = status("VmHWM")
bundle = load_data(sys.argv[1], stream=sys.argv[2] == "stream", workers=1)
cache = extract_features(model, bundle, bundle.train, ["2"], batch_size=16, progress=False, max_memory_gb=0.001)
assert cache.features["2"].shape == (len(bundle.train), 4, 4, 4)
print(json.dumps({"grown": status("VmHWM") - before, "decoded": len(bundle.train) * 3 * 256 * 256}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc (Linux)")
def test_streamed_analysis_keeps_resident_memory_small(tmp_path):
    """600 images of 256x256 (115 MiB decoded): feature extraction over the streamed folder (into
    a memory-mapped cache) grows the peak resident memory by less than the decoded size; decoding
    the folder into memory grows it by more."""
    name = _folder(tmp_path / "data", classes=3, per=(200, 1), side=256, smooth=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    grown = {}
    for mode in ("stream", "memory"):
        out = subprocess.run([sys.executable, "-c", _MEASURE, name, mode], capture_output=True, text=True, env=env,
                             timeout=300)
        assert out.returncode == 0, out.stderr
        grown[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    bound = grown["stream"]["decoded"]
    assert grown["stream"]["grown"] < bound < grown["memory"]["grown"], grown


def test_another_number_of_workers_resumes_the_same_run(tmp_path):
    import yaml

    from compress.data import DataConfig
    from compress.jobs import check_resume, settings

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(settings(data=DataConfig(name="digits", workers=2))))
    check_resume(tmp_path / "config.yaml", settings(data=DataConfig(name="digits", workers=0)))
    with pytest.raises(UserError, match="data.stream"):
        check_resume(tmp_path / "config.yaml", settings(data=DataConfig(name="digits", workers=2, stream=False)))


def test_training_transform_is_seeded_and_leaves_torch_rng_alone(tmp_path):
    """The random-resized crop (>= CROP_FROM px) and the flip + shift (below) depend on the seed
    alone, differ between seeds, stay within the image, and never draw from torch's generator."""
    from compress.streaming import _crop_box, _training

    f = str(next(Path(_folder(tmp_path, classes=1, per=(2, 1), side=200).split(":", 1)[1]).rglob("*.jpg")))
    for size in (224, 32):
        torch.manual_seed(5)
        before = torch.get_rng_state()
        a, b, c = _training(f, size, True, 1), _training(f, size, True, 1), _training(f, size, True, 2)
        assert torch.equal(torch.get_rng_state(), before)
        assert a.shape == (3, size, size) and a.dtype == torch.uint8
        assert torch.equal(a, b) and not torch.equal(a, c)
    rng = np.random.default_rng(0)
    for h, w in ((200, 200), (50, 400), (400, 50)):
        for _ in range(200):
            top, left, ch, cw = _crop_box(rng, h, w)
            assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0
