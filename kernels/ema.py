"""Triton kernels for codebook statistics: per-code weighted counts and sums of the rows of z.

Two kernels, both accumulating in float32 whatever z's dtype:
- `_ema_scatter_fwd_kernel`: one program per (BLOCK_N rows, BLOCK_D columns) tile of z, which
  adds scale * w[n] * z[n] into sums[idx[n]] and scale * w[n] into counts[idx[n]] with atomics.
  Bytes bound (z read once, K x D accumulators touched in L2); the order of the atomic adds, and
  so the float32 rounding, changes from run to run.
- `_ema_piece_kernel` and `_ema_combine_kernel`: the deterministic variant. The host sorts the
  indices (stable), so the rows of code k are order[offsets[k]:offsets[k + 1]], and cuts each
  code's run into pieces of at most PIECE_ROWS rows: one program per (piece, BLOCK_D columns)
  sums its rows in a fixed order. A code of one piece (the usual case) is written there, as
  keep * old + gain * sum; the pieces of a longer run store partial sums, which the combine
  kernel adds in piece order. A hot code (most of N, as at initialization or collapse) thus
  spreads over N / PIECE_ROWS programs instead of being one program's serial loop. Every output
  is written exactly once, without atomics, in an order fixed by the data alone, so the result
  is bit-identical run to run.

Host launchers take float32 accumulators that may be strided views (row stride free, unit
column stride), so counts and sums can live in one (K, D + 1) buffer that a single all-reduce
sends.
"""

import torch
import triton
import triton.language as tl
from fastvq.kernels import check_operand, on_input_device

from fastvq.ops._validate import KERNEL_FLOATING, check_disjoint, check_writable
from fastvq.ops.codebook import _ema_pieces


