"""GPU readiness (issue 16, point 3): amp true/false/bf16/fp16, channels-last training, torch.compile,
feature extraction under autocast on CUDA only, and the bench's onnxruntime TensorRT backend.

What runs on the CPU is tested here for real (bf16 autocast, channels-last, compile where a C++
compiler is present); what needs CUDA is tested where CUDA is, and skipped elsewhere."""

from __future__ import annotations

import argparse
import shutil

import pytest
import torch
import yaml

from compress import accel
from compress.config import from_dict
from compress.errors import OptionError, UserError
from compress.training import TrainConfig, fit

from conftest import tiny_vgg

CFG = dict(epochs=1, batch_size=100, lr=0.05, momentum=0.9, weight_decay=5e-4, seed=3, augment=False)
CUDA = torch.cuda.is_available()


def _first_conv(model: torch.nn.Module) -> torch.nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))


# ----------------------------------------------------------------------------- amp: the setting


@pytest.mark.parametrize("value", [True, False, "bf16", "fp16"])
def test_every_amp_value_is_accepted(value):
    assert TrainConfig(amp=value).amp == value
    assert from_dict(TrainConfig, {"amp": value}, "train").amp == value


@pytest.mark.parametrize("value", ["xx", "float16", 1, 0, None, [True]])
def test_a_bad_amp_value_is_one_line_naming_the_valid_ones(value):
    with pytest.raises(UserError) as e:
        from_dict(TrainConfig, {"amp": value}, "train")
    text = str(e.value)
    assert "\n" not in text and text.startswith("train.amp") and "bf16" in text and "fp16" in text
    if value is not None:  # built directly, the class checks it itself
        with pytest.raises(OptionError) as e:
            TrainConfig(amp=value)
        assert "true" in str(e.value) and "false" in str(e.value) and "bf16" in str(e.value)


@pytest.mark.parametrize("key", ["channels_last", "compile"])
def test_the_switches_are_booleans(key):
    assert getattr(TrainConfig(), key) is False
    with pytest.raises(OptionError, match=key):
        TrainConfig(**{key: 1})
    with pytest.raises(UserError, match=f"train.{key}"):
        from_dict(TrainConfig, {key: "yes"}, "train")


def test_amp_resolves_per_device():
    assert accel.amp_dtype(True, "cuda") is torch.float16 and accel.amp_dtype(True, "cpu") is None
    assert accel.amp_dtype(False, "cuda") is None and accel.amp_dtype(False, "cpu") is None
    assert accel.amp_dtype("bf16", "cpu") is torch.bfloat16 and accel.amp_dtype("bf16", "cuda") is torch.bfloat16
    assert accel.amp_dtype("fp16", "cuda") is torch.float16
    with pytest.raises(OptionError) as e:
        accel.amp_dtype("fp16", "cpu")
    assert "\n" not in str(e.value) and "needs CUDA" in str(e.value) and "bf16" in str(e.value)
    assert not accel.grad_scaler(torch.bfloat16, "cpu").is_enabled()
    assert not accel.grad_scaler(None, "cpu").is_enabled()


def test_the_flags_take_every_amp_value_and_no_amp_still_works():
    from compress.cli.flags import add_train, train_config

    p = argparse.ArgumentParser()
    add_train(p)
    cases = {(): (True, False, False), ("--no-amp",): (False, False, False), ("--amp",): (True, False, False),
             ("--amp", "bf16"): ("bf16", False, False), ("--amp", "false"): (False, False, False),
             ("--channels-last", "--compile"): (True, True, True)}
    for argv, want in cases.items():
        cfg = train_config(p.parse_args(list(argv)))
        assert (cfg.amp, cfg.channels_last, cfg.compile) == want, argv
    with pytest.raises(UserError, match="--amp"):
        train_config(p.parse_args(["--amp", "half"]))


def test_a_recorded_run_of_before_still_resumes(tmp_path):
    """A config.yaml written before these options (amp: true, no channels_last, no compile)
    matches the defaults of today; another amp does not."""
    from compress.jobs import check_resume, settings

    old = settings(train=TrainConfig())
    del old["train"]["channels_last"], old["train"]["compile"]
    assert old["train"]["amp"] is True
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old))
    check_resume(path, settings(train=TrainConfig()))
    with pytest.raises(UserError, match="amp"):
        check_resume(path, settings(train=TrainConfig(amp="bf16")))
    with pytest.raises(UserError, match="compile"):
        check_resume(path, settings(train=TrainConfig(compile=True)))


