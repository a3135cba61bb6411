"""Pieces shared by the Leech and E8 shells, which are built from the same two patterns.

Both shells contain (+-a, +-a, 0, ...) on a pair of coordinates and (+-b)^8 on eight coordinates
with an even number of minus signs. Both are ordered the same way, and the lowest index wins ties:
- pair vectors by pair (i < j, lexicographic), then signs ++, +-, -+, -- (2 * neg_i + neg_j);
- even sign patterns on eight ascending coordinates p_0 < ... < p_7 by their rank
  t = sum_{k<7} neg_k * 2^(6-k) (p_0's sign is the most significant bit); p_7's sign is the one
  that makes the number of minus signs even.
"""

import functools

import torch

from fastvq.ops._validate import (
    FLOATING,
    check_floating,
    check_index_range,
    check_index_tensor,
)
from fastvq.ops.quantize import straight_through
from fastvq.reference import inv_norm


def check_vectors(name: str, value, dim: int) -> None:
    """TypeError unless a floating tensor; ValueError unless its last dimension is `dim`."""
    check_floating(name, value)
    if value.dim() == 0 or value.shape[-1] != dim:
        raise ValueError(f"{name} must have shape (..., {dim}), got {tuple(value.shape)}")


def check_code_dtype(dtype) -> None:
    """TypeError unless a floating dtype: unit codes cast to an integer or bool dtype would be
    silently wrong (rounded to 0, or True)."""
    if dtype not in FLOATING:
        raise TypeError(f"dtype must be float32, bfloat16, float16 or float64, got {dtype}")


def check_indices(name: str, value, size: int) -> None:
    """TypeError unless an index tensor (INDEX_DTYPES); ValueError unless every entry is in
    [0, size) (one host sync, skipped under torch.compile)."""
    check_index_tensor(name, value)
    check_index_range(name, value, 0, size)


def row_norms(v: torch.Tensor) -> torch.Tensor:
    """|v| over the last dimension (kept) for finite rows of any magnitude: the squares of float64
    rows beyond 1e154 overflow (and those below 1e-154 underflow) in vector_norm alone. NaN for
    zero rows."""
    big = v.abs().amax(-1, keepdim=True)
    return big * torch.linalg.vector_norm(v / big, dim=-1, keepdim=True)


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """x / |x| over the last dimension, differentiable, for finite nonzero rows of any magnitude.

    Each row is first scaled by a power of two (exactly, in two steps: 2^132 exceeds float32) to
    a largest |x| in [0.5, 1). Unscaled, 1 / |x| overflows float32 below 3e-39 and |x| overflows
    float64 above 1e154, and inv_norm turns such rows into zero rows. Zero rows stay zero; rows
    with NaN or Inf come out NaN or zero, as from inv_norm.
    """
    e = torch.frexp(x.detach().abs().amax(-1, keepdim=True)).exponent.to(x.dtype)
    half = torch.floor(-e / 2)
    x = x * torch.exp2(half) * torch.exp2(-e - half)
    return x * inv_norm(x)


# Shell scores reach 48 max|z| (Leech; 4 max|z| for E8): a row whose largest |z| exceeds 2^64 is
# scaled by 2^-100 first, so no score overflows and the argmax is unchanged (csrc/leech_decode.h
# row_scale, the same rule in every backend).
OVERFLOW, OVERFLOW_SCALE = 2.0**64, 2.0**-100


def scale_large_rows(z: torch.Tensor) -> torch.Tensor:
    """z (B, n) with rows whose largest |z| exceeds OVERFLOW multiplied by OVERFLOW_SCALE."""
    big = z.abs().amax(-1, keepdim=True)
    return torch.where(big > OVERFLOW, z * OVERFLOW_SCALE, z)


def quantize_rows(z: torch.Tensor, decode, codes_of) -> tuple[torch.Tensor, torch.Tensor]:
    """The shell quantizers' common tail: indices of the rows of z (..., n) by decode ((N, n)
    contiguous -> (N,) int64), codes by codes_of(indices, z.dtype), and a straight-through
    gradient from the codes to z. Returns (indices (...) int64, codes (..., n))."""
    flat = z.detach().reshape(-1, z.shape[-1]).contiguous()
    if flat.shape[0] == 0:
        index = torch.zeros(0, dtype=torch.int64, device=z.device)
    else:
        index = decode(flat)
    codes = codes_of(index, z.dtype).view(z.shape)
    if _may_carry_derivatives(z):
        codes = straight_through(z, codes)
    return index.view(z.shape[:-1]), codes


