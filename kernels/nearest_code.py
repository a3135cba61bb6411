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

`_nearest_code_topk_kernel` (fastvq.nearest_code(..., k=), 2 <= k <= 128): the k best codes per
row, best first, equal scores by lower index, NaN as -inf. Sorting or torch.topk would need the
N x K scores in memory, and a running top-k per (row, lane) like the argmin kernel's running best
would take k times its registers; instead a row keeps one top-k, shared by its lanes. One program
per (BLOCK_N rows, split of the codebook) walks its codes in BLOCK_K tiles scored by the argmin
kernel's instructions (same BLOCK_D, precision, epilogue), so column 0 is its answer up to the
rounding of the two tile shapes. The row's k best are an
unordered (BLOCK_N, KP) int64 register tensor, KP = next power of 2 >= k; a slot packs an
order-preserving int32 key of the score above the code's complement, so one int64 comparison
orders by score then by lower code, and one min reduction finds the worst slot, whose score is
the row's threshold. A tile's codes come after every code held, so one enters only by beating the
threshold strictly. Per tile: each row's maximum score and a block vote (does any row's maximum
beat its threshold?); in the common case that is all. Otherwise rounds, while any row of the
block improves: each row moves its best remaining candidate (maximum, then lowest lane) into its
worst slot if it beats the threshold, and knocks it out of the tile (to -inf, which never enters).
Only scores > -inf enter, so NaN and -inf need no test in the loop; a row left with free slots
(fewer than k scores > -inf) takes the lowest codes it does not hold, which is where -inf ties
by index put them. The output is k rounds of extract-max. Split-K as for the argmin kernel,
chosen the same way: each split keeps the top-k of its codes (its free slots filled from its own
range) and writes its packed slots to an (N, S, k) buffer; one torch.topk over a row's S x k
slots is the merge, since the packing orders them by score, then lower code, across splits.

Cost on the H100, UNMEASURED (no GPU was available; from the sm_90 SASS of bf16, D = 32, k = 8,
BLOCK_N = 128, BLOCK_K = 64, 8 warps: 32 candidates per thread per tile): a tile with no insertion
is 202 instructions per thread against the argmin kernel's 243, its selection ~1.7 instructions
per candidate (one FMNMX, then per row two shuffles and the block vote) against the argmin
kernel's 3 (FSETP, FSEL, SEL). A round is 273 (8.5 per candidate: the lowest lane holding the
maximum, the knock-out, the next maximum, then the slot update). Rounds are not rare: the vote is
over all BLOCK_N rows, and a row inserts about k * BLOCK_K / m codes of a tile after m codes, so
a block votes yes on most tiles until m ~ BLOCK_N * BLOCK_K * k (65,536 at k = 8). Simulated with
Gaussian scores: 1.0 round per tile at K = 65,536, 2.0 at K = 8,192, 4.4 at K = 1,024 (k = 8).
So expect ~15 instructions per candidate at K = 65,536 and ~23 at K = 8,192, 2-3x the argmin
kernel's CUDA-core work, which the GEMM no longer hides at small D. k = 128 (BLOCK_N = 64, 16
candidates per thread) is far dearer: a round is 446 instructions (the 64 x 128 slot update),
with 2.9 rounds per tile at K = 65,536 and 9.2 at K = 8,192: ~90 per candidate.

