"""Bad input through the real command line (a subprocess): exit status 2, one line ``error: ...``
naming the input and what would be valid, no traceback, and nothing written earlier is touched."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

CLI = [sys.executable, "-m", "compress.cli"]
TINY = ["--model", "vgg6", "--width", "0.125", "--fc-hidden", "none"]
RECIPE = {"name": "bad", "model": {"name": "vgg6", "options": {"width": 0.125, "fc_hidden": []},
                                   "train": {"epochs": 1}},
          "data": {"name": "digits", "limit_train": 100, "limit_test": 50}, "steps": [{"trim": {"tap": "plateau"}}]}
SENTINELS = {"config.yaml": b"model: an earlier run\n", "analysis.json": b'{"earlier": true}\n',
             "checkpoint.pt": os.urandom(4096)}


def _run(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A vgg6 trained for one epoch on 200 digits (meta: vgg6, width 0.125, 10 classes)."""
    out = tmp_path_factory.mktemp("trained")
    proc = _run(["train", *TINY, "--epochs", "1", "--limit-train", "200", "--limit-test", "100", "--out", str(out),
                 "--quiet"])
    assert proc.returncode == 0, proc.stderr
    return out / "checkpoint.pt"


def _images(root: Path, classes: dict[str, list[tuple[str, str, int]]]) -> str:
    """An image folder: ``{split/class: [(file name, PIL mode, size), ...]}``; returns ``imagefolder:<root>``."""
    for folder, files in classes.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name, mode, size in files:
            Image.new(mode, (size, size), color=60 if mode in ("L", "P") else (60,) * len(mode)).save(root / folder / name)
    return f"imagefolder:{root}"


def _good_split(split: str) -> dict:
    return {f"{split}/{c}": [(f"{i}.png", "RGB", 8) for i in range(2)] for c in ("cat", "dog")}


def _recipe(tmp: Path, change: dict | None = None, text: str | None = None) -> str:
    path = tmp / "recipe.yaml"
    path.write_text(text if text is not None else yaml.safe_dump({**RECIPE, **(change or {})}))
    return str(path)


# Each case: (tmp, out, ckpt) -> (argv, fragments the error line must contain: the input and what is valid).
def _unknown_model(tmp, out, ckpt):
    return ["train", "--model", "vgg17", "--out", out], ["'vgg17'", "valid: avgg16", "vgg6"]


def _unknown_dataset(tmp, out, ckpt):
    return ["analyze", "--checkpoint", ckpt, "--data", "cifar11", "--out", out], ["'cifar11'", "valid:", "digits"]


def _unknown_tap(tmp, out, ckpt):
    return (["analyze", "--checkpoint", ckpt, "--taps", "features.pool9", "--out", out],
            ["'features.pool9'", "valid:", "features.pool5"])


def _unknown_step(tmp, out, ckpt):
    return (["run", _recipe(tmp, {"steps": [{"prnue": {}}]}), "--out", out],
            ["'prnue'", "recipe.steps[0]", "valid:", "dilute", "trim"])


def _recipe_unknown_key(tmp, out, ckpt):
    return ["run", _recipe(tmp, {"modle": {}}), "--out", out], ["'modle'", "did you mean 'model'", "valid:"]


def _recipe_wrong_type(tmp, out, ckpt):
    model = {**RECIPE["model"], "train": {"epochs": "ten"}}
    return ["run", _recipe(tmp, {"model": model}), "--out", out], ["recipe.model.train.epochs", "expected int", "'ten'"]


def _recipe_unsafe_yaml(tmp, out, ckpt):
    recipe = _recipe(tmp, text="name: !!python/object/apply:os.system ['touch pwned']\n")
    return ["run", recipe, "--out", out], ["recipe.yaml", "not valid YAML", "no !!python tags"]


def _dilution_target(tmp, out, ckpt):
    steps = [{"dilute": {"layer": "features.conv5", "target": 600}}]
    return (["run", _recipe(tmp, {"steps": steps}), "--out", out],
            ["target 600", "features.conv5 with 64 filters", "choose 1..64", "'auto'"])


def _checkpoint_of_another_model(tmp, out, ckpt):
    return (["analyze", "--model", "vgg16", "--checkpoint", ckpt, "--out", out],
            [ckpt, "does not fit the model", "missing:", "saved for model 'vgg6' (width=0.125", "with 10 classes"])


def _checkpoint_other_classes(tmp, out, ckpt):
    return (["analyze", "--checkpoint", ckpt, "--labels", "5", "--out", out],
            [ckpt, "shape mismatch: head.out.weight", "with 10 classes"])


def _truncated_checkpoint(tmp, out, ckpt):
    data = Path(ckpt).read_bytes()
    bad = tmp / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    return (["analyze", "--model", "vgg6", "--checkpoint", str(bad), "--out", out],
            ["truncated.pt", "truncated", ".pt/.pth state dict or a .safetensors"])


def _pickled_code_checkpoint(tmp, out, ckpt):
    bad = tmp / "pickled.pt"
    torch.save(torch.nn.Linear(2, 2), bad)  # a whole module: unpickling it would import and run code
    return (["analyze", "--model", "vgg6", "--checkpoint", str(bad), "--out", out],
            ["pickled.pt", "carries pickled code and was refused", "safetensors"])


