"""Triton kernel of fastvq.nearest_code: idx[n] = argmax_k (z[n] . c[k]) * scale[k] + bias[k].

`_nearest_code_fwd_kernel`: one program per (BLOCK_N rows of z, one split of the codebook). It
walks its codes in BLOCK_K tiles; each tile is a tensor-core product z_tile @ c_tile^T with
float32 accumulation (over D in BLOCK_D chunks when D > BLOCK_D; otherwise the z tile stays in
registers for the whole walk), then the epilogue score = acc * scale[k] + bias[k]. The running
best is kept per (row, lane of the K tile): `score > best` (strict), then two selects. That is
3 CUDA-core instructions per candidate with no cross-thread shuffle inside the loop, a NaN score
fails the comparison and so never wins, and a tie keeps the earlier (lower) k of that lane. Once
per program the BLOCK_K lanes are reduced: their maximum, then the lowest index holding it; a row
whose scores are all -inf/NaN keeps the initial (-inf, 0) everywhere and returns 0.

Split-K: when the row blocks alone cannot fill the machine (N = 1 with K = 2^20), the codebook is
split into S <= 64 ranges of whole BLOCK_K tiles; each program writes its (best score, index) to
an (N, S) float32/int32 partial buffer and `_nearest_code_fwd_reduce_kernel` takes, per row, the
maximum score and the lowest index holding it. Each score is computed by the same instructions in
either path and the first occurrence of the maximum is unique, so the split and unsplit results
are identical.

Precision of the products (accumulation is always float32):
- bfloat16 / float16 inputs: plain tl.dot; the products are exact in float32.
- float32, fast=False: input_precision="tf32x3" (3xTF32: about 2^-22 relative per product on the
  tensor cores, within the contract's "float32 up to rounding").
- float32, fast=True: tiles cast to bfloat16 (2^-8 relative), not tf32: the H100's bf16 rate is
  twice its tf32 rate (772 vs 391 TFLOP/s, DESIGN.md), bf16 operand tiles take half the
  registers, and it is the precision of the torch backend's fast path (a bf16 matmul), so every
  fast backend shares one error bound.
Under the Triton interpreter (TRITON_INTERPRET=1, CPU tests) the INTERPRET constexpr replaces
tl.dot by a float32 product-and-sum over (BLOCK_N, BLOCK_K, BLOCK_D): the interpreter's tl.dot
multiplies the raw bit patterns of bfloat16 operands (triton-lang/triton#11584, "not
supported"), and its np.matmul rounds a column differently by its position in the tile (137 of
2,560 scores of duplicate codes differed at 64 x 128 x 32), which breaks exact ties. Products are
the same, so the answer is the same up to float32 accumulation order; the fast path's cast to
bf16 is kept, 3xTF32's residual rounding is not emulated.
"""

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from fastvq.ops._backends import triton_interpreting

# The contract bounds the partial buffer at N x 64.
MAX_SPLITS = 64
# A split walks at least this many K tiles, so its final lane reduction and partial write stay
# small next to its loop (an unmeasured guess; the bench session should revisit it).
MIN_TILES_PER_SPLIT = 4

# Products: PREC_NATIVE for bf16/fp16 inputs, PREC_TF32X3 and PREC_BF16 for float32 inputs.
PREC_NATIVE, PREC_TF32X3, PREC_BF16 = 0, 1, 2


