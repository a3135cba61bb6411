"""Triton kernel of the E8 shell decoder (fastvq.lattice.e8_shell_quantize, backend "triton").

`_e8_shell_decode_fwd_kernel`: one program per BLOCK_M rows of z (N, 8), held as a (BLOCK_M, 8)
tile. It reproduces the torch path's arithmetic score for score (fastvq/lattice/e8.py `_decode`),
so the indices are equal bit for bit, ties included: against the doubled codes, 2 (|z_i| + |z_j|)
for the two largest |z| (pair shape) and sum |z| - 2 min |z| [odd minus count] for the
half-integer shape, the sum as the tree ((u0 + u1) + (u2 + u3)) + ((u4 + u5) + (u6 + u7)).
Predicted from the sm_90 SASS (tests/triton_sm90.py, Triton 3.9: 72 registers, one row per
thread, ~1,160 instructions): ~36 warp instructions per row, so ~40 us at N = 2^20 at full issue
on an H100 against ~13 us for its 40 MB of traffic at 3.0 TB/s: instruction bound. Unmeasured on
a GPU.
Rows with NaN or Inf get 0; rows beyond 2^64 are scaled by 2^-100 first, as in every backend
(csrc/leech_decode.h row_scale). Scores in float32 (float64 for float64 inputs)."""

import torch
import triton
import triton.language as tl

from fastvq.ops._backends import triton_interpreting

BLOCK_M = 128  # 1,024 elements per tile: 8 per thread with 4 warps
INTERPRETER_BLOCK_M = 1024  # the interpreter pays per program, not per row


@triton.jit
def _abs_column(z_ptr, rows, row_ok, scale, C: tl.constexpr, DTYPE: tl.constexpr):
    """|z[:, C]| * scale, (BLOCK_M,): the terms of sum |z| one column at a time."""
    return tl.abs(tl.load(z_ptr + rows * 8 + C, mask=row_ok, other=0.0).to(DTYPE) * scale)


@triton.jit
def _e8_shell_decode_fwd_kernel(
    # input: z (N, 8) row-major float32/float64/bf16/fp16
    z_ptr,
    # output: idx (N,) int64
    idx_ptr,
    # sizes
    N,
    # meta
    BLOCK_M: tl.constexpr,
    DTYPE: tl.constexpr,  # scores: float64 for float64 inputs, else float32
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    cols = tl.arange(0, 8)
    z = tl.load(z_ptr + rows[:, None] * 8 + cols[None, :], mask=row_ok[:, None], other=0.0)
    z = z.to(DTYPE)
    # Scores reach 4 max|z|: rows beyond 2^64 are scaled by 2^-100 (exact), as in every backend.
    big = tl.max(tl.abs(z), axis=1)
    scale = tl.where(big > 18446744073709551616.0, 7.888609052210118e-31, 1.0).to(DTYPE)
    z = z * scale[:, None]
    u = tl.abs(z)
    neg = z < 0

    # Pair shape: the first largest |z| (i), then the first largest of the others (j).
    top1 = tl.max(u, axis=1)
    i = tl.min(tl.where(u == top1[:, None], cols[None, :], 8), axis=1)
    others = tl.where(cols[None, :] == i[:, None], -1.0, u)
    top2 = tl.max(others, axis=1)
    j = tl.min(tl.where(others == top2[:, None], cols[None, :], 8), axis=1)
    a = tl.minimum(i, j)
    b = tl.maximum(i, j)
    neg_a = tl.sum(tl.where((cols[None, :] == a[:, None]) & neg, 1, 0), axis=1)
    neg_b = tl.sum(tl.where((cols[None, :] == b[:, None]) & neg, 1, 0), axis=1)
    index1 = ((a * 7 - a * (a - 1) // 2 + (b - a - 1)) * 4 + 2 * neg_a + neg_b).to(tl.int64)

    # Half-integer shape (fastvq.lattice._common.best_even_signs): sign(z); an odd minus count flips
    # one least |z|, chosen by key (a minus at the smallest slot k < 7, then k = 7, then a plus at
    # the largest k < 7).
    least = tl.min(u, axis=1)
    k = cols[None, :]
    key = tl.where(neg & (k < 7), k, tl.where(k == 7, 8, 22 - k))
    cand = u == least[:, None]
    flip_key = tl.min(tl.where(cand, key, 100), axis=1)
    odd = tl.sum(tl.where(neg, 1, 0), axis=1) & 1
    flip = cand & (key == flip_key[:, None]) & (odd[:, None] != 0)
    minus = (neg ^ flip) & (k < 7)
    rank = tl.sum(tl.where(minus, 1 << (6 - tl.minimum(k, 6)), 0), axis=1)
    index2 = 112 + rank.to(tl.int64)

    u0 = _abs_column(z_ptr, rows, row_ok, scale, 0, DTYPE)
    u1 = _abs_column(z_ptr, rows, row_ok, scale, 1, DTYPE)
    u2 = _abs_column(z_ptr, rows, row_ok, scale, 2, DTYPE)
    u3 = _abs_column(z_ptr, rows, row_ok, scale, 3, DTYPE)
    u4 = _abs_column(z_ptr, rows, row_ok, scale, 4, DTYPE)
    u5 = _abs_column(z_ptr, rows, row_ok, scale, 5, DTYPE)
    u6 = _abs_column(z_ptr, rows, row_ok, scale, 6, DTYPE)
    u7 = _abs_column(z_ptr, rows, row_ok, scale, 7, DTYPE)
    total = ((u0 + u1) + (u2 + u3)) + ((u4 + u5) + (u6 + u7))
    score2 = tl.where(odd != 0, total - 2.0 * least, total)  # 2 * least is exact: one rounding

    # >= keeps the pair shape (the lower indices) on equal scores.
    index = tl.where(2.0 * (top1 + top2) >= score2, index1, index2)
    bad = tl.sum(tl.where(u < float("inf"), 0, 1), axis=1) > 0  # NaN or Inf
    tl.store(idx_ptr + rows, tl.where(bad, 0, index), mask=row_ok)


def e8_shell_decode_triton(z: torch.Tensor) -> torch.Tensor:
    """z (N, 8) contiguous float32/float64/bfloat16/float16 -> (N,) int64 canonical indices."""
    n = z.shape[0]
    out = torch.empty(n, dtype=torch.int64, device=z.device)
    if n == 0:
        return out
    block_m = INTERPRETER_BLOCK_M if triton_interpreting() else BLOCK_M
    _e8_shell_decode_fwd_kernel[(triton.cdiv(n, block_m),)](
        z,
        out,
        n,
        BLOCK_M=block_m,
        DTYPE=tl.float64 if z.dtype == torch.float64 else tl.float32,
    )
    return out