Precision of the products (accumulation is always float32):
- bfloat16 / float16 inputs: plain tl.dot; the products are exact in float32.
- float32, fast=False: input_precision="tf32x3" (3xTF32: about 2^-22 relative per product on the
  tensor cores, within the contract's "float32 up to rounding").
- float32, fast=True: tiles cast to bfloat16 (2^-8 relative), not tf32: the H100's bf16 rate is
  twice its tf32 rate (772 vs 391 TFLOP/s, DESIGN.md), bf16 operand tiles take half the
  registers, and it is the precision of the torch backend's fast path (a bf16 matmul), so every
  fast backend shares one error bound.
Exact float32 search by screening (`_screened_search`, chosen by `_use_screening`): 3xTF32 is
three tf32 products per term, 2.1 ms of H100 tensor-core time at N = K = 65,536, D = 32 before any
epilogue. Instead, `_tf32_split_kernel` rounds z and the codebook to tf32 (copies, so that the
products are exact in float32 whatever the hardware does to tf32 inputs) and writes per row the
norms of the vector and of its rounding residual (for the codebook also their maxima). The
screening pass multiplies the copies (one product per term) and keeps, beside each lane's best,
its runner-up (two more instructions per candidate); its epilogue takes each row's margin, the
best score minus the best score of any other code, and compares it with twice
`_screening_bound`, which bounds, per row and for every code at once, how far a screening score
can lie from the 3xTF32 score. A row whose margin exceeds that has the same winner in both
passes; the others (near ties, exact ties, NaN or non-finite margins and bounds, scores that
may overflow float32) are searched again by 3xTF32 alone, listed by torch.nonzero_static with
their count left on the device: the recheck's grid covers all N rows and programs past the count
exit, so nothing waits on the host.
The answer is the 3xTF32 search's, row for row, at about a third of its tensor-core work plus
the rechecked rows: bench/results/screening_share.json records their share for Gaussian data
(about 6 % at D = 32, K = 65,536; more at D = 8, where codes crowd, and at D = 1024, where the
float32 accumulation term grows). `_tf32_split_reference` and `_screening_reference` are the
PyTorch specification of the split and the bound.

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
from fastvq.kernels import check_operand, on_input_device

from fastvq.ops._backends import triton_interpreting
from fastvq.ops._validate import KERNEL_FLOATING

# The contract bounds the partial buffer at N x 64.
MAX_SPLITS = 64
# A split walks at least this many K tiles, so its final lane reduction and partial write stay
# small next to its loop (an unmeasured guess; the bench session should revisit it).
MIN_TILES_PER_SPLIT = 4
# The exact float32 search screens with tf32 from this many candidates (N x K) and dimensions up
# (unmeasured guesses), and sizes the recheck's codebook split for 1 / RECHECK_SHARE of the rows
# (the share rechecked at D = 24 to 256, see the module docstring).
SCREEN_MIN_WORK = 1 << 24
SCREEN_MIN_DIM = 24
RECHECK_SHARE = 16

# Products: PREC_NATIVE for bf16/fp16 inputs, PREC_TF32X3 and PREC_BF16 for float32 inputs;
# PREC_TF32 for float32 operands the caller has rounded to tf32 (the screening pass of the exact
# search), whose products are then exact in float32.
PREC_NATIVE, PREC_TF32X3, PREC_BF16, PREC_TF32 = 0, 1, 2, 3


@triton.jit
def _z_tile(z_base, z_offs, row_ok, dims, D, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
            INTERPRET: tl.constexpr):  # fmt: skip
    """The program's BLOCK_N rows of z as the product's left operand, loaded once when D fits a
    single BLOCK_D chunk. Masks only where the sizes need them (EVEN_D: D == BLOCK_D)."""
    if EVEN_D:
        z_tile = tl.load(z_base + z_offs, mask=row_ok[:, None], other=0.0)
    else:
        z_mask = row_ok[:, None] & (dims[None, :] < D)
        z_tile = tl.load(z_base + z_offs, mask=z_mask, other=0.0)
    if PRECISION == 2:
        z_tile = z_tile.to(tl.bfloat16)
    if INTERPRET:
        z_tile = z_tile.to(tl.float32)
    return z_tile


@triton.jit
def _score_tile(
    # z: the tile from _z_tile (ONE_D_CHUNK) or its base pointer and offsets (chunked D)
    z_tile,
    z_base,
    z_offs,
    row_ok,
    # codebook tile: base pointer of its first code, offsets, its codes and which are < K
    c_base,
    c_offs,
    dims,
    codes,
    code_ok,
    scale_ptr,
    bias_ptr,
    D,
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_D: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    ONE_D_CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """(BLOCK_N, BLOCK_K) float32 scores (z . c) * scale + bias of one codebook tile, the same
    instructions for every kernel that searches codes; codes past K score -inf."""
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
        elif PRECISION == 3:
            acc = tl.dot(z_tile, tl.trans(c_tile), input_precision="tf32")
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
            elif PRECISION == 3:
                acc = tl.dot(z_chunk, tl.trans(c_chunk), acc, input_precision="tf32")
            else:
                acc = tl.dot(z_chunk, tl.trans(c_chunk), acc)

    # Per-code terms are (BLOCK_K,) vectors, so masking codes past K costs nothing per
    # candidate: -inf folded into the bias never wins.
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
    return score


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
    # SCREEN: recheck (N,) int8 out: 1 where the row's margin (best score minus the best score of
    # any other code) is not above twice the row's `_screening_bound`, from z_terms (N, 2) and
    # code_terms (5,) float64 (`_tf32_split_kernel`) and the constants rel, tiny_d
    recheck_ptr,
    z_terms_ptr,
    code_terms_ptr,
    rel,
    tiny_d,
    # ROWS: search only rows rows_ptr[:count_ptr[0]] (int64), program i taking list entries
    # [i * BLOCK_N, (i + 1) * BLOCK_N); partials go to (list entry, split), idx to the row
    rows_ptr,
    count_ptr,
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
    SCREEN: tl.constexpr,
    ROWS: tl.constexpr,
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
    # `slot`: where the row's partials go; `row`: the row of z (the same unless ROWS).
    slot = pid_n * BLOCK_N + rows
    if ROWS:
        # The grid covers all N rows so that the count never travels to the host: programs past
        # it exit at once.
        count = tl.load(count_ptr)
        if pid_n * BLOCK_N >= count:
            return
        row_ok = slot < count
        row = tl.load(rows_ptr + slot, mask=row_ok, other=0)
        z_base = z_ptr
        z_offs = row[:, None] * D + dims[None, :]
    else:
        row_ok = slot < N
        row = slot
        # 64-bit base pointers, 32-bit offsets inside a tile (BLOCK * D < 2^31).
        z_base = z_ptr + pid_n * BLOCK_N * D
        z_offs = rows[:, None] * D + dims[None, :]
    c_offs = lanes[:, None] * D + dims[None, :]
    k_start = pid_s * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)

    if ONE_D_CHUNK:
        z_tile = _z_tile(z_base, z_offs, row_ok, dims, D, EVEN_D, PRECISION, INTERPRET)
    else:
        z_tile = 0.0  # unused: the chunked product loads z chunk by chunk

    # Running best per (row, lane): best_k holds the start k0 of the tile where the lane's best
    # was found (a uniform register in the select), so its code is best_k + lane.
    best = tl.full((BLOCK_N, BLOCK_K), float("-inf"), dtype=tl.float32)
    best_k = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)
    # SCREEN: the lane's best score among its other codes, two more instructions per candidate.
    runner = tl.full((BLOCK_N, BLOCK_K), float("-inf"), dtype=tl.float32)
    # The codebook pointer advances by BLOCK_K * D per tile, so k * D is never formed in 32 bits.
    c_base = codebook_ptr + k_start.to(tl.int64) * D
    for k0 in range(k_start, k_end, BLOCK_K):
        codes = k0 + lanes
        code_ok = codes < K
        score = _score_tile(z_tile, z_base, z_offs, row_ok, c_base, c_offs, dims, codes, code_ok,
                            scale_ptr, bias_ptr, D, HAS_SCALE, HAS_BIAS, EVEN_K, EVEN_D, PRECISION,
                            INTERPRET, ONE_D_CHUNK, BLOCK_N, BLOCK_K, BLOCK_D)  # fmt: skip
        if SCREEN:
            runner = tl.maximum(runner, tl.minimum(score, best))
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
    if SPLIT:
        tl.store(part_score_ptr + slot * S + pid_s, row_best, mask=row_ok)
        tl.store(idx_ptr + slot * S + pid_s, row_k, mask=row_ok)
    else:
        tl.store(idx_ptr + row, row_k.to(tl.int64), mask=row_ok)
    if SCREEN:
        # The runner-up: the best of the other lanes (the maximum itself if two lanes hold it),
        # or of the other codes of the winning lane.
        at_best = best == row_best[:, None]
        other = tl.max(tl.where(at_best, float("-inf"), best), axis=1)
        other = tl.where(tl.sum(at_best.to(tl.int32), axis=1) > 1, row_best, other)
        margin = row_best - tl.maximum(other, tl.max(runner, axis=1))
        z_norm = tl.load(z_terms_ptr + 2 * row, mask=row_ok, other=0.0)
        z_res = tl.load(z_terms_ptr + 2 * row + 1, mask=row_ok, other=0.0)
        bound = _screening_bound(
            z_norm,
            z_res,
            tl.load(code_terms_ptr),
            tl.load(code_terms_ptr + 1),
            tl.load(code_terms_ptr + 2),
            tl.load(code_terms_ptr + 3),
            tl.load(code_terms_ptr + 4),
            rel,
            tiny_d,
        )
        # NaN margins and bounds fail the comparison: rechecked.
        recheck = margin.to(tl.float64) > 2 * bound
        tl.store(recheck_ptr + row, tl.where(recheck, 0, 1).to(tl.int8), mask=row_ok)