@triton.jit
def _ema_scatter_fwd_kernel(
    # inputs: z (N, D) with row stride, codes (N,) int, weights (N,) float32
    z_ptr,
    idx_ptr,
    w_ptr,
    # outputs, accumulated into: counts (K,) and sums (K, D), float32
    counts_ptr,
    sums_ptr,
    # sizes, strides, scalars
    N,
    K,
    D,
    stride_z,
    stride_counts,
    stride_sums,
    scale,
    # meta
    HAS_WEIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < N
    code = tl.load(idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    row_ok = row_ok & (code >= 0) & (code < K)  # out-of-range rows are skipped, as on CUDA
    if HAS_WEIGHT:
        w = tl.load(w_ptr + rows, mask=row_ok, other=0.0) * scale
        # Padding rows (weight 0, the common mask) cost no atomics on whatever code they carry.
        row_ok = row_ok & (w != 0.0)
    else:
        w = tl.zeros([BLOCK_N], dtype=tl.float32) + scale
    mask = row_ok[:, None] & (cols[None, :] < D)
    x = tl.load(z_ptr + rows[:, None] * stride_z + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32) * w[:, None]
    tl.atomic_add(
        sums_ptr + code[:, None] * stride_sums + cols[None, :], x, mask=mask, sem="relaxed"
    )
    if pid_d == 0:
        tl.atomic_add(counts_ptr + code * stride_counts, w, mask=row_ok, sem="relaxed")


@triton.jit
def _ema_piece_kernel(
    # inputs: z (N, D) with row stride, order (N,) int64 rows sorted by code, weights (N,)
    # float32 in z's row order; per code (K + 1,) int64: offsets (run starts), piece_offsets
    # (first piece), slot_offsets (first partial slot); piece_code (programs,) int64, K past
    # the last piece
    z_ptr,
    order_ptr,
    w_ptr,
    offsets_ptr,
    piece_offsets_ptr,
    slot_offsets_ptr,
    piece_code_ptr,
    # outputs: counts (K,) and sums (K, D) float32, updated in place for codes of one piece;
    # partial (slots, D + 1) float32 for the pieces of longer runs
    counts_ptr,
    sums_ptr,
    partial_ptr,
    # sizes, strides, scalars: out = keep * out + gain * run sum
    K,
    D,
    stride_z,
    stride_counts,
    stride_sums,
    keep,
    gain,
    # meta
    PIECE_ROWS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    code = tl.load(piece_code_ptr + pid)
    real = code < K  # the grid is an upper bound on the number of pieces
    code = tl.where(real, code, 0)
    first_piece = tl.load(piece_offsets_ptr + code)
    pieces = tl.load(piece_offsets_ptr + code + 1) - first_piece
    piece = pid - first_piece
    start = tl.load(offsets_ptr + code) + piece * PIECE_ROWS
    end = tl.minimum(start + PIECE_ROWS, tl.load(offsets_ptr + code + 1))
    end = tl.where(real, end, start)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    cnt = tl.zeros([BLOCK_N], dtype=tl.float32)
    for s in range(start, end, BLOCK_N):
        pos = s + tl.arange(0, BLOCK_N)
        ok = pos < end
        row = tl.load(order_ptr + pos, mask=ok, other=0)
        if HAS_WEIGHT:
            w = tl.load(w_ptr + row, mask=ok, other=0.0)
            ok = ok & (w != 0.0)  # padding rows add nothing, whatever they hold (0 * NaN is NaN)
        else:
            w = ok.to(tl.float32)
        x = tl.load(
            z_ptr + row[:, None] * stride_z + cols[None, :],
            mask=ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        acc += tl.sum(x.to(tl.float32) * w[:, None], axis=0)
        cnt += w
    total = tl.sum(cnt, axis=0)
    if real:
        if pieces == 1:
            out = sums_ptr + code * stride_sums + cols
            tl.store(out, keep * tl.load(out, mask=col_ok) + gain * acc, mask=col_ok)
            if pid_d == 0:
                out_count = counts_ptr + code * stride_counts
                tl.store(out_count, keep * tl.load(out_count) + gain * total)
        else:
            slot = partial_ptr + (tl.load(slot_offsets_ptr + code) + piece) * (D + 1)
            tl.store(slot + cols, acc, mask=col_ok)
            if pid_d == 0:
                tl.store(slot + D, total)


@triton.jit
def _ema_combine_kernel(
    # inputs: piece_offsets, slot_offsets (K + 1,) int64 as above; partial (slots, D + 1) float32
    piece_offsets_ptr,
    slot_offsets_ptr,
    partial_ptr,
    # outputs, updated in place for codes of several pieces: counts (K,), sums (K, D) float32
    counts_ptr,
    sums_ptr,
    D,
    stride_counts,
    stride_sums,
    keep,
    gain,
    BLOCK_D: tl.constexpr,
):
    code = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    pieces = tl.load(piece_offsets_ptr + code + 1) - tl.load(piece_offsets_ptr + code)
    if pieces > 1:
        first = tl.load(slot_offsets_ptr + code)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        total = 0.0
        for slot in range(first, first + pieces):
            row = partial_ptr + slot * (D + 1)
            acc += tl.load(row + cols, mask=col_ok, other=0.0)
            total += tl.load(row + D)
        out = sums_ptr + code * stride_sums + cols
        tl.store(out, keep * tl.load(out, mask=col_ok) + gain * acc, mask=col_ok)
        if pid_d == 0:
            out_count = counts_ptr + code * stride_counts
            tl.store(out_count, keep * tl.load(out_count) + gain * total)


def _blocks(d: int, tile: int) -> tuple[int, int]:
    # NOTE: tile sizes are unmeasured on GPU (no H100 in the session that wrote this): 4096
    # elements per scatter tile, 2048 per segment step, up to 128 columns per program.
    block_d = min(triton.next_power_of_2(d), 128)
    return max(1, min(1024, tile // block_d)), block_d


def _check(op: str, counts, sums, z, indices, weight) -> None:
    """The launchers' contract as ValueError: they are reachable as torch.ops.fastvq.ema_*_triton
    past fastvq.ema_update_'s checks."""
    device = z.device
    check_operand(op, "z", z, (None, None), KERNEL_FLOATING, strided_rows=True)
    n, d = z.shape
    if d < 1 or sums.dim() != 2 or sums.shape[0] < 1:
        raise ValueError(f"{op}: z (N, D) and sums (K, D) need D >= 1 and K >= 1")
    check_operand(op, "sums", sums, (None, d), (torch.float32,), device, strided_rows=True)
    check_operand(
        op, "counts", counts, (sums.shape[0],), (torch.float32,), device, strided_rows=True
    )
    check_writable(f"{op}: counts", counts)
    check_writable(f"{op}: sums", sums)
    if sums.shape[0] > 1 and sums.stride(0) < sums.shape[1]:  # rows would share elements
        raise ValueError(f"{op}: sums' rows overlap (row stride {sums.stride(0)} < D = {d})")
    check_operand(op, "indices", indices, (n,), (torch.int32, torch.int64), device)
    if weight is not None:
        check_operand(op, "weight", weight, (n,), (torch.float32,), device)
    # One element both read and written, or written twice: the result would depend on the
    # order of the scatter's reads and writes (the C++ op refuses these too).
    check_disjoint(f"{op}: counts", counts, "sums", sums)
    for name, value in (("z", z), ("indices", indices), ("weight", weight)):
        for out_name, out in (("counts", counts), ("sums", sums)):
            if value is not None:
                check_disjoint(f"{op}: {out_name}", out, name, value)


@on_input_device
def ema_scatter(
    counts: torch.Tensor,
    sums: torch.Tensor,
    z: torch.Tensor,
    indices: torch.Tensor,
    weight: torch.Tensor | None,
    scale: float,
) -> None:
    """counts[idx[n]] += scale * w[n]; sums[idx[n]] += scale * w[n] * z[n] (float32 atomics).

    counts (K,) and sums (K, D) float32 with any row stride, updated in place; z (N, D) float32,
    bfloat16 or float16 with unit column stride; indices (N,) int32/int64 contiguous, rows
    outside [0, K) skipped (not a host sync to check them); weight (N,) float32 contiguous or
    None (all ones).
    """
    _check("ema_scatter_triton", counts, sums, z, indices, weight)
    n, d = z.shape
    if n == 0:
        return
    block_n, block_d = _blocks(d, 4096)
    grid = (triton.cdiv(n, block_n), triton.cdiv(d, block_d))
    _ema_scatter_fwd_kernel[grid](
        z,
        indices,
        weight if weight is not None else z,
        counts,
        sums,
        n,
        counts.shape[0],
        d,
        z.stride(0),
        counts.stride(0),
        sums.stride(0),
        scale,
        HAS_WEIGHT=weight is not None,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=4,
    )


# Rows per piece of a code's run in the deterministic kernels (fastvq.ops.codebook._ema_pieces):
# 8 steps of BLOCK_N = 64 rows. NOTE: unmeasured on GPU, like the tile sizes above.
PIECE_ROWS = 512


@on_input_device
def ema_segment(
    counts: torch.Tensor,
    sums: torch.Tensor,
    z: torch.Tensor,
    indices: torch.Tensor,
    weight: torch.Tensor | None,
    keep: float,
    gain: float,
    piece_rows: int = PIECE_ROWS,
) -> None:
    """Deterministic: counts = keep * counts + gain * c, sums = keep * sums + gain * s, where
    c[k] = sum of w[n] and s[k] = sum of w[n] * z[n] over the rows with indices[n] == k, each
    summed in an order fixed by the data (stable sort by code, pieces of piece_rows rows, the
    pieces in order). Same shapes and dtypes as `ema_scatter`, rows outside [0, K) skipped too.
    """
    _check("ema_segment_triton", counts, sums, z, indices, weight)
    k = counts.shape[0]
    d = z.shape[1]
    # Stable sort: the order of equal codes is the input order, so the sum order is fixed.
    sorted_codes, order = torch.sort(indices.to(torch.int64), stable=True)
    offsets, piece_offsets, slot_offsets, piece_code, slots = _ema_pieces(
        sorted_codes, k, piece_rows
    )
    partial = torch.empty(max(slots, 1), d + 1, dtype=torch.float32, device=z.device)
    block_n, block_d = _blocks(d, 2048)
    block_n = min(block_n, 64)
    col_blocks = triton.cdiv(d, block_d)
    _ema_piece_kernel[(piece_code.shape[0], col_blocks)](
        z,
        order,
        weight if weight is not None else z,
        offsets,
        piece_offsets,
        slot_offsets,
        piece_code,
        counts,
        sums,
        partial,
        k,
        d,
        z.stride(0),
        counts.stride(0),
        sums.stride(0),
        keep,
        gain,
        PIECE_ROWS=piece_rows,
        HAS_WEIGHT=weight is not None,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=4,
    )
    _ema_combine_kernel[(k, col_blocks)](
        piece_offsets,
        slot_offsets,
        partial,
        counts,
        sums,
        d,
        counts.stride(0),
        sums.stride(0),
        keep,
        gain,
        BLOCK_D=block_d,
        num_warps=4,
    )
