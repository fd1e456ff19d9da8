"""Hostile files and run folders through the real command line, one process per case:
checkpoints and their metadata, ONNX metadata, images, recipe files, a run folder holding another
run, a full disk. Each exits with status 2 and one line ``error: ...``, prints no traceback and
leaves every earlier file as it was (see :mod:`badinput`); the cases that would allocate
gigabytes are refused within seconds."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
import torch
import yaml

from badinput import (RECIPE, T, TINY, Case, check_refused, copy_run, good_split, images, outcomes_of,
                      recipe)


def _model_file(tmp: Path, base, name: str, meta: dict | None = None, meta_text: str | None = None,
                nan: bool = False, source: Path | None = None) -> str:
    """A copy of the base model file (or ``source``) with its metadata changed or replaced, or a NaN weight."""
    obj = torch.load(source or base.model, weights_only=True)
    if meta is not None:
        obj["meta"] = json.dumps({**json.loads(obj["meta"]), **meta})
    if meta_text is not None:
        obj["meta"] = meta_text
    if nan:
        obj["model"]["features.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(obj, tmp / name)
    return str(tmp / name)


def _onnx_file(tmp: Path, base, **props: str) -> str:
    """A copy of the base ONNX export with metadata entries replaced (``None`` removes one)."""
    import onnx

    proto = onnx.load(str(base.onnx))
    kept = {p.key: p.value for p in proto.metadata_props}
    kept.update(props)
    del proto.metadata_props[:]
    for key, value in kept.items():
        if value is not None:
            proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(tmp / "hostile.onnx"))
    return str(tmp / "hostile.onnx")


def _bomb_png(path: Path, side: int = 100_000) -> Path:
    """A PNG a few hundred bytes long that declares side x side pixels (10 GB decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 999))
                     + chunk(b"IEND", b""))
    return path


def _png(tmp: Path) -> str:
    from PIL import Image

    Image.new("RGB", (32, 32), (10, 20, 30)).save(tmp / "x.png")
    return str(tmp / "x.png")


# ----------------------------------------------------------------------------- checkpoints and model files

def _checkpoint_of_another_model(tmp, out, base):
    return Case(["analyze", "--model", "vgg16", "--checkpoint", str(base.ckpt), "--out", out],
                [str(base.ckpt), "does not fit the model", "missing:", "saved for model 'vgg6' (width=0.125",
                 "with 10 classes"])


def _checkpoint_other_classes(tmp, out, base):
    return Case(["analyze", "--checkpoint", str(base.ckpt), "--labels", "5", "--out", out],
                [str(base.ckpt), "shape mismatch: head.out.weight", "with 10 classes"])


