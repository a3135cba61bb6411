"""Triton kernels and their host launchers, imported as fastvq.kernels (never `import kernels`)."""

import functools

import torch


def on_input_device(launcher):
    """Run a host launcher with its first tensor's GPU as the current device. Triton launches on
    the current device, not the tensors': with inputs on cuda:1 while cuda:0 is current, the
    kernel ran on cuda:0 with cuda:1's pointers (an illegal address, or another GPU's memory)."""

    @functools.wraps(launcher)
    def launch(x, *args, **kwargs):
        if not x.is_cuda:
            return launcher(x, *args, **kwargs)
        with torch.cuda.device(x.device):
            return launcher(x, *args, **kwargs)

    return launch


def check_operand(
    op: str,
    name: str,
    x: torch.Tensor,
    shape: tuple[int | None, ...],
    dtypes: tuple[torch.dtype, ...],
    device: torch.device | None = None,
    *,
    strided_rows: bool = False,
) -> None:
    """ValueError unless x has `shape` (None: any size there), one of `dtypes`, lives on `device`
    (when given) and is contiguous (strided_rows: rows at any stride, each row's elements
    adjacent). The kernels index raw pointers with these assumptions, and the launchers are
    reachable as custom ops past the public ops' checks: a wrong shape, stride or dtype would read
    or write memory outside x, or silently read the wrong elements."""
    ok_shape = x.dim() == len(shape) and all(
        want is None or want == got for want, got in zip(shape, x.shape, strict=True)
    )
    if strided_rows:
        ok_layout = x.dim() < 2 or x.shape[-1] <= 1 or x.stride(-1) == 1
    else:
        ok_layout = x.is_contiguous()
    if ok_shape and ok_layout and x.dtype in dtypes and (device is None or x.device == device):
        return
    dims = ", ".join("*" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "")
    layout = "contiguous " if not strided_rows else "" if len(shape) < 2 else "unit-column-stride "
    kinds = ", ".join(str(t).removeprefix("torch.") for t in dtypes)
    where = f" on {device}" if device is not None else ""
    raise ValueError(
        f"{op}: {name} must be a {layout}({dims}) tensor of {kinds}{where}; got {x.dtype} of "
        f"shape {tuple(x.shape)}, strides {x.stride()}, on {x.device}"
    )
