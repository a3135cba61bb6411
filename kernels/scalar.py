"""Triton kernels of fastvq's scalar quantizers (FSQ, LFQ, BSQ) and of the factorized binary
entropy regularizer; semantics in fastvq.reference.scalar and fastvq.ops.scalar.

Every kernel holds BLOCK_N whole rows of z (N, D) per program (BLOCK_D = next_pow2(D)), computes in
float32 and reads / writes each element once:
- `_fsq_fwd_kernel`: bound (tanh), round half to even, clamp, write codes and the mixed-radix
  int64 index of each row.                                        reads z, writes codes + 8 B/row
- `_fsq_bwd_kernel`: dz = g * tanh'(z + shift) * h / (L // 2).     reads g, z, writes dz
- `_sign_fwd_kernel`: LFQ / BSQ codes +-scale from the sign of z and the bit-packed index
  (bit i <=> z_i >= 0; the sign of z / |z| is the sign of z). LFQ's backward is the identity.
- `_bsq_bwd_kernel`: dz = (g - u (u . g)) / |z|, u = z / |z| (0 for a zero row).
- `_binary_entropy_fwd_kernel`: per-row entropy sum_i H(sigmoid(a_i)), a = coef * x, and per
  program column sums of p(+) and p(-) (reduced by the host: deterministic, no atomics).
- `_binary_entropy_bwd_kernel`: dz from the per-row and per-column upstream gradients.
Only the stable `tl` API: tanh and log1p are built from exp / log below.
"""

import math

import torch
import triton
import triton.language as tl
from fastvq.kernels import check_operand, on_input_device

from fastvq.ops._validate import KERNEL_FLOATING
from fastvq.ops.scalar import MAX_BITS, MAX_ENTROPY_DIM

# --- shared device helpers ---------------------------------------------------------------------


