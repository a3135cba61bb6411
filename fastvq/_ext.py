"""Loads the compiled extension fastvq._C if it was built, and remembers why not otherwise; and
the package's other registrations with torch."""

import importlib.util
import warnings

import torch

# Every module that `import fastvq` runs imports its siblings by their full module path
# (`from fastvq._C import ...`, never `from fastvq import _C`): the package form waits for
# fastvq/__init__ to finish, which deadlocks (and then fails with a partly initialised module)
# when another thread is running that __init__ and waiting for the importing module.
# tests/test_build.py checks the rule and the threads.
try:
    from fastvq._C import cpu_isa  # registers torch.ops.fastvq.* on import

    EXTENSION_ERROR: str | None = None
except ImportError as e:  # a source checkout without a build, or a torch ABI mismatch
    EXTENSION_ERROR = f"fastvq._C is not importable ({e}); run `make install` to build it"
    warnings.warn(
        f"{EXTENSION_ERROR}. The C++ backends are unavailable; Triton and the PyTorch reference "
        "still work.",
        stacklevel=2,
    )


def has_kernel(name: str, key: str) -> bool:
    if EXTENSION_ERROR is not None or not hasattr(torch.ops.fastvq, name):
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastvq::{name}", key)


def fake_on_one_device(op: str, *tensors) -> None:
    """For the fake (meta) kernels of the C++ ops with several tensor arguments: the dispatcher
    runs the fake whenever one argument is a meta tensor, where the real kernel refuses mixed
    devices; without this check the fake returns an uninitialised tensor on the others' device
    (or, for an in-place op, does nothing)."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(
            f"fastvq::{op}: all tensors must be on one device, got {sorted(map(str, devices))}"
        )


def refuse_gradient(op: str, instead: str) -> None:
    """Give the C++ op fastvq::op an autograd kernel whose backward raises: without one the
    dispatcher runs it under autograd with only a warning, and gradients through its outputs are
    silently dropped (the Python custom ops that call it own the gradient). instead: what to call
    for the gradient."""

    def backward(ctx, *grads):
        raise NotImplementedError(f"fastvq::{op} has no gradient of its own: {instead}")

    torch.library.register_autograd(f"fastvq::{op}", backward)


def register_namedtuple(cls):
    """Name a namedtuple that a forward returns for torch.export: save writes a returned
    namedtuple's type only under a registered name (NotImplementedError otherwise), and load
    finds it once the defining module is imported. Returns cls. The registration is private
    torch API (the one torch's error message names); a torch without it only loses the save."""
    register = getattr(torch.utils._pytree, "_register_namedtuple", None)
    if register is not None:
        register(cls, serialized_type_name=f"{cls.__module__}.{cls.__qualname__}")
    return cls


# Plain booleans read once at import (dispatcher queries, no CUDA): torch.compile can trace code
# that reads them, but not the dispatcher query itself.
HAS_CPU_KERNELS = has_kernel("nearest_code", "CPU")
HAS_CUDA_KERNELS = has_kernel("nearest_code", "CUDA")
HAS_TRITON = importlib.util.find_spec("triton") is not None
# Which build of the C++ CPU kernels runs: "avx2+fma", "avx2" or "baseline" (csrc/fastvq.cpp).
CPU_ISA = None if EXTENSION_ERROR is not None else cpu_isa()