def _truncated_checkpoint(tmp, out, base):
    data = base.ckpt.read_bytes()
    (tmp / "truncated.pt").write_bytes(data[: len(data) // 2])
    return Case(["analyze", "--model", "vgg6", "--checkpoint", str(tmp / "truncated.pt"), "--out", out],
                ["truncated.pt", "truncated", ".pt/.pth state dict or a .safetensors"])


def _pickled_code_checkpoint(tmp, out, base):
    torch.save(torch.nn.Linear(2, 2), tmp / "pickled.pt")  # a whole module: unpickling it would run code
    return Case(["analyze", "--model", "vgg6", "--checkpoint", str(tmp / "pickled.pt"), "--out", out],
                ["pickled.pt", "carries pickled code and was refused", "safetensors"])


def _complex_safetensors(tmp, out, base):
    from safetensors.torch import save_file

    save_file({"features.conv1.weight": torch.zeros(2, dtype=torch.complex64)}, str(tmp / "c.safetensors"))
    return Case(["analyze", *TINY, "--checkpoint", str(tmp / "c.safetensors"), "--out", out],
                ["c.safetensors", "dtype torch.complex64", "floating-point or integer"])


def _meta_not_json(tmp, out, base):
    return Case(["export", _model_file(tmp, base, "m.pt", meta_text='{"model": "vgg6", '), "--out", out + "/m.onnx"],
                ["m.pt", "metadata is not valid JSON", "damaged"])


def _meta_input_of_ten_gigapixels(tmp, out, base):
    path = _model_file(tmp, base, "huge.pt", meta={"input_size": [3, 100_000, 100_000]})
    return Case(["export", path, "--out", out + "/m.onnx"], ["huge.pt", "input_size", "H, W <= 4096"], max_seconds=5)


def _meta_model_of_half_a_terabyte(tmp, out, base):
    path = _model_file(tmp, base, "wide.pt", meta={"model": "vgg16", "input_size": [3, 4096, 4096],
                                                    "options": {"width": 16, "fc_hidden": [65536]}})
    return Case(["export", path, "--out", out + "/m.onnx"], ["wide.pt", "parameters", "more than"], max_seconds=10)


def _meta_trim_without_tap(tmp, out, base):
    path = _model_file(tmp, base, "t.pt", meta={"transforms": [{"kind": "trim"}]})
    return Case(["export", path, "--out", out + "/m.onnx"], ["t.pt", "transforms[0]", "'trim' lacks the key 'tap'"])


def _meta_unknown_transform(tmp, out, base):
    path = _model_file(tmp, base, "t.pt", meta={"transforms": [{"kind": "explode"}]})
    return Case(["export", path, "--out", out + "/m.onnx"], ["transforms[0].kind 'explode'", "valid:", "trim"])


def _meta_transforms_not_a_list(tmp, out, base):
    path = _model_file(tmp, base, "t.pt", meta={"transforms": "trim"})
    return Case(["export", path, "--out", out + "/m.onnx"], ["transforms 'trim'", "a list"])


def _meta_negative_classes(tmp, out, base):
    path = _model_file(tmp, base, "n.pt", meta={"num_classes": -3})
    return Case(["bench", path, "--out", out], ["n.pt", "num_classes -3", "from 1 to 100,000"])


def _meta_labels_not_strings(tmp, out, base):
    path = _model_file(tmp, base, "l.pt", meta={"label_names": [1, 2]})
    return Case(["export", path, "--out", out + "/m.onnx"], ["l.pt", "label_names [1, 2]", "strings"])


def _meta_giant_width(tmp, out, base):
    path = _model_file(tmp, base, "w.pt", meta={"options": {"width": 1e9}})
    return Case(["analyze", "--checkpoint", path, "--out", out], ["w.pt", "options.width 1000000000.0", "(0, 16]"],
                max_seconds=10)


def _nan_weights_export(tmp, out, base):
    return Case(["export", _model_file(tmp, base, "nan.pt", nan=True), "--out", out + "/m.onnx"],
                ["nan.pt", "non-finite weights", "features.conv1.weight"])


def _nan_weights_analyze(tmp, out, base):
    path = _model_file(tmp, base, "nan.pt", nan=True, source=base.ckpt)
    return Case(["analyze", "--checkpoint", path, "--out", out], ["nan.pt", "non-finite weights"])


def _nan_weights_bench(tmp, out, base):
    return Case(["bench", _model_file(tmp, base, "nan.pt", nan=True), "--out", out], ["nan.pt", "non-finite weights"])


# ----------------------------------------------------------------------------- ONNX files

def _onnx_input_of_2_5_gigapixels(tmp, out, base):
    return Case(["predict", _onnx_file(tmp, base, input_size="[3, 50000, 50000]"), _png(tmp)],
                ["hostile.onnx", "input_size", "H, W <= 4096"], max_seconds=5)


def _onnx_input_of_2_5_gigapixels_bench(tmp, out, base):
    return Case(["bench", _onnx_file(tmp, base, input_size="[3, 50000, 50000]"), "--out", out],
                ["hostile.onnx", "input_size"], max_seconds=5)


def _onnx_nan_scale(tmp, out, base):
    return Case(["predict", _onnx_file(tmp, base, scale="nan"), _png(tmp)], ["scale 'nan'", "positive finite"])


def _onnx_short_mean(tmp, out, base):
    return Case(["predict", _onnx_file(tmp, base, mean="[0.5]"), _png(tmp)], ["mean [0.5]", "3 finite numbers"])


def _onnx_labels_not_a_list(tmp, out, base):
    return Case(["predict", _onnx_file(tmp, base, label_names='{"a": 1}'), _png(tmp)], ["label_names", "a list"])


def _onnx_deeply_nested_json(tmp, out, base):
    return Case(["predict", _onnx_file(tmp, base, label_names="[" * 100_000 + "]" * 100_000), _png(tmp)],
                ["label_names", "not valid JSON"])


def _onnx_without_metadata(tmp, out, base):
    return Case(["predict", _onnx_file(tmp, base, input_size=None, label_names=None), _png(tmp)],
                ["lacks the deployment metadata input_size, label_names", "compress export"])


def _corrupt_onnx(tmp, out, base):
    bad = tmp / "model.onnx"
    bad.write_bytes(b"\x08\x07\x12\x04this is not a protobuf graph" + bytes(range(64)))
    return Case(["predict", str(bad), _png(tmp)], ["model.onnx", "corrupt or truncated", "compress export"])


# ----------------------------------------------------------------------------- images

def _bomb_png_predict(tmp, out, base):
    return Case(["predict", str(base.onnx), str(_bomb_png(tmp / "bomb.png"))], ["bomb.png", "too large to decode"],
                max_seconds=5)


def _bomb_png_in_training_data(tmp, out, base):
    data = images(tmp / "imgs", {**good_split("train", 32), **good_split("test", 32)})
    _bomb_png(tmp / "imgs" / "train" / "cat" / "0.png")
    return Case(["train", *TINY, "--data", data, "--out", out], ["0.png", "too large to decode"], max_seconds=10)


def _images_differ_in_size(tmp, out, base):
    data = images(tmp / "imgs", {**good_split("train", 32), **good_split("test", 32)})
    images(tmp / "imgs", {"train/dog": [("big.png", "RGB", 48)]})
    return Case(["train", *TINY, "--data", data, "--out", out], ["differ in size", "32x32 (4 images", "48x48 (1 image",
                                                                 "--image-size"])


def _images_not_square(tmp, out, base):
    data = images(tmp / "imgs", {f"{s}/{c}": [("a.png", "RGB", (40, 32))] for s in ("train", "test") for c in "ab"})
    return Case(["train", *TINY, "--data", data, "--out", out], ["40x32", "not square", "--image-size"])


def _train_and_test_sizes_differ(tmp, out, base):
    data = images(tmp / "imgs", {**good_split("train", 32), **good_split("test", 40)})
    return Case(["train", *TINY, "--data", data, "--out", out], ["are 32x32 but", "are 40x40", "--image-size"])


def _empty_dataset(tmp, out, base):
    (tmp / "empty" / "train").mkdir(parents=True)
    (tmp / "empty" / "test").mkdir(parents=True)
    return Case(["train", *TINY, "--data", f"imagefolder:{tmp / 'empty'}", "--out", out],
                ["empty/train", "holds no class folders", "one folder of images per class"])


def _empty_class(tmp, out, base):
    data = images(tmp / "imgs", {**good_split("train"), **good_split("test")})
    (tmp / "imgs" / "train" / "bird").mkdir()
    return Case(["train", *TINY, "--data", data, "--out", out], ["train/bird", "holds no images", "at least one"])


def _non_image_file(tmp, out, base):
    data = images(tmp / "imgs", {**good_split("train"), **good_split("test")})
    (tmp / "imgs" / "train" / "cat" / "notes.txt").write_text("not a picture")
    return Case(["train", *TINY, "--data", data, "--out", out], ["notes.txt", "not an image file", "valid: .jpg"])


def _undecodable_image(tmp, out, base):
    data = images(tmp / "imgs", {**good_split("train"), **good_split("test")})
    (tmp / "imgs" / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return Case(["train", *TINY, "--data", data, "--out", out],
                ["broken.png", "cannot be decoded", "remove or replace"])


def _images_too_small(tmp, out, base):
    data = images(tmp / "imgs", {**good_split("train"), **good_split("test")})  # 8x8, vgg6 pools 5 times
    return Case(["train", *TINY, "--data", data, "--out", out], ["img_size 8 is too small", "at least 32x32",
                                                                 "--image-size 32"])


def _missing_image(tmp, out, base):
    return Case(["predict", str(base.onnx), str(tmp / "nope.png")], ["nope.png", "does not exist"])


# ----------------------------------------------------------------------------- recipe files

def _recipe_unsafe_yaml(tmp, out, base):
    path = recipe(tmp, text="name: !!python/object/apply:os.system ['touch pwned']\n")
    return Case(["run", path, "--out", out], ["recipe.yaml", "not valid YAML", "no !!python tags"])


def _recipe_binary(tmp, out, base):
    return Case(["run", recipe(tmp, text=bytes(range(256)) * 4), "--out", out], ["recipe.yaml", "binary file"])


def _recipe_latin1(tmp, out, base):
    return Case(["run", recipe(tmp, text="name: caf\xe9\n".encode("latin-1")), "--out", out],
                ["not UTF-8 text", "byte 0xe9 at offset 9"])


def _recipe_nested_20000_deep(tmp, out, base):
    return Case(["run", recipe(tmp, text="steps: " + "[" * 20_000 + "]" * 20_000 + "\n"), "--out", out],
                ["nested deeper than 64 levels"], max_seconds=10)


def _recipe_duplicate_key(tmp, out, base):
    text = yaml.safe_dump(RECIPE) + "steps:\n- export: {}\n"
    return Case(["run", recipe(tmp, text=text), "--out", out],
                ["found the key 'steps' twice", "each key may appear once"])


def _recipe_billion_laughs(tmp, out, base):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 10) + "]")
    return Case(["run", recipe(tmp, text="\n".join(lines) + "\n"), "--out", out], ["expands to more than 100,000"],
                max_seconds=10)


def _recipe_of_two_megabytes(tmp, out, base):
    return Case(["run", recipe(tmp, text="# " + "x" * (2 << 20) + "\n"), "--out", out], ["larger than 1024 KiB"])


def _recipe_is_a_folder(tmp, out, base):
    return Case(["run", str(tmp), "--out", out], ["is a folder"])


# ----------------------------------------------------------------------------- run folders and writes

def _resume_with_other_settings(tmp, out, base):
    run = copy_run(base, tmp)
    return Case(["train", *T, "--lr", "0.01", "--out", str(run)], ["other settings", "train.lr: 0.028 there, 0.01 now",
                                                                   "--no-resume"], keep=[run])


def _resume_truncated_checkpoint(tmp, out, base):
    run = copy_run(base, tmp)
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 3])
    return Case(["train", *T, "--out", str(run)], ["checkpoint.pt", "cannot be read", "--no-resume"], keep=[run])


