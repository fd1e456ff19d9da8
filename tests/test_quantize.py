"""INT8 quantization (``compress quantize``, the ``quantize`` step, ``bench --int8``): the INT8 ONNX
has quantized convolutions, carries the FP32 file's metadata unchanged, predicts as the FP32 file
does, and the accuracy gate stops (nothing written) or excludes the worst layers and retries."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import compress.deploy.quantize as Q
from compress.cli import main
from compress.compression.serialize import save_model
from compress.data import load_data
from compress.deploy.export import export_and_verify, onnx_metadata
from compress.deploy.quantize import QuantizeGateError, QuantizeSettings, quantize_onnx, quantized_ops
from compress.errors import UserError
from compress.jobs import model_meta
from compress.models import ModelConfig, create_model
from compress.system import int8_fast_path

from conftest import tiny_vgg


@pytest.fixture(scope="module")
def bundle():
    return load_data("digits", limit_train=500, limit_test=100, val_fraction=0.2)


def _train(model, bundle, epochs=4):
    """A few quick SGD epochs: a model whose predictions mean something (a random one ties everywhere)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(bundle.train), generator=gen)
        for start in range(0, len(order), 50):
            idx = order[start:start + 50]
            loss = F.cross_entropy(model(bundle.normalize(bundle.train.images[idx])), bundle.train.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def _export(model, bundle, path, name="vgg6", options=None):
    meta = model_meta(ModelConfig(name, options if options is not None else {"width": 0.125, "fc_hidden": []}),
                      bundle)
    export_and_verify(model, meta, path, bundle, tol=1e-3, max_samples=32)
    return path


@pytest.fixture(scope="module")
def vgg(bundle):
    torch.manual_seed(0)
    return _train(tiny_vgg(), bundle)


@pytest.fixture(scope="module")
def vgg_onnx(vgg, bundle, tmp_path_factory):
    return _export(vgg, bundle, tmp_path_factory.mktemp("vgg") / "model.onnx")


@pytest.fixture(scope="module")
def images(bundle, tmp_path_factory):
    """40 test digits as PNG files, for ``compress predict``."""
    folder = tmp_path_factory.mktemp("images")
    files = []
    for i in range(40):
        path = folder / f"{i:02d}.png"
        Image.fromarray(bundle.test.images[i].permute(1, 2, 0).numpy()).save(path)
        files.append(str(path))
    return files


def _predict(path, files, capsys):
    capsys.readouterr()
    assert main(["predict", str(path), *files, "--top-k", "1"]) == 0
    return [line.rsplit(" ", 2)[1] for line in capsys.readouterr().out.splitlines()]


def _quantized_convs(path) -> int:
    ops = quantized_ops(onnx.load(str(path)))
    return ops.get("Conv", 0) + ops.get("QLinearConv", 0) + ops.get("ConvInteger", 0)


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_static_qdq_has_quantized_convs_same_metadata_and_predictions(vgg_onnx, bundle, images, tmp_path, capsys):
    out = tmp_path / "model.int8.onnx"
    info = quantize_onnx(vgg_onnx, out, bundle, bundle.val, QuantizeSettings(calibration_images=200))
    proto = onnx.load(str(out))
    ops = [n.op_type for n in proto.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert _quantized_convs(out) == 5 and info["quantized_ops"]["Conv"] == 5  # every conv of the VGG-6
    assert onnx_metadata(proto) == onnx_metadata(onnx.load(str(vgg_onnx)))
    assert info["calibration_images"] == 200 and info["excluded"] == [] and info["int8_size"] < info["fp32_size"] / 2
    assert info["drop_points"] <= 1.0 and info["fp32_accuracy"] > 0.2  # above chance (0.1)
    fp32, int8 = _predict(vgg_onnx, images, capsys), _predict(out, images, capsys)
    assert np.mean([a == b for a, b in zip(fp32, int8)]) >= 0.9


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_other_calibration_methods(vgg_onnx, bundle, tmp_path, method):
    out = tmp_path / "m.onnx"
    info = quantize_onnx(vgg_onnx, out, bundle, bundle.val, QuantizeSettings(method=method, calibration_images=50,
                                                                             max_drop=10))
    assert info["method"] == method and _quantized_convs(out) == 5


def test_dynamic_quantization(vgg_onnx, bundle, tmp_path):
    out = tmp_path / "dyn.onnx"
    info = quantize_onnx(vgg_onnx, out, bundle, bundle.val, QuantizeSettings(mode="dynamic", max_drop=5))
    assert info["quantized_ops"].get("ConvInteger") == 5 and info["calibration_images"] == 0
    assert onnx_metadata(onnx.load(str(out))) == onnx_metadata(onnx.load(str(vgg_onnx)))


def _penalise(monkeypatch, when):
    """A fixed accuracy of 0.5, less 5 points for the INT8 files whose graph satisfies ``when(proto)``."""

    def fake(path, split):
        return 0.45 if "int8" in str(path) and when(onnx.load(str(path))) else 0.5

    monkeypatch.setattr(Q, "onnx_split_accuracy", fake)


def test_gate_stop_names_the_worst_layers_and_writes_nothing(vgg_onnx, bundle, tmp_path, monkeypatch):
    _penalise(monkeypatch, lambda proto: True)
    out = tmp_path / "model.int8.onnx"
    out.write_bytes(b"an earlier file")
    with pytest.raises(QuantizeGateError) as e:
        quantize_onnx(vgg_onnx, out, bundle, bundle.val, QuantizeSettings(max_drop=0, on_fail="stop"))
    msg = str(e.value)
    assert "past max_drop 0" in msg and "points below FP32" in msg and "nothing written" in msg
    assert "/features/conv" in msg  # the worst layers, by name
    assert out.read_bytes() == b"an earlier file" and _leftovers(tmp_path) == []


def test_gate_exclude_leaves_the_worst_layers_in_fp32_and_retries(vgg_onnx, bundle, tmp_path, monkeypatch):
    _penalise(monkeypatch, lambda proto: sum(quantized_ops(proto).get(k, 0) for k in ("Conv", "MatMul")) > 4)
    out = tmp_path / "model.int8.onnx"
    info = quantize_onnx(vgg_onnx, out, bundle, bundle.val, QuantizeSettings(max_drop=1, exclude_per_round=2))
    assert len(info["rounds"]) == 2 and info["rounds"][0]["drop_points"] > 1 and len(info["excluded"]) == 2
    assert info["worst_layers"][0]["node"] in info["excluded"]
    proto = onnx.load(str(out))
    weights = {t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    for node in proto.graph.node:
        if node.name in info["excluded"]:
            assert any(i in weights for i in node.input), node.name  # its weights stay FP32
    assert onnx_metadata(proto) == onnx_metadata(onnx.load(str(vgg_onnx)))


def test_gate_still_missed_after_retries_names_the_best_drop(vgg_onnx, bundle, tmp_path, monkeypatch):
    _penalise(monkeypatch, lambda proto: True)
    out = tmp_path / "model.int8.onnx"
    with pytest.raises(QuantizeGateError, match=r"after 2 tries: the best drop reached is 5\.00 points"):
        quantize_onnx(vgg_onnx, out, bundle, bundle.val, QuantizeSettings(max_drop=1, retries=1))
    assert not out.exists() and _leftovers(tmp_path) == []


def test_timm_resnet(bundle, tmp_path, images, capsys):
    torch.manual_seed(0)
    model = create_model("timm:resnet18", num_classes=10, img_size=32)
    with torch.no_grad():  # random weights, batch-norm statistics of real images
        model.train()(bundle.normalize(bundle.train.images[:200]))
    model.eval()
    path = _export(model, bundle, tmp_path / "resnet.onnx", "timm:resnet18", {})
    out = tmp_path / "resnet.int8.onnx"
    info = quantize_onnx(path, out, bundle, bundle.val, QuantizeSettings(calibration_images=64, max_drop=None))
    assert _quantized_convs(out) >= 17 and info["max_drop"] is None
    assert onnx_metadata(onnx.load(str(out))) == onnx_metadata(onnx.load(str(path)))
    fp32, int8 = _predict(path, images, capsys), _predict(out, images, capsys)
    assert np.mean([a == b for a, b in zip(fp32, int8)]) >= 0.75


def test_trimmed_model_and_sparse_head(vgg, bundle, tmp_path):
    from compress.compression.afcc import SparseHead, afcc_mask, apply_mask, compress_head
    from compress.compression.trim import trim_model
    from compress.models.taps import run_to_taps

    trimmed = copy.deepcopy(vgg)
    with torch.no_grad():
        shape = run_to_taps(trimmed, torch.zeros(1, 3, 32, 32), ["features.pool3"])["features.pool3"].shape
    trim_model(trimmed, "features.pool3", torch.randn(10, int(np.prod(shape[1:]))) * 0.01)
    sparse = copy.deepcopy(vgg)
    ids = -np.ones((64, 10), dtype=np.int64)  # (filters, labels): one cluster of 3 labels per filter
    for f in range(64):
        ids[f, np.random.default_rng(f).choice(10, 3, replace=False)] = 0
    mask = afcc_mask(ids, (1, 1))
    apply_mask(sparse.head.out, mask)
    compress_head(sparse, "head.out", mask, (1, 1))
    assert isinstance(sparse.head.out, SparseHead)
    for name, model in (("trimmed", trimmed), ("afcc", sparse)):
        path = _export(model.eval(), bundle, tmp_path / f"{name}.onnx")
        out = tmp_path / f"{name}.int8.onnx"
        quantize_onnx(path, out, bundle, bundle.val, QuantizeSettings(calibration_images=64, max_drop=None))
        assert _quantized_convs(out) >= 3, name
        assert onnx_metadata(onnx.load(str(out))) == onnx_metadata(onnx.load(str(path)))


# ----------------------------------------------------------------------------- command line


def test_cli_quantize_writes_the_file_and_its_details(vgg_onnx, tmp_path, capsys):
    out = tmp_path / "q.int8.onnx"
    assert main(["quantize", str(vgg_onnx), "--out", str(out), "--calibration-images", "100", "--limit-train", "500",
                 "--val-fraction", "0.2", "--max-drop", "5"]) == 0
    text = capsys.readouterr().out
    assert "wrote" in text and "validation accuracy" in text and "5 Conv" in text
    details = json.loads((tmp_path / "q.int8.json").read_text())
    assert details["calibration_images"] == 100 and details["split"] == "validation"
    assert onnx_metadata(onnx.load(str(out))) == onnx_metadata(onnx.load(str(vgg_onnx)))


def _refused(argv, capsys, *fragments):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and err.startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def test_cli_refuses_bad_input_in_one_line(vgg_onnx, tmp_path, capsys):
    earlier = tmp_path / "earlier.onnx"
    earlier.write_bytes(b"keep me")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage" * 10)
    pt = tmp_path / "model.pt"
    pt.write_bytes(b"x")
    m = str(vgg_onnx)
    _refused(["quantize", m, "--out", str(earlier), "--calibration-images", "0"], capsys, "--calibration-images 0")
    _refused(["quantize", m, "--out", str(earlier), "--max-drop", "nan"], capsys, "--max-drop nan", "finite")
    _refused(["quantize", m, "--out", str(earlier), "--max-drop", "-1"], capsys, "--max-drop -1")
    _refused(["quantize", m, "--out", str(earlier), "--method", "kl"], capsys, "--method", "minmax")
    _refused(["quantize", m, "--out", str(earlier), "--on-fail", "retry"], capsys, "--on-fail", "exclude")
    _refused(["quantize", m, "--out", str(earlier), "--val-fraction", "0"], capsys, "--val-fraction 0")
    _refused(["quantize", str(pt), "--out", str(earlier)], capsys, "ONNX file", "compress export")
    _refused(["quantize", str(corrupt), "--out", str(earlier)], capsys, "corrupt.onnx", "corrupt")
    _refused(["quantize", str(tmp_path / "missing.onnx")], capsys, "does not exist")
    _refused(["quantize", m, "--out", m], capsys, "is the model file itself")
    _refused(["quantize", m, "--out", str(tmp_path)], capsys, "is a folder")
    assert earlier.read_bytes() == b"keep me" and _leftovers(tmp_path) == []


def test_cli_gate_stop(vgg_onnx, tmp_path, capsys, monkeypatch):
    _penalise(monkeypatch, lambda proto: True)
    out = tmp_path / "q.onnx"
    _refused(["quantize", str(vgg_onnx), "--out", str(out), "--max-drop", "0", "--on-fail", "stop",
              "--limit-train", "500", "--val-fraction", "0.2"], capsys, "past max_drop 0", "nothing written")
    assert not out.exists() and not (tmp_path / "q.json").exists() and _leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- bench and the step


def test_int8_fast_path_flags():
    assert int8_fast_path(["avx2", "avx512_vnni"])[0] and int8_fast_path(["asimddp"])[0]
    fast, note = int8_fast_path(["avx2", "avx512f"])
    assert not fast and "no fast INT8 path" in note


def test_bench_int8_rows_and_the_no_vnni_note(vgg_onnx, bundle, tmp_path, monkeypatch):
    import compress.deploy.bench as B
    from compress.reports.bench import summary_rows, write_bench_report

    monkeypatch.setattr(B, "int8_fast_path", lambda: (False, "this CPU has no fast INT8 path (test)"))
    result = B.run_bench([vgg_onnx], bundle, tmp_path / "bench", names=["base"], batch_sizes=[1], warmup=0,
                         repeats=2, backends=["ort-cpu"], int8=True)
    assert [m["name"] for m in result.models] == ["base", "base int8"]
    assert [m["precision"] for m in result.models] == ["fp32", "int8"] and result.models[1]["int8_of"] == "base"
    assert result.models[1]["latency"]["ort-cpu"]["1"]["median_ms"] > 0
    assert summary_rows(result)[1][1][0] == "base int8 *"
    write_bench_report(result, tmp_path / "bench")
    assert "no fast INT8 path (test)" in (tmp_path / "bench" / "bench.md").read_text()


def test_recipe_refuses_quantize_without_export():
    from compress.recipe import parse_recipe

    model = {"name": "vgg6", "options": {"width": 0.125, "fc_hidden": []}, "train": {"epochs": 1}}
    base = {"name": "q", "model": model}
    with pytest.raises(UserError, match=r"recipe.steps\[0\].quantize needs an earlier export step"):
        parse_recipe({**base, "steps": [{"quantize": {}}]})
    with pytest.raises(UserError, match=r"method"):
        parse_recipe({**base, "steps": ["export", {"quantize": {"method": "kl"}}]})
    with pytest.raises(UserError, match=r"calibration_images"):
        parse_recipe({**base, "steps": ["export", {"quantize": {"calibration_images": 0}}]})
    r = parse_recipe({**base, "steps": ["export", {"quantize": {"original": True}},
                                        {"bench": {"models": ["original", "original-int8", "final", "quantize"]}}]})
    assert r.steps[1].name == "quantize" and not r.steps[1].changes_model


def test_quantize_step_writes_int8_files_and_a_bench_compares_them(vgg, bundle, tmp_path):
    from compress.recipe.state import RunState
    from compress.recipe.steps.bench import Bench
    from compress.recipe.steps.export import Export
    from compress.recipe.steps.quantize import Quantize

    meta = model_meta(ModelConfig("vgg6", {"width": 0.125, "fc_hidden": []}), bundle)
    state = RunState(None, copy.deepcopy(vgg), bundle.for_choices("val"), meta, None, tmp_path, progress=False,
                     report_data=bundle)
    state.models["original"] = str(save_model(vgg, tmp_path / "steps" / "00-original" / "model.pt", meta))
    Export().run(state, tmp_path / "steps" / "01-export")
    info = Quantize(original=True, calibration_images=100).run(state, tmp_path / "steps" / "02-quantize")
    for name in ("model", "original"):
        assert info[name]["split"] == "validation" and info[name]["drop_points"] <= 1
        assert "int8_test_accuracy" in info[name]
    assert (tmp_path / "model.int8.onnx").is_file() and (tmp_path / "original.int8.onnx").is_file()
    assert json.loads((tmp_path / "steps" / "02-quantize" / "quantize.json").read_text())["model"]["excluded"] == []
    state.models["final"] = str(tmp_path / "model.onnx")
    bench = Bench(models=["original", "quantize"], batch_sizes=[1], warmup=0, repeats=2, torch_eager=False, int8=True)
    out = bench.run(state, tmp_path / "steps" / "03-bench")
    doc = json.loads((tmp_path / "bench" / "bench.json").read_text())
    names = [m["name"] for m in doc["models"]]
    assert names == ["original", "original int8", "quantize"]  # the quantize step's file is INT8 already
    assert "fast_path" in out["int8"]
