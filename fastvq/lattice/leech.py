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

from fastvq._ext import EXTENSION_ERROR, has_kernel
from fastvq.lattice._common import (
    best_even_signs,
    best_pair,
    check_code_dtype,
    check_indices,
    check_vectors,
    compute_dtype,
    pair_tables,
    pair_vectors,
    quantize_rows,
    rank_to_signs,
    row_norms,
    scale_large_rows,
    signs_to_rank,
)
from fastvq.lattice.golay import golay_codewords, golay_octad_of_message, golay_octads
from fastvq.ops._backends import backends, check_backend, pick_backend

LEECH_SIZE = 196560
_START2 = 1104  # 276 pairs x 4 signs
_START3 = _START2 + 759 * 128  # 98256; then 4096 codewords x 24 positions
_NORM2 = 32
_DEVICES = ("cpu", "cuda")  # the C++ backends, named after their dispatch keys
# Rows per decoder chunk: keeps the (rows, 4096) temporaries (1 MiB at 64 rows) in cache. One CPU
# thread, CPU time on the loaded 2-core dev box: 72 / 52 / 114-179 / 146-185 us per row at 16 / 64 /
# 256 / 1024 rows (brute force z @ C.T + argmax: 880-900 us per row).
_CHUNK = 64


@functools.cache
def _tables(device: torch.device) -> SimpleNamespace:
    """Small index tables on `device` (about 0.9 MiB); the 196,560 vectors are never stored."""
    words = golay_codewords(device)  # (4096, 24) bits
    octads = golay_octads(device)  # (759, 8)
    bit6 = 1 << torch.arange(6, device=device)
    bits6 = ((torch.arange(64, device=device)[:, None] & bit6) > 0).long()  # (64, 6) 0/1
    # (759, 4): octad o's 6-bit pattern on group k, bit c for coordinate 6k + c
    octad_words = words[golay_octad_of_message(device) >= 0]
    octad_groups = (octad_words.view(759, 4, 6) * bit6).sum(-1)
    return SimpleNamespace(
        signs=1 - 2 * words,  # (4096, 24) +-1, -1 on the codeword
        # (64, 6): 6-bit pattern e has bit c (coordinate c of its group) set, -1 / +1 signs
        bits6=bits6,
        patterns6=1 - 2 * bits6,
        # (4096,) the 12-bit sign pattern of codeword m on coordinates 12..23
        high12=(words[:, 12:] << torch.arange(12, device=device)).sum(-1),
        octads=octads,
        octad_of_message=golay_octad_of_message(device),  # (4096,)
        # (4 * 759,) group-major indices into (4, 64) per-group tables: k * 64 + pattern
        octad_table_index=(octad_groups + 64 * torch.arange(4, device=device)).T.flatten(),
        # (759,) 24-bit masks of the octads, for the kernels
        octad_masks=(octad_words << torch.arange(24, device=device)).sum(-1),
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

    indices: (...) int64, int32, int16, int8 or uint8 tensor with entries in [0, 196560);
    dtype: float32, bfloat16, float16 or float64. Returns (..., 24) `dtype` on the indices'
    device, each row a minimal vector divided by sqrt(32).
    """
    check_indices("indices", indices, LEECH_SIZE)
    check_code_dtype(dtype)
    # The custom op: torch.compile keeps it whole (its tables' boolean indexing would break it)
    return _leech_unit_codes(indices.long(), dtype)


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
    v = v / row_norms(v) * math.sqrt(_NORM2)
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


def _sum6(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension (6) left to right: the order every backend uses."""
    total = x[..., 0]
    for c in range(1, 6):
        total = total + x[..., c]
    return total


def _decode(z: torch.Tensor) -> torch.Tensor:
    """(B, 24) float32/float64 -> (B,) int64: the canonical index maximizing <z, x> over the shell.

    Scores are inner products with the integer vectors (squared norm 32); every code has the same
    norm, so their argmax is the argmax over the unit codes. Ties go to the lowest index: to the
    lower shape, then the first codeword / octad / pair in index order.

    The arithmetic is fixed to the operation, so that the C++, CUDA and Triton kernels
    (csrc/cpu/leech.cpp, csrc/cuda/leech.cu, kernels/leech.py) reproduce every score bit for bit:
    per 6-coordinate group k and 6-bit pattern e, sums run left to right over the group's
    coordinates (_sum6); a codeword's or octad's score adds its four group values as
    (g0 + g1) + (g2 + g3); minima and sign flips are exact (so are products by 2 and 4: fused
    multiply-adds round once, as the plain subtractions do).
    """
    t = _tables(z.device)
    inf = torch.full((), float("inf"), dtype=z.dtype, device=z.device)  # a fill, no host copy
    z = scale_large_rows(z)

    # Shape 1: 4 (|z_i| + |z_j|) for the two largest |z|.
    score1, index1 = best_pair(z)
    score1 = 4 * score1

    # Per-input tables over the 4 groups of 6 coordinates and the 64 patterns e on each, (B, 4, 64):
    # signed sums and minima of z with -1 on e (shape 3); sums and minima of |z| over the subset e
    # and the parity of z's minus signs on it (shape 2).
    zg = z.view(-1, 4, 1, 6)
    zs = zg * t.patterns6.to(z.dtype)  # (B, 4, 64, 6)
    g_sum, g_min = _sum6(zs), zs.amin(-1)
    on = t.bits6.bool()
    a_sum = _sum6(zg.abs() * t.bits6.to(z.dtype))  # adding the zeros of excluded terms is exact
    a_min = torch.where(on, zg.abs(), inf).amin(-1)
    a_neg = _sum6((zg < 0).to(z.dtype) * t.bits6.to(z.dtype))

    # Shape 2: per octad, 2 sum |z| with signs of z; an odd count of minus signs forces one flip, on
    # the least |z| of the octad (cost 4 min |z|).
    def octad_values(table):  # (B, 4, 64) -> (B, 4, 759): each octad's pattern on each group
        return table.flatten(1).index_select(1, t.octad_table_index).view(-1, 4, 759)

    s = octad_values(a_sum)
    sums2 = (s[:, 0] + s[:, 1]) + (s[:, 2] + s[:, 3])
    odd = torch.remainder(octad_values(a_neg).sum(1), 2)  # small integers: exact in any order
    # 4 * odd * min is exact, so the fused add rounds once, as a plain subtraction would.
    scores2 = torch.addcmul(2 * sums2, odd, octad_values(a_min).amin(1), value=-4)
    octad = scores2.argmax(-1)
    score2 = scores2.gather(1, octad[:, None]).squeeze(1)
    index2 = _START2 + octad * 128 + best_even_signs(z.gather(1, t.octads[octad]))

    # Shape 3: for codeword m with signs s, <z, s * (1 - 4 e_p)> = sum_i s_i z_i - 4 s_p z_p, best
    # at the p minimizing s_p z_p. The group tables combine in pairs into tables over 12
    # coordinates (2 x 4096 each). The code is systematic, so codeword m's pattern on coordinates
    # 0..11 is m itself and only the half on 12..23 needs a gather. (No matmul: TF32 or bf16
    # matmul precision settings would round the scores.)
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


# --- Backends of the decoder: each maps z (N, 24) contiguous -> (N,) int64, the same indices -----


# Triton: an opaque custom op (importing fastvq must not import Triton); torch.compile keeps it as
# one node with the fake below.
@torch.library.custom_op("fastvq::leech_decode_triton", mutates_args=())
def _leech_decode_triton(z: torch.Tensor) -> torch.Tensor:
    from fastvq.kernels.leech import leech_decode_triton

    return leech_decode_triton(z)


@_leech_decode_triton.register_fake
def _(z):
    return z.new_empty(z.shape[0], dtype=torch.int64)


# A build from before fastvq::leech_decode existed has no schema to attach a fake to.
_HAS_OP = EXTENSION_ERROR is None and hasattr(torch.ops.fastvq, "leech_decode")
_HAS_KERNEL = {key: _HAS_OP and has_kernel("leech_decode", key.upper()) for key in _DEVICES}
if _HAS_OP:

    @torch.library.register_fake("fastvq::leech_decode")
    def _(z):
        return z.new_empty(z.shape[0], dtype=torch.int64)


# The torch backend and the index -> code map are custom ops too: torch.compile cannot trace the
# cached tables they read (_tables), so it keeps each as one node with its fake.
@torch.library.custom_op("fastvq::leech_decode_torch", mutates_args=())
def _leech_decode_torch(z: torch.Tensor) -> torch.Tensor:
    flat = z.to(compute_dtype(z.dtype))
    parts = [_decode(chunk) for chunk in flat.split(_CHUNK)]
    return torch.cat(parts) if parts else flat.new_zeros(0, dtype=torch.int64)


@_leech_decode_torch.register_fake
def _(z):
    return z.new_empty(z.shape[0], dtype=torch.int64)


@torch.library.custom_op("fastvq::leech_unit_codes", mutates_args=())
def _leech_unit_codes(index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    check_code_dtype(dtype)  # reachable as torch.ops.fastvq.leech_unit_codes past leech_codes
    return _unit_codes(index.reshape(-1), dtype).view(*index.shape, 24)


@_leech_unit_codes.register_fake
def _(index, dtype):
    return index.new_empty(*index.shape, 24, dtype=dtype)


_KERNELS = {
    "torch": _leech_decode_torch,
    "triton": _leech_decode_triton,
    "cpu": lambda z: torch.ops.fastvq.leech_decode(z),
    "cuda": lambda z: torch.ops.fastvq.leech_decode(z),
}


def _pick(backend: str, device: torch.device) -> str:
    # Every Leech backend takes float64 (scores in float64), so the backend is picked as for
    # float32 inputs.
    name = pick_backend(backend, device, torch.float32)
    if backend == "auto" and device.type not in _DEVICES:
        return "torch"  # e.g. meta or mps tensors: no kernel of ours runs there
    if name in _HAS_KERNEL and not _HAS_KERNEL[name]:
        if backend != "auto":
            raise ValueError(
                f"backend {backend!r} is unavailable: fastvq._C has no {name} kernel for "
                "leech_decode (a build from before it existed: rebuild the extension)"
            )
        name = "triton" if name == "cuda" and backends(device)["triton"].available else "torch"
    return name


def leech_quantize(z: torch.Tensor, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize the direction of z to the unit Leech code of largest inner product.

    Args:
        z: (..., 24) float32, float64, bfloat16 or float16, any strides, on any device a backend
            runs on.
        backend: "auto" (C++ on CPU tensors; Triton, else CUDA C++, on CUDA tensors), "triton",
            "cuda", "cpu" or "torch"; see fastvq.backends(). Every backend returns the same
            indices, bit for bit.

    Returns:
        indices (...) int64 in [0, 196560) and codes (..., 24) in z's dtype, codes =
        leech_codes(indices): unit vectors, whatever the norm of z.

    The index is argmax_k <z, leech_codebook()[k]>, ties to the lowest index, exact up to the
    rounding of the scores (float32, float64 for float64 inputs; half inputs are widened exactly,
    so e.g. small integers decode exactly). It is decoded from the shell's structure: about 56k
    additions, minima and comparisons per vector plus 20k table reads, against 4.7M multiply-adds
    for brute force. A zero row ties every code and gets index 0; so does a row holding NaN or Inf.
    Rows whose largest |z| exceeds 2^64 are scaled by 2^-100 first, which changes nothing but
    keeps the scores finite.

    Gradient: straight-through. If z requires grad, codes carry dL/dz = dL/dcodes (the identity,
    although codes are unit vectors and z need not be); indices are not differentiable.
    """
    check_vectors("z", z, 24)
    check_backend(backend)
    name = _pick(backend, z.device)
    return quantize_rows(z, _KERNELS[name], _leech_unit_codes)
