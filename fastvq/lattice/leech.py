"""The 196,560 minimal vectors of the Leech lattice as a fixed codebook (spherical Leech, L24-SQ).

Coordinates are scaled as in Conway & Sloane (ch. 4 sec. 11): integer vectors of squared norm 32,
built on the Golay code of fastvq.lattice.golay. Public codes are these divided by sqrt(32) (unit).

Canonical order (index ranges, then the order within each range):
  [0, 1104)          shape 1, (+-4, +-4, 0^22): pair * 4 + signs; pairs i < j lexicographic (276),
                     signs 2 * neg_i + neg_j (++, +-, -+, --).
  [1104, 98256)      shape 2, (+-2^8, 0^16) on an octad with an even number of minus signs:
                     1104 + octad * 128 + t; octads in Golay message order (759), t the rank of the
                     signs on the octad's ascending positions p_0..p_7: t = sum_{k<7} neg_k 2^(6-k).
  [98256, 196560)    shape 3, (-+3, +-1^23): 98256 + m * 24 + p, the vector s * (1 - 4 e_p), where
                     s_i = -1 on the coordinates of Golay codeword m and +1 elsewhere: -3 at p if
                     p is outside the codeword, +3 if inside (so (-3, 1^23) for m = 0, p = 0).
"""

import functools
import math
from types import SimpleNamespace

import torch

from fastvq.lattice import golay
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

LEECH_SIZE = 196560
_START2 = 1104  # 276 pairs x 4 signs
_START3 = _START2 + 759 * 128  # 98256; then 4096 codewords x 24 positions
_NORM2 = 32
# Rows per decoder chunk: keeps the (rows, 4096) temporaries (1 MiB at 64 rows) in cache. One CPU
# thread, CPU time on the loaded 2-core dev box: 72 / 52 / 114-179 / 146-185 us per row at 16 / 64 /
# 256 / 1024 rows (brute force z @ C.T + argmax: 880-900 us per row).
_CHUNK = 64


@functools.cache
def _tables(device: torch.device) -> SimpleNamespace:
    """Small index tables on `device` (a few hundred KiB); the 196,560 vectors are never stored."""
    words = golay.golay_codewords(device)  # (4096, 24) bits
    octads = golay.golay_octads(device)  # (759, 8)
    bit6 = 1 << torch.arange(6, device=device)
    return SimpleNamespace(
        signs=1 - 2 * words,  # (4096, 24) +-1, -1 on the codeword
        # (64, 6) +-1: 6-bit sign pattern e has -1 at coordinate k iff bit k of e is set
        patterns6=1 - 2 * ((torch.arange(64, device=device)[:, None] & bit6) > 0).long(),
        # (4096,) the 12-bit sign pattern of codeword m on coordinates 12..23
        high12=(words[:, 12:] << torch.arange(12, device=device)).sum(-1),
        octads=octads,
        octad_slots=octads.T.flatten(),  # (8 * 759,) slot-major, for reductions over 8 slots
        octad_of_message=golay.golay_octad_of_message(device),  # (4096,)
        position=torch.arange(24, device=device),
    )