@triton.jit
def _nearest_code_fwd_reduce_kernel(
    # inputs: partial best score (N, S) float32 and index (N, S) int32
    part_score_ptr,
    part_idx_ptr,
    # ROWS: as for the search kernel, the partials of list entry i belong to row rows_ptr[i]
    rows_ptr,
    count_ptr,
    # outputs: idx (N,) int64
    idx_ptr,
    # sizes
    N,
    S,
    # meta
    ROWS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    slot = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    splits = tl.arange(0, BLOCK_S)
    if ROWS:
        row_ok = slot < tl.load(count_ptr)
        row = tl.load(rows_ptr + slot, mask=row_ok, other=0)
    else:
        row_ok = slot < N
        row = slot
    mask = row_ok[:, None] & (splits[None, :] < S)
    offs = slot[:, None] * S + splits[None, :]
    score = tl.load(part_score_ptr + offs, mask=mask, other=float("-inf"))
    k = tl.load(part_idx_ptr + offs, mask=mask, other=2147483647)
    row_best = tl.max(score, axis=1)
    row_k = tl.min(tl.where(score == row_best[:, None], k, 2147483647), axis=1)
    tl.store(idx_ptr + row, row_k.to(tl.int64), mask=row_ok)


# Top-k slots: a row's state packs each slot into an int64, key << 32 | (code ^ IDX_LO), where the
# key is an int32 whose signed order is the float order of the score (-0.0 taken as +0.0): the
# int64 order is then by score, then by lower code.
IDX_LO = tl.constexpr(2**31 - 1)  # code ^ IDX_LO = IDX_LO - code: lower code, larger int64
# Free slot s holds SLOT_FREE + s: the key of -inf (0xff800000 ^ 0x7fffffff) with low bits below
# every code's, so it is unique, decodes to a threshold of -inf and ranks below any code.
SLOT_FREE = tl.constexpr(-2139095041 * 2**32)
SLOT_PAD = tl.constexpr(2**63 - 1)  # slots k..KP-1: never the worst, dropped before output
SLOT_NONE = tl.constexpr(-(2**63))  # below everything: taken slots in the output rounds

# tl.reduce with Triton's own combine functions is what tl.max / tl.min run for 32- and 64-bit
# operands, without their @triton.jit call: the interpreter re-patches triton.language on every
# such call, which took 60 % of the top-k kernel's CPU test time (it reduces 4 times per round).
# The interpreter recognises these two functions and reduces with numpy. They are private: a
# Triton without them gets the same combine functions defined here (slower only when interpreted).


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _min_combine(a, b):
    return tl.minimum(a, b)


_MAX = getattr(tl.standard, "_elementwise_max", _max_combine)
_MIN = getattr(tl.standard, "_elementwise_min", _min_combine)


@triton.jit
def _nearest_code_topk_kernel(
    # inputs: z (N, D), codebook (K, D), row-major, one dtype; scale, bias (K,) float32
    z_ptr,
    codebook_ptr,
    scale_ptr,
    bias_ptr,
    # output: idx (N, TOPK) int64, or with SPLIT each split's packed slots, part (N, S, TOPK)
    # int64, which the host merges
    idx_ptr,
    part_ptr,
    # sizes: 1 <= TOPK <= min(K, KP); split s owns codes [s * K_PER_SPLIT, (s + 1) * K_PER_SPLIT),
    # K_PER_SPLIT % BLOCK_K == 0
    N,
    K,
    D,
    TOPK,
    K_PER_SPLIT,
    SPLITS,
    # meta
    SPLIT: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_D: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    ONE_D_CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    KP: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    k_start = pid_s * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    rows = tl.arange(0, BLOCK_N)
    lanes = tl.arange(0, BLOCK_K)
    dims = tl.arange(0, BLOCK_D)
    slots = tl.arange(0, KP)
    row_ok = (pid_n * BLOCK_N + rows) < N
    # 64-bit base pointers, 32-bit offsets inside a tile (BLOCK * D < 2^31).
    z_base = z_ptr + pid_n * BLOCK_N * D
    z_offs = rows[:, None] * D + dims[None, :]
    c_offs = lanes[:, None] * D + dims[None, :]

    if ONE_D_CHUNK:
        z_tile = _z_tile(z_base, z_offs, row_ok, dims, D, EVEN_D, PRECISION, INTERPRET)
    else:
        z_tile = 0.0  # unused: the chunked product loads z chunk by chunk

    # Running top-k per row, unordered, packed as above; `worst` is its least slot (least score,
    # then highest code; a free slot while the row holds fewer than k codes), `thr` the worst
    # score as a float32 threshold (-inf while a slot is free). Only scores > -inf enter here;
    # a row with fewer than k of those is completed after the walk. KP + K < 2^31, so free slots
    # are exactly those below SLOT_FREE + KP.
    state = tl.where(slots < TOPK, slots.to(tl.int64) + SLOT_FREE, SLOT_PAD)
    state = state[None, :] + tl.zeros((BLOCK_N, KP), tl.int64)
    worst = tl.full((BLOCK_N,), SLOT_FREE, tl.int64)
    thr = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    lanes_2d = lanes[None, :]
    c_base = codebook_ptr + k_start.to(tl.int64) * D
    for k0 in range(k_start, k_end, BLOCK_K):
        codes = k0 + lanes
        code_ok = codes < K
        # _nearest_code_fwd_kernel's scores, so column 0 is its answer.
        score = _score_tile(z_tile, z_base, z_offs, row_ok, c_base, c_offs, dims, codes, code_ok,
                            scale_ptr, bias_ptr, D, HAS_SCALE, HAS_BIAS, EVEN_K, EVEN_D, PRECISION,
                            INTERPRET, ONE_D_CHUNK, BLOCK_N, BLOCK_K, BLOCK_D)  # fmt: skip

        # A candidate enters if its score exceeds the threshold (strictly: its code is higher
        # than every code held, so a tie loses; a NaN never does). Each round moves every row's
        # best remaining candidate (largest score, then lowest code) into its worst slot if it
        # enters, and knocks it out of the tile (-inf never enters). Candidates go best first, so
        # a row stops improving for the tile once its best remaining one fails; the block stops
        # when no row improves: at most min(k, BLOCK_K) rounds. The common case is none: one max
        # per candidate (NaN-ignoring on the GPU; the interpreter's is too), then one vote.
        best = tl.reduce(score, 1, _MAX)
        better = best > thr
        while tl.reduce(better.to(tl.int32), 0, _MAX) > 0:
            lane = tl.reduce(tl.where(score == best[:, None], lanes_2d, BLOCK_K), 1, _MIN)
            score = tl.where(lanes_2d == lane[:, None], float("-inf"), score)
            bits = (best + 0.0).to(tl.int32, bitcast=True)  # + 0.0: -0.0 keys as +0.0
            key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
            new = (key.to(tl.int64) << 32) + ((k0 + lane) ^ IDX_LO)
            state = tl.where((state == worst[:, None]) & better[:, None], new[:, None], state)
            worst = tl.reduce(state, 1, _MIN)
            wkey = (worst >> 32).to(tl.int32)
            thr = (wkey ^ ((wkey >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
            best = tl.reduce(score, 1, _MAX)
            better = best > thr
        c_base += BLOCK_K * D

    # Rows with fewer than k scores > -inf (NaN / -inf scores, unchecked inputs): the rest rank
    # as -inf, ties by index, so their free slots take the lowest codes not held, in order. The
    # j-th of those is below k_start + k + j <= k_start + 2k, and below K since k <= K; a split
    # of fewer than k codes leaves slots free, ranked below every code in the merge. The splits'
    # lowest codes not held, merged by their packed -inf keys, are the lowest overall.
    c = k_start
    while (tl.reduce((worst < SLOT_FREE + KP).to(tl.int32), 0, _MAX) > 0) & (c < k_end):
        held = tl.reduce(((state.to(tl.int32) ^ IDX_LO) == c).to(tl.int32), 1, _MAX)
        fill = (worst < SLOT_FREE + KP) & (held == 0)
        new = (c ^ IDX_LO).to(tl.int64) + SLOT_FREE
        state = tl.where((state == worst[:, None]) & fill[:, None], new, state)
        worst = tl.reduce(state, 1, _MIN)
        c += 1

    if SPLIT:
        part = part_ptr + ((pid_n * BLOCK_N + rows[:, None]) * SPLITS + pid_s) * TOPK + slots
        tl.store(part, state, mask=row_ok[:, None] & (slots[None, :] < TOPK))
    else:
        # Output, best first: TOPK rounds of the largest slot. TOPK <= K, so every slot below
        # TOPK holds a code by now.
        state = tl.where(slots[None, :] < TOPK, state, SLOT_NONE)
        out = idx_ptr + pid_n * BLOCK_N * TOPK + rows * TOPK
        for j in range(0, TOPK):
            top = tl.reduce(state, 1, _MAX)
            tl.store(out + j, (top.to(tl.int32) ^ IDX_LO).to(tl.int64), mask=row_ok)
            state = tl.where(state == top[:, None], SLOT_NONE, state)


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
    # come from compiling for sm_90 with Triton 3.9 and 3.6 without running (tests/triton_sm90.py,
    # which fails on a spill here): the largest tiles whose every specialization, K a multiple of
    # BLOCK_K or not, fits in 255 registers with no spill store (STL in the SASS). At Triton 3.9,
    # bias on: 189 registers for tf32x3 128 x 64 x 32, 201 screened, 155 for bf16; 244-254 in the
    # chunked-D classes. Spills appeared, with K not a multiple of BLOCK_K (the masked epilogue),
    # at chunked BLOCK_D 32 for tf32x3 (36-152 stores) and 64 for bf16 (11-49), at 16 x 128 x 128
    # bf16 tiles (53) and in every 64-row class at 4 warps (4-152). Small N wastes tensor-core
    # rows anyway; its smaller tiles keep registers low.
    if precision in (PREC_TF32X3, PREC_TF32):
        block_d = d_pow2 if d_pow2 <= 64 else 16
    else:
        block_d = d_pow2 if d_pow2 <= 128 else 32
    if n <= 16:
        block_k = 128 if precision == PREC_NATIVE and block_d <= 64 else 64
        return dict(BLOCK_N=16, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=4, num_stages=3)
    if n <= 64:
        return dict(BLOCK_N=64, BLOCK_K=64, BLOCK_D=block_d, num_warps=8, num_stages=3)
    return dict(BLOCK_N=128, BLOCK_K=64, BLOCK_D=block_d, num_warps=8, num_stages=3)


def _sm_count(device: torch.device) -> int:
    """The GPU's SMs; 2 under the interpreter, which runs programs one after another (a few
    splits only exercise the path)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def _split_codebook(
    row_blocks: int, num_codes: int, block_k: int, splits: int | None, device: torch.device
) -> tuple[int, int]:
    """(S, codes per split) for a kernel of row_blocks x S programs: S = `splits` clamped to
    1..64 (for tests), or by default enough splits that the programs cover about two waves of the
    machine. Splits hold whole BLOCK_K tiles and none is empty."""
    k_tiles = triton.cdiv(num_codes, block_k)
    if splits is None:
        programs = 2 * _sm_count(device)
        splits = 1
        if row_blocks < programs:
            splits = min(triton.cdiv(programs, row_blocks), k_tiles // MIN_TILES_PER_SPLIT)
    splits = max(1, min(splits, MAX_SPLITS, k_tiles))
    k_per_split = triton.cdiv(k_tiles, splits) * block_k
    return triton.cdiv(num_codes, k_per_split), k_per_split


def _check_launch(z, codebook, code_scale, code_bias) -> None:
    """The launchers' contract, raised as ValueError / TypeError (never asserts, which python -O
    strips): they are reachable past fastvq.nearest_code's checks, as the custom ops
    torch.ops.fastvq.nearest_code_triton and nearest_code_topk_triton."""
    if z.dim() != 2 or codebook.dim() != 2:
        raise ValueError(
            f"z and codebook must be (N, D) and (K, D), got {tuple(z.shape)} and "
            f"{tuple(codebook.shape)}"
        )
    d, num_codes = z.shape[1], codebook.shape[0]
    if codebook.shape[1] != d or not 1 <= d <= 1024:
        raise ValueError(
            f"z's D ({d}) and codebook's ({codebook.shape[1]}) must be one D in 1..1024"
        )
    # int32 code indices in the kernels; the margin keeps k0 + BLOCK_K from wrapping.
    if not 1 <= num_codes <= 2**31 - 2**16:
        raise ValueError(f"K must be between 1 and 2^31 - 2^16, got {num_codes}")
    if z.dtype != codebook.dtype or z.dtype not in KERNEL_FLOATING:
        raise TypeError(
            f"z and codebook must share one of float32, bfloat16, float16, got {z.dtype} and "
            f"{codebook.dtype}"
        )
    if codebook.device != z.device or not (z.is_contiguous() and codebook.is_contiguous()):
        raise ValueError("z and codebook must be contiguous and on one device")
    for name, t in (("code_scale", code_scale), ("code_bias", code_bias)):
        if t is not None and not (
            t.shape == (num_codes,)
            and t.dtype == torch.float32
            and t.is_contiguous()
            and t.device == z.device
        ):
            raise ValueError(
                f"{name} must be None or a contiguous float32 ({num_codes},) on z's device"
            )


def _precision(z: torch.Tensor, fast: bool) -> int:
    """PREC_NATIVE for bf16 / fp16; for float32, PREC_BF16 when fast, else PREC_TF32X3."""
    if z.dtype == torch.float32:
        return PREC_BF16 if fast else PREC_TF32X3
    return PREC_NATIVE


def _tf32_split_reference(x: torch.Tensor, scale: torch.Tensor | None = None):
    """What `_tf32_split_kernel` computes, in PyTorch: x (rows, D) float32 rounded to tf32 for the
    screening pass, and per row (|x|, |x - x_tf32|) in float64, times |scale| where given.

    Rounding is to nearest, ties away from zero, at 10 explicit mantissa bits, and magnitudes
    below float32's smallest normal flush to 0: the tensor cores then multiply these values
    exactly, whether they round, truncate or flush their own inputs, and every difference from x
    is in the residual, which the bound accounts for (x - x_tf32 is exact in float32). Norms are
    float64, where squares of float32 values neither underflow nor overflow; non-finite or
    overflowing values give non-finite norms, so their rows are always rechecked."""
    bits = x.view(torch.int32)
    rounded = ((bits + 0x1000) & -0x2000).view(torch.float32)
    rounded = torch.where(x.abs() < torch.finfo(torch.float32).tiny, 0.0, rounded)
    norm = torch.linalg.vector_norm(x, dim=1, dtype=torch.float64)
    residual = torch.linalg.vector_norm(x - rounded, dim=1, dtype=torch.float64)
    if scale is not None:
        norm, residual = norm * scale.abs(), residual * scale.abs()
    return rounded, norm, residual


def _screening_reference(z, codebook, code_scale, code_bias):
    """The screening pass's inputs in PyTorch: (z_tf32, codebook_tf32, per-row bound float64)."""
    z_tf32, z_norm, z_res = _tf32_split_reference(z)
    c_tf32, c_norm, c_res = _tf32_split_reference(codebook, code_scale)
    bias_max = code_bias.abs().max().double() if code_bias is not None else 0.0
    scale_max = code_scale.abs().max().double() if code_scale is not None else 1.0
    constants = _screening_constants(z.shape[1])
    c_max = torch.linalg.vector_norm(codebook, dim=1, dtype=torch.float64).max()
    bound = _screening_bound.fn(z_norm, z_res, c_norm.max(), c_res.max(), bias_max, scale_max,
                                c_max, *constants)  # fmt: skip
    return z_tf32, c_tf32, bound


@triton.jit
def _max_keeping_nan(x):
    """The maximum of a 1-D block, NaN if any element is. A NaN among the codebook's terms (a NaN
    code, or a tf32 copy that overflowed to inf under a scale of 0) must reach the maxima, so
    that every row is rechecked; tl.max may drop NaN on GPUs and does under the interpreter."""
    nan = tl.sum((x != x).to(tl.int32), axis=0) > 0
    return tl.where(nan, float("nan"), tl.max(x, axis=0))


@triton.jit
def _tf32_split_kernel(
    # inputs: x (R, D) float32; scale, bias (R,) float32 (a codebook's per-code terms)
    x_ptr,
    scale_ptr,
    bias_ptr,
    # outputs: x rounded to tf32 (R, D); terms (R, 2) float64 = (|x|, |x - tf32(x)|) * |scale|;
    # MAXIMA: per program, the maxima of both terms, |bias|, |scale| and |x| (grid, 5) float64
    rounded_ptr,
    terms_ptr,
    maxima_ptr,
    R,
    D,
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    MAXIMA: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """`_tf32_split_reference` in one pass over x."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    dims = tl.arange(0, BLOCK_D)
    squares = tl.zeros((BLOCK_R,), dtype=tl.float64)
    res_squares = tl.zeros((BLOCK_R,), dtype=tl.float64)
    for d0 in range(0, D, BLOCK_D):
        mask = row_ok[:, None] & ((d0 + dims) < D)[None, :]
        offs = rows[:, None] * D + d0 + dims[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        rounded = ((x.to(tl.int32, bitcast=True) + 0x1000) & -0x2000).to(tl.float32, bitcast=True)
        rounded = tl.where(tl.abs(x) < 1.1754943508222875e-38, 0.0, rounded)
        tl.store(rounded_ptr + offs, rounded, mask=mask)
        x64 = x.to(tl.float64)
        res64 = (x - rounded).to(tl.float64)
        squares += tl.sum(x64 * x64, axis=1)
        res_squares += tl.sum(res64 * res64, axis=1)
    unscaled = tl.sqrt(squares)
    norm = unscaled
    res = tl.sqrt(res_squares)
    if HAS_SCALE:
        scale = tl.abs(tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float64))
        norm *= scale
        res *= scale
    tl.store(terms_ptr + 2 * rows, norm, mask=row_ok)
    tl.store(terms_ptr + 2 * rows + 1, res, mask=row_ok)
    if MAXIMA:
        # Rows past R hold 0, which never raises a maximum of magnitudes.
        tl.store(maxima_ptr + 5 * pid, _max_keeping_nan(norm))
        tl.store(maxima_ptr + 5 * pid + 1, _max_keeping_nan(res))
        bias_max = 0.0
        if HAS_BIAS:
            bias = tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float64)
            bias_max = _max_keeping_nan(tl.abs(bias))
        tl.store(maxima_ptr + 5 * pid + 2, bias_max)
        if HAS_SCALE:
            scale_max = _max_keeping_nan(scale)
        else:
            scale_max = 1.0
        tl.store(maxima_ptr + 5 * pid + 3, scale_max)
        tl.store(maxima_ptr + 5 * pid + 4, _max_keeping_nan(unscaled))


def _tf32_split(x, scale=None, bias=None, *, maxima=False, wrap=lambda kernel: kernel):
    """`_tf32_split_kernel` on x: (x_tf32, terms (R, 2) float64); with `maxima` (for a codebook
    and its scale and bias), also code_terms (5,) float64 = the maxima of |c| s, |r_c| s, |bias|,
    s and |c|."""
    r, d = x.shape
    # 32 x 32 tiles: 128 registers on sm_90 (32 x 128 took 255); the pass is bound by memory.
    block_r, block_d = 32, min(32, max(16, triton.next_power_of_2(d)))
    grid = triton.cdiv(r, block_r)
    rounded = torch.empty_like(x)
    terms = torch.empty(r, 2, dtype=torch.float64, device=x.device)
    partial = torch.empty(grid if maxima else 0, 5, dtype=torch.float64, device=x.device)
    wrap(_tf32_split_kernel)[(grid,)](
        x, x if scale is None else scale, x if bias is None else bias, rounded, terms, partial,
        r, d, HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, MAXIMA=maxima,
        BLOCK_R=block_r, BLOCK_D=block_d,
    )  # fmt: skip
    return (rounded, terms, partial.amax(0)) if maxima else (rounded, terms)


@triton.jit
def _squared_norms_kernel(x_ptr, out_ptr, R, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[r] = sum_d x[r, d]^2 in float64: x (R, D) float32, bfloat16 or float16, whose squares
    float64 holds exactly."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    dims = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float64)
    for d0 in range(0, D, BLOCK_D):
        mask = row_ok[:, None] & ((d0 + dims) < D)[None, :]
        x = tl.load(x_ptr + rows[:, None] * D + d0 + dims[None, :], mask=mask, other=0.0)
        x64 = x.to(tl.float32).to(tl.float64)
        acc += tl.sum(x64 * x64, axis=1)
    tl.store(out_ptr + rows, acc, mask=row_ok)


@on_input_device
def squared_norms_triton(x: torch.Tensor) -> torch.Tensor:
    """The sum of squares of each row of x (R, D) contiguous float32/bfloat16/float16, in
    float64 (R,): the search's per-code terms in one read of the codebook, where code_terms in
    eager PyTorch writes and reads back an (R, D) temporary of squares."""
    check_operand("squared_norms_triton", "x", x, (None, None), KERNEL_FLOATING)
    r, d = x.shape
    out = torch.empty(r, dtype=torch.float64, device=x.device)
    if r:
        # _tf32_split's tiles: the pass is bound by memory
        block_r, block_d = 32, min(32, max(16, triton.next_power_of_2(d)))
        _squared_norms_kernel[(triton.cdiv(r, block_r),)](
            x, out, r, d, BLOCK_R=block_r, BLOCK_D=block_d
        )
    return out


def _screening_constants(d: int) -> tuple[float, float]:
    """`rel` and `tiny_d` of `_screening_bound` at dimension d."""
    rel = (2 * d + 16) * 2.0**-22 + 2.0**-18 + 2.0**-20
    return rel, (8 * d + 8) * torch.finfo(torch.float32).tiny


@triton.jit
def _screening_bound(z_norm, z_res, u, v, bias_max, scale_max, c_max, rel, tiny_d):
    """Per row, a bound on |screening score - 3xTF32 score| that holds for every code; plain
    arithmetic, so `_screening_bound.fn` evaluates it on torch tensors too.

    For code k with s = |scale_k|, the screening pass computes fl(tf32(z) . tf32(c_k)) * scale_k
    + bias_k and the exact pass the same from 3xTF32 products. Against the true score,
    tf32(z) . tf32(c) - z . c = -(z - tf32(z)) . c - tf32(z) . (c - tf32(c)), so by Cauchy-Schwarz
    the screening products are off by at most |r_z| U + |z~| V with U = max_k s |c_k| (u),
    V = max_k s |r_c_k| (v) and |z~| <= |z| + |r_z|. Accumulating D exact products in float32
    costs at most D ulps of the sum of their magnitudes (2^-22 per term leaves room for tensor
    cores that truncate), 3xTF32 adds about 2^-20 per product, and each epilogue rounds twice:
    all within `rel` of |z~| (U + V) + max|bias| for both passes together. `tiny_d` (1 + max s)
    covers what underflows (flushed on GPUs), less than float32's smallest normal each time: d
    products and d partial sums in the screening pass, 3d and 3d in 3xTF32, and the epilogues'
    roundings. The factor covers the rounding of the norms and of this formula (float64; rel and
    tiny_d may arrive as float32).

    No error bound holds where a score may overflow float32 (one pass may reach inf where the
    other does not), so the bound is infinite, and the row rechecked, wherever the scores
    (|z~| (U + V) + max|bias|) or the partial sums of a product (|z~| max_k |c_k|, unscaled: c_max)
    may come within a factor 4 of float32's range: the division by a false comparison (the
    bound is positive)."""
    z_tilde = z_norm + z_res
    bound = z_res * u + z_tilde * v + rel * (z_tilde * (u + v) + bias_max)
    reach = z_tilde * (u + v + c_max) + bias_max
    return (bound + tiny_d * (1 + scale_max)) * 1.0009765625 / (reach < 2.0**126)


def _search(
    z, codebook, code_scale, code_bias, out, precision, splits, wrap,
    *, screen=None, rows=None, count=None, expected_rows=None,
):  # fmt: skip
    """One launch of the search kernel (and of the split reduction when the codebook is split)
    writing `out`; with `screen` = (recheck, z_terms, code_terms), also the rows to recheck
    (unsplit only); with `rows` and `count`, only the rows listed, the split count chosen for
    `expected_rows` of them."""
    n, d = z.shape
    k = codebook.shape[0]
    cfg = _config(n, d, precision, z.device)
    block_k = cfg["BLOCK_K"]
    row_blocks = triton.cdiv(n, cfg["BLOCK_N"])
    busy_blocks = row_blocks if rows is None else triton.cdiv(expected_rows, cfg["BLOCK_N"])
    splits, k_per_split = _split_codebook(busy_blocks, k, block_k, splits, z.device)
    assert screen is None or splits == 1, "screening passes are unsplit"
    if splits > 1:
        part_score = torch.empty(n, splits, dtype=torch.float32, device=z.device)
        part_idx = torch.empty(n, splits, dtype=torch.int32, device=z.device)
    else:
        # SPLIT False: the kernel writes idx into `out` and never touches part_score; the dummy is
        # not `out` itself, so no tensor is passed twice where wrap_triton tracks mutations.
        part_score, part_idx = z, out
    recheck, z_terms, code_terms = (codebook,) * 3 if screen is None else screen
    rel, tiny_d = _screening_constants(d)
    # Absent optional tensors are never read or written: any valid pointer will do.
    wrap(_nearest_code_fwd_kernel)[(row_blocks, splits)](
        z,
        codebook,
        z if code_scale is None else code_scale,
        z if code_bias is None else code_bias,
        part_idx,
        part_score,
        recheck,
        z_terms,
        code_terms,
        rel,
        tiny_d,
        codebook if rows is None else rows,
        codebook if count is None else count,
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
        SCREEN=screen is not None,
        ROWS=rows is not None,
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
            part_idx if rows is None else rows,
            part_idx if count is None else count,
            out,
            n,
            splits,
            ROWS=rows is not None,
            BLOCK_R=block_r,
            BLOCK_S=max(2, triton.next_power_of_2(splits)),
        )


def _screen(z, codebook, code_scale, code_bias, out, wrap) -> torch.Tensor:
    """The tf32 screening pass: writes its winners to `out`; returns the rows to recheck (N,)
    int8, 1 where the winner is not certain to be the 3xTF32 search's."""
    z_tf32, z_terms = _tf32_split(z, wrap=wrap)
    c_tf32, _, code_terms = _tf32_split(codebook, code_scale, code_bias, maxima=True, wrap=wrap)
    recheck = torch.empty(z.shape[0], dtype=torch.int8, device=z.device)
    screen = (recheck, z_terms, code_terms)
    _search(z_tf32, c_tf32, code_scale, code_bias, out, PREC_TF32, 1, wrap, screen=screen)
    return recheck


def _screened_search(z, codebook, code_scale, code_bias, out, splits, wrap) -> None:
    """The exact float32 search as a tf32 screening pass plus a 3xTF32 recheck of the rows it
    cannot decide (see the module docstring). Never syncs with the host."""
    n = z.shape[0]
    recheck = _screen(z, codebook, code_scale, code_bias, out, wrap)
    rows = torch.nonzero_static(recheck, size=n, fill_value=-1).view(n)
    count = recheck.sum(dtype=torch.int64).view(1)
    _search(z, codebook, code_scale, code_bias, out, PREC_TF32X3, splits, wrap, rows=rows,
            count=count, expected_rows=triton.cdiv(n, RECHECK_SHARE))  # fmt: skip


def _use_screening(n: int, k: int, d: int, screen: bool | None, device: torch.device) -> bool:
    """Whether the exact float32 search screens with tf32 (`screen`, or a choice by size)."""
    if screen is not None:
        return screen
    # NOTE: unmeasured: screening adds ~6 small launches (the two tf32 splits, a 4-value maximum,
    # the row listing) and a tf32 copy of z and the codebook, worth it only where the search is
    # long and the MMAs it saves outweigh the two epilogue instructions it adds per candidate
    # (the interpreter screens whenever the rows allow, to test it). The screening pass cannot
    # split the codebook (a row's margin needs all its codes), so its row blocks must cover the
    # SMs, if only once (N = 16,384: 128 blocks on 132 SMs) where the search alone would split
    # for two waves.
    if not triton_interpreting() and (n * k < SCREEN_MIN_WORK or d < SCREEN_MIN_DIM):
        return False
    row_blocks = triton.cdiv(n, _config(n, d, PREC_TF32, device)["BLOCK_N"])
    return row_blocks >= 0.9 * _sm_count(device)


@on_input_device
def nearest_code_triton(
    z: torch.Tensor,
    codebook: torch.Tensor,
    code_scale: torch.Tensor | None,
    code_bias: torch.Tensor | None,
    fast: bool,
    *,
    splits: int | None = None,
    screen: bool | None = None,
    launch: Callable | None = None,
) -> torch.Tensor:
    """Index of the best code per row: argmax_k (z[n] . codebook[k]) * code_scale[k] + code_bias[k].

    Args:
        z: (N, D) contiguous float32, bfloat16 or float16, N >= 0, 1 <= D <= 1024.
        codebook: (K, D) contiguous, z's dtype and device, 1 <= K <= 2^31 - 2^16.
        code_scale, code_bias: (K,) contiguous float32 on z's device, or None (1 and 0).
        fast: float32 inputs multiply in bfloat16 (fp32 accumulation) instead of 3xTF32.
        splits: codebook splits (clamped to 1..64), for tests; None picks one from the machine.
            With screening, it applies to the recheck (the screening pass is never split).
        screen: float32 inputs with fast=False: True searches by a tf32 screening pass and a
            3xTF32 recheck of the rows it cannot decide, False by 3xTF32 alone (the same
            answer), None chooses from the size of the search.
        launch: applied to each kernel before `[grid](...)`; pass torch.library.wrap_triton when
            this runs as the body of a torch.library.triton_op. None launches directly: an eager
            wrap_triton call outside a triton_op goes through the higher-order-op dispatcher.

    Returns:
        int64 (N,) on z's device. Ties go to the lowest index; NaN scores never win; a row whose
        scores are all -inf/NaN gets 0.
    """
    _check_launch(z, codebook, code_scale, code_bias)
    n = z.shape[0]
    k = codebook.shape[0]
    out = torch.empty(n, dtype=torch.int64, device=z.device)
    if n == 0:
        return out
    precision = _precision(z, fast)
    wrap = (lambda kernel: kernel) if launch is None else launch
    if precision == PREC_TF32X3 and _use_screening(n, k, z.shape[1], screen, z.device):
        _screened_search(z, codebook, code_scale, code_bias, out, splits, wrap)
    else:
        _search(z, codebook, code_scale, code_bias, out, precision, splits, wrap)
    return out


def _topk_config(n: int, d: int, kp: int, precision: int, device: torch.device) -> dict:
    """Tile sizes for the top-k kernel: the argmin kernel's BLOCK_D (same scores), and rows per
    program bounded so that the (BLOCK_N, KP) key and code state stays in registers."""
    cfg = _config(n, d, precision, device)
    if triton_interpreting():
        return cfg
    # NOTE: untuned, like _config: chosen from sm_90 compiles (tests/triton_sm90.py) only, with no
    # spill store in any (precision, D, N class, KP) tried: 105-170 registers at D = 32 for
    # KP <= 32, 180-204 at KP = 128 with BLOCK_N = 64 and 8 warps, up to 255 in the chunked-D
    # classes. 128 rows x KP = 128 slots would be 128 int64 registers per thread. 16-row programs
    # spilled at BLOCK_K 128 beside BLOCK_D 64 (bf16), at 3 stages of chunked tf32x3 and at 8 warps
    # with KP = 128 (ptxas then kept 128 registers), and not at BLOCK_K 64, 2 stages, 4 warps.
    if cfg["BLOCK_N"] == 16:
        cfg.update(BLOCK_K=64, num_stages=2)
    elif kp > 32:
        cfg.update(BLOCK_N=min(cfg["BLOCK_N"], 64), num_warps=8)
    return cfg


@on_input_device
def nearest_code_topk_triton(
    z: torch.Tensor,
    codebook: torch.Tensor,
    code_scale: torch.Tensor | None,
    code_bias: torch.Tensor | None,
    k: int,
    fast: bool,
    *,
    splits: int | None = None,
    launch: Callable | None = None,
) -> torch.Tensor:
    """The k best codes per row, best first, by (z[n] . codebook[j]) * scale[j] + bias[j].

    Args:
        z: (N, D) contiguous float32, bfloat16 or float16, N >= 0, 1 <= D <= 1024.
        codebook: (K, D) contiguous, z's dtype and device, 1 <= K <= 2^31 - 2^16.
        code_scale, code_bias: (K,) contiguous float32 on z's device, or None (1 and 0).
        k: 1 <= k <= min(K, 128).
        fast: float32 inputs multiply in bfloat16 (fp32 accumulation) instead of 3xTF32.
        splits: codebook splits (clamped to 1..64), for tests; None picks one from the machine.
            Each split keeps its own top-k; their packed slots merge by one torch.topk.
        launch: as for nearest_code_triton.

    Returns:
        int64 (N, k) on z's device. Equal scores in increasing index; NaN scores rank as -inf (a
        row of NaN scores gets 0, 1, ..., k-1). Column 0 is nearest_code_triton's answer up to the
        rounding of the two kernels' tile shapes.
    """
    _check_launch(z, codebook, code_scale, code_bias)
    n, d = z.shape
    num_codes = codebook.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(num_codes, 128):
        raise ValueError(
            f"k must be an int in 1..min(K, 128) = 1..{min(num_codes, 128)}, got {k!r}"
        )
    out = torch.empty(n, k, dtype=torch.int64, device=z.device)
    if n == 0:
        return out
    precision = _precision(z, fast)
    kp = max(2, triton.next_power_of_2(k))
    cfg = _topk_config(n, d, kp, precision, z.device)
    row_blocks = triton.cdiv(n, cfg["BLOCK_N"])
    splits, k_per_split = _split_codebook(row_blocks, num_codes, cfg["BLOCK_K"], splits, z.device)
    # Split: (N, S, k) packed slots; else the kernel writes `out` and the dummy is never touched.
    part = torch.empty(n, splits, k, dtype=torch.int64, device=z.device) if splits > 1 else z
    wrap = (lambda kernel: kernel) if launch is None else launch
    wrap(_nearest_code_topk_kernel)[(row_blocks, splits)](
        z,
        codebook,
        z if code_scale is None else code_scale,
        z if code_bias is None else code_bias,
        out,
        part,
        n,
        num_codes,
        d,
        k,
        k_per_split,
        splits,
        SPLIT=splits > 1,
        HAS_SCALE=code_scale is not None,
        HAS_BIAS=code_bias is not None,
        EVEN_K=num_codes % cfg["BLOCK_K"] == 0,
        EVEN_D=d % cfg["BLOCK_D"] == 0,
        PRECISION=precision,
        INTERPRET=triton_interpreting(),
        ONE_D_CHUNK=d <= cfg["BLOCK_D"],
        KP=kp,
        **cfg,
    )
    if splits > 1:
        # Slots are distinct (disjoint code ranges) and int64-ordered by score, then lower code.
        top = part.view(n, splits * k).topk(k, dim=1).values
        torch.sub(IDX_LO.value, top & 0xFFFFFFFF, out=out)
    return out