def _corrupt_onnx(tmp, out, ckpt):
    bad = tmp / "model.onnx"
    bad.write_bytes(b"\x08\x07\x12\x04this is not a protobuf graph" + os.urandom(64))
    image = tmp / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    return ["predict", str(bad), str(image)], ["model.onnx", "corrupt or truncated", "compress export"]


def _empty_dataset(tmp, out, ckpt):
    (tmp / "empty" / "train").mkdir(parents=True)
    (tmp / "empty" / "test").mkdir(parents=True)
    return (["train", *TINY, "--data", f"imagefolder:{tmp / 'empty'}", "--out", out],
            ["empty/train", "holds no class folders", "one folder of images per class"])


def _empty_class(tmp, out, ckpt):
    data = _images(tmp / "imgs", {**_good_split("train"), **_good_split("test")})
    (tmp / "imgs" / "train" / "bird").mkdir()
    return ["train", *TINY, "--data", data, "--out", out], ["train/bird", "holds no images", "at least one"]


def _non_image_file(tmp, out, ckpt):
    data = _images(tmp / "imgs", {**_good_split("train"), **_good_split("test")})
    (tmp / "imgs" / "train" / "cat" / "notes.txt").write_text("not a picture")
    return ["train", *TINY, "--data", data, "--out", out], ["notes.txt", "not an image file", "valid: .jpg"]


def _undecodable_image(tmp, out, ckpt):
    data = _images(tmp / "imgs", {**_good_split("train"), **_good_split("test")})
    (tmp / "imgs" / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return ["train", *TINY, "--data", data, "--out", out], ["broken.png", "cannot be decoded", "remove or replace"]


def _images_too_small(tmp, out, ckpt):
    data = _images(tmp / "imgs", {**_good_split("train"), **_good_split("test")})  # 8x8, vgg6 pools 5 times
    return ["train", *TINY, "--data", data, "--out", out], ["img_size 8 is too small", "at least 32x32",
                                                            "--image-size 32"]


def _too_many_labels(tmp, out, ckpt):
    return ["analyze", "--checkpoint", ckpt, "--labels", "11", "--out", out], ["K=11", "outside 1..10"]


def _threshold(tmp, out, ckpt):
    return (["analyze", "--checkpoint", ckpt, "--threshold", "1.5", "--out", out],
            ["threshold 1.5", "outside (0, 1)", "0.3"])


def _empty_subset(tmp, out, ckpt):
    return ["train", *TINY, "--limit-train", "0", "--out", out], ["limit_train=0", "at least 1"]


def _unwritable_out(tmp, out, ckpt):
    # A folder below a regular file cannot be created, even by root (chmod does not stop root).
    blocker = tmp / "out" / "file.txt"
    blocker.write_bytes(b"an earlier artifact\n")
    target = blocker / "sub"
    return ["train", *TINY, "--out", str(target)], [str(target), "is not writable", "writable --out"]


CASES = [_unknown_model, _unknown_dataset, _unknown_tap, _unknown_step, _recipe_unknown_key, _recipe_wrong_type,
         _recipe_unsafe_yaml, _dilution_target, _checkpoint_of_another_model, _checkpoint_other_classes,
         _truncated_checkpoint, _pickled_code_checkpoint, _corrupt_onnx, _empty_dataset, _empty_class,
         _non_image_file, _undecodable_image, _images_too_small, _too_many_labels, _threshold, _empty_subset,
         _unwritable_out]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c.__name__.lstrip("_") for c in CASES])
def test_bad_input_is_refused_clearly_and_loses_nothing(case, ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name, data in SENTINELS.items():  # artifacts of an earlier run in the output folder
        (out / name).write_bytes(data)
    argv, fragments = case(tmp_path, str(out), str(ckpt))
    before = _snapshot(out)
    ckpt_bytes = ckpt.read_bytes()
    proc = _run(argv)
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    assert err.splitlines() == [err] and err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert _snapshot(out) == before  # every earlier artifact intact, no temporary files left
    assert ckpt.read_bytes() == ckpt_bytes
    assert not (Path.cwd() / "pwned").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="permissions do not stop root (the file case covers it)")
def test_read_only_output_folder(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    (out / "config.yaml").write_bytes(SENTINELS["config.yaml"])
    out.chmod(0o500)
    try:
        proc = _run(["train", *TINY, "--out", str(out)])
    finally:
        out.chmod(0o700)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "is not writable" in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "config.yaml").read_bytes() == SENTINELS["config.yaml"]


def test_mixed_grey_rgba_palette_images_are_read_as_rgb(tmp_path):
    """Mixed image modes are not an error: every image becomes 3-channel RGB."""
    modes = ["L", "RGBA", "P", "RGB", "LA", "CMYK"]
    data = _images(tmp_path / "imgs", {f"{split}/{c}": [(f"{m}.png" if m != "CMYK" else "cmyk.jpg", m, 8)
                                                          for m in modes]
                                       for split in ("train", "test") for c in ("a", "b")})
    proc = _run(["train", *TINY, "--data", data, "--image-size", "32", "--epochs", "1", "--out", str(tmp_path / "run"),
                 "--quiet"])
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
