"""Loads the compiled extension fastvq._C if it was built, and remembers why not otherwise."""

import warnings

import torch

try:
    from fastvq import _C  # noqa: F401  (registers torch.ops.fastvq.* on import)

    EXTENSION_ERROR: str | None = None
except ImportError as e:  # a source checkout without a build, or a torch ABI mismatch
    EXTENSION_ERROR = f"fastvq._C is not importable ({e}); run `make install` to build it"
    warnings.warn(
        f"{EXTENSION_ERROR}. The C++ backends are unavailable; Triton and the PyTorch reference "
        "still work.",
        stacklevel=2,
    )


def has_op(name: str, device_type: str) -> bool:
    """Whether the compiled op torch.ops.fastvq.<name> has a kernel for `device_type`."""
    if EXTENSION_ERROR is not None or not hasattr(torch.ops.fastvq, name):
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastvq::{name}", key)
