"""Triton kernels of fastvq.quantize: the gather + estimator forward and the closed-form backward.

Per row n, with z = z[n], q = codebook[idx[n]] (both upcast to float32) and g = dL/dz_q[n]:
- `_quantize_fwd_kernel` writes z_q[n] = q and, for the rotation / Householder estimators, four
  float32 scalars stats[n] = (s, 1/|z|, 1/|q|, w): s = |q|/|z|, e = z^ + sigma q^ (sigma = +1
  rotation, -1 Householder) and w = 2/|e|^2. A degenerate row stores the values that make the
  backward formula below reduce to its fallback: (1, 0, 0, 0) for STE, w = 0 for H = I.
- `_quantize_bwd_kernel` writes, per row, with e recomputed from z, q and the saved scalars,
      rotation     dz = s (g - w (e.g) e + 2 (q^.g) z^)      = s R^T g,  R = I - 2rr^T + 2q^z^^T
      householder  dz = s (g - w (e.g) e)                    = s H^T g,  H = I - 2vv^T
  (w e e^T = 2 r r^T, resp. 2 v v^T: never a D x D matrix), and/or scatters g into the float32
  codebook gradient dc[idx[n]] += g with atomics (never an N x K one-hot).
Both kernels round as the CPU reference does, operation by operation: launched with
enable_fp_fusion=False, and tl.div_rn, not / (div.full.f32 on NVIDIA, up to 2 ulps off). A row
with z^ = q^ (householder) or z^ = -q^ (rotation), as when z equals its code, must give e = 0
exactly to take its fallback. Fused (sm_90 PTX: e = fma(inv_z, z, -(q * inv_q))), e is the
rounding error of one product: |e|^2 = 7.5e-16 for test_degenerate_rows' 6-d row (emulated in
numpy), far above the 2^-126 threshold, so the row was reflected along rounding noise. The
backward recomputes the forward's e, bit for bit only if both round alike.
One program holds BLOCK_N whole rows (BLOCK_D = next_pow2(D) <= 1024 columns), so each row's
reductions stay in registers: forward reads q (+ z), writes z_q (+ 16 bytes); backward reads
g, z, q, writes dz. Bytes bound; all of it is small next to the search.
"""

import torch
import triton
import triton.language as tl
from fastvq.kernels import check_operand, on_input_device
from fastvq.kernels.scalar import _cast_for

from fastvq.ops._validate import KERNEL_FLOATING

MODES = {"ste": 0, "rotation": 1, "householder": 2}


