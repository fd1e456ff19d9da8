"""The machine every figure is taken on: CPU model and vector extensions, threads, load, GPU and
library versions, written beside every result (a latency is a property of a machine)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from compress._version import __version__

__all__ = ["environment", "cpu_model", "cpu_flags", "int8_fast_path"]

# the extensions that decide which convolution and INT8 kernels a CPU runs
_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16", "asimddp")
# the extensions with which onnxruntime's INT8 kernels are faster than FP32 (x86 VNNI or AMX, ARM dot product)
INT8_FAST = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp")


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says."""
    for line in _cpuinfo():
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """Which of the vector extensions that matter for inference speed the CPU has (AVX2, AVX-512,
    VNNI, AMX); empty where ``/proc/cpuinfo`` is not readable."""
    for line in _cpuinfo():
        if line.lower().startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return [f for f in _FLAGS if f in have]
    return []


def int8_fast_path(flags: list[str] | None = None) -> tuple[bool, str]:
    """Whether onnxruntime has a fast INT8 path on this CPU, and a sentence saying why.

    x86 needs AVX-512 VNNI, AVX-VNNI or AMX (without them the u8s8 kernels run on AVX2 or
    AVX-512BW and are often no faster than FP32); ARM needs the dot-product extension (asimddp).
    """
    flags = cpu_flags() if flags is None else list(flags)
    found = [f for f in INT8_FAST if f in flags]
    if found:
        return True, f"this CPU has a fast INT8 path ({', '.join(found)})"
    return False, ("this CPU has no fast INT8 path (no AVX-512 VNNI, AVX-VNNI, AMX or ARM dot product): onnxruntime's "
                   "INT8 kernels are emulated with wider instructions here, so INT8 latencies on it are not what a "
                   "VNNI CPU would measure; compare INT8 speed on the deployment CPU")


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return "-"


def environment(threads: int | None = None) -> dict[str, str]:
    """CPU model and flags, thread counts, load average, GPU, library versions and ONNX Runtime
    providers.

    Args:
        threads: the onnxruntime thread count the figures were taken with (``None``: its default).
    """
    import onnx
    import onnxruntime as ort

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "-"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "compress": __version__, "torch": str(torch.__version__), "python": platform.python_version(),
        "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
        "threads": str(torch.get_num_threads()), "device": gpu if gpu != "none" else "cpu",
        "cpu": cpu_model(), "cpu_flags": " ".join(cpu_flags()) or "-", "cpu_count": str(os.cpu_count()),
        "cpu_affinity": str(affinity),
        "load_average": load,  # 1, 5, 15 min: other work on a shared machine shows here
        "torch_threads": str(torch.get_num_threads()),
        "ort_threads": str(threads) if threads else "onnxruntime default",
        "gpu": gpu, "platform": platform.platform(), "onnx": onnx.__version__, "onnxruntime": ort.__version__,
        "onnxruntime_package": "onnxruntime-gpu" if _version("onnxruntime-gpu") != "-" else "onnxruntime",
        "ort_providers": ",".join(ort.get_available_providers()), "numpy": _version("numpy"),
        "fvcore": _version("fvcore"),
    }
