"""The E8 lattice, D8 u (D8 + 1/2), and its 240 minimal vectors (squared norm 2) as a codebook.

Canonical order of the shell (the same conventions as the Leech shell, see _common):
  [0, 112)     (+-1, +-1, 0^6): pair * 4 + signs; pairs i < j lexicographic (28), signs
               2 * neg_i + neg_j (++, +-, -+, --).
  [112, 240)   (+-1/2)^8 with an even number of minus signs: 112 + t, t = sum_{k<7} neg_k 2^(6-k).
"""

import torch

from fastvq.lattice._common import (
    best_even_signs,
    best_pair,
    check_indices,
    check_vectors,
    compute_dtype,
    pair_tables,
    pair_vectors,
    rank_to_signs,
    signs_to_rank,
)

E8_SHELL_SIZE = 240
_START2 = 112


def _nearest_d8(x: torch.Tensor) -> torch.Tensor:
    """Nearest point of D8 (integer vectors with even sum) to each row of x (B, 8).

    Conway & Sloane (ch. 20 sec. 2): round every coordinate; if the sum is odd, round the
    coordinate with the largest rounding error the other way (the first such coordinate; a
    coordinate rounded exactly moves up).
    """
    f = torch.round(x)
    err = x - f
    k = err.abs().argmax(-1, keepdim=True)
    step = torch.where(err.gather(-1, k) >= 0, 1.0, -1.0).to(x.dtype)
    odd = torch.remainder(f.sum(-1, keepdim=True), 2) != 0
    return f.scatter_add(-1, k, torch.where(odd, step, 0.0))


def e8_nearest(x: torch.Tensor) -> torch.Tensor:
    """Nearest E8 lattice point (Euclidean) to each row: (..., 8) floating -> (..., 8), x's dtype.

    The better of the nearest points of D8 and of D8 + 1/2; the D8 point on equal distance.
    Computes in float32 (float64 for float64); exact while |x| < 2^20 in float32, where the
    parity test's sum of 8 rounded coordinates stays an exact integer.
    """
    check_vectors("x", x, 8)
    y = x.reshape(-1, 8).to(compute_dtype(x.dtype))
    p0 = _nearest_d8(y)
    p1 = _nearest_d8(y - 0.5) + 0.5
    d0 = (y - p0).square().sum(-1, keepdim=True)
    d1 = (y - p1).square().sum(-1, keepdim=True)
    return torch.where(d1 < d0, p1, p0).to(x.dtype).view(x.shape)


def _doubled_codes(index: torch.Tensor) -> torch.Tensor:
    """(N,) int64 in [0, 240) -> (N, 8) int64 shell vectors times 2 (squared norm 8)."""
    x1 = pair_vectors(index.clamp(max=_START2 - 1), 8, 2)
    x2 = rank_to_signs((index - _START2).clamp(min=0))
    return torch.where((index < _START2)[:, None], x1, x2)


def e8_shell_codes(indices: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """E8 minimal vectors from canonical indices: (...) integer in [0, 240) -> (..., 8) `dtype`."""
    check_indices("indices", indices, E8_SHELL_SIZE)
    x = _doubled_codes(indices.reshape(-1).long())
    return (x.to(dtype) / 2).view(*indices.shape, 8)


def e8_shell_codebook(dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """All 240 minimal vectors of E8 (squared norm 2): (240, 8) `dtype`, canonical order."""
    return e8_shell_codes(torch.arange(E8_SHELL_SIZE, device=device), dtype)


def e8_shell_index(vectors: torch.Tensor) -> torch.Tensor:
    """Canonical indices of E8 minimal vectors: (..., 8) floating -> (...) int64.

    Rows must be shell vectors (squared norm 2) within 0.05 per coordinate, else ValueError.
    """
    check_vectors("vectors", vectors, 8)
    v = 2 * vectors.reshape(-1, 8).double()
    x = torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0).round().long()
    two = (x.abs() == 2).long()
    a = two.argmax(-1)
    b = 7 - two.flip(-1).argmax(-1)
    _, pair_id = pair_tables(8, vectors.device)
    neg_a = x.gather(-1, a[:, None]).squeeze(-1) < 0
    neg_b = x.gather(-1, b[:, None]).squeeze(-1) < 0
    i1 = pair_id[a, b] * 4 + neg_a * 2 + neg_b
    index = torch.where(two.any(-1), i1, _START2 + signs_to_rank(x))
    index = index.clamp(0, E8_SHELL_SIZE - 1)  # non-shell rows fail the check below
    ok = (_doubled_codes(index) == x).all(-1) & ((v - x).abs().amax(-1) < 0.1)
    if not bool(ok.all()):
        bad = (~ok).nonzero()[0].item()
        raise ValueError(f"vectors: row {bad} is not an E8 minimal vector")
    return index.view(vectors.shape[:-1])


def e8_shell_quantize(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The shell vector of largest inner product with each row: argmax_k <z, codebook[k]>.

    z: (..., 8) floating. Returns (indices (...) int64, codes (..., 8) in z's dtype, squared norm 2;
    divide by sqrt(2) for unit codes). Ties go to the lowest index (exact where the arithmetic is);
    zero rows and rows with NaN or Inf get index 0. Decoded from the two shapes: the two largest |z|
    against sum |z| with a parity fix. Computes in float32 (float64 for float64).
    """
    check_vectors("z", z, 8)
    y = z.reshape(-1, 8).to(compute_dtype(z.dtype))
    # Scores against the doubled codes: 2 (|z_i| + |z_j|), and sum |z| - 2 min |z| if the signs of z
    # have an odd minus count.
    score1, index1 = best_pair(y)
    u = y.abs()
    odd = ((y < 0).sum(-1) % 2).to(y.dtype)
    score2 = u.sum(-1) - 2 * odd * u.amin(-1)
    index = torch.where(2 * score1 >= score2, index1, _START2 + best_even_signs(y))
    index = torch.where(torch.isfinite(y).all(-1), index, 0)
    return index.view(z.shape[:-1]), (_doubled_codes(index).to(z.dtype) / 2).view(z.shape)
