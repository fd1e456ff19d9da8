"""ONNX export: agreement with PyTorch on real digits, opset and dynamic batch, deployment metadata,
smaller models give smaller files, and clear errors for corrupt files and mismatched inputs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from compress.cli import main
from compress.data import load_data
from compress.errors import UserError
from compress.deploy.export import ExportMismatchError, export_and_verify, export_onnx, load_onnx, onnx_metadata, verify_onnx
from compress.compression.serialize import save_model
from compress.jobs import model_meta
from compress.models import ModelConfig
from compress.deploy.predict import open_session, read_deploy_meta

from conftest import tiny_vgg


@pytest.fixture(scope="module")
def bundle():
    return load_data("digits", limit_train=200, limit_test=128)


def make_model(bundle, width=0.125, img_size=32, seed=0):
    """A tiny VGG-6 with batch-norm statistics calibrated on real images (no training needed)."""
    torch.manual_seed(seed)
    model = tiny_vgg(width=width, img_size=img_size)
    x = bundle.normalize(bundle.train.images[:128])
    if img_size != x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=(img_size, img_size), mode="bilinear")
    with torch.no_grad():
        model.train()(x)
    meta = model_meta(ModelConfig("vgg6", {"width": width, "fc_hidden": []}), bundle)
    meta["input_size"] = [3, img_size, img_size]
    return model.eval(), meta


@pytest.fixture(scope="module")
def exported(bundle, tmp_path_factory):
    model, meta = make_model(bundle)
    path = tmp_path_factory.mktemp("export") / "digits.onnx"
    result = export_and_verify(model, meta, path, bundle, tol=1e-4)
    return model, meta, path, result


def test_exported_digits_model_agrees_with_pytorch(exported, bundle):
    model, _, path, result = exported
    assert result["passed"] and result["samples"] == 128
    assert result["max_abs_diff"] <= 1e-4
    assert result["argmax_agreement"] == 1.0
    assert result["file_size"] == path.stat().st_size > 0
    # the same predictions on the whole test split, through a fresh session
    sess = open_session(path)
    x = bundle.normalize(bundle.test.images)
    with torch.inference_mode():
        ref = model(x).numpy()
    got = sess.run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    assert (got.argmax(1) == ref.argmax(1)).all()


def test_opset_dynamic_batch_and_checker(exported):
    _, _, path, _ = exported
    proto = load_onnx(path)  # runs onnx.checker
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")
    sess = open_session(path)
    for n in (1, 7, 64):
        assert sess.run(None, {"input": np.zeros((n, 3, 32, 32), np.float32)})[0].shape == (n, 10)


def test_metadata_carries_what_deployment_needs(exported, bundle):
    _, _, path, _ = exported
    props = onnx_metadata(onnx.load(str(path)))
    assert json.loads(props["label_names"]) == bundle.label_names
    assert json.loads(props["input_size"]) == [3, 32, 32]
    assert props["channel_order"] == "RGB" and props["layout"] == "NCHW"
    assert json.loads(props["mean"]) == list(bundle.mean) and json.loads(props["std"]) == list(bundle.std)
    assert float(props["scale"]) == pytest.approx(1 / 255)
    deploy = read_deploy_meta(open_session(path), path)
    assert deploy.input_size == (3, 32, 32) and deploy.label_names == tuple(bundle.label_names)
    assert deploy.fixed_batch is None


def test_structurally_smaller_model_gives_smaller_file(bundle, tmp_path):
    sizes = {}
    for width in (0.25, 0.125):
        model, meta = make_model(bundle, width=width)
        sizes[width] = export_onnx(model, meta, tmp_path / f"w{width}.onnx").stat().st_size
    assert sizes[0.125] < 0.5 * sizes[0.25]  # about a quarter of the weights


def test_mismatch_past_tolerance_fails_loudly(exported, bundle, tmp_path):
    model, meta, path, _ = exported
    other, _ = make_model(bundle, seed=1)  # same architecture, other weights
    with pytest.raises(ExportMismatchError, match="disagrees with PyTorch"):
        verify_onnx(path, other, bundle)
    report = verify_onnx(path, other, bundle, raise_on_failure=False)
    assert not report["passed"] and report["max_abs_diff"] > 1e-3

    class Drifting(torch.nn.Module):  # exports as one model, runs as another in PyTorch
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            out = self.inner(x)
            return out if torch.onnx.is_in_onnx_export() else out + 0.1

    bad = tmp_path / "bad.onnx"
    with pytest.raises(ExportMismatchError, match="was not written"):
        export_and_verify(Drifting(), meta, bad, bundle)
    assert not bad.exists()
    bad.write_bytes(b"an earlier export")  # a failed export leaves an earlier file as it was
    with pytest.raises(ExportMismatchError, match="earlier file there is kept"):
        export_and_verify(Drifting(), meta, bad, bundle)
    assert bad.read_bytes() == b"an earlier export" and sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


def _corrupt_copies(path, folder):
    data = path.read_bytes()
    files = {"truncated": data[: len(data) // 2], "garbage": b"not an onnx model at all " * 40, "empty": b""}
    out = {}
    for name, content in files.items():
        (folder / f"{name}.onnx").write_bytes(content)
        out[name] = folder / f"{name}.onnx"
    return out


def test_corrupt_or_truncated_file_gives_clear_error(exported, tmp_path, capsys):
    _, _, path, _ = exported
    for bad in _corrupt_copies(path, tmp_path).values():
        with pytest.raises(UserError, match="corrupt|truncated|empty"):
            load_onnx(bad)
        with pytest.raises(UserError, match="corrupt|truncated|empty"):
            open_session(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_onnx(tmp_path / "missing.onnx")
    truncated = tmp_path / "truncated.onnx"
    assert main(["predict", str(truncated), str(tmp_path / "x.png")]) == 2
    assert main(["bench", str(truncated), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") and "truncated" in line for line in err)


def test_input_shape_that_does_not_fit_the_data_is_an_error(bundle, tmp_path, capsys):
    model, meta = make_model(bundle, img_size=64)
    save_model(model, tmp_path / "m64.pt", meta)
    assert main(["export", str(tmp_path / "m64.pt"), "--data", "digits", "--limit-test", "16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "3x64x64" in err and "3x32x32" in err
    assert not (tmp_path / "m64.onnx").exists()
    onnx64 = export_onnx(model, meta, tmp_path / "m64.onnx")
    with pytest.raises(UserError, match="expects inputs of 3x64x64"):
        verify_onnx(onnx64, model, bundle)
    with pytest.raises(UserError, match="opset"):
        export_onnx(model, meta, tmp_path / "old.onnx", opset=13)


def test_export_command(exported, bundle, tmp_path, capsys):
    model, meta, _, _ = exported
    save_model(model, tmp_path / "model.pt", meta)
    assert main(["export", str(tmp_path / "model.pt"), "--limit-test", "32"]) == 0  # data from the metadata
    out = capsys.readouterr().out
    assert (tmp_path / "model.onnx").is_file()
    assert "opset 17" in out and "argmax agreement 100.00%" in out and "KiB" in out
    props = onnx_metadata(load_onnx(tmp_path / "model.onnx"))
    assert int(props["params"]) == sum(p.numel() for p in model.parameters()) and int(props["flops"]) > 0


@pytest.mark.parametrize("in_hw,out_hw", [((1, 1), (7, 7)), ((5, 3), (3, 2)), ((13, 13), (6, 6))])
def test_adaptive_pool_whose_output_does_not_divide_the_input_exports_as_a_matrix_product(tmp_path, in_hw, out_hw):
    """torchvision's AlexNet and VGG at small inputs: ONNX has no such adaptive pooling."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.AdaptiveAvgPool2d(out_hw), torch.nn.Flatten(),
                                torch.nn.Linear(4 * out_hw[0] * out_hw[1], 3)).eval()
    meta = {"model": "pool", "num_classes": 3, "input_size": [3, *in_hw], "label_names": ["a", "b", "c"],
            "mean": [0.5] * 3, "std": [0.25] * 3}
    path = export_onnx(model, meta, tmp_path / "pool.onnx")
    x = torch.randn(5, 3, *in_hw)
    got = open_session(path).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, model(x).detach().numpy(), atol=1e-5)
    assert isinstance(model[1], torch.nn.AdaptiveAvgPool2d)  # the user's model is left as it was


def test_a_torchvision_model_with_state_dict_versions_reloads(tmp_path):
    """MNASNet refuses a state dict without its modules' versions (lost when a state is rebuilt)."""
    from compress.compression.serialize import load_model
    from compress.models import create_model

    model = create_model("torchvision:mnasnet0_5", num_classes=10).eval()
    save_model(model, tmp_path / "m.pt", {"model": "torchvision:mnasnet0_5", "num_classes": 10,
                                          "input_size": [3, 32, 32]})
    again, _ = load_model(tmp_path / "m.pt")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(again.eval()(x), model(x))
