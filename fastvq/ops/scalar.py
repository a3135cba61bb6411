"""Codebook-free scalar quantizers FSQ, LFQ and BSQ, and the factorized entropy regularizer of
LFQ / BSQ, as fused elementwise ops with closed-form straight-through backward passes.

Custom ops (each with a "torch" body of plain torch ops, a Triton body in kernels/scalar.py and a
C++ CPU body in csrc/cpu/scalar.cpp, picked by the `impl` argument; a fake implementation; and
register_autograd wiring forward to backward):
  fastvq::fsq_fwd(z, levels)          -> (codes, indices)    fastvq::fsq_bwd(g, z, levels) -> dz
  fastvq::lfq_fwd(z)                  -> (codes, indices)    backward: identity (no op)
  fastvq::bsq_fwd(z)                  -> (codes, indices)    fastvq::bsq_bwd(g, z) -> dz
  fastvq::binary_entropy_fwd(z, coef, spherical) -> (row entropies (N,), column sums (2, D))
  fastvq::binary_entropy_bwd(g_row, g_col, z, coef, spherical) -> dz
The Triton bodies import fastvq.kernels lazily, so importing fastvq never imports Triton. GPUs get
no C++ twin: these ops are elementwise and bytes bound there, which Triton covers.
Semantics are specified by fastvq.reference.scalar; the tests hold every backend to it.
"""

import functools
import math
import numbers
import operator
import sys

import torch

from fastvq._ext import fake_on_one_device, has_kernel, refuse_gradient
from fastvq.ops._backends import backends, pick_backend
from fastvq.ops._validate import (
    FLOATING,
    check_choice,
    check_floating,
    check_index_tensor,
    check_no_tangent,
)
from fastvq.reference.nearest_code import inv_norm
from fastvq.reference.scalar import FSQ_EPS

SCALAR_BACKENDS = ("auto", "triton", "cpu", "torch")
QUANTIZERS = ("lfq", "bsq")
MAX_BITS = 62  # LFQ / BSQ indices 2^d - 1 stay well inside int64
# float32 (the kernels' arithmetic) resolves the bounded value of a 2^16-level dimension to
# 2^-8 of a level (its ulp at 2^15); beyond that rounding would no longer mean much.
MAX_LEVEL = 2**16
MAX_ENTROPY_DIM = 1024  # widest row of the kernels: one row per program in registers
INT64_MAX = 2**63 - 1


# --- argument checks ---------------------------------------------------------------------------


# The C++ CPU kernels (csrc/cpu/scalar.cpp), when fastvq._C was built with them. A plain boolean,
# read once: torch.compile can trace code that reads it, not the dispatcher query.
_HAS_CPP = all(
    has_kernel(op, "CPU")
    for op in (
        "fsq_fwd_cpp",
        "fsq_bwd_cpp",
        "sign_fwd_cpp",
        "bsq_bwd_cpp",
        "binary_entropy_fwd_cpp",
        "binary_entropy_bwd_cpp",
    )
)
if _HAS_CPP:
    # Shapes of the C++ ops (schemas in csrc/fastvq.cpp), so that they trace and pass opcheck on
    # their own too, not only inside the custom ops below that call them.

    @torch.library.register_fake("fastvq::fsq_fwd_cpp")
    def _(z, params, basis):
        fake_on_one_device("fsq_fwd_cpp", z, params, basis)
        return z.new_empty(z.shape), z.new_empty(z.shape[0], dtype=torch.int64)

    @torch.library.register_fake("fastvq::sign_fwd_cpp")
    def _(z, scale):
        return z.new_empty(z.shape), z.new_empty(z.shape[0], dtype=torch.int64)

    @torch.library.register_fake("fastvq::binary_entropy_fwd_cpp")
    def _(z, coef, spherical):
        return z.new_empty(z.shape[0], dtype=torch.float32), z.new_empty(
            2, z.shape[1], dtype=torch.float32
        )

    @torch.library.register_fake("fastvq::fsq_bwd_cpp")
    def _(grad_codes, z, params):
        fake_on_one_device("fsq_bwd_cpp", grad_codes, z, params)
        return z.new_empty(z.shape)

    @torch.library.register_fake("fastvq::bsq_bwd_cpp")
    def _(grad_codes, z):
        fake_on_one_device("bsq_bwd_cpp", grad_codes, z)
        return z.new_empty(z.shape)

    @torch.library.register_fake("fastvq::binary_entropy_bwd_cpp")
    def _(grad_rows, grad_cols, z, coef, spherical):
        fake_on_one_device("binary_entropy_bwd_cpp", grad_rows, grad_cols, z)
        return z.new_empty(z.shape)

    for _op, _instead in (
        ("fsq_fwd_cpp", "call fastvq.fsq"),
        ("sign_fwd_cpp", "call fastvq.lfq or fastvq.bsq"),
        ("binary_entropy_fwd_cpp", "call fastvq.binary_entropy_loss"),
        ("fsq_bwd_cpp", "fastvq.fsq has no double backward"),
        ("bsq_bwd_cpp", "fastvq.bsq has no double backward"),
        ("binary_entropy_bwd_cpp", "fastvq.binary_entropy_loss has no double backward"),
    ):
        refuse_gradient(_op, _instead)


