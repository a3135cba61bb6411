"""Which kernel backends exist on this machine, and which one `backend="auto"` picks."""

import contextlib
import os
from typing import NamedTuple

import torch

from fastvq._ext import CPU_ISA, EXTENSION_ERROR, HAS_CPU_KERNELS, HAS_CUDA_KERNELS, HAS_TRITON

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")
# setup.py's MIN_CUDA_ARCH: the CUDA kernels are built for sm_80 and up, and the Triton search
# asks for bf16 and tf32 tensor cores (sm_80+). Older GPUs run the torch backend.
MIN_CUDA_CAPABILITY = (8, 0)


class Backend(NamedTuple):
    available: bool
    reason: str


def autocast_off(device_type: str):
    """torch.autocast(device_type, enabled=False), or no context where autocast is off already:
    entering and leaving one is host time in every forward (two per VectorQuantize forward, so
    two per layer of a residual stack, whose own context has turned autocast off around them),
    a visible share of a small layer's step. torch.compile guards on the autocast state, so a
    compiled forward stays right either way."""
    if device_type != "meta" and torch.is_autocast_enabled(device_type):  # meta: no autocast
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def triton_interpreting() -> bool:
    """Triton kernels run through its CPU interpreter (TRITON_INTERPRET=1): their launchers pick
    the interpreter's tile sizes, and backend="triton" takes CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def backends(device: torch.device | None = None) -> dict[str, Backend]:
    """Availability of each backend with the reason, e.g. {"cpu": Backend(True, "C++ ..."), ...}.

    device: the GPU whose compute capability decides for the GPU backends (a machine may mix
    generations); default, or a CPU device, the current CUDA device.
    """
    cuda = torch.cuda.is_available()
    old_gpu = None
    if cuda:
        index = device.index if device is not None and device.type == "cuda" else None
        index = torch.cuda.current_device() if index is None else index
        # get_device_properties, not get_device_capability: torch.compile folds only the former.
        gpu = torch.cuda.get_device_properties(index)
        if (gpu.major, gpu.minor) < MIN_CUDA_CAPABILITY:
            old_gpu = (
                f"fastvq's GPU kernels need compute capability 8.0+ (bf16/tf32 tensor cores); "
                f"cuda:{index} has {gpu.major}.{gpu.minor}"
            )
    report = {}
    if not HAS_TRITON:
        report["triton"] = Backend(False, "triton is not installed (pip install triton)")
    elif old_gpu is not None:
        report["triton"] = Backend(False, old_gpu)
    elif cuda:
        report["triton"] = Backend(True, "Triton kernels on CUDA tensors")
    elif triton_interpreting():
        report["triton"] = Backend(True, "Triton interpreter on CPU tensors (TRITON_INTERPRET=1)")
    else:
        report["triton"] = Backend(
            False, "no CUDA device; set TRITON_INTERPRET=1 to run Triton kernels on CPU tensors"
        )
    if EXTENSION_ERROR is not None:
        report["cuda"] = Backend(False, EXTENSION_ERROR)
    elif not HAS_CUDA_KERNELS:
        report["cuda"] = Backend(
            False, "fastvq._C was built without CUDA (torch without CUDA, or no nvcc at build time)"
        )
    elif not cuda:
        report["cuda"] = Backend(False, "built with CUDA, but no CUDA device is visible")
    elif old_gpu is not None:
        report["cuda"] = Backend(False, old_gpu)
    else:
        report["cuda"] = Backend(True, "C++/CUDA kernels")
    if EXTENSION_ERROR is not None:
        report["cpu"] = Backend(False, EXTENSION_ERROR)
    elif not HAS_CPU_KERNELS:
        report["cpu"] = Backend(False, "fastvq._C has no CPU kernel for nearest_code")
    else:
        report["cpu"] = Backend(True, f"C++ CPU kernels, {CPU_ISA} build")
    report["torch"] = Backend(True, "plain PyTorch reference, chunked")
    return report


def cpu_available() -> bool:
    """backends()["cpu"].available without building the report (CUDA queries, the environment,
    four reasons), which "auto" would otherwise build on every call on CPU tensors (three times
    per fastvq.quantize call before)."""
    return EXTENSION_ERROR is None and HAS_CPU_KERNELS


def check_backend(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def pick_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Resolve `backend` for tensors on `device`; ValueError if it cannot run there."""
    if dtype == torch.float64:
        if backend not in ("auto", "torch"):
            raise ValueError(
                f"backend {backend!r} takes float32, bfloat16 or float16; float64 inputs run on "
                "backend='torch'"
            )
        return "torch"
    if backend == "auto" and device.type != "cuda":
        return "cpu" if cpu_available() else "torch"
    report = backends(device)
    if backend == "auto":
        # NOTE: Triton before CUDA C++ on GPU is unmeasured so far: bench/ decides once it has run.
        return next(name for name in ("triton", "cuda", "torch") if report[name].available)
    if not report[backend].available:
        raise ValueError(f"backend {backend!r} is unavailable: {report[backend].reason}")
    wants = {"cuda": "cuda", "cpu": "cpu", "triton": "cpu" if triton_interpreting() else "cuda"}
    if backend in wants and device.type != wants[backend]:
        raise ValueError(
            f"backend {backend!r} runs on {wants[backend]} tensors here, got tensors on {device}"
        )
    return backend
