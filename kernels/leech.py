"""Triton kernel of the structured Leech decoder (fastvq.lattice.leech_quantize, backend "triton").

`_leech_decode_fwd_kernel`: one program per BLOCK_M rows of z (N, 24). It reproduces the torch
path's arithmetic score for score (fastvq/lattice/leech.py `_decode`), so the indices are equal
bit for bit, ties included:
  - Per-row tables over the 4 groups of 6 coordinates and the 64 sign patterns e of a group, each a
    (BLOCK_M, 64) tensor: the signed sum of z with -1 on e (left to right) and its least term
    (shape 3); the sum of |z| over the subset e (left to right) and its least |z| (shape 2).
  - Shape 3, codeword m = l1 * 64 + l0: the loop runs over l1 and the 64 values of l0 are the lane
    axis, so group 0's tables are used as they are, group 1's is one column, and groups 2 and 3
    are read at high12(m) = hhi[l1] ^ hlo[l0] with tl.gather. Per codeword: 4 gathers, 3 adds,
    3 minima, 1 multiply-add, a compare and 2 selects (~13 operations, 53k per row).
  - Shape 2, octads in BLOCK_O tiles (759 padded to 768): 8 gathers, 3 adds, 3 minima, the parity
    of the minus signs on the octad by xor folding, a select, compare and 2 selects (~30
    operations, 23k per row).
  - Shape 1 and the winners' sign fix (shape 2) and position (shape 3) on the (BLOCK_M, 32) tile.
  About 80k lane operations per row (brute force: 4.7M multiply-adds). Unmeasured on a GPU.
  Predicted from the sm_90 SASS (tests/triton_sm90.py, Triton 3.9; 255 registers, no spills):
  tl.gather lowers to warp shuffles, 80 of the 226 instructions of a shape-3 iteration and 512 of
  the 1,462 of an octad tile, ~2,000 warp shuffles per row. At one warp shuffle per cycle per SM
  that is >= 0.58 ms at N = 65,536 on an H100, twice the issue's 0.3 ms target; the CUDA C++
  kernel (csrc/cuda/leech.cu, shared-memory tables) predicts ~0.33 ms. bench/ decides.
Each lane keeps its best with a strict `>` over increasing codewords / octads; the lanes are then
reduced to (largest score, lowest index), which is the first maximum. Rows with NaN or Inf get 0;
rows beyond 2^64 are scaled by 2^-100 first, as in every backend (csrc/leech_decode.h row_scale).
Scores in float32 (float64 for float64 inputs)."""

import functools

import torch
import triton
import triton.language as tl
from fastvq.kernels import check_operand, on_input_device

from fastvq.lattice.leech import _tables
from fastvq.ops._backends import triton_interpreting
from fastvq.ops._validate import FLOATING

# Rows per program and warps, by score dtype: the sixteen (BLOCK_M, 64) group tables (4 groups x
# signed sum, minimum, |z| sum, |z| minimum) must stay in registers. 16 rows x 64 lanes over 8 warps
# is 4 float32 elements per thread and table, 64 registers in all; 8 rows for float64 holds the
# same 64. With 4 warps (8 elements each) float32 hit the 255-register cap, and spilled under
# Triton 3.9 (11 stores, float64 236-339); these choices compile spill-free for sm_90 under
# Triton 3.6 and 3.9 (tests/triton_sm90.py: 128 registers, 128-138 for float64). Untimed.
BLOCK_M, BLOCK_M_F64 = 16, 8
NUM_WARPS = 8
INTERPRETER_BLOCK_M = 64
BLOCK_O = 128  # octads per tile: 759 in 6 tiles
OCTADS_PADDED = 768