def _impl(backend, device: torch.device, dtype: torch.dtype) -> str:
    """The body that runs: "triton", "cpu" (C++) or "torch". "auto": Triton on CUDA tensors, C++
    on CPU tensors; float64 (and a build without the kernels) on torch."""
    if backend == "cuda":
        raise ValueError(
            "backend 'cuda' is unavailable: the scalar quantizers have no CUDA C++ kernels; "
            "'auto' and 'triton' run Triton's on GPUs"
        )
    check_choice("backend", backend, SCALAR_BACKENDS)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        if dtype == torch.float64:
            return "torch"
        if device.type == "cuda":
            return "triton" if backends(device)["triton"].available else "torch"  # sm_80+
        return "cpu" if _HAS_CPP else "torch"
    pick_backend(backend, device, dtype)  # raises ValueError where it cannot run these
    if backend == "cpu" and not _HAS_CPP:
        raise ValueError(
            "backend 'cpu' is unavailable: fastvq._C was built without the scalar quantizer "
            "kernels; rebuild it with `make install`"
        )
    return backend


def _check_levels(levels) -> tuple[int, ...]:
    if isinstance(levels, torch.Tensor):
        levels = levels.tolist()
    try:
        out = tuple(operator.index(level) for level in levels)
    except TypeError:
        raise TypeError(f"levels must be a sequence of ints, got {levels!r}") from None
    if not out:
        raise ValueError("levels must hold at least one level, got an empty sequence")
    if any(not 2 <= level <= MAX_LEVEL for level in out):
        raise ValueError(f"levels must each be between 2 and {MAX_LEVEL}, got {list(out)}")
    if math.prod(out) > INT64_MAX:
        raise ValueError(
            f"levels: the codebook size prod(levels) = {math.prod(out)} overflows int64 indices "
            f"(at most 2^63 - 1), got {list(out)}"
        )
    return out


def _check_z(z, low: int, high: int, why: str) -> int:
    check_floating("z", z)
    if z.dim() < 1:
        raise ValueError("z must have shape (..., d), got a 0-d tensor")
    d = z.shape[-1]
    if not low <= d <= high:
        raise ValueError(f"z's last dimension d must be between {low} and {high}{why}, got {d}")
    return d


def _check_bits(d) -> int:
    if isinstance(d, bool) or not isinstance(d, numbers.Integral):
        raise TypeError(f"d must be an int, got {type(d).__name__}")
    if not 1 <= d <= MAX_BITS:
        raise ValueError(f"d must be between 1 and {MAX_BITS}, got {d}")
    return int(d)


def _check_indices(indices, dtype) -> None:
    check_index_tensor("indices", indices)
    if dtype not in FLOATING:
        raise TypeError(f"dtype must be float32, bfloat16, float16 or float64, got {dtype}")


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- FSQ ---------------------------------------------------------------------------------------


def _constant_cache(fn):
    """functools.lru_cache for functions that build constant tensors, bypassed while tracing:
    non-strict torch.export runs this Python under fake tensors, and a cached one would be handed
    to every later eager call (dynamo traces the function itself either way)."""
    cached = functools.lru_cache(maxsize=64)(fn)

    @functools.wraps(fn)
    def wrapper(*args):
        return fn(*args) if torch.compiler.is_compiling() else cached(*args)

    return wrapper