# ----------------------------------------------------------------------------- amp: training


def test_bf16_really_runs_on_the_cpu(tmp_path, small_digits):
    torch.manual_seed(0)
    model = tiny_vgg()
    seen = []
    handle = _first_conv(model).register_forward_hook(lambda m, i, o: seen.append(o.dtype) if m.training else None)
    history = fit(model, small_digits, TrainConfig(amp="bf16", **CFG), tmp_path, progress=False)
    handle.remove()
    assert seen and set(seen) == {torch.bfloat16}
    assert torch.isfinite(torch.tensor(history[-1]["loss"]))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())


def test_fp16_off_cuda_is_refused_before_any_work(tmp_path, small_digits):
    if CUDA:
        pytest.skip("this machine has CUDA")
    with pytest.raises(OptionError) as e:
        fit(tiny_vgg(), small_digits, TrainConfig(amp="fp16", **CFG), tmp_path / "run", progress=False)
    assert str(e.value).startswith("amp fp16") and "\n" not in str(e.value)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_amp_true_on_the_cpu_is_float32_as_before(tmp_path, small_digits):
    torch.manual_seed(0)
    a = tiny_vgg()
    torch.manual_seed(0)
    b = tiny_vgg()
    fit(a, small_digits, TrainConfig(amp=True, **CFG), tmp_path / "a", progress=False)
    fit(b, small_digits, TrainConfig(amp=False, **CFG), tmp_path / "b", progress=False)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


# ----------------------------------------------------------------------------- channels-last


def test_channels_last_trains_and_saves_the_usual_format(tmp_path, small_digits):
    torch.manual_seed(0)
    model = tiny_vgg()
    torch.manual_seed(0)
    plain = tiny_vgg()
    formats = []
    _first_conv(model).register_forward_pre_hook(
        lambda m, args: formats.append((m.training, args[0].is_contiguous(memory_format=torch.channels_last),
                                        m.weight.is_contiguous(memory_format=torch.channels_last))))
    history = fit(model, small_digits, TrainConfig(channels_last=True, **CFG), tmp_path / "cl", progress=False)
    reference = fit(plain, small_digits, TrainConfig(**CFG), tmp_path / "plain", progress=False)
    assert any(training for training, _, _ in formats) and any(not training for training, _, _ in formats)
    assert all(x and w for _, x, w in formats)  # training and the evaluation inside fit
    # the same arithmetic in another order: rounding differences, which this tiny net amplifies step by step
    assert history[-1]["loss"] == pytest.approx(reference[-1]["loss"], rel=0.02)
    assert all(v.is_contiguous() for v in model.state_dict().values())  # handed back as before
    state = torch.load(tmp_path / "cl" / "checkpoint.pt", weights_only=True)["model"]
    assert all(v.is_contiguous() for v in state.values())
    fresh = tiny_vgg()
    fresh.load_state_dict(state)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    # and a channels-last run resumes from it (the epoch is done: nothing more to train)
    again = fit(tiny_vgg(), small_digits, TrainConfig(channels_last=True, **CFG), tmp_path / "cl", progress=False)
    assert again == history


def test_channels_last_module_restores_the_format_after_an_error():
    model = tiny_vgg()
    weight = _first_conv(model).weight
    with pytest.raises(RuntimeError):
        with accel.channels_last_module(model):
            assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
            raise RuntimeError("boom")
    assert _first_conv(model).weight is weight and weight.is_contiguous()


# ----------------------------------------------------------------------------- torch.compile