def _resume_pickled_checkpoint(tmp, out, base):
    run = copy_run(base, tmp)
    torch.save({"model": torch.nn.Linear(2, 2)}, run / "checkpoint.pt")
    return Case(["train", *T, "--out", str(run)], ["carries pickled code and was refused", "--no-resume"], keep=[run])


def _resume_checkpoint_of_another_model(tmp, out, base):
    run = copy_run(base, tmp)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["model"]["features.conv1.weight"] = torch.zeros(4, 3, 3, 3)
    torch.save(state, run / "checkpoint.pt")
    return Case(["train", *T, "--out", str(run)], ["saved for another model", "shape mismatch: features.conv1.weight",
                                                   "--no-resume"], keep=[run])


def _resume_without_recorded_settings(tmp, out, base):
    run = copy_run(base, tmp)
    (run / "config.yaml").unlink()
    return Case(["train", *T, "--out", str(run)], ["no config.yaml", "--no-resume"], keep=[run])


def _run_folder_of_another_recipe(tmp, out, base):
    (Path(out) / "recipe.yaml").write_text(yaml.safe_dump({**RECIPE, "name": "other"}))
    return Case(["run", recipe(tmp), "--out", out], ["earlier run with other recipe settings", "name: 'other' there",
                                                     "--no-resume"])