@_constant_cache
def _radix(levels: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """basis (d,) = prod(levels[:i]) and levels (d,), int64 on `device`, built once per device:
    torch.tensor(list, device="cuda") copies from the host and waits for the stream (a host
    sync) on every call."""
    basis = torch.tensor([math.prod(levels[:i]) for i in range(len(levels))], dtype=torch.int64)
    return basis.to(device), torch.tensor(levels, dtype=torch.int64).to(device)


@_constant_cache
def _fsq_tables(levels: tuple[int, ...], device: torch.device, dtype: torch.dtype):
    """params (6, d): shift, h, offset, L // 2, L - 1 - L // 2, h / (L // 2); basis (d,) int64."""
    rows = []
    for level in levels:
        half_l = (level - 1) * (1 + FSQ_EPS) / 2
        offset = 0.5 if level % 2 == 0 else 0.0
        half_width = level // 2
        rows.append(
            (math.atanh(offset / half_l), half_l, offset, half_width, level - 1 - half_width,
             half_l / half_width)
        )  # fmt: skip
    params = torch.tensor(rows, dtype=torch.float64).T.to(dtype).contiguous()
    return params.to(device), _radix(levels, device)[0]


def _slope(x: torch.Tensor) -> torch.Tensor:
    """1 - tanh(x)^2 as 4e / (1 + e)^2, e = exp(-2|x|): the same formula as the kernel."""
    e = torch.exp(-2 * x.abs())
    return 4 * e / (1 + e).square()


def _fsq_fwd_torch(z, levels):
    params, basis = _fsq_tables(tuple(levels), z.device, _acc(z.dtype))
    shift, half_l, offset, half_width, top, _ = params
    r = torch.round(torch.tanh(z.to(params.dtype) + shift) * half_l - offset)
    r = torch.minimum(torch.maximum(torch.nan_to_num(r, nan=0.0), -half_width), top)
    r = torch.where(r == 0, 0.0, r)  # +0 for the level 0, as the kernels and fsq_codes give
    indices = ((r + half_width).to(torch.int64) * basis).sum(1)
    return (r / half_width).to(z.dtype), indices


@torch.library.custom_op("fastvq::fsq_fwd", mutates_args=())
def _fsq_fwd(z: torch.Tensor, levels: list[int], impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """codes (N, d) in z's dtype and indices (N,) int64 for z (N, d)."""
    z = z.contiguous()  # for contiguous outputs in every body, as the fake gives
    if impl == "torch":
        return _fsq_fwd_torch(z, levels)
    params, basis = _fsq_tables(tuple(levels), z.device, torch.float32)
    if impl == "cpu":
        return torch.ops.fastvq.fsq_fwd_cpp(z, params, basis)
    from fastvq.kernels.scalar import fsq_fwd

    return fsq_fwd(z, params, basis)


@_fsq_fwd.register_fake
def _(z, levels, impl):
    return z.new_empty(z.shape), z.new_empty(z.shape[0], dtype=torch.int64)


@torch.library.custom_op("fastvq::fsq_bwd", mutates_args=())
def _fsq_bwd(g: torch.Tensor, z: torch.Tensor, levels: list[int], impl: str) -> torch.Tensor:
    """dL/dz (N, d) in z's dtype = g * d(bound(z) / (L // 2))/dz."""
    g, z = g.contiguous(), z.contiguous()  # a contiguous dz in every body, as the fake gives
    if impl != "torch":
        params, _ = _fsq_tables(tuple(levels), z.device, torch.float32)
        if impl == "cpu":
            return torch.ops.fastvq.fsq_bwd_cpp(g, z, params)
        from fastvq.kernels.scalar import fsq_bwd

        return fsq_bwd(g, z, params)
    params, _ = _fsq_tables(tuple(levels), z.device, _acc(z.dtype))
    shift, gain = params[0], params[5]
    return (g.to(params.dtype) * _slope(z.to(params.dtype) + shift) * gain).to(z.dtype)


@_fsq_bwd.register_fake
def _(g, z, levels, impl):
    fake_on_one_device("fsq_bwd", g, z)
    return z.new_empty(z.shape)


def _fsq_setup(ctx, inputs, output):
    z, levels, impl = inputs
    ctx.levels, ctx.impl = levels, impl
    ctx.save_for_backward(z)


def _fsq_backward(ctx, g_codes, _g_indices):
    (z,) = ctx.saved_tensors
    return _fsq_bwd(g_codes, z, ctx.levels, ctx.impl), None, None


_fsq_fwd.register_autograd(_fsq_backward, setup_context=_fsq_setup)


def fsq(z: torch.Tensor, levels, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Finite scalar quantization (Mentzer et al., ICLR 2024) with a straight-through gradient.

    Per dimension i with L = levels[i] levels: b = tanh(z + shift) * h - offset with
    h = (L - 1)(1 + 1e-3) / 2, offset = 1/2 for even L and 0 for odd L, shift = atanh(offset / h)
    (so b(0) = 0); r = round(b) (half to even), clamped to the L integers -(L // 2) ..
    L - 1 - L // 2 (a no-op below L = 1001, where the 1e-3 margin is still under half a level);
    codes = r / (L // 2) in [-1, 1]. This is vector-quantize-pytorch's FSQ; the paper's appendix
    writes h with (1 - 1e-3) and tan(offset / h) for the shift, which never reaches the extreme
    levels beyond L = 1000 and puts b(0) slightly off 0. Even L gives the asymmetric grid of the
    paper (L = 4: codes -1, -0.5, 0, 0.5; L = 2: -1, 0). A NaN component gets level 0.
    Gradient: dcodes/dz = tanh'(z + shift) * h / (L // 2), the gradient of b / (L // 2).

    Args:
        z: (..., d) float32, bfloat16 or float16 (float64 with backend "torch" / "auto");
            computed in float32 (float64 for float64 z).
        levels: d ints, each between 2 and 2^16, with prod(levels) <= 2^63 - 1.
        backend: "auto" (Triton on CUDA tensors, C++ on CPU tensors, torch for float64),
            "triton", "cpu" or "torch".

    Returns:
        codes: (..., d) in z's dtype; indices: (...,) int64, mixed radix with dimension 0 the
        least significant digit: sum_i (r_i + L_i // 2) * prod(levels[:i]).
    """
    check_floating("z", z)
    levels = _check_levels(levels)
    if z.dim() < 1:
        raise ValueError("z must have shape (..., d), got a 0-d tensor")
    d = z.shape[-1]
    if d != len(levels):
        raise ValueError(
            f"z's last dimension ({d}) must equal len(levels) ({len(levels)}), got z of shape "
            f"{tuple(z.shape)} and levels {list(levels)}"
        )
    check_no_tangent("fsq", z)
    impl = _impl(backend, z.device, z.dtype)
    codes, indices = _fsq_fwd(z.reshape(-1, d).contiguous(), list(levels), impl)
    return codes.view(z.shape), indices.view(z.shape[:-1])


def fsq_codes(indices: torch.Tensor, levels, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """FSQ codes (..., d) in `dtype` for mixed-radix indices (...,) of dtype int64, int32,
    int16, int8 or uint8 (the index dtypes torch takes: uint16 token files need a cast).

    The inverse of fsq's index map (bit-identical to fsq's codes in the same dtype); indices are
    taken modulo prod(levels).
    """
    levels = _check_levels(levels)
    _check_indices(indices, dtype)
    acc = _acc(dtype)
    basis, lv = _radix(levels, indices.device)
    digits = indices.to(torch.int64)[..., None].div(basis, rounding_mode="floor").remainder(lv)
    half_width = (lv // 2).to(acc)
    return ((digits.to(acc) - half_width) / half_width).to(dtype)


# --- LFQ and BSQ -------------------------------------------------------------------------------


def _sign_fwd_torch(z, spherical):
    pos = z >= 0
    s = torch.tensor(1 / math.sqrt(z.shape[1]) if spherical else 1.0, dtype=_acc(z.dtype))
    codes = torch.where(pos, s, -s).to(z.dtype)
    bits = torch.ones((), dtype=torch.int64, device=z.device) << torch.arange(
        z.shape[1], device=z.device
    )
    return codes, (pos.to(torch.int64) * bits).sum(1)


def _sign_fwd(z, spherical, impl):
    z = z.contiguous()  # for contiguous codes in every body, as the fakes give
    if impl == "torch":
        return _sign_fwd_torch(z, spherical)
    if impl == "cpu":
        scale = 1 / math.sqrt(z.shape[1]) if spherical else 1.0
        return torch.ops.fastvq.sign_fwd_cpp(z, scale)
    from fastvq.kernels.scalar import sign_fwd

    return sign_fwd(z, spherical)


@torch.library.custom_op("fastvq::lfq_fwd", mutates_args=())
def _lfq_fwd(z: torch.Tensor, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """codes (N, d) = +-1 in z's dtype and bit-packed indices (N,) int64."""
    return _sign_fwd(z, False, impl)


@torch.library.custom_op("fastvq::bsq_fwd", mutates_args=())
def _bsq_fwd(z: torch.Tensor, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """codes (N, d) = +-1/sqrt(d) in z's dtype and bit-packed indices (N,) int64."""
    return _sign_fwd(z, True, impl)


@_lfq_fwd.register_fake
def _(z, impl):
    return z.new_empty(z.shape), z.new_empty(z.shape[0], dtype=torch.int64)


@_bsq_fwd.register_fake
def _(z, impl):
    return z.new_empty(z.shape), z.new_empty(z.shape[0], dtype=torch.int64)


@torch.library.custom_op("fastvq::bsq_bwd", mutates_args=())
def _bsq_bwd(g: torch.Tensor, z: torch.Tensor, impl: str) -> torch.Tensor:
    """dL/dz (N, d) in z's dtype: g pulled back through u = z / |z| (0 for a zero row)."""
    g, z = g.contiguous(), z.contiguous()  # a contiguous dz in every body, as the fake gives
    if impl == "cpu":
        return torch.ops.fastvq.bsq_bwd_cpp(g, z)
    if impl == "triton":
        from fastvq.kernels.scalar import bsq_bwd

        return bsq_bwd(g, z)
    acc = _acc(z.dtype)
    x, gf = z.to(acc), g.to(acc)
    inv = inv_norm(x)
    u = x * inv
    return ((gf - u * (u * gf).sum(1, keepdim=True)) * inv).to(z.dtype)


@_bsq_bwd.register_fake
def _(g, z, impl):
    fake_on_one_device("bsq_bwd", g, z)
    return z.new_empty(z.shape)


def _lfq_backward(ctx, g_codes, _g_indices):
    return g_codes, None


def _bsq_setup(ctx, inputs, output):
    z, impl = inputs
    ctx.impl = impl
    ctx.save_for_backward(z)


def _bsq_backward(ctx, g_codes, _g_indices):
    (z,) = ctx.saved_tensors
    return _bsq_bwd(g_codes, z, ctx.impl), None


_lfq_fwd.register_autograd(_lfq_backward)
_bsq_fwd.register_autograd(_bsq_backward, setup_context=_bsq_setup)


def lfq(z: torch.Tensor, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Lookup-free quantization (MAGVIT-v2): codes = sign(z) with a straight-through gradient.

    codes_i = +1 where z_i >= 0 (zero and -0.0 included) and -1 elsewhere (NaN included);
    dL/dz = dL/dcodes. indices = sum_i [codes_i = +1] 2^i (bit i for dimension i).

    Args:
        z: (..., d), 1 <= d <= 62, float32, bfloat16 or float16 (float64 on backend "torch").
        backend: "auto" (Triton on CUDA tensors, C++ on CPU tensors, torch for float64),
            "triton", "cpu" or "torch".

    Returns:
        codes: (..., d) in z's dtype; indices: (...,) int64 in [0, 2^d).
    """
    d = _check_z(z, 1, MAX_BITS, " (indices are int64 bit masks)")
    check_no_tangent("lfq", z)
    impl = _impl(backend, z.device, z.dtype)
    codes, indices = _lfq_fwd(z.reshape(-1, d).contiguous(), impl)
    return codes.view(z.shape), indices.view(z.shape[:-1])


def bsq(z: torch.Tensor, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Binary spherical quantization (Zhao et al.): codes = sign(z / |z|) / sqrt(d).

    u = z / |z| is quantized to the nearest of the 2^d vertices of the hypercube inscribed in
    the unit sphere; the straight-through estimator sits on u, as in the paper
    (u + sg(codes - u)): dL/dz = (dL/dcodes - u (u . dL/dcodes)) / |z|. Signs as in lfq
    (z_i >= 0 -> +1/sqrt(d)); a zero row gets all +1/sqrt(d) codes and a zero gradient.
    indices are lfq's indices of z (the sign of z / |z| is the sign of z).

    Args:
        z: (..., d), 1 <= d <= 62, float32, bfloat16 or float16 (float64 on backend "torch").
        backend: "auto" (Triton on CUDA tensors, C++ on CPU tensors, torch for float64),
            "triton", "cpu" or "torch".

    Returns:
        codes: (..., d) in z's dtype, +-1/sqrt(d) (for float32 and narrower: rounded to
            float32, then to z's dtype);
        indices: (...,) int64 in [0, 2^d).
    """
    d = _check_z(z, 1, MAX_BITS, " (indices are int64 bit masks)")
    check_no_tangent("bsq", z)
    impl = _impl(backend, z.device, z.dtype)
    codes, indices = _bsq_fwd(z.reshape(-1, d).contiguous(), impl)
    return codes.view(z.shape), indices.view(z.shape[:-1])


def _bits(indices, d):
    shifts = torch.arange(d, device=indices.device)
    return (indices.to(torch.int64)[..., None] >> shifts) & 1 == 1


def lfq_codes(indices: torch.Tensor, d: int, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """LFQ codes (..., d) in {-1, +1} for bit-packed indices (...,); bits >= d are ignored."""
    d = _check_bits(d)
    _check_indices(indices, dtype)
    return torch.where(_bits(indices, d), 1.0, -1.0).to(dtype)


def bsq_codes(indices: torch.Tensor, d: int, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """BSQ codes (..., d) = +-1/sqrt(d) for bit-packed indices (...,), equal to bsq's codes; bits
    >= d are ignored, as in lfq_codes."""
    d = _check_bits(d)
    _check_indices(indices, dtype)
    s = torch.full((), 1 / math.sqrt(d), dtype=_acc(dtype), device=indices.device)  # no copy
    return torch.where(_bits(indices, d), s, -s).to(dtype)


# --- factorized binary entropy -----------------------------------------------------------------


def _logits(z, coef, spherical):
    """(x, 1/|z| or None, a = coef * x) in float32 / float64, x = z or z / |z|."""
    x = z.to(_acc(z.dtype))
    inv = inv_norm(x) if spherical else None
    if spherical:
        x = x * inv
    return x, inv, coef * x


@torch.library.custom_op("fastvq::binary_entropy_fwd", mutates_args=())
def _binary_entropy_fwd(
    z: torch.Tensor, coef: float, spherical: bool, impl: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row entropies (N,) and column sums (2, d) of p(+), p(-); float32 (float64 for float64 z)."""
    if impl == "cpu":
        return torch.ops.fastvq.binary_entropy_fwd_cpp(z.contiguous(), coef, spherical)
    if impl == "triton":
        from fastvq.kernels.scalar import binary_entropy_fwd

        return binary_entropy_fwd(z.contiguous(), coef, spherical)
    _, _, a = _logits(z, coef, spherical)
    e = torch.exp(-a.abs())
    inv = 1 / (1 + e)
    # |a| e^-|a| -> 0 as |a| -> inf, but a saturated logit (|a| = inf) gives inf * 0 = NaN.
    h = torch.log1p(e) + torch.where(e == 0, 0.0, a.abs() * e * inv)
    plus = torch.where(a >= 0, inv, e * inv)
    minus = torch.where(a >= 0, e * inv, inv)
    return h.sum(1), torch.stack([plus.sum(0), minus.sum(0)])


@_binary_entropy_fwd.register_fake
def _(z, coef, spherical, impl):
    acc = _acc(z.dtype)
    return z.new_empty(z.shape[0], dtype=acc), z.new_empty(2, z.shape[1], dtype=acc)


@torch.library.custom_op("fastvq::binary_entropy_bwd", mutates_args=())
def _binary_entropy_bwd(
    g_row: torch.Tensor,
    g_col: torch.Tensor,
    z: torch.Tensor,
    coef: float,
    spherical: bool,
    impl: str,
) -> torch.Tensor:
    """dL/dz (N, d) in z's dtype from dL/drow_entropies (N,) and dL/dcolumn_sums (2, d)."""
    z = z.contiguous()  # a contiguous dz in every body, as the fake gives
    if impl != "torch":
        g_row, g_col = g_row.float().contiguous(), g_col.float().contiguous()
        if impl == "cpu":
            return torch.ops.fastvq.binary_entropy_bwd_cpp(g_row, g_col, z, coef, spherical)
        from fastvq.kernels.scalar import binary_entropy_bwd

        return binary_entropy_bwd(g_row, g_col, z, coef, spherical)
    x, inv_norm, a = _logits(z, coef, spherical)
    e = torch.exp(-a.abs())
    w = e / (1 + e).square()  # p (1 - p)
    # p (1 - p) = 0 where the logit saturates, and so is the gradient, though a (inf) is not.
    dx = torch.where(e == 0, 0.0, coef * w * ((g_col[0] - g_col[1]) - a * g_row[:, None]))
    if spherical:
        dx = (dx - x * (x * dx).sum(1, keepdim=True)) * inv_norm
    return dx.to(z.dtype)


@_binary_entropy_bwd.register_fake
def _(g_row, g_col, z, coef, spherical, impl):
    fake_on_one_device("binary_entropy_bwd", g_row, g_col, z)
    return z.new_empty(z.shape)


def _entropy_setup(ctx, inputs, output):
    z, coef, spherical, impl = inputs
    ctx.coef, ctx.spherical, ctx.impl = coef, spherical, impl
    ctx.save_for_backward(z)


def _entropy_backward(ctx, g_row, g_col):
    (z,) = ctx.saved_tensors
    dz = _binary_entropy_bwd(
        g_row.contiguous(), g_col.contiguous(), z, ctx.coef, ctx.spherical, ctx.impl
    )
    return dz, None, None, None


_binary_entropy_fwd.register_autograd(_entropy_backward, setup_context=_entropy_setup)


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) whose backward sums the ranks' gradients too (as vector-quantize-pytorch's
    torch.distributed.nn.all_reduce, deprecated in torch 2.13): DDP's average of the parameter
    gradients is then the gradient of one process's loss on the whole batch."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        t = t.clone()
        torch.distributed.all_reduce(t, group=group)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def binary_entropy_loss(
    z: torch.Tensor,
    *,
    inv_temperature: float,
    quantizer: str = "lfq",
    backend: str = "auto",
    all_reduce=False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy regularizers of LFQ / BSQ over 2^d codes in O(N d), never enumerating the codes.

    Soft assignment of x to the 2^d codes c: q(c | x) = softmax_c(-inv_temperature |x - c|^2),
    with x = z, c in {-1, +1}^d for quantizer="lfq" (vector-quantize-pytorch's LFQ and its
    inv_temperature) and x = z / |z|, c in {-1/sqrt(d), +1/sqrt(d)}^d for "bsq" (the BSQ paper's
    soft quantization; a zero row has x = 0). Since |c| is fixed, q factorizes exactly into
    independent bits: p_i = q(c_i > 0 | x) = sigmoid(4 inv_temperature s x_i), s = |c_i|.

    Returns, in nats, as 0-d tensors (float32, float64 for float64 z), both differentiable:
        per_sample_entropy = mean_n sum_i H(p_ni). This is EXACTLY mean_n H(q(. | x_n)), the
            entropy of the full 2^d-way distribution (the entropy of a product distribution is
            the sum of its factors' entropies).
        codebook_entropy = sum_i H(mean_n p_ni), the entropy of the product of the batch-averaged
            bit marginals: the BSQ paper's factorized approximation taken to single bits (its
            code factorizes over groups of bits). It is an UPPER BOUND on H(mean_n q(. | x_n)),
            the joint entropy of the batch-averaged code distribution (subadditivity), equal to
            it when that average is itself a product distribution (e.g. N = 1).
    The usual loss is per_sample_entropy - gamma * codebook_entropy (both lie in [0, d log 2]).
    An empty batch gives (0, 0). H(p) = log(1 + e^-|a|) + |a| e^-|a| / (1 + e^-|a|) is computed
    without cancellation; a saturated logit (e^-|a| = 0, |a| up to inf: an inv_temperature or a
    |z| near float32's limit) gives H = 0 and a zero gradient, and saturated columns (mean p = 0
    or 1) keep finite gradients. z is not checked for NaN or Inf, which make the entropies NaN (a
    loss: the training loop's NaN guard sees it).

    Args:
        z: (..., d), 1 <= d <= 1024, float32, bfloat16 or float16 (float64 on backend "torch").
        inv_temperature: positive finite float (LFQ commonly uses 100).
        quantizer: "lfq" or "bsq".
        backend: "auto" (Triton on CUDA tensors, C++ on CPU tensors, torch for float64),
            "triton", "cpu" or "torch".
        all_reduce: True (default process group) or a ProcessGroup: z is this rank's shard and
            the bit marginals are averaged over the group's rows (a differentiable all-reduce, as
            vector-quantize-pytorch's LFQ does under DDP), so codebook_entropy is the group
            batch's; per_sample_entropy stays this rank's mean.
    Memory: O(N d) for the backward (z is saved), O(d) extra in the forward (under torch.compile
    also the (N, d) float32 logits, so that inv_temperature stays a graph input).
    """
    from fastvq.ops.codebook import _process_group

    d = _check_z(z, 1, MAX_ENTROPY_DIM, "")
    check_choice("quantizer", quantizer, QUANTIZERS)
    group = _process_group("all_reduce", all_reduce)
    if isinstance(inv_temperature, bool) or not isinstance(inv_temperature, numbers.Real):
        raise TypeError(f"inv_temperature must be a float, got {type(inv_temperature).__name__}")
    # Comparisons rather than math.isfinite (NaN fails both): under torch.compile(dynamic=True) a
    # float argument is a SymFloat, which math.isfinite cannot trace (a graph break). The largest
    # float, not inf: an int past it (10**400) would fail float() below.
    if not 0 < inv_temperature <= sys.float_info.max:
        raise ValueError(f"inv_temperature must be positive and finite, got {inv_temperature}")
    check_no_tangent("binary_entropy_loss", z)
    impl = _impl(backend, z.device, z.dtype)
    z2 = z.reshape(-1, d).contiguous()
    n = z2.shape[0]
    spherical = quantizer == "bsq"
    coef = 4.0 * float(inv_temperature) * (1 / math.sqrt(d) if spherical else 1.0)
    # Past float32's range the kernels would round it to inf, and inf * 0 (a zero coordinate,
    # whose logit is 0 at any finite temperature) is NaN; the largest float saturates the rest.
    coef = min(coef, torch.finfo(_acc(z.dtype)).max)
    if torch.compiler.is_compiling():
        # The coefficient scales the logits in torch arithmetic, outside the kernel: a float
        # inv_temperature changed between steps (annealed) then stays a graph input, where as the
        # kernel's float argument each value was a constant that compiled a new graph.
        _, _, logits = _logits(z2, coef, spherical)
        rows, sums = _binary_entropy_fwd(logits, 1.0, False, impl)
    else:
        rows, sums = _binary_entropy_fwd(z2, coef, spherical, impl)
    per_sample = rows.sum() / max(n, 1)
    if group is None:
        probs = sums / max(n, 1)
    else:  # the group's rows: its total count stays on the device (no host sync)
        sums = _SumOverRanks.apply(sums, group)
        count = torch.full((), n, dtype=sums.dtype, device=z.device)
        torch.distributed.all_reduce(count, group=group)
        probs = sums / count.clamp_min(1)
    # log of the clamped probability: a column with mean p = 0 gets H = 0 and a finite gradient.
    tiny = torch.finfo(probs.dtype).tiny
    codebook = -(probs * torch.log(probs.clamp_min(tiny))).sum()
    return per_sample, codebook