@triton.jit
def _tanh_and_slope(x):
    """(tanh(x), 1 - tanh(x)^2) without overflow: e = exp(-2|x|) lies in (0, 1]."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t), 4.0 * e / ((1.0 + e) * (1.0 + e))


@triton.jit
def _round_half_even(x):
    # x + 0.5 is exact for |x| < 2^22 (levels are capped at 2^16): ties go to the even neighbour,
    # as torch.round does.
    r = tl.floor(x + 0.5)
    odd = (r - 2.0 * tl.floor(0.5 * r)) != 0.0
    return tl.where(((r - x) == 0.5) & odd, r - 1.0, r)


@triton.jit
def _log1p_small(e):
    """log(1 + e) for e in [0, 1] to a few ulps: Goldberg's log(u) * e / (u - 1), u = 1 + e."""
    u = 1.0 + e
    return tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _cast_for(x, ptr):
    """x (float32) in ptr's element type, rounded to nearest even. For bfloat16 the rounding is
    done here on the bits, because the interpreter's float32 -> bfloat16 cast truncates (1/3 ->
    0.33203 instead of 0.33398); the cast that follows is then exact on every target. A NaN
    becomes a quiet NaN instead: NVIDIA GPUs compute one NaN, 0x7FFFFFFF, which the carry wrapped
    to -0.0 (numpy's 0x7FC00000 survives it, so the interpreter never showed this), and a NaN
    with its payload in the low 16 bits only would truncate to inf in the interpreter's cast."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x == x, bits.to(tl.float32, bitcast=True), float("nan"))
    return x.to(ptr.dtype.element_ty)


@triton.jit
def _rows_and_cols(N, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    return rows, cols, rows < N, cols < D


@triton.jit
def _inv_norm(x):
    """1 / |row| per row of a float32 tile (fastvq.ops.scalar._inv_norm's rule): the norm in
    float64, where float32 squares neither underflow nor overflow; 0 where the norm is 0 or
    its inverse exceeds float32 (a zero row; inf norms give 0 too)."""
    x64 = x.to(tl.float64)
    norm = tl.sqrt(tl.sum(x64 * x64, axis=1))
    inv = 1.0 / tl.where(norm > 0, norm, 1.0)
    return tl.where((norm > 0) & (inv <= 3.4028234663852886e38), inv, 0.0).to(tl.float32)


# --- FSQ ---------------------------------------------------------------------------------------


@triton.jit
def _fsq_fwd_kernel(
    # inputs: z (N, D); params (6, D) float32 rows shift, h, offset, L // 2, top, gain; basis (D,)
    z_ptr,
    params_ptr,
    basis_ptr,
    # outputs: codes (N, D) in z's dtype, idx (N,) int64
    codes_ptr,
    idx_ptr,
    # sizes
    N,
    D,
    # meta
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows, cols, row_ok, col_ok = _rows_and_cols(N, D, BLOCK_N, BLOCK_D)
    mask = row_ok[:, None] & col_ok[None, :]
    shift = tl.load(params_ptr + cols, mask=col_ok, other=0.0)[None, :]
    half_l = tl.load(params_ptr + D + cols, mask=col_ok, other=0.0)[None, :]
    offset = tl.load(params_ptr + 2 * D + cols, mask=col_ok, other=0.0)[None, :]
    half_width = tl.load(params_ptr + 3 * D + cols, mask=col_ok, other=1.0)[None, :]
    top = tl.load(params_ptr + 4 * D + cols, mask=col_ok, other=0.0)[None, :]
    basis = tl.load(basis_ptr + cols, mask=col_ok, other=0)[None, :]
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    t, _ = _tanh_and_slope(x + shift)
    r = _round_half_even(t * half_l - offset)
    # NaN -> level 0 (tl.maximum would drop or keep NaN depending on the target).
    r = tl.where(r == r, r, 0.0)
    r = tl.minimum(tl.maximum(r, -half_width), top)
    codes = tl.div_rn(r, half_width)
    tl.store(codes_ptr + offs, _cast_for(codes, codes_ptr), mask=mask)
    digits = (r + half_width).to(tl.int64)
    idx = tl.sum(tl.where(mask, digits * basis, 0), axis=1)
    tl.store(idx_ptr + rows, idx, mask=row_ok)


@triton.jit
def _fsq_bwd_kernel(
    # inputs: g = dL/dcodes (N, D), z (N, D), params (6, D) float32 as in the forward
    g_ptr,
    z_ptr,
    params_ptr,
    # outputs: dz (N, D) in z's dtype
    dz_ptr,
    # sizes
    N,
    D,
    # meta
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows, cols, row_ok, col_ok = _rows_and_cols(N, D, BLOCK_N, BLOCK_D)
    mask = row_ok[:, None] & col_ok[None, :]
    shift = tl.load(params_ptr + cols, mask=col_ok, other=0.0)[None, :]
    gain = tl.load(params_ptr + 5 * D + cols, mask=col_ok, other=0.0)[None, :]
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    _, slope = _tanh_and_slope(x + shift)
    tl.store(dz_ptr + offs, _cast_for(g * slope * gain, dz_ptr), mask=mask)


# --- LFQ / BSQ ---------------------------------------------------------------------------------


@triton.jit
def _sign_fwd_kernel(
    # inputs: z (N, D), D <= 62
    z_ptr,
    # outputs: codes (N, D) = +-scale in z's dtype, idx (N,) int64
    codes_ptr,
    idx_ptr,
    # sizes and the code magnitude (1 for LFQ, 1/sqrt(D) for BSQ)
    N,
    D,
    scale,
    # meta
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows, cols, row_ok, col_ok = _rows_and_cols(N, D, BLOCK_N, BLOCK_D)
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    pos = x >= 0
    codes = tl.where(pos, scale, -scale)
    tl.store(codes_ptr + offs, _cast_for(codes, codes_ptr), mask=mask)
    bit = tl.full([BLOCK_D], 1, tl.int64) << cols.to(tl.int64)
    idx = tl.sum(tl.where(mask & pos, bit[None, :], 0), axis=1)
    tl.store(idx_ptr + rows, idx, mask=row_ok)


@triton.jit
def _bsq_bwd_kernel(
    # inputs: g = dL/dcodes (N, D), z (N, D)
    g_ptr,
    z_ptr,
    # outputs: dz (N, D) in z's dtype
    dz_ptr,
    # sizes
    N,
    D,
    # meta
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows, cols, row_ok, col_ok = _rows_and_cols(N, D, BLOCK_N, BLOCK_D)
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    inv = _inv_norm(x)[:, None]
    u = x * inv
    dz = (g - u * tl.sum(u * g, axis=1)[:, None]) * inv
    tl.store(dz_ptr + offs, _cast_for(dz, dz_ptr), mask=mask)


# --- factorized binary entropy -----------------------------------------------------------------


@triton.jit
def _binary_entropy_fwd_kernel(
    # inputs: z (N, D)
    z_ptr,
    # outputs: row_entropy (N,) float32, partial (programs, 2, D) float32 column sums of p(+), p(-)
    row_ptr,
    partial_ptr,
    # sizes and the logit scale a = coef * x
    N,
    D,
    coef,
    # meta
    SPHERICAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows, cols, row_ok, col_ok = _rows_and_cols(N, D, BLOCK_N, BLOCK_D)
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(z_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if SPHERICAL:
        x = x * _inv_norm(x)[:, None]
    a = coef * x
    e = tl.exp(-tl.abs(a))
    inv = 1.0 / (1.0 + e)
    # H(sigmoid(a)) = log(1 + e) + |a| e / (1 + e): no cancellation at any |a|. The second term
    # is 0 once e is, also at |a| = inf (a saturated logit), where inf * 0 would be NaN.
    h = _log1p_small(e) + tl.where(e == 0.0, 0.0, tl.abs(a) * e * inv)
    tl.store(row_ptr + rows, tl.sum(tl.where(mask, h, 0.0), axis=1), mask=row_ok)
    p_hi = tl.where(mask, inv, 0.0)
    p_lo = tl.where(mask, e * inv, 0.0)
    plus = tl.where(a >= 0, p_hi, p_lo)
    minus = tl.where(a >= 0, p_lo, p_hi)
    out = partial_ptr + tl.program_id(0).to(tl.int64) * 2 * D + cols
    tl.store(out, tl.sum(plus, axis=0), mask=col_ok)
    tl.store(out + D, tl.sum(minus, axis=0), mask=col_ok)


@triton.jit
def _binary_entropy_bwd_kernel(
    # inputs: g_row = dL/drow_entropy (N,), g_col = dL/dcolumn sums (2, D), z (N, D)
    g_row_ptr,
    g_col_ptr,
    z_ptr,
    # outputs: dz (N, D) in z's dtype
    dz_ptr,
    # sizes and the logit scale
    N,
    D,
    coef,
    # meta
    SPHERICAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows, cols, row_ok, col_ok = _rows_and_cols(N, D, BLOCK_N, BLOCK_D)
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if SPHERICAL:
        inv_norm = _inv_norm(x)[:, None]
        x = x * inv_norm
    a = coef * x
    e = tl.exp(-tl.abs(a))
    w = e / ((1.0 + e) * (1.0 + e))  # p (1 - p)
    g_row = tl.load(g_row_ptr + rows, mask=row_ok, other=0.0)[:, None]
    g_col = tl.load(g_col_ptr + cols, mask=col_ok, other=0.0) - tl.load(
        g_col_ptr + D + cols, mask=col_ok, other=0.0
    )
    # dH/da = -a p (1 - p); dp(+)/da = -dp(-)/da = p (1 - p): 0 where the logit saturates,
    # though a (inf) is not
    dx = tl.where(e == 0.0, 0.0, coef * w * (g_col[None, :] - a * g_row))
    dx = tl.where(mask, dx, 0.0)
    if SPHERICAL:
        dx = (dx - x * tl.sum(x * dx, axis=1)[:, None]) * inv_norm
    tl.store(dz_ptr + offs, _cast_for(dx, dz_ptr), mask=mask)


# --- host launchers ----------------------------------------------------------------------------


def _blocks(d: int) -> tuple[int, int]:
    # NOTE: unmeasured on GPU (no H100 in the session that wrote this): 2048 elements per program
    # over 4 warps is 16 per thread; these kernels are bytes bound, so tiles only need to be
    # large enough to keep loads in flight.
    block_d = triton.next_power_of_2(d)
    return max(1, min(256, 2048 // block_d)), block_d


_NUM_WARPS = 4


def _grid(n: int, block_n: int) -> tuple[int]:
    return (triton.cdiv(n, block_n),)


def _check_rows(op: str, z: torch.Tensor, max_dim: int, g: torch.Tensor | None = None) -> None:
    """The launchers' contract as ValueError (reachable as torch.ops.fastvq.* past the public
    ops' checks): z (N, D) contiguous, 1 <= D <= max_dim; g, where given, the upstream gradient
    (N, D) in z's dtype."""
    check_operand(op, "z", z, (None, None), KERNEL_FLOATING)
    if not 1 <= z.shape[1] <= max_dim:
        raise ValueError(f"{op}: z must have 1 <= D <= {max_dim} columns, got {z.shape[1]}")
    if g is not None:
        check_operand(op, "g", g, tuple(z.shape), (z.dtype,), z.device)


@on_input_device
def fsq_fwd(
    z: torch.Tensor, params: torch.Tensor, basis: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """codes (N, D) in z's dtype and indices (N,) int64. z (N, D) contiguous float32/bf16/fp16;
    params (6, D) float32 and basis (D,) int64 on z's device (fastvq.ops.scalar builds them)."""
    _check_rows("fsq_fwd", z, MAX_ENTROPY_DIM)
    n, d = z.shape
    check_operand("fsq_fwd", "params", params, (6, d), (torch.float32,), z.device)
    check_operand("fsq_fwd", "basis", basis, (d,), (torch.int64,), z.device)
    codes = torch.empty_like(z)
    idx = torch.empty(n, dtype=torch.int64, device=z.device)
    if n:
        block_n, block_d = _blocks(d)
        _fsq_fwd_kernel[_grid(n, block_n)](
            z, params, basis, codes, idx, n, d, block_n, block_d, num_warps=_NUM_WARPS
        )
    return codes, idx


@on_input_device
def fsq_bwd(g: torch.Tensor, z: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """dL/dz (N, D) in z's dtype from g = dL/dcodes (N, D) contiguous."""
    _check_rows("fsq_bwd", z, MAX_ENTROPY_DIM, g)
    n, d = z.shape
    check_operand("fsq_bwd", "params", params, (6, d), (torch.float32,), z.device)
    dz = torch.empty_like(z)
    if n:
        block_n, block_d = _blocks(d)
        _fsq_bwd_kernel[_grid(n, block_n)](
            g, z, params, dz, n, d, block_n, block_d, num_warps=_NUM_WARPS
        )
    return dz


@on_input_device
def sign_fwd(z: torch.Tensor, spherical: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """LFQ (spherical=False: +-1) or BSQ (+-1/sqrt(D)) codes (N, D) and indices (N,) int64."""
    _check_rows("sign_fwd", z, MAX_BITS)
    n, d = z.shape
    codes = torch.empty_like(z)
    idx = torch.empty(n, dtype=torch.int64, device=z.device)
    if n:
        block_n, block_d = _blocks(d)
        scale = 1 / math.sqrt(d) if spherical else 1.0
        _sign_fwd_kernel[_grid(n, block_n)](
            z, codes, idx, n, d, scale, block_n, block_d, num_warps=_NUM_WARPS
        )
    return codes, idx


@on_input_device
def bsq_bwd(g: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """dL/dz (N, D) in z's dtype: g pulled back through u = z / |z|."""
    _check_rows("bsq_bwd", z, MAX_ENTROPY_DIM, g)
    n, d = z.shape
    dz = torch.empty_like(z)
    if n:
        block_n, block_d = _blocks(d)
        _bsq_bwd_kernel[_grid(n, block_n)](g, z, dz, n, d, block_n, block_d, num_warps=_NUM_WARPS)
    return dz


@on_input_device
def binary_entropy_fwd(
    z: torch.Tensor, coef: float, spherical: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """row entropy (N,) float32 and column sums (2, D) float32 of p(+) and p(-)."""
    _check_rows("binary_entropy_fwd", z, MAX_ENTROPY_DIM)
    n, d = z.shape
    rows = torch.empty(n, dtype=torch.float32, device=z.device)
    if not n:
        return rows, torch.zeros(2, d, dtype=torch.float32, device=z.device)
    block_n, block_d = _blocks(d)
    grid = _grid(n, block_n)
    partial = torch.empty(grid[0], 2, d, dtype=torch.float32, device=z.device)
    _binary_entropy_fwd_kernel[grid](
        z, rows, partial, n, d, coef, spherical, block_n, block_d, num_warps=_NUM_WARPS
    )
    return rows, partial.sum(0)


@on_input_device
def binary_entropy_bwd(
    g_row: torch.Tensor, g_col: torch.Tensor, z: torch.Tensor, coef: float, spherical: bool
) -> torch.Tensor:
    """dL/dz (N, D) in z's dtype; g_row (N,) and g_col (2, D) float32 contiguous."""
    op = "binary_entropy_bwd"
    _check_rows(op, z, MAX_ENTROPY_DIM)
    n, d = z.shape
    check_operand(op, "g_row", g_row, (n,), (torch.float32,), z.device)
    check_operand(op, "g_col", g_col, (2, d), (torch.float32,), z.device)
    dz = torch.empty_like(z)
    if n:
        block_n, block_d = _blocks(d)
        _binary_entropy_bwd_kernel[_grid(n, block_n)](
            g_row, g_col, z, dz, n, d, coef, spherical, block_n, block_d, num_warps=_NUM_WARPS
        )
    return dz