def _may_carry_derivatives(z: torch.Tensor) -> bool:
    """Whether the codes need straight_through's estimator: z requires grad, carries a
    forward-mode tangent or is a torch.func tensor (vmap), or dynamo traces it. Else the fresh
    codes are returned as they are: the estimator's copy of them was a second (N, n) allocation,
    which on CPUs cost up to twice the decode itself (page faults of a fresh buffer)."""
    return (
        z.requires_grad
        or torch.compiler.is_compiling()
        or torch._C._functorch.is_functorch_wrapped_tensor(z)
        or torch.autograd.forward_ad.unpack_dual(z).tangent is not None
    )


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision sums over 24 coordinates would round scores of near-tied codes together.
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.cache
def _pair_tables_cpu(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = torch.combinations(torch.arange(n), 2)  # lexicographic, i < j
    pair_id = torch.full((n, n), -1)
    pair_id[pairs[:, 0], pairs[:, 1]] = torch.arange(len(pairs))
    return pairs, pair_id


def pair_tables(n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """pairs (n(n-1)/2, 2) int64 in lexicographic order; pair_id (n, n) int64, -1 unless i < j."""
    pairs, pair_id = _pair_tables_cpu(n)
    return pairs.to(device), pair_id.to(device)


def pair_vectors(index: torch.Tensor, n: int, value: int) -> torch.Tensor:
    """(N,) int64 indices pair * 4 + signs -> (N, n) int64 vectors with +-value on the pair."""
    pairs, _ = pair_tables(n, index.device)
    ij = pairs[index // 4]
    neg = torch.stack(((index >> 1) & 1, index & 1), -1)
    out = torch.zeros(len(index), n, dtype=torch.int64, device=index.device)
    return out.scatter_(-1, ij, value * (1 - 2 * neg))


def best_pair(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best pair vector for each row of z (B, n): (score (B,) = |z_i| + |z_j|, index (B,) int64).

    The two largest |z| with the lowest positions among equals give the lexicographically lowest
    maximizing pair; a zero coordinate takes the + sign (the lower index).
    """
    _, pair_id = pair_tables(z.shape[-1], z.device)
    u = z.abs()
    i = u.argmax(-1, keepdim=True)  # argmax returns the first of equal maxima
    j = u.scatter(-1, i, -1.0).argmax(-1, keepdim=True)
    a, b = torch.minimum(i, j), torch.maximum(i, j)
    score = (u.gather(-1, i) + u.gather(-1, j)).squeeze(-1)
    neg = (z.gather(-1, a) < 0).long() * 2 + (z.gather(-1, b) < 0).long()
    return score, (pair_id[a, b] * 4 + neg).squeeze(-1)


def rank_to_signs(t: torch.Tensor) -> torch.Tensor:
    """(N,) int64 ranks in [0, 128) -> (N, 8) int64 signs +-1 with an even number of -1."""
    neg = (t[:, None] >> torch.arange(6, -1, -1, device=t.device)) & 1
    neg = torch.cat((neg, neg.sum(-1, keepdim=True) % 2), -1)
    return 1 - 2 * neg


def signs_to_rank(x: torch.Tensor) -> torch.Tensor:
    """(N, 8) values whose signs have even parity -> (N,) int64 rank (inverse of rank_to_signs)."""
    neg = (x[:, :7] < 0).long()
    return (neg << torch.arange(6, -1, -1, device=x.device)).sum(-1)


def best_even_signs(w: torch.Tensor) -> torch.Tensor:
    """Lowest rank t among the even sign patterns s maximizing sum_k s_k w_k; w: (B, 8) -> (B,).

    The unconstrained best is s = sign(w) (zeros +). If its minus count is odd, exactly one sign
    must flip, on a coordinate of least |w| (flipping three costs more unless all three are zeros,
    which only raises the rank). Among those candidates the lowest rank comes from, in order:
    turning a minus into a plus at the smallest k < 7; flipping k = 7 (not part of the rank);
    turning a plus into a minus at the largest k < 7.
    """
    neg = w < 0
    k = torch.arange(8, device=w.device)
    key = torch.where(neg & (k < 7), k, torch.where(k == 7, 8, 22 - k))
    least = w.abs() == w.abs().amin(-1, keepdim=True)
    flip = torch.where(least, key, 100).argmin(-1, keepdim=True)
    odd = neg.sum(-1, keepdim=True) % 2 == 1
    neg = neg ^ (odd & (k == flip))
    return (neg[:, :7].long() << torch.arange(6, -1, -1, device=w.device)).sum(-1)
