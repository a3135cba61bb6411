"""Argument checks shared by the public ops: each message names the argument and what it wants."""

import numbers

import torch

FLOATING = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


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


def check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


class NonFiniteError(ValueError):
    """An op's input holds NaN or Inf (the trainer's NaN guard tells it from other errors)."""


def check_finite(skippable: bool = True, **tensors) -> None:
    """Raise NonFiniteError (a ValueError) naming the first tensor with NaN or Inf; one host sync
    for all of them. Each value is a tensor or a sequence of tensors checked under one name (a
    residual stack's codebooks). skippable: the op takes check_inputs_finite, and the message
    says so.

    Skipped while torch.compile traces (a data-dependent branch would break the graph) and for
    meta tensors (no values to check: shape inference only).

    A tensor's sum is finite only if all its terms are (NaN and Inf propagate through additions),
    so one reduction per tensor settles the usual case, where isfinite().all() makes about five
    passes and four temporaries. Only where a sum is not finite, which finite terms can also give
    by overflowing, do the exact checks run.
    """
    groups = [[v] if isinstance(v, torch.Tensor) else list(v) for v in tensors.values()]
    if torch.compiler.is_compiling() or any(t.is_meta for ts in groups for t in ts):
        return

    def all_of(check) -> list[bool]:
        alls = [[check(t) for t in ts] for ts in groups]
        return torch.stack([a[0] if len(a) == 1 else torch.stack(a).all() for a in alls]).tolist()

    flags = all_of(lambda t: t.sum(dtype=torch.promote_types(t.dtype, torch.float32)).isfinite())
    if not all(flags):
        flags = all_of(lambda t: torch.isfinite(t).all())
    for (name, _), ok in zip(tensors.items(), flags, strict=True):
        if not ok:
            hint = "; pass check_inputs_finite=False to skip this check" if skippable else ""
            raise NonFiniteError(f"{name} contains NaN or Inf{hint}")