@triton.jit
def _nearest_code_fwd_kernel(
    # inputs: z (N, D), codebook (K, D), row-major, one dtype; scale, bias (K,) float32
    z_ptr,
    codebook_ptr,
    scale_ptr,
    bias_ptr,
    # outputs: SPLIT: partial best score (N, S) float32 and index (N, S) int32; else idx (N,) int64
    idx_ptr,
    part_score_ptr,
    # sizes: split s owns codes [s * K_PER_SPLIT, (s + 1) * K_PER_SPLIT), K_PER_SPLIT % BLOCK_K == 0
    N,
    K,
    D,
    K_PER_SPLIT,
    S,
    # meta
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_D: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    ONE_D_CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    rows = tl.arange(0, BLOCK_N)
    lanes = tl.arange(0, BLOCK_K)
    dims = tl.arange(0, BLOCK_D)
    row_ok = (pid_n * BLOCK_N + rows) < N
    # 64-bit base pointers, 32-bit offsets inside a tile (BLOCK * D < 2^31).
    z_base = z_ptr + pid_n * BLOCK_N * D
    z_offs = rows[:, None] * D + dims[None, :]
    c_offs = lanes[:, None] * D + dims[None, :]
    k_start = pid_s * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    # The loop body calls no @triton.jit helpers: each device-function call costs the interpreter
    # a re-patch of triton.language (about a third of the CPU test time when it did).

    if ONE_D_CHUNK:
        # Masks only where the sizes need them (EVEN_D: D == BLOCK_D, EVEN_K: K % BLOCK_K == 0),
        # so common shapes load whole vectors without per-element predicates.
        if EVEN_D:
            z_tile = tl.load(z_base + z_offs, mask=row_ok[:, None], other=0.0)
        else:
            z_mask = row_ok[:, None] & (dims[None, :] < D)
            z_tile = tl.load(z_base + z_offs, mask=z_mask, other=0.0)
        if PRECISION == 2:
            z_tile = z_tile.to(tl.bfloat16)
        if INTERPRET:
            z_tile = z_tile.to(tl.float32)

    # Running best per (row, lane): best_k holds the start k0 of the tile where the lane's best
    # was found (a uniform register in the select), so its code is best_k + lane.
    best = tl.full((BLOCK_N, BLOCK_K), float("-inf"), dtype=tl.float32)
    best_k = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)
    # The codebook pointer advances by BLOCK_K * D per tile, so k * D is never formed in 32 bits.
    c_base = codebook_ptr + k_start.to(tl.int64) * D
    for k0 in range(k_start, k_end, BLOCK_K):
        codes = k0 + lanes
        code_ok = codes < K
        if ONE_D_CHUNK:
            if EVEN_K and EVEN_D:
                c_tile = tl.load(c_base + c_offs)
            elif EVEN_K:
                c_tile = tl.load(c_base + c_offs, mask=dims[None, :] < D, other=0.0)
            elif EVEN_D:
                c_tile = tl.load(c_base + c_offs, mask=code_ok[:, None], other=0.0)
            else:
                c_mask = code_ok[:, None] & (dims[None, :] < D)
                c_tile = tl.load(c_base + c_offs, mask=c_mask, other=0.0)
            if PRECISION == 2:
                c_tile = c_tile.to(tl.bfloat16)
            if INTERPRET:
                c_tile = c_tile.to(tl.float32)
                acc = tl.sum(z_tile[:, None, :] * c_tile[None, :, :], axis=2)
            elif PRECISION == 1:
                acc = tl.dot(z_tile, tl.trans(c_tile), input_precision="tf32x3")
            else:
                acc = tl.dot(z_tile, tl.trans(c_tile))
        else:
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d_ok = (d0 + dims)[None, :] < D
                if EVEN_D:
                    z_chunk = tl.load(z_base + d0 + z_offs, mask=row_ok[:, None], other=0.0)
                else:
                    z_mask = row_ok[:, None] & d_ok
                    z_chunk = tl.load(z_base + d0 + z_offs, mask=z_mask, other=0.0)
                if EVEN_K and EVEN_D:
                    c_chunk = tl.load(c_base + d0 + c_offs)
                elif EVEN_K:
                    c_chunk = tl.load(c_base + d0 + c_offs, mask=d_ok, other=0.0)
                elif EVEN_D:
                    c_chunk = tl.load(c_base + d0 + c_offs, mask=code_ok[:, None], other=0.0)
                else:
                    c_mask = code_ok[:, None] & d_ok
                    c_chunk = tl.load(c_base + d0 + c_offs, mask=c_mask, other=0.0)
                if PRECISION == 2:
                    z_chunk = z_chunk.to(tl.bfloat16)
                    c_chunk = c_chunk.to(tl.bfloat16)
                if INTERPRET:
                    z_chunk = z_chunk.to(tl.float32)
                    c_chunk = c_chunk.to(tl.float32)
                    acc += tl.sum(z_chunk[:, None, :] * c_chunk[None, :, :], axis=2)
                elif PRECISION == 1:
                    acc = tl.dot(z_chunk, tl.trans(c_chunk), acc, input_precision="tf32x3")
                else:
                    acc = tl.dot(z_chunk, tl.trans(c_chunk), acc)

        # Per-code terms are (BLOCK_K,) vectors, so masking codes past K costs nothing per
        # candidate: -inf folded into the bias never beats the initial -inf.
        score = acc
        if HAS_SCALE:
            scale = tl.load(scale_ptr + codes, mask=code_ok, other=1.0)
            score = score * scale[None, :]
        if HAS_BIAS:
            bias = tl.load(bias_ptr + codes, mask=code_ok, other=0.0)
            if not EVEN_K:
                bias = tl.where(code_ok, bias, float("-inf"))
            score = score + bias[None, :]
        elif not EVEN_K:
            score = score + tl.where(code_ok, 0.0, float("-inf"))[None, :]
        # Strict >: a NaN score fails it, and a tie keeps the lane's earlier (lower) code.
        better = score > best
        best = tl.where(better, score, best)
        best_k = tl.where(better, k0, best_k)
        c_base += BLOCK_K * D

    # Lanes -> row: the maximum, then the lowest index holding it (every lane of an all -inf/NaN
    # row still holds (-inf, 0)).
    row_best = tl.max(best, axis=1)
    cand = tl.where(best == row_best[:, None], best_k + lanes[None, :], 2147483647)
    row_k = tl.min(cand, axis=1)
    out_rows = pid_n * BLOCK_N + rows
    if SPLIT:
        tl.store(part_score_ptr + out_rows * S + pid_s, row_best, mask=row_ok)
        tl.store(idx_ptr + out_rows * S + pid_s, row_k, mask=row_ok)
    else:
        tl.store(idx_ptr + out_rows, row_k.to(tl.int64), mask=row_ok)