def test_a_compile_failure_is_one_clear_line(tmp_path, small_digits, monkeypatch):
    """Wired without compiling (fast): the backend's error on the first step becomes a UserError."""

    class NoCompiler(RuntimeError):
        pass

    def broken(module, key="compile"):
        class Failing(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = module

            def forward(self, x):
                raise NoCompiler("InvalidCxxCompiler: No working C++ compiler found in cpp.cxx: ('cc',)\n\nmore")

        return Failing()

    monkeypatch.setattr(accel, "COMPILE_ERRORS", (NoCompiler,))
    monkeypatch.setattr(accel, "compile_module", broken)
    with pytest.raises(UserError) as e:
        fit(tiny_vgg(), small_digits, TrainConfig(compile=True, **CFG), tmp_path, progress=False)
    text = str(e.value)
    assert "\n" not in text and text.startswith("compile: torch.compile could not compile the model")
    assert "No working C++ compiler" in text and "compile: false" in text
    assert not (tmp_path / "checkpoint.pt").exists()


def _cxx() -> str | None:
    return shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


@pytest.mark.slow
@pytest.mark.skipif(_cxx() is None, reason="torch.compile's inductor needs a C++ compiler on the CPU")
def test_compile_trains_and_keeps_the_checkpoint_keys(tmp_path, small_digits):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = tiny_vgg()
    keys = list(model.state_dict())
    cfg = TrainConfig(compile=True, **CFG)  # 400 images in batches of 100: one shape, one compilation
    history = fit(model, small_digits, cfg, tmp_path, progress=False)
    assert torch.isfinite(torch.tensor(history[-1]["loss"]))
    assert list(model.state_dict()) == keys and type(model).__name__ != "OptimizedModule"
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    assert list(state) == keys and not any("_orig_mod" in k for k in state)
    tiny_vgg().load_state_dict(state)
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.skipif(_cxx() is None, reason="needs a C++ compiler to compare against")
def test_compile_without_a_working_compiler_stops_with_one_line(tmp_path, small_digits, monkeypatch):
    import torch._inductor.config as inductor

    torch._dynamo.reset()
    monkeypatch.setattr(inductor.cpp, "cxx", ("no-such-compiler-here",))
    monkeypatch.setattr(inductor, "fx_graph_cache", False)  # a cached kernel would need no compiler
    with pytest.raises(UserError) as e:
        fit(tiny_vgg(width=0.25), small_digits, TrainConfig(compile=True, **CFG), tmp_path, progress=False)
    assert "\n" not in str(e.value) and str(e.value).startswith("compile: torch.compile could not compile")
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- feature extraction


def test_feature_extraction_on_the_cpu_is_unchanged(small_digits, monkeypatch):
    """On the CPU the helper is the plain call: the cache equals one made with ``model(x)``, bit for bit."""
    import compress.analysis.features as features

    torch.manual_seed(0)
    model = tiny_vgg().eval()
    x = small_digits.test.images[:8].float() / 255
    assert torch.equal(accel.inference_forward(model, x), model(x))
    taps = ["features.pool2", "features.pool3"]
    ours = features.extract_features(model, small_digits, small_digits.test, taps, batch_size=64, progress=False)
    monkeypatch.setattr(features, "inference_forward", lambda m, x: m(x))
    plain = features.extract_features(model, small_digits, small_digits.test, taps, batch_size=64, progress=False)
    for t in taps:
        assert ours.features[t].dtype == torch.float32 and torch.equal(ours.features[t], plain.features[t]), t


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_feature_extraction_on_cuda_uses_autocast_and_keeps_the_dtype(small_digits):
    from compress.analysis.features import extract_features

    torch.manual_seed(0)
    model = tiny_vgg().cuda().eval()
    x = small_digits.test.images[:8].float().cuda() / 255
    seen = []
    _first_conv(model).register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    accel.inference_forward(model, x)
    assert seen == [torch.float16]
    for dtype in ("float32", "float16"):
        cache = extract_features(model, small_digits, small_digits.test, ["features.pool3"], dtype=dtype,
                                 progress=False)
        assert cache.features["features.pool3"].dtype == getattr(torch, dtype)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("amp", [True, "fp16", "bf16"])
def test_cuda_training_with_every_setting(tmp_path, small_digits, amp):
    torch.manual_seed(0)
    model = tiny_vgg()
    history = fit(model, small_digits, TrainConfig(amp=amp, channels_last=True, **CFG), tmp_path,
                  device=torch.device("cuda"), progress=False)
    assert torch.isfinite(torch.tensor(history[-1]["loss"]))
    assert all(v.is_contiguous() for v in model.state_dict().values())


# ----------------------------------------------------------------------------- bench: TensorRT


def test_ort_trt_is_offered_only_where_onnxruntime_lists_it(monkeypatch):
    import onnxruntime as ort

    from compress.deploy.bench import BACKENDS, available_backends

    assert "ort-trt" in BACKENDS
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert "ort-trt" not in available_backends() and "ort-cuda" not in available_backends()
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    have = available_backends()
    assert have[:3] == ["ort-cpu", "ort-cuda", "ort-trt"]


def test_ort_trt_where_it_is_missing_is_one_error_line(tmp_path, small_digits):
    import onnxruntime as ort

    from compress.deploy.bench import available_backends, run_bench
    from compress.deploy.trt import open_trt_session

    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the TensorRT provider")
    with pytest.raises(UserError) as e:  # refused before any model is read
        run_bench([str(tmp_path / "model.pt")], small_digits, tmp_path / "bench", backends=["ort-trt"])
    assert str(e.value) == f"backend 'ort-trt' is not available here (available: {', '.join(available_backends())})"
    with pytest.raises(UserError, match="no TensorrtExecutionProvider"):
        open_trt_session(tmp_path / "any.onnx")


def test_the_report_reads_trt_as_a_gpu_backend():
    from compress.deploy.bench import BenchResult
    from compress.reports.bench import _env_line, primary_backend

    result = BenchResult([{"name": "a", "latency": {"ort-trt": {"1": {"median_ms": 1.0}}}}],
                         {"backends": ["ort-trt"], "warmup": 1, "repeats": 1}, {"gpu": "H100", "cpu": "x86"})
    assert primary_backend(result) == "ort-trt"
    assert "on H100" in _env_line(result, "ort-trt")


def test_an_ort_trt_bench_runs_through_the_trt_session_with_one_untimed_call(tmp_path, monkeypatch):
    """The ort-trt path without TensorRT: its session stands in for a CPU one, its runner counts calls."""
    import compress.deploy.bench as bench
    from compress.compression.serialize import save_model
    from compress.data import load_data
    from compress.deploy.predict import open_session
    from compress.jobs import model_meta
    from compress.models import ModelConfig

    data = load_data("digits", limit_train=1, limit_test=16)
    torch.manual_seed(0)
    path = save_model(tiny_vgg().eval(), tmp_path / "m" / "model.pt",
                      model_meta(ModelConfig("vgg6", {"width": 0.125, "fc_hidden": []}), data))
    opened, calls = [], []
    plain_runner = bench.ort_runner

    def runner(session, size, batch, device="cpu"):
        fn = plain_runner(session, size, batch, "cpu")
        return lambda: (calls.append((device, batch)), fn())[1]

    monkeypatch.setattr(bench, "available_backends", lambda: ["ort-cpu", "ort-cuda", "ort-trt", "torch-cpu"])
    monkeypatch.setattr(bench, "open_trt_session", lambda p, *a: opened.append(p) or open_session(p, "cpu"))
    monkeypatch.setattr(bench, "ort_runner", runner)
    result = bench.run_bench([path], data, tmp_path / "b", batch_sizes=[2], warmup=0, repeats=3,
                             backends=["ort-trt"], threads=1)
    assert len(opened) == 1 and set(result.models[0]["latency"]) == {"ort-trt"}
    assert result.models[0]["latency"]["ort-trt"]["2"]["repeats"] == 3
    assert calls == [("cuda", 2)] * 4  # I/O binding on the GPU; the engine-building call, then 3 timed


@pytest.mark.slow
@pytest.mark.skipif(_cxx() is None, reason="torch.compile's inductor needs a C++ compiler on the CPU")
def test_compile_channels_last_and_bf16_under_two_processes(tmp_path):
    """DistributedDataParallel around the compiled module (2 CPU processes, gloo): one checkpoint,
    its keys those of the plain model."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr", "127.0.0.1",
            "--master_port", str(port), "-m", "compress.cli", "train", "--model", "vgg6", "--width", "0.125",
            "--fc-hidden", "none", "--epochs", "1", "--limit-train", "200", "--limit-test", "100",
            "--batch-size", "90", "--compile", "--channels-last", "--amp", "bf16", "--out", str(out), "--quiet"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    assert list(state) == list(tiny_vgg().state_dict()) and all(v.is_contiguous() for v in state.values())
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["compile"] is True