def _analysis_into_a_training_run(tmp, out, base):
    run = copy_run(base, tmp)
    return Case(["analyze", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(run)],
                ["holds a training run", "choose another --out"], keep=[run])


def _disk_full_during_checkpoint(tmp, out, base):
    target = tmp / "full"
    return Case(["train", *T, "--quiet", "--out", str(target)], ["cannot write", "checkpoint.pt", "File too large",
                                                      "the earlier file, if any, is unchanged"], fsize=100_000)


def _diverging_training(tmp, out, base):
    # valid values (std is positive) that blow the inputs up: the weights become NaN in the first epoch
    return Case(["train", *T, "--std", "1e-30", "1e-30", "1e-30", "--quiet", "--out", str(tmp / "diverged")],
                ["training diverged in epoch 1", "NaN or infinite", "no checkpoint was written", "normalisation"])


def _export_that_fails_keeps_the_earlier_file(tmp, out, base):
    earlier = Path(out) / "good.onnx"
    earlier.write_bytes(base.onnx.read_bytes())
    return Case(["export", str(base.model), "--out", str(earlier), "--verify-samples", "8", "--tol", "1e-30"],
                ["disagrees with PyTorch", "was not written", "earlier file there is kept"])


def _report_of_truncated_analysis(tmp, out, base):
    (Path(out) / "analysis.json").write_text('{"model": "vgg6", "taps": [{"name": "features.po')
    return Case(["report", out], ["cannot be read", "JSONDecodeError", "compress analyze"])