@triton.jit
def _nearest_code_fwd_reduce_kernel(
    # inputs: partial best score (N, S) float32 and index (N, S) int32
    part_score_ptr,
    part_idx_ptr,
    # outputs: idx (N,) int64
    idx_ptr,
    # sizes
    N,
    S,
    # meta
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    splits = tl.arange(0, BLOCK_S)
    row_ok = rows < N
    mask = row_ok[:, None] & (splits[None, :] < S)
    offs = rows[:, None] * S + splits[None, :]
    score = tl.load(part_score_ptr + offs, mask=mask, other=float("-inf"))
    k = tl.load(part_idx_ptr + offs, mask=mask, other=2147483647)
    row_best = tl.max(score, axis=1)
    row_k = tl.min(tl.where(score == row_best[:, None], k, 2147483647), axis=1)
    tl.store(idx_ptr + rows, row_k.to(tl.int64), mask=row_ok)


def _config(n: int, d: int, precision: int, device: torch.device) -> dict:
    """Tile sizes and launch options for one call (no autotuning yet: see the NOTEs)."""
    d_pow2 = max(16, triton.next_power_of_2(d))  # tl.dot needs every tile dim >= 16
    if triton_interpreting():
        # NOTE: the interpreter pays per tl op per program, so big tiles are cheaper: BLOCK_K =
        # 128 ran a set of shapes in 1.7 s that took 2.6 s at 64 and 4.6 s at 32. Its product
        # tile (BLOCK_N, BLOCK_K, BLOCK_D) must stay within Triton's 2^20 elements; larger D
        # takes the chunked path (D = 256, 300, 1024 in the tests).
        block_n = min(64, max(16, triton.next_power_of_2(n)))
        block_d = min(d_pow2, 256, (1 << 20) // (block_n * 128))
        return dict(BLOCK_N=block_n, BLOCK_K=128, BLOCK_D=block_d, num_warps=4, num_stages=1)
    # NOTE: untuned: no GPU was available when these were chosen; nothing here was timed. They
    # come from compiling for sm_90 with Triton 3.9 without running (registers / spills from
    # cuobjdump, as tests/triton_sm90.py prints them; instructions in the K loop from the SASS),
    # bias on, K and D multiples of 16:
    #   bf16, 128 x 64 x 32, 8 warps: 119 registers (two CTAs per SM), 202 instructions per K
    #     tile = 6.3 per candidate (a per-tile max/argmax epilogue instead: 300, 64 registers);
    #   bf16 single chunk up to D = 128: 128 registers; chunked D at BLOCK_D 64: 176, no spills;
    #   fp32 tf32x3 single chunk up to 64: 184; chunked at BLOCK_D 32: 232 (at 64: 24 B spilled);
    #   fp32 fast (bf16) single chunk up to 128: 218; chunked at BLOCK_D 32: 192 (at 64: 16 B).
    # Small N wastes tensor-core rows anyway; its smaller tiles keep registers low.
    if precision == PREC_TF32X3:
        block_d = d_pow2 if d_pow2 <= 64 else 32
    elif precision == PREC_BF16:
        block_d = d_pow2 if d_pow2 <= 128 else 32
    else:
        block_d = d_pow2 if d_pow2 <= 128 else 64
    if n <= 16:
        block_k = 128 if precision == PREC_NATIVE else 64
        return dict(BLOCK_N=16, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=4, num_stages=3)
    if n <= 64:
        return dict(BLOCK_N=64, BLOCK_K=64, BLOCK_D=block_d, num_warps=4, num_stages=3)
    return dict(BLOCK_N=128, BLOCK_K=64, BLOCK_D=block_d, num_warps=8, num_stages=3)


def _num_splits(row_blocks: int, k_tiles: int, device: torch.device) -> int:
    """Codebook splits so that row blocks x splits covers about two waves of the machine."""
    if device.type == "cuda":
        programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        # The interpreter runs programs one after another: a few splits only exercise the path.
        programs = 4
    if row_blocks >= programs:
        return 1
    return max(
        1, min(MAX_SPLITS, triton.cdiv(programs, row_blocks), k_tiles // MIN_TILES_PER_SPLIT)
    )


def nearest_code_triton(
    z: torch.Tensor,
    codebook: torch.Tensor,
    code_scale: torch.Tensor | None,
    code_bias: torch.Tensor | None,
    fast: bool,
    *,
    splits: int | None = None,
    launch: Callable | None = None,
) -> torch.Tensor:
    """Index of the best code per row: argmax_k (z[n] . codebook[k]) * code_scale[k] + code_bias[k].

    Args:
        z: (N, D) contiguous float32, bfloat16 or float16, N >= 0, 1 <= D <= 1024.
        codebook: (K, D) contiguous, z's dtype and device, 1 <= K <= 2^31 - 2^16.
        code_scale, code_bias: (K,) contiguous float32 on z's device, or None (1 and 0).
        fast: float32 inputs multiply in bfloat16 (fp32 accumulation) instead of 3xTF32.
        splits: codebook splits (clamped to 1..64), for tests; None picks one from the machine.
        launch: applied to each kernel before `[grid](...)`; pass torch.library.wrap_triton when
            this runs as the body of a torch.library.triton_op. None launches directly: an eager
            wrap_triton call outside a triton_op goes through the higher-order-op dispatcher.

    Returns:
        int64 (N,) on z's device. Ties go to the lowest index; NaN scores never win; a row whose
        scores are all -inf/NaN gets 0.
    """
    n, d = z.shape
    k = codebook.shape[0]
    # int32 code indices in the kernel; the margin keeps k0 + BLOCK_K from wrapping.
    assert codebook.shape == (k, d) and 1 <= k <= 2**31 - 2**16, "codebook must be (K, D), K >= 1"
    assert z.dtype == codebook.dtype, "z and codebook must share a dtype"
    assert z.is_contiguous() and codebook.is_contiguous(), "z and codebook must be contiguous"
    for name, t in (("code_scale", code_scale), ("code_bias", code_bias)):
        assert t is None or (t.shape == (k,) and t.dtype == torch.float32 and t.is_contiguous()), (
            f"{name} must be a contiguous float32 (K,) tensor or None"
        )
    out = torch.empty(n, dtype=torch.int64, device=z.device)
    if n == 0:
        return out
    if z.dtype == torch.float32:
        precision = PREC_BF16 if fast else PREC_TF32X3
    else:
        precision = PREC_NATIVE
    cfg = _config(n, d, precision, z.device)
    block_n, block_k = cfg["BLOCK_N"], cfg["BLOCK_K"]
    row_blocks = triton.cdiv(n, block_n)
    k_tiles = triton.cdiv(k, block_k)
    if splits is None:
        splits = _num_splits(row_blocks, k_tiles, z.device)
    splits = max(1, min(splits, MAX_SPLITS, k_tiles))
    k_per_split = triton.cdiv(k_tiles, splits) * block_k
    splits = triton.cdiv(k, k_per_split)  # no empty split
    if splits > 1:
        part_score = torch.empty(n, splits, dtype=torch.float32, device=z.device)
        part_idx = torch.empty(n, splits, dtype=torch.int32, device=z.device)
    else:
        # SPLIT False: the kernel writes idx into `out` and never touches part_score; the dummy is
        # not `out` itself, so no tensor is passed twice where wrap_triton tracks mutations.
        part_score, part_idx = z, out
    wrap = (lambda kernel: kernel) if launch is None else launch
    # An absent scale/bias is never read: any valid pointer will do.
    wrap(_nearest_code_fwd_kernel)[(row_blocks, splits)](
        z,
        codebook,
        z if code_scale is None else code_scale,
        z if code_bias is None else code_bias,
        part_idx,
        part_score,
        n,
        k,
        d,
        k_per_split,
        splits,
        HAS_SCALE=code_scale is not None,
        HAS_BIAS=code_bias is not None,
        EVEN_K=k % block_k == 0,
        EVEN_D=d % cfg["BLOCK_D"] == 0,
        SPLIT=splits > 1,
        PRECISION=precision,
        INTERPRET=triton_interpreting(),
        ONE_D_CHUNK=d <= cfg["BLOCK_D"],
        **cfg,
    )
    if splits > 1:
        block_r = 64
        wrap(_nearest_code_fwd_reduce_kernel)[(triton.cdiv(n, block_r),)](
            part_score,
            part_idx,
            out,
            n,
            splits,
            BLOCK_R=block_r,
            BLOCK_S=max(2, triton.next_power_of_2(splits)),
        )
    return out