@triton.jit
def _quantize_fwd_kernel(
    # inputs: z (N, D), codebook (K, D), idx (N,) int64; row-major contiguous
    z_ptr,
    codebook_ptr,
    idx_ptr,
    # outputs: z_q (N, D) in the codebook's dtype, stats (N, 4) float32 (MODE != 0 only)
    zq_ptr,
    stats_ptr,
    # sizes
    N,
    K,
    D,
    # meta
    MODE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    mask = row_ok[:, None] & (cols[None, :] < D)
    code = tl.load(idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    # An index outside [0, K) reads nothing: its row of z_q is NaN and its stats (1, 0, 0, 0),
    # as in the CUDA kernels (a range check on the host would cost a sync per call).
    code_ok = (code >= 0) & (code < K)
    q = tl.load(
        codebook_ptr + code[:, None] * D + cols[None, :], mask=mask & code_ok[:, None], other=0.0
    )
    # In float32 (the store rounds back exactly): Triton 3.6's interpreter cannot make a NaN of
    # q's dtype where that is bfloat16.
    tl.store(
        zq_ptr + rows[:, None] * D + cols[None, :],
        tl.where(code_ok[:, None], q.to(tl.float32), float("nan")),
        mask=mask,
    )
    if MODE != 0:
        z = tl.load(z_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0)
        z = z.to(tl.float32)
        q = q.to(tl.float32)  # 0 for an index out of range: the q = 0 fallback below
        nz = tl.sqrt_rn(tl.sum(z * z, axis=1))
        nq = tl.sqrt_rn(tl.sum(q * q, axis=1))
        # Divisors replaced by 1 where they are 0 (padding rows too): no inf/NaN is ever formed.
        scale = tl.div_rn(nq, tl.where(nz > 0, nz, 1.0))
        ok = (nz > 0) & (nq > 0) & (nz < float("inf")) & (scale < float("inf"))
        inv_z = tl.where(ok, tl.div_rn(1.0, tl.where(ok, nz, 1.0)), 0.0)
        inv_q = tl.where(ok, tl.div_rn(1.0, tl.where(ok, nq, 1.0)), 0.0)
        if MODE == 1:
            e = z * inv_z[:, None] + q * inv_q[:, None]
        else:
            e = z * inv_z[:, None] - q * inv_q[:, None]
        e2 = tl.sum(e * e, axis=1)
        # Below float32's smallest normal e counts as 0 (fastvq.reference.quantize says why).
        e_ok = e2 >= 1.1754943508222875e-38
        if MODE == 1:
            # z^ = -q^: the rotation is not unique; the row falls back to STE.
            ok = ok & e_ok
            inv_z = tl.where(ok, inv_z, 0.0)
            inv_q = tl.where(ok, inv_q, 0.0)
        w = tl.where(ok & e_ok, tl.div_rn(2.0, tl.where(e_ok, e2, 1.0)), 0.0)
        scale = tl.where(ok, scale, 1.0)
        out = stats_ptr + rows * 4
        tl.store(out, scale, mask=row_ok)
        tl.store(out + 1, inv_z, mask=row_ok)
        tl.store(out + 2, inv_q, mask=row_ok)
        tl.store(out + 3, w, mask=row_ok)


@triton.jit
def _quantize_bwd_kernel(
    # inputs: g = dL/dz_q (N, D), z (N, D), codebook (K, D), idx (N,) int64, stats (N, 4) f32
    g_ptr,
    z_ptr,
    codebook_ptr,
    idx_ptr,
    stats_ptr,
    # outputs: dz (N, D) in z's dtype (written), dc (K, D) float32 (accumulated into)
    dz_ptr,
    dc_ptr,
    # sizes
    N,
    K,
    D,
    # meta
    MODE: tl.constexpr,
    NEED_DZ: tl.constexpr,
    NEED_DC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    mask = row_ok[:, None] & (cols[None, :] < D)
    offs = rows[:, None] * D + cols[None, :]
    code = tl.load(idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    code_ok = (code >= 0) & (code < K)  # else: no codebook term, dz NaN (as the forward's z_q)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if NEED_DC:
        tl.atomic_add(
            dc_ptr + code[:, None] * D + cols[None, :],
            g,
            mask=mask & code_ok[:, None],
            sem="relaxed",
        )
    if NEED_DZ:
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        q = tl.load(
            codebook_ptr + code[:, None] * D + cols[None, :],
            mask=mask & code_ok[:, None],
            other=0.0,
        )
        q = q.to(tl.float32)
        scale = tl.load(stats_ptr + rows * 4, mask=row_ok, other=1.0)
        inv_z = tl.load(stats_ptr + rows * 4 + 1, mask=row_ok, other=0.0)
        inv_q = tl.load(stats_ptr + rows * 4 + 2, mask=row_ok, other=0.0)
        w = tl.load(stats_ptr + rows * 4 + 3, mask=row_ok, other=0.0)
        zs = z * inv_z[:, None]
        if MODE == 1:
            e = zs + q * inv_q[:, None]
        else:
            e = zs - q * inv_q[:, None]
        p = tl.sum(e * g, axis=1)
        dz = g - (w * p)[:, None] * e
        if MODE == 1:
            # A fallback row (inv_q = 0) whose q.g overflows: 0, not inf * 0 = NaN.
            qg = tl.where(inv_q > 0, tl.sum(q * g, axis=1) * inv_q, 0.0)
            dz += (2.0 * qg)[:, None] * zs
        dz = tl.where(code_ok[:, None], scale[:, None] * dz, float("nan"))
        tl.store(dz_ptr + offs, _cast_for(dz, dz_ptr), mask=mask)


def _blocks(d: int) -> tuple[int, int]:
    # NOTE: unmeasured on GPU (no H100 in the session that wrote this): 4096 elements per tile
    # over 8 warps is 16 per thread and tensor, so the backward's five live float32 tiles
    # (g, z, q, e, dz) fit in registers up to D = 1024 (4 rows per program).
    block_d = triton.next_power_of_2(d)
    return max(1, min(64, 4096 // block_d)), block_d


_NUM_WARPS = 8


def _check(op: str, z, codebook, indices, grad: str) -> int:
    """The launchers' contract as ValueError (they are reachable as torch.ops.fastvq.quantize_fwd
    / quantize_bwd past fastvq.quantize's checks); returns the estimator's MODE."""
    if grad not in MODES:
        raise ValueError(f"{op}: grad must be one of {tuple(MODES)}, got {grad!r}")
    check_operand(op, "codebook", codebook, (None, None), KERNEL_FLOATING, z.device)
    k, d = codebook.shape
    if k < 1 or not 1 <= d <= 1024:
        raise ValueError(f"{op}: codebook must be (K, D) with K >= 1, 1 <= D <= 1024, got {(k, d)}")
    check_operand(op, "z", z, (None, d), (codebook.dtype,))
    check_operand(op, "indices", indices, (z.shape[0],), (torch.int64,), z.device)
    return MODES[grad]


@on_input_device
def quantize_fwd(
    z: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, grad: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """z_q = codebook[indices] (N, D) in codebook's dtype, and stats (N, 4) float32 ((N, 0) for
    grad="ste"). z (N, D) and codebook (K, D) contiguous, one dtype; indices (N,) int64. A row
    whose index is outside [0, K) gets NaN in z_q and the stats (1, 0, 0, 0)."""
    mode = _check("quantize_fwd", z, codebook, indices, grad)
    n, d = z.shape
    z_q = torch.empty(n, d, dtype=codebook.dtype, device=z.device)
    stats = torch.empty(n, 4 if mode else 0, dtype=torch.float32, device=z.device)
    if n == 0:
        return z_q, stats
    block_n, block_d = _blocks(d)
    grid = (triton.cdiv(n, block_n),)
    _quantize_fwd_kernel[grid](
        z,
        codebook,
        indices,
        z_q,
        stats if mode else z_q,  # an empty tensor may have no storage: pass a valid dummy
        n,
        codebook.shape[0],
        d,
        MODE=mode,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=_NUM_WARPS,
        enable_fp_fusion=False,  # e = z^ -+ q^ exactly 0 where z^ = +-q^ (module docstring)
    )
    return z_q, stats


@on_input_device
def quantize_bwd(
    grad_out: torch.Tensor,
    z: torch.Tensor,
    codebook: torch.Tensor,
    indices: torch.Tensor,
    stats: torch.Tensor,
    grad: str,
    need_z: bool,
    need_codebook: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dz (N, D) in z's dtype or None, dc (K, D) float32 or None) for the estimator `grad`.

    grad_out, z (N, D) and codebook (K, D) contiguous; need_z only for rotation / householder
    (the STE gradient is grad_out itself). dc is accumulated with float32 atomics, so its
    rounding depends on the order in which rows land. stats (N, 4) float32 from the forward
    (read for need_z only). A row whose index is outside [0, K) adds nothing to dc and gets NaN
    in dz.
    """
    op = "quantize_bwd"
    mode = _check(op, z, codebook, indices, grad)
    if mode == 0 and need_z:
        raise ValueError(f"{op}: need_z is for rotation / householder; STE's dz is grad_out")
    n, d = z.shape
    check_operand(op, "grad_out", grad_out, (n, d), (z.dtype,), z.device)
    if need_z:
        check_operand(op, "stats", stats, (n, 4), (torch.float32,), z.device)
    dz = torch.empty_like(z) if need_z else None
    dc = (
        torch.zeros(codebook.shape, dtype=torch.float32, device=z.device) if need_codebook else None
    )
    if n == 0 or not (need_z or need_codebook):
        return dz, dc
    block_n, block_d = _blocks(d)
    grid = (triton.cdiv(n, block_n),)
    _quantize_bwd_kernel[grid](
        grad_out,
        z,
        codebook,
        indices,
        stats if mode else grad_out,
        dz if need_z else grad_out,  # unused pointer when NEED_DZ is False
        dc if need_codebook else grad_out,
        n,
        codebook.shape[0],
        d,
        MODE=mode,
        NEED_DZ=need_z,
        NEED_DC=need_codebook,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=_NUM_WARPS,
        enable_fp_fusion=False,  # the forward's e, bit for bit
    )
    return dz, dc