def _report_without_arrays(tmp, out, base):
    (Path(out) / "analysis.json").write_text(json.dumps({"model": "vgg6", "taps": [{"name": "features.pool1"}]}))
    return Case(["report", out], ["cannot be read", "damaged"])


CASES = [_checkpoint_of_another_model, _checkpoint_other_classes, _truncated_checkpoint, _pickled_code_checkpoint,
         _complex_safetensors, _meta_not_json, _meta_input_of_ten_gigapixels, _meta_model_of_half_a_terabyte,
         _meta_trim_without_tap, _meta_unknown_transform, _meta_transforms_not_a_list, _meta_negative_classes,
         _meta_labels_not_strings, _meta_giant_width, _nan_weights_export, _nan_weights_analyze, _nan_weights_bench,
         _onnx_input_of_2_5_gigapixels, _onnx_input_of_2_5_gigapixels_bench, _onnx_nan_scale, _onnx_short_mean,
         _onnx_labels_not_a_list, _onnx_deeply_nested_json, _onnx_without_metadata, _corrupt_onnx, _bomb_png_predict,
         _bomb_png_in_training_data, _images_differ_in_size, _images_not_square, _train_and_test_sizes_differ,
         _empty_dataset, _empty_class, _non_image_file, _undecodable_image, _images_too_small, _missing_image,
         _recipe_unsafe_yaml, _recipe_binary, _recipe_latin1, _recipe_nested_20000_deep, _recipe_duplicate_key,
         _recipe_billion_laughs, _recipe_of_two_megabytes, _recipe_is_a_folder, _resume_with_other_settings,
         _resume_truncated_checkpoint, _resume_pickled_checkpoint, _resume_checkpoint_of_another_model,
         _resume_without_recorded_settings, _run_folder_of_another_recipe, _analysis_into_a_training_run,
         _disk_full_during_checkpoint, _diverging_training, _export_that_fails_keeps_the_earlier_file,
         _report_of_truncated_analysis, _report_without_arrays]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    yield from outcomes_of(CASES, tmp_path_factory)


@pytest.mark.parametrize("name", [c.__name__ for c in CASES], ids=[c.__name__.lstrip("_") for c in CASES])
def test_hostile_file_is_refused_in_one_line_and_loses_nothing(name, outcomes):
    outcome = outcomes[name]
    check_refused(outcome)
    if name in ("_disk_full_during_checkpoint", "_diverging_training"):  # nothing saved for the failed epoch
        folder = Path(outcome.case.argv[-1])
        assert not (folder / "checkpoint.pt").exists() and not list(folder.glob(".*tmp*"))
    assert not (outcome.cwd / "pwned").exists()
