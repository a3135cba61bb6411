"""Argument checks shared by the public ops: each message names the argument and what it wants."""

import functools
import math
import numbers
import operator

import torch
from torch.autograd import forward_ad

FLOATING = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# What the Triton and C++ kernels read (float64 inputs take the torch paths, except the lattices').
KERNEL_FLOATING = (torch.float32, torch.bfloat16, torch.float16)


def check_tensor(name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def check_floating(name: str, value) -> None:
    check_tensor(name, value)
    if value.dtype not in FLOATING:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {value.dtype}")


def check_int(name: str, value, low: int = 1) -> int:
    """TypeError unless an int (not bool); ValueError unless >= low."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def check_real(name: str, value, low: float, high: float | None = None) -> float:
    """The value as a float: TypeError unless a real number (not a bool); ValueError unless in
    [low, high], or finite and >= low without high (NaN fails both)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:  # an int past float's range (10**400): neither finite nor in range
        raise ValueError(
            f"{name} must be a finite real number, got an int of {value.bit_length()} bits"
        ) from None
    if high is not None and not low <= value <= high:
        raise ValueError(f"{name} must be in [{low:g}, {high:g}], got {value}")
    if high is None and not low <= value < float("inf"):
        raise ValueError(f"{name} must be finite and >= {low:g}, got {value}")
    return value


def check_positive(name: str, value) -> float:
    """check_real, and > 0: a scale or a divisor, where 0 would give NaN or lose the input."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and not 0 < value < math.inf:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return check_real(name, value, 0.0)


# The integer dtypes torch indexes with (not uint16, uint32 or uint64).
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_index_tensor(name: str, indices, device: torch.device | None = None) -> None:
    """TypeError unless a tensor of one of INDEX_DTYPES; ValueError unless on `device` (if
    given: the codebook's, which a meta tensor would otherwise answer with uninitialised rows)."""
    check_tensor(name, indices)
    if indices.dtype not in INDEX_DTYPES:
        raise TypeError(
            f"{name} must be an int64, int32, int16, int8 or uint8 tensor, got {indices.dtype}"
        )
    if device is not None and indices.device != device:
        raise ValueError(f"{name} must be on the codebook's device {device}, got {indices.device}")


def check_index_range(name: str, indices: torch.Tensor, low: int, high: int, why: str = "") -> None:
    """ValueError unless low <= indices < high (why: a note after the range); one host sync,
    skipped while torch.compile traces (a data-dependent branch would break the graph).
    indices: checked by check_index_tensor first."""
    if indices.numel() == 0 or indices.is_meta or torch.compiler.is_compiling():
        return
    lo, hi = torch.stack(torch.aminmax(indices)).tolist()
    if lo < low or hi >= high:
        raise ValueError(f"{name} must lie in [{low}, {high}){why}, got values from {lo} to {hi}")


def check_writable(name: str, value: torch.Tensor) -> None:
    """ValueError where `value`, written in place, repeats one element along a dimension (an
    expand()ed view, stride 0): its elements' updates would overwrite one another."""
    if any(
        stride == 0 and size > 1 for stride, size in zip(value.stride(), value.shape, strict=True)
    ):
        raise ValueError(
            f"{name} is written in place, so it must not be an expanded view (a dimension of "
            f"stride 0); got shape {tuple(value.shape)}, strides {value.stride()}: pass a copy"
        )


def shares_storage(rows: torch.Tensor, *written: torch.Tensor) -> bool:
    """Whether rows lie in the storage of a tensor the op writes while it reads them (the
    result would depend on the threads' order). Not checked while torch.compile traces, which
    cannot read storage pointers, nor for meta tensors, which have none."""
    if torch.compiler.is_compiling() or rows.numel() == 0 or rows.is_meta:
        return False
    ptr = rows.untyped_storage().data_ptr()
    return any(t.numel() > 0 and t.untyped_storage().data_ptr() == ptr for t in written)


def _span(t: torch.Tensor, unit: int) -> tuple[int, int]:
    """[first, last] storage position of t's elements, in units of `unit` bytes."""
    k = t.element_size() // unit
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
    return t.storage_offset() * k, (t.storage_offset() + last + 1) * k - 1


def check_disjoint(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """ValueError where a, written in place (after check_writable), and b hold a common element:
    the backends' orders of reads and writes differ, and so would the results. Views of one
    buffer that share no element pass, as the (K, D + 1) statistics layout of cluster_size =
    buf[:, D], embed_sum = buf[:, :D] does (ATen's overlap check answers "too hard" for such
    strided views). Exact for any strides: where the two storage ranges meet, one bool per
    element of their union marks a's elements (CPU, from sizes and strides alone: no data read,
    no device sync), a cost paid only by views of one buffer."""
    if not shares_storage(a, b):
        return
    unit = math.gcd(a.element_size(), b.element_size())
    (lo_a, hi_a), (lo_b, hi_b) = _span(a, unit), _span(b, unit)
    if hi_a < lo_b or hi_b < lo_a:
        return
    lo = min(lo_a, lo_b)
    mask = torch.zeros(max(hi_a, hi_b) - lo + 1, dtype=torch.bool)

    def units(t):  # t's elements as (..., element_size / unit) positions in mask
        k = t.element_size() // unit
        strides = [s * k for s in t.stride()] + [1]
        return mask.as_strided((*t.shape, k), strides, t.storage_offset() * k - lo)

    units(a).fill_(True)
    if units(b).any():
        raise ValueError(
            f"{name_a} is written in place, so it must not share elements with {name_b}; "
            f"got views of one buffer that overlap (storage offsets {a.storage_offset()} and "
            f"{b.storage_offset()}, strides {a.stride()} and {b.stride()}): pass separate tensors"
        )


def check_no_tangent(op: str, *tensors) -> None:
    """NotImplementedError where a tensor carries a forward-mode tangent (torch.func.jvp / jacfwd,
    torch.autograd.forward_ad): torch passes none through a custom op that registers only its
    backward, so the result's tangent would silently be zero. (torch.func.grad, vjp and jacrev
    raise torch's own error at such an op; torch.autograd's reverse mode is unaffected.)"""
    if torch.compiler.is_compiling():
        return
    for t in tensors:
        if forward_ad.unpack_dual(t).tangent is not None:
            raise NotImplementedError(
                f"{op} does not support forward-mode AD (torch.func.jvp, jacfwd, "
                "torch.autograd.forward_ad): its custom op would give a zero tangent; use "
                "torch.autograd.grad or torch.autograd.functional (vectorize=True) instead"
            )


def check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


class NonFiniteError(ValueError):
    """An op's input holds NaN or Inf (the trainer's NaN guard tells it from other errors)."""


def _no_values(t: torch.Tensor) -> bool:
    return t.is_meta or torch._C._functorch.is_functorch_wrapped_tensor(t)


def check_finite(skippable: bool = True, **tensors) -> None:
    """Raise NonFiniteError (a ValueError) naming the first tensor with NaN or Inf; one host sync
    for all of them. Each value is a tensor or a sequence of tensors checked under one name (a
    residual stack's codebooks). skippable: the op takes check_inputs_finite, and the message
    says so.

    Skipped while torch.compile traces (a data-dependent branch would break the graph), for meta
    tensors (no values to check: shape inference only) and under torch.func's transforms (vmap's
    batched tensors have no single value to read).

    A tensor's sum is finite only if all its terms are (NaN and Inf propagate through additions),
    and so is a sum of such sums: one reduction per tensor (float16 and bfloat16 summed in
    float32), their total and one sync settle the usual case, where isfinite().all() makes about
    five passes and four temporaries, and per-tensor flags (an isfinite each and a stack) cost
    more host time than a small search itself. Only where the total is not finite, which finite
    terms can also give by overflowing, do the exact checks run, and they name the first
    offending tensor.
    """
    groups = [(v,) if isinstance(v, torch.Tensor) else tuple(v) for v in tensors.values()]
    flat = [t for ts in groups for t in ts]
    if not flat or torch.compiler.is_compiling() or any(map(_no_values, flat)):
        return
    sums = [t.sum(dtype=torch.promote_types(t.dtype, torch.float32)) for t in flat]
    # n - 1 additions, or a stack and a sum (two ops) once that is fewer.
    total = functools.reduce(operator.add, sums) if len(sums) <= 3 else torch.stack(sums).sum()
    if math.isfinite(total.tolist()):
        return
    true = total.new_ones((), dtype=torch.bool)  # leads each group's flags: an empty group is fine
    flags = torch.stack(
        [torch.stack([true, *(t.isfinite().all() for t in ts)]).all() for ts in groups]
    )
    for name, ok in zip(tensors, flags.tolist(), strict=True):
        if not ok:
            hint = "; pass check_inputs_finite=False to skip this check" if skippable else ""
            raise NonFiniteError(f"{name} contains NaN or Inf{hint}")
