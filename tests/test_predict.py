"""`compress predict`: image files -> top labels, from the ONNX file's metadata only, with the same
labels as the PyTorch model; preprocessing follows the metadata (size, grey/RGB, BGR, mean/std)."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from compress.cli import main
from compress.data import load_data
from compress.errors import UserError
from compress.deploy.export import export_onnx
from compress.jobs import model_meta
from compress.models import ModelConfig
from compress.deploy.predict import DeployMeta, open_session, predict_images, preprocess_images, read_deploy_meta

from conftest import CIFAR10, tiny_vgg

LINE = re.compile(r"^(?P<file>.+): (?P<top>.+)$")


def _parse(stdout: str) -> dict[str, list[tuple[str, float]]]:
    out = {}
    for line in stdout.strip().splitlines():
        m = LINE.match(line)
        parts = m["top"].split(", ")
        out[m["file"]] = [(p.rsplit(" ", 1)[0], float(p.rsplit(" ", 1)[1])) for p in parts]
    return out


def _calibrated_model(x: torch.Tensor, seed: int = 0) -> torch.nn.Module:
    """A tiny VGG-6 whose batch-norm statistics come from real images, so outputs vary per image."""
    torch.manual_seed(seed)
    model = tiny_vgg()
    with torch.no_grad():
        model.train()(x)
    return model.eval()


@pytest.mark.skipif(not (CIFAR10 / "test").is_dir(), reason=f"real CIFAR-10 JPEGs not found at {CIFAR10}")
def test_predict_on_cifar10_images_gives_pytorch_labels(tmp_path, capsys):
    bundle = load_data(f"imagefolder:{CIFAR10}", limit_train=64, limit_test=1)
    files = [CIFAR10 / "test" / c / f"{i:04d}.jpg" for c in bundle.label_names[::2] for i in range(2)]
    files = [f for f in files if f.is_file()]
    assert len(files) >= 4
    model = _calibrated_model(bundle.normalize(bundle.train.images))
    meta = model_meta(ModelConfig("vgg6", {"width": 0.125, "fc_hidden": []}), bundle)
    onnx_path = export_onnx(model, meta, tmp_path / "cifar.onnx")

    pixels = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files])
    with torch.inference_mode():
        probs = torch.softmax(model(bundle.normalize(pixels)), dim=1).numpy()
    want = [bundle.label_names[i] for i in probs.argmax(1)]

    assert main(["predict", str(onnx_path), *map(str, files), "--top-k", "3"]) == 0
    printed = _parse(capsys.readouterr().out)
    assert list(printed) == [str(f) for f in files]
    assert [top[0][0] for top in printed.values()] == want
    for top, p in zip(printed.values(), probs):
        assert len(top) == 3 and [q for _, q in top] == sorted((q for _, q in top), reverse=True)
        assert top[0][1] == pytest.approx(float(p.max()), abs=1e-4)
    results = predict_images(onnx_path, files, top_k=10)
    np.testing.assert_allclose([r["probabilities"] for r in results], probs, atol=1e-5)


@pytest.fixture(scope="module")
def digits_onnx(tmp_path_factory):
    bundle = load_data("digits", limit_train=128, limit_test=1)
    model = _calibrated_model(bundle.normalize(bundle.train.images))
    meta = model_meta(ModelConfig("vgg6", {"width": 0.125, "fc_hidden": []}), bundle)
    meta.update(mean=[0.1, 0.2, 0.3], std=[0.5, 0.25, 0.2])  # uneven, so a wrong channel order shows
    return export_onnx(model, meta, tmp_path_factory.mktemp("predict") / "digits.onnx"), model


def test_preprocessing_follows_the_metadata(digits_onnx, tmp_path):
    path, model = digits_onnx
    meta = read_deploy_meta(open_session(path), path)
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (50, 40, 4), dtype=np.uint8), "RGBA")
    grey = Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), "L")
    rgba.save(tmp_path / "a.png")
    grey.save(tmp_path / "b.png")
    x = preprocess_images([tmp_path / "a.png", tmp_path / "b.png"], meta)
    assert x.shape == (2, 3, 32, 32) and x.dtype == np.float32
    on_white = Image.alpha_composite(Image.new("RGBA", rgba.size, (255,) * 4), rgba)  # transparency over white
    ref = np.asarray(on_white.convert("RGB").resize((32, 32), Image.BILINEAR), dtype=np.float32).transpose(2, 0, 1)
    mean, std = np.array([0.1, 0.2, 0.3]).reshape(3, 1, 1), np.array([0.5, 0.25, 0.2]).reshape(3, 1, 1)
    np.testing.assert_allclose(x[0], (ref / 255 - mean) / std, atol=1e-5)
    g = np.asarray(grey, dtype=np.float32) / 255
    np.testing.assert_allclose(x[1], (np.stack([g] * 3) - mean) / std, atol=1e-5)
    bgr = DeployMeta(**{**meta.__dict__, "channel_order": "BGR", "mean": (0.0,) * 3, "std": (1.0,) * 3})
    xb = preprocess_images([tmp_path / "a.png"], bgr)
    np.testing.assert_allclose(xb[0], ref[::-1] / 255, atol=1e-6)
    # the whole path agrees with PyTorch on the same pixels
    with torch.inference_mode():
        want = torch.softmax(model(torch.from_numpy(x)), 1).numpy()
    got = predict_images(path, [tmp_path / "a.png", tmp_path / "b.png"], top_k=2)
    np.testing.assert_allclose([r["probabilities"] for r in got], want, atol=1e-5)
    assert [r["top"][0][0] for r in got] == [str(i) for i in want.argmax(1)]


def test_predict_errors_are_clear(digits_onnx, tmp_path, capsys):
    path, _ = digits_onnx
    (tmp_path / "not_an_image.png").write_bytes(b"hello")
    with pytest.raises(UserError, match="cannot be decoded"):
        predict_images(path, [tmp_path / "not_an_image.png"])
    with pytest.raises(UserError, match="does not exist"):
        predict_images(path, [tmp_path / "missing.png"])
    with pytest.raises(UserError, match="top-k"):
        predict_images(path, [tmp_path / "missing.png"], top_k=0)
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "bare.onnx"))
    with pytest.raises(UserError, match="lacks the deployment metadata"):
        predict_images(tmp_path / "bare.onnx", [tmp_path / "not_an_image.png"])
    assert main(["predict", str(tmp_path / "model.pt"), str(tmp_path / "x.png")]) == 2
    assert "export" in capsys.readouterr().err


def test_graph_with_a_fixed_batch_still_predicts(digits_onnx, tmp_path):
    path, _ = digits_onnx
    proto = onnx.load(str(path))
    for value in (proto.graph.input[0], proto.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = 1  # as exported without a dynamic batch axis
    onnx.save(proto, str(tmp_path / "fixed.onnx"))
    images = []
    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), 60 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
        images.append(tmp_path / f"{i}.png")
    fixed = predict_images(tmp_path / "fixed.onnx", images, top_k=3)
    dynamic = predict_images(path, images, top_k=3)
    np.testing.assert_allclose([r["probabilities"] for r in fixed], [r["probabilities"] for r in dynamic], atol=1e-6)