def _integer_codes(index: torch.Tensor) -> torch.Tensor:
    """(N,) int64 indices in [0, 196560) -> (N, 24) int64 vectors of squared norm 32."""
    t = _tables(index.device)
    # Every shape is computed for every index (sub-indices clamped into range) and the right one
    # selected: branch-free and without host syncs, at 3x of a small cost.
    x1 = pair_vectors(index.clamp(max=_START2 - 1), 24, 4)
    r2 = (index - _START2).clamp(0, _START3 - _START2 - 1)
    x2 = torch.zeros_like(x1).scatter_(-1, t.octads[r2 // 128], 2 * rank_to_signs(r2 % 128))
    r3 = (index - _START3).clamp(0, LEECH_SIZE - _START3 - 1)
    x3 = t.signs[r3 // 24] * (1 - 4 * (t.position == (r3 % 24)[:, None]))
    shape = (index >= _START2).long() + (index >= _START3).long()
    return torch.where((shape == 0)[:, None], x1, torch.where((shape == 1)[:, None], x2, x3))


def _unit_codes(index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Divide in float64 and round once, so each entry is the correctly rounded k / sqrt(32).
    return (_integer_codes(index).double() / math.sqrt(_NORM2)).to(dtype)


def leech_codes(indices: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unit Leech codes from indices in the canonical order (module docstring), by index arithmetic.

    indices: (...) integer tensor with entries in [0, 196560). Returns (..., 24) `dtype` on the
    indices' device, each row a minimal vector divided by sqrt(32).
    """
    check_indices("indices", indices, LEECH_SIZE)
    return _unit_codes(indices.reshape(-1).long(), dtype).view(*indices.shape, 24)


def leech_codebook(dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """All 196,560 unit Leech codes: (196560, 24) `dtype`, row k = leech_codes(k)."""
    return leech_codes(torch.arange(LEECH_SIZE, device=device), dtype)


def leech_index(vectors: torch.Tensor) -> torch.Tensor:
    """Canonical indices of Leech codes given as vectors: (..., 24) floating -> (...) int64.

    Any positive multiple of a codebook row is accepted (unit codes, the integer vectors of squared
    norm 32, ...): each row is rescaled to squared norm 32 and rounded. Rows that are not, within
    0.05 per coordinate at that scale, a codebook vector raise ValueError.
    """
    check_vectors("vectors", vectors, 24)
    t = _tables(vectors.device)
    v = vectors.reshape(-1, 24).double()
    v = v * (math.sqrt(_NORM2) / torch.linalg.vector_norm(v, dim=-1, keepdim=True))
    v = torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)  # zero rows fail the check below
    x = v.round().long()
    ax = x.abs()
    bits = 1 << t.position
    # shape 1: the two coordinates equal to +-4
    four = (ax == 4).long()
    a = four.argmax(-1)
    b = 23 - four.flip(-1).argmax(-1)
    _, pair_id = pair_tables(24, vectors.device)
    neg_a = x.gather(-1, a[:, None]).squeeze(-1) < 0
    neg_b = x.gather(-1, b[:, None]).squeeze(-1) < 0
    i1 = pair_id[a, b] * 4 + neg_a * 2 + neg_b
    # shape 2: the support is an octad, found from its message (first 12 coordinates)
    octad = t.octad_of_message[((ax == 2).long() * bits).sum(-1) & 4095].clamp(min=0)
    i2 = _START2 + octad * 128 + signs_to_rank(x.gather(-1, t.octads[octad]))
    # shape 3: s = sign(x) except at the +-3, where s_p = -sign(x_p); s is -1 on the codeword
    p = (ax == 3).long().argmax(-1)
    s_neg = (x < 0) ^ (t.position == p[:, None])
    i3 = _START3 + ((s_neg.long() * bits).sum(-1) & 4095) * 24 + p
    m = ax.amax(-1)
    index = torch.where(m == 4, i1, torch.where(m == 2, i2, i3))
    ok = (_integer_codes(index) == x).all(-1) & ((v - x).abs().amax(-1) < 0.05)
    if not bool(ok.all()):
        bad = (~ok).nonzero()[0].item()
        raise ValueError(f"vectors: row {bad} is not a multiple of a Leech codebook vector")
    return index.view(vectors.shape[:-1])


def _decode(z: torch.Tensor) -> torch.Tensor:
    """(B, 24) float32/float64 -> (B,) int64: the canonical index maximizing <z, x> over the shell.

    Scores are inner products with the integer vectors (squared norm 32); every code has the same
    norm, so their argmax is the argmax over the unit codes. Ties go to the lowest index: to the
    lower shape, then within each shape by the order in which argmax/argmin return first maxima.
    """
    t = _tables(z.device)

    # Shape 1: 4 (|z_i| + |z_j|) for the two largest |z|.
    score1, index1 = best_pair(z)
    score1 = 4 * score1

    # Shape 2: per octad, 2 sum |z| with signs of z; an odd count of minus signs forces one flip, on
    # the least |z| of the octad (cost 4 min |z|).
    # Flags and magnitudes are taken on the 24 coordinates, then read per octad slot; float counts,
    # because bool sums are several times slower.
    av = z.abs().index_select(1, t.octad_slots).view(-1, 8, 759)
    neg = (z < 0).to(z.dtype).index_select(1, t.octad_slots).view(-1, 8, 759)
    odd = torch.remainder(neg.sum(1), 2)
    # 4 * odd * min is exact, so each fused add below rounds once, as a plain subtraction would.
    scores2 = torch.addcmul(2 * av.sum(1), odd, av.amin(1), value=-4)
    octad = scores2.argmax(-1)
    score2 = scores2.gather(1, octad[:, None]).squeeze(1)
    index2 = _START2 + octad * 128 + best_even_signs(z.gather(1, t.octads[octad]))

    # Shape 3: for codeword m with signs s, <z, s * (1 - 4 e_p)> = sum_i s_i z_i - 4 s_p z_p, best
    # at the p minimizing s_p z_p. Per-input tables of the sum and the minimum of s_p z_p over each
    # group of 6 coordinates under all 64 sign patterns (4 x 64 x 6 each) combine in pairs into
    # tables over 12 coordinates (2 x 4096 each). The code is systematic, so codeword m's pattern on
    # coordinates 0..11 is m itself and only the half on 12..23 needs a gather. (No matmul: TF32 or
    # bf16 matmul precision settings would round the scores.)
    zs = z.view(-1, 4, 1, 6) * t.patterns6.to(z.dtype)  # (B, 4, 64, 6)
    g_sum, g_min = zs.sum(-1), zs.amin(-1)  # (B, 4, 64)
    # Pattern h * 64 + l on coordinates 6k..6k+11 is l on group k and h on group k + 1.
    lo_sum = (g_sum[:, 1, :, None] + g_sum[:, 0, None, :]).flatten(1)  # (B, 4096)
    hi_sum = (g_sum[:, 3, :, None] + g_sum[:, 2, None, :]).flatten(1)
    lo_min = torch.minimum(g_min[:, 1, :, None], g_min[:, 0, None, :]).flatten(1)
    hi_min = torch.minimum(g_min[:, 3, :, None], g_min[:, 2, None, :]).flatten(1)
    sums = lo_sum + hi_sum.index_select(1, t.high12)
    mins = torch.minimum(lo_min, hi_min.index_select(1, t.high12))
    scores3 = torch.add(sums, mins, alpha=-4)
    word = scores3.argmax(-1)
    score3 = scores3.gather(1, word[:, None]).squeeze(1)
    position = (z * t.signs[word].to(z.dtype)).argmin(-1)  # first minimizer: lowest index
    index3 = _START3 + word * 24 + position

    # >= keeps the lower shape on equal scores.
    use1 = (score1 >= score2) & (score1 >= score3)
    index = torch.where(use1, index1, torch.where(score2 >= score3, index2, index3))
    return torch.where(torch.isfinite(z).all(-1), index, 0)


def leech_quantize(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize the direction of z to the unit Leech code of largest inner product.

    z: (..., 24) float16/bfloat16/float32/float64. Returns (indices (...) int64, codes (..., 24) in
    z's dtype), codes = leech_codes(indices). Equivalent to argmax_k <z, leech_codebook()[k]> with
    ties to the lowest index (exact where the arithmetic is, e.g. small integers), but decoded from
    the shell's structure: about 56k additions, minima and comparisons per vector plus 20k table
    reads, against 4.7M multiply-adds for brute force. Computes in float32 (float64 for float64).
    A zero row ties every code and gets index 0; a row with NaN or Inf gets index 0.
    Not differentiable: wrap it in a straight-through estimator for training.
    """
    check_vectors("z", z, 24)
    flat = z.reshape(-1, 24).to(compute_dtype(z.dtype))
    parts = [_decode(chunk) for chunk in flat.split(_CHUNK)]
    index = torch.cat(parts) if parts else flat.new_zeros(0, dtype=torch.int64)
    return index.view(z.shape[:-1]), _unit_codes(index, z.dtype).view(z.shape)