@triton.jit
def _group_tables(z_ptr, rows, row_ok, scale, K: tl.constexpr, DTYPE: tl.constexpr):
    """(BLOCK_M, 64) tables of group K: signed sum and minimum, |z| subset sum and minimum."""
    e = tl.arange(0, 64)
    for c in tl.static_range(6):
        x = tl.load(z_ptr + rows * 24 + (6 * K + c), mask=row_ok, other=0.0).to(DTYPE) * scale
        on = ((e >> c) & 1)[None, :] != 0
        t = tl.where(on, -x[:, None], x[:, None])
        a = tl.abs(x)[:, None]
        if c == 0:
            s = t
            mn = t
            a_sum = tl.where(on, a, 0.0)
            a_min = tl.where(on, a, float("inf"))
        else:
            s = s + t
            mn = tl.minimum(mn, t)
            a_sum = tl.where(on, a_sum + a, a_sum)
            a_min = tl.where(on, tl.minimum(a_min, a), a_min)
    return s, mn, a_sum, a_min


@triton.jit
def _leech_decode_fwd_kernel(
    # inputs: z (N, 24) row-major float32/float64/bf16/fp16; Golay tables int32: hlo, hhi (64,) with
    # high12(l0 + 64 l1) = hlo[l0] ^ hhi[l1], octads (768,) 24-bit masks (0 past 759)
    z_ptr,
    hlo_ptr,
    hhi_ptr,
    octad_ptr,
    # output: idx (N,) int64
    idx_ptr,
    # sizes
    N,
    # meta
    BLOCK_M: tl.constexpr,
    BLOCK_O: tl.constexpr,
    OCTADS_PADDED: tl.constexpr,
    DTYPE: tl.constexpr,  # scores: float64 for float64 inputs, else float32
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    cols = tl.arange(0, 32)
    col_ok = cols < 24
    e = tl.arange(0, 64)
    zt = tl.load(
        z_ptr + rows[:, None] * 24 + cols[None, :],
        mask=row_ok[:, None] & col_ok[None, :],
        other=0.0,
    ).to(DTYPE)
    inf = float("inf")
    # Scores reach 48 max|z|: rows beyond 2^64 are scaled by 2^-100 (exact) so none overflows
    # (csrc/leech_decode.h row_scale, the same rule in every backend). NaN rows get 0 below.
    big = tl.max(tl.abs(zt), axis=1)
    scale = tl.where(big > 18446744073709551616.0, 7.888609052210118e-31, 1.0).to(DTYPE)
    zt = zt * scale[:, None]

    s0, mn0, a_s0, a_m0 = _group_tables(z_ptr, rows, row_ok, scale, 0, DTYPE)
    s1, mn1, a_s1, a_m1 = _group_tables(z_ptr, rows, row_ok, scale, 1, DTYPE)
    s2, mn2, a_s2, a_m2 = _group_tables(z_ptr, rows, row_ok, scale, 2, DTYPE)
    s3, mn3, a_s3, a_m3 = _group_tables(z_ptr, rows, row_ok, scale, 3, DTYPE)

    # Shape 3: lane l0, loop l1; m = l1 * 64 + l0 increases along the loop in each lane.
    hlo = tl.load(hlo_ptr + e)
    best3 = tl.full((BLOCK_M, 64), -inf, dtype=DTYPE)
    best_l1 = tl.zeros((BLOCK_M, 64), dtype=tl.int32)
    for l1 in range(64):
        col = tl.full((BLOCK_M, 1), l1, dtype=tl.int32)
        c_s = tl.gather(s1, col, axis=1)
        c_m = tl.gather(mn1, col, axis=1)
        hi = tl.load(hhi_ptr + l1) ^ hlo
        i2 = tl.broadcast_to((hi & 63)[None, :], (BLOCK_M, 64))
        i3 = tl.broadcast_to((hi >> 6)[None, :], (BLOCK_M, 64))
        s = (s0 + c_s) + (tl.gather(s2, i2, axis=1) + tl.gather(s3, i3, axis=1))
        mn = tl.minimum(
            tl.minimum(mn0, c_m), tl.minimum(tl.gather(mn2, i2, axis=1), tl.gather(mn3, i3, axis=1))
        )
        score = s - 4.0 * mn  # 4 * mn is exact: one rounding, fused or not
        better = score > best3
        best3 = tl.where(better, score, best3)
        best_l1 = tl.where(better, l1, best_l1)
    score3 = tl.max(best3, axis=1)
    word3 = tl.min(tl.where(best3 == score3[:, None], best_l1 * 64 + e[None, :], 4096), axis=1)

    # Shape 2: octads in message order, BLOCK_O per tile.
    neg = tl.sum(tl.where(zt < 0, 1 << cols[None, :], 0), axis=1)  # 24-bit minus-sign mask
    j = tl.arange(0, BLOCK_O)
    best2 = tl.full((BLOCK_M, BLOCK_O), -inf, dtype=DTYPE)
    best_o = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.int32)
    for o0 in range(0, OCTADS_PADDED, BLOCK_O):
        octad = tl.load(octad_ptr + o0 + j)
        g0 = tl.broadcast_to((octad & 63)[None, :], (BLOCK_M, BLOCK_O))
        g1 = tl.broadcast_to(((octad >> 6) & 63)[None, :], (BLOCK_M, BLOCK_O))
        g2 = tl.broadcast_to(((octad >> 12) & 63)[None, :], (BLOCK_M, BLOCK_O))
        g3 = tl.broadcast_to((octad >> 18)[None, :], (BLOCK_M, BLOCK_O))
        s = (tl.gather(a_s0, g0, axis=1) + tl.gather(a_s1, g1, axis=1)) + (
            tl.gather(a_s2, g2, axis=1) + tl.gather(a_s3, g3, axis=1)
        )
        mn = tl.minimum(
            tl.minimum(tl.gather(a_m0, g0, axis=1), tl.gather(a_m1, g1, axis=1)),
            tl.minimum(tl.gather(a_m2, g2, axis=1), tl.gather(a_m3, g3, axis=1)),
        )
        p = octad[None, :] & neg[:, None]
        p = p ^ (p >> 16)
        p = p ^ (p >> 8)
        p = p ^ (p >> 4)
        p = p ^ (p >> 2)
        p = p ^ (p >> 1)
        score = tl.where((p & 1) != 0, 2.0 * s - 4.0 * mn, 2.0 * s)
        score = tl.where((o0 + j < 759)[None, :], score, -inf)
        better = score > best2
        best2 = tl.where(better, score, best2)
        best_o = tl.where(better, o0 + j[None, :], best_o)
    score2 = tl.max(best2, axis=1)
    octad2 = tl.min(tl.where(best2 == score2[:, None], best_o, OCTADS_PADDED), axis=1)

    # Shape 1: the first largest |z| (i), then the first largest of the others (j).
    u = tl.where(col_ok[None, :], tl.abs(zt), -1.0)
    top1 = tl.max(u, axis=1)
    i = tl.min(tl.where(u == top1[:, None], cols[None, :], 32), axis=1)
    u = tl.where(cols[None, :] == i[:, None], -1.0, u)
    top2 = tl.max(u, axis=1)
    jj = tl.min(tl.where(u == top2[:, None], cols[None, :], 32), axis=1)
    score1 = 4.0 * (top1 + top2)
    a = tl.minimum(i, jj)
    b = tl.maximum(i, jj)
    zneg = zt < 0
    neg_a = tl.sum(tl.where((cols[None, :] == a[:, None]) & zneg, 1, 0), axis=1)
    neg_b = tl.sum(tl.where((cols[None, :] == b[:, None]) & zneg, 1, 0), axis=1)
    index1 = ((a * 23 - a * (a - 1) // 2 + (b - a - 1)) * 4 + 2 * neg_a + neg_b).to(tl.int64)

    # Shape 2's signs (fastvq.lattice._common.best_even_signs): sign(z) on the octad; an odd minus
    # count flips one least |z|, chosen by key (a minus at the smallest slot k < 7, then k = 7,
    # then a plus at the largest k < 7).
    om = tl.load(octad_ptr + octad2)
    on = (((om[:, None] >> cols[None, :]) & 1) != 0) & col_ok[None, :]
    on_i = on.to(tl.int32)
    k = tl.cumsum(on_i, axis=1) - on_i  # slot of each octad position
    az = tl.abs(zt)
    least = tl.min(tl.where(on, az, inf), axis=1)
    key = tl.where(zneg & (k < 7), k, tl.where(k == 7, 8, 22 - k))
    cand = on & (az == least[:, None])
    flip_key = tl.min(tl.where(cand, key, 100), axis=1)
    odd = tl.sum(tl.where(on & zneg, 1, 0), axis=1) & 1
    flip = cand & (key == flip_key[:, None]) & (odd[:, None] != 0)
    sgn = (zneg ^ flip) & on & (k < 7)
    rank = tl.sum(tl.where(sgn, 1 << (6 - tl.minimum(k, 6)), 0), axis=1)
    index2 = 1104 + octad2.to(tl.int64) * 128 + rank

    # Shape 3's position: the first p minimizing s_p z_p, s = -1 on codeword word3.
    word = word3 | ((tl.load(hlo_ptr + (word3 & 63)) ^ tl.load(hhi_ptr + (word3 >> 6))) << 12)
    v = tl.where(((word[:, None] >> cols[None, :]) & 1) != 0, -zt, zt)
    v = tl.where(col_ok[None, :], v, inf)
    vmin = tl.min(v, axis=1)
    pos = tl.min(tl.where(v == vmin[:, None], cols[None, :], 32), axis=1)
    index3 = 98256 + word3.to(tl.int64) * 24 + pos

    # >= keeps the lower shape on equal scores.
    use1 = (score1 >= score2) & (score1 >= score3)
    index = tl.where(use1, index1, tl.where(score2 >= score3, index2, index3))
    finite = (zt == zt) & (tl.abs(zt) < inf)
    bad = tl.sum(tl.where(col_ok[None, :] & ~finite, 1, 0), axis=1) > 0
    index = tl.where(bad, 0, index)
    tl.store(idx_ptr + rows, index, mask=row_ok)


@functools.cache
def _golay_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t = _tables(device)
    hlo = t.high12[:64].int()
    hhi = t.high12[::64].int()  # high12(64 l1)
    octads = torch.zeros(OCTADS_PADDED, dtype=torch.int32, device=device)
    octads[: len(t.octad_masks)] = t.octad_masks.int()
    return hlo, hhi, octads


@on_input_device
def leech_decode_triton(z: torch.Tensor) -> torch.Tensor:
    """z (N, 24) contiguous float32/float64/bfloat16/float16 -> (N,) int64 canonical indices."""
    check_operand("leech_decode_triton", "z", z, (None, 24), FLOATING)
    n = z.shape[0]
    out = torch.empty(n, dtype=torch.int64, device=z.device)
    if n == 0:
        return out
    hlo, hhi, octads = _golay_tables(z.device)
    wide = z.dtype == torch.float64
    # The interpreter (CPU tensors) pays per program, not per row: 64 rows per program there.
    if triton_interpreting():
        block_m = INTERPRETER_BLOCK_M
    else:
        block_m = BLOCK_M_F64 if wide else BLOCK_M
    grid = (triton.cdiv(n, block_m),)
    _leech_decode_fwd_kernel[grid](
        z,
        hlo,
        hhi,
        octads,
        out,
        n,
        BLOCK_M=block_m,
        BLOCK_O=BLOCK_O,
        OCTADS_PADDED=OCTADS_PADDED,
        DTYPE=tl.float64 if wide else tl.float32,
        num_warps=NUM_WARPS,
        # The group tables' sums add z * scale rounded first, as the C++ and CUDA kernels do:
        # fused, z * scale + s rounds once (a subnormal step apart for rows past 2^64).
        enable_fp_fusion=False,
    )
    return out
