"""The E8 lattice, D8 u (D8 + 1/2), and its 240 minimal vectors (squared norm 2) as a codebook.

Canonical order of the shell (the same conventions as the Leech shell, see _common):
  [0, 112)     (+-1, +-1, 0^6): pair * 4 + signs; pairs i < j lexicographic (28), signs
               2 * neg_i + neg_j (++, +-, -+, --).
  [112, 240)   (+-1/2)^8 with an even number of minus signs: 112 + t, t = sum_{k<7} neg_k 2^(6-k).
"""

import functools
import math

import torch

from fastvq._ext import has_kernel
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
from fastvq.ops._backends import backends, pick_backend
from fastvq.ops._validate import check_choice

E8_SHELL_SIZE = 240
E8_BACKENDS = ("auto", "triton", "cpu", "torch")  # no CUDA C++ kernel: Triton covers CUDA tensors
_START2 = 112


def _odd_sum(f: torch.Tensor) -> torch.Tensor:
    """Whether each row of integer-valued f (B, 8) float32/float64 has an odd sum, exactly at every
    magnitude: from 2^24 (2^53 in float64) up every value is even, so clamping there keeps the
    parity, and the clamped values add exactly as integers."""
    big, kind = (2**24, torch.int32) if f.dtype == torch.float32 else (2**53, torch.int64)
    return (f.clamp(-big, big).to(kind).sum(-1, keepdim=True, dtype=kind) & 1) != 0


def _nearest_d8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest point of D8 (integer vectors with even sum) to each finite row of x (B, 8), and x
    rounded.

    Conway & Sloane (ch. 20 sec. 2): round every coordinate (ties to even); if the sum is odd,
    round the coordinate with the largest rounding error the other way (the first such coordinate;
    a coordinate rounded exactly moves up). The parity is exact at every magnitude (_odd_sum); only
    the moved coordinate changes (a -0 elsewhere stays -0).
    """
    f = torch.round(x)  # the kernels: (|x| + 2^p) - 2^p with x's sign, p = 23 (52 in float64)
    err = x - f
    k = err.abs().argmax(-1, keepdim=True)  # the first of equal maxima (rows without NaN)
    fk = f.gather(-1, k)
    moved = fk + torch.where(err.gather(-1, k) >= 0, 1.0, -1.0).to(x.dtype)
    return f.scatter(-1, k, torch.where(_odd_sum(f), moved, fk)), f


def _squared_distance(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """|x - p|^2 per row of (B, 8): each square rounded once, then added as the tree
    ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7)), the order every backend uses."""
    s = (x - p).square()
    pairs = s[:, 0::2] + s[:, 1::2]  # (s0 + s1, s2 + s3, s4 + s5, s6 + s7)
    quads = pairs[:, 0::2] + pairs[:, 1::2]
    return quads[:, :1] + quads[:, 1:]


def _nearest(y: torch.Tensor) -> torch.Tensor:
    """(B, 8) float32/float64 -> (B, 8) the nearest E8 points, y's dtype: the torch path of
    e8_nearest, whose arithmetic the C++ and Triton kernels (csrc/cpu/e8.cpp, kernels/e8.py)
    reproduce bit for bit.

    p0 = the nearest D8 point, p1 = the nearest D8 point to y - 1/2, plus 1/2; p1 wins if its
    squared distance (_squared_distance) is strictly less. Rows with NaN or Inf, the rows whose
    d0 is not finite (|y - p0| <= 1.5 elsewhere): torch.round(y) (no parity fix, NaN and Inf
    kept), as e8_nearest has always returned.
    """
    p0, f = _nearest_d8(y)
    p1 = _nearest_d8(y - 0.5)[0] + 0.5
    d0 = _squared_distance(y, p0)
    p = torch.where(_squared_distance(y, p1) < d0, p1, p0)
    return torch.where(torch.isfinite(d0), p, f)


def e8_nearest(x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Nearest E8 lattice point (Euclidean) to each row: (..., 8) floating -> (..., 8), x's dtype.

    The better of the nearest points of D8 and of D8 + 1/2; the D8 point on equal distance.
    Computes in float32 (float64 for float64); exact while |x| < 2^20 in float32 (y - 1/2 and
    the rounding errors stay exact there; the D8 parity test is exact at every magnitude).

    Args:
        x: (..., 8) float32, float64, bfloat16 or float16, any strides.
        backend: "auto" (C++ on CPU tensors, Triton on CUDA tensors), "triton", "cpu" or
            "torch"; every backend returns the same points, bit for bit (-0 included): the two
            squared distances are summed in one fixed order (_squared_distance).

    Rows with NaN or Inf are rounded coordinate by coordinate (torch.round: ties to even, no
    parity fix; NaN and Inf kept), not a lattice point. Half inputs widen exactly; the point is
    rounded back to x's dtype (to nearest even) at the end, so it is the lattice point only
    where that dtype holds it: every coordinate within 2^7 for bfloat16 and 2^10 for float16,
    where they hold the half-integers (2^8 and 2^11 for points of D8, the integers). Beyond,
    the parity fix may move a coordinate to an odd integer the dtype rounds away ([258, 1, 0,
    ...] in bfloat16 comes back as [260, 1, 0, ...]), and a half-integer to an integer.

    Gradient: zero (the output is piecewise constant in x), as autograd through torch.round gave.
    """
    check_vectors("x", x, 8)
    name = _pick(backend, x.device, "e8_nearest", _HAS_NEAREST_KERNEL)
    return _NEAREST_KERNELS[name](x.reshape(-1, 8).contiguous()).view(x.shape)


# --- Backends of e8_nearest: each maps x (N, 8) contiguous -> (N, 8) of x's dtype, the same bits --


def _nearest_fake(x):
    return x.new_empty(x.shape)  # contiguous, as every body returns


def _nearest_backward(ctx, grad):
    return torch.zeros_like(grad)  # piecewise constant: zero almost everywhere


@torch.library.custom_op("fastvq::e8_nearest_torch", mutates_args=())
def _nearest_torch(x: torch.Tensor) -> torch.Tensor:
    return _nearest(x.contiguous().to(compute_dtype(x.dtype))).to(x.dtype)


# Triton: an opaque custom op (importing fastvq must not import Triton).
@torch.library.custom_op("fastvq::e8_nearest_triton", mutates_args=())
def _nearest_triton(x: torch.Tensor) -> torch.Tensor:
    from fastvq.kernels.e8 import e8_nearest_triton

    return e8_nearest_triton(x)


_nearest_torch.register_fake(_nearest_fake)
_nearest_torch.register_autograd(_nearest_backward)
_nearest_triton.register_fake(_nearest_fake)
_nearest_triton.register_autograd(_nearest_backward)

# A build from before fastvq::e8_nearest existed has no schema to attach a fake to.
_HAS_NEAREST_KERNEL = has_kernel("e8_nearest", "CPU")
if _HAS_NEAREST_KERNEL:
    torch.library.register_fake("fastvq::e8_nearest")(_nearest_fake)
    torch.library.register_autograd("fastvq::e8_nearest", _nearest_backward)

_NEAREST_KERNELS = {
    "torch": _nearest_torch,
    "triton": _nearest_triton,
    "cpu": lambda x: torch.ops.fastvq.e8_nearest(x),
}


def _doubled_codes(index: torch.Tensor) -> torch.Tensor:
    """(N,) int64 in [0, 240) -> (N, 8) int64 shell vectors times 2 (squared norm 8)."""
    x1 = pair_vectors(index.clamp(max=_START2 - 1), 8, 2)
    x2 = rank_to_signs((index - _START2).clamp(min=0))
    return torch.where((index < _START2)[:, None], x1, x2)


@functools.cache
def _codebook(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return (_doubled_codes(torch.arange(E8_SHELL_SIZE, device=device)).to(dtype) / 2).contiguous()


# A custom op: torch.compile cannot trace the cached table it reads, so it keeps one node.
@torch.library.custom_op("fastvq::e8_shell_lookup", mutates_args=())
def _lookup(index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Shell vectors for valid indices: (...) int64 -> (..., 8) `dtype`, a row gather."""
    check_code_dtype(dtype)  # reachable as torch.ops.fastvq.e8_shell_lookup past e8_shell_codes
    return _codebook(index.device, dtype).index_select(0, index.reshape(-1)).view(*index.shape, 8)


@_lookup.register_fake
def _(index, dtype):
    return index.new_empty(*index.shape, 8, dtype=dtype)


def e8_shell_codes(indices: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """E8 minimal vectors from canonical indices: (...) int64, int32, int16, int8 or uint8 in
    [0, 240) -> (..., 8) `dtype` (float32, bfloat16, float16 or float64)."""
    check_indices("indices", indices, E8_SHELL_SIZE)
    check_code_dtype(dtype)
    return _lookup(indices.long(), dtype)


def e8_shell_codebook(dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """All 240 minimal vectors of E8 (squared norm 2): (240, 8) `dtype`, canonical order."""
    return e8_shell_codes(torch.arange(E8_SHELL_SIZE, device=device), dtype)


def e8_shell_index(vectors: torch.Tensor) -> torch.Tensor:
    """Canonical indices of E8 minimal vectors: (..., 8) floating -> (...) int64.

    Rows within 0.05 per coordinate of a shell vector c (squared norm 2), or within 0.05 s of a
    positive multiple s c (E8Quantize's unit codes; s fitted by least squares), as leech_index
    takes multiples; other rows raise ValueError.
    """
    check_vectors("vectors", vectors, 8)
    v = vectors.reshape(-1, 8).double()
    u = v / row_norms(v)
    x = torch.nan_to_num(u * (2 * math.sqrt(2)), nan=0.0, posinf=0.0, neginf=0.0).round().long()
    two = (x.abs() == 2).long()
    a = two.argmax(-1)
    b = 7 - two.flip(-1).argmax(-1)
    _, pair_id = pair_tables(8, vectors.device)
    neg_a = x.gather(-1, a[:, None]).squeeze(-1) < 0
    neg_b = x.gather(-1, b[:, None]).squeeze(-1) < 0
    i1 = pair_id[a, b] * 4 + neg_a * 2 + neg_b
    index = torch.where(two.any(-1), i1, _START2 + signs_to_rank(x))
    index = index.clamp(0, E8_SHELL_SIZE - 1)  # non-shell rows fail the check below
    s = (u * x).sum(-1, keepdim=True) / 8  # u ~ s x, x doubled (squared norm 8)
    near = ((2 * v - x).abs().amax(-1) < 0.1) | ((s[:, 0] > 0) & ((u / s - x).abs().amax(-1) < 0.1))
    ok = (_doubled_codes(index) == x).all(-1) & near
    if not bool(ok.all()):
        bad = (~ok).nonzero()[0].item()
        raise ValueError(f"vectors: row {bad} is not an E8 minimal vector")
    return index.view(vectors.shape[:-1])


def _decode(z: torch.Tensor) -> torch.Tensor:
    """(B, 8) float32/float64 -> (B,) int64: the canonical index maximizing <z, x> over the shell.

    Scores are taken against the doubled codes (squared norm 8): 2 (|z_i| + |z_j|) for the pair
    shape at the two largest |z|; sum |z| - 2 min |z| [odd minus count] for the half-integer shape
    (sign(z), one sign flipped at a least |z| when the parity demands it). Ties go to the lowest
    index: the pair shape on equal scores, then the first pair / lowest sign rank.

    The arithmetic is fixed to the operation so that the C++ and Triton kernels (csrc/cpu/e8.cpp,
    kernels/e8.py) reproduce every score bit for bit: sum |z| is added as the tree
    ((u0 + u1) + (u2 + u3)) + ((u4 + u5) + (u6 + u7)); products by 2 are exact, so each score
    rounds once, fused or not.
    """
    z = scale_large_rows(z)
    score1, index1 = best_pair(z)
    u = z.abs()
    pairs = u[:, 0::2] + u[:, 1::2]  # (u0 + u1, u2 + u3, u4 + u5, u6 + u7)
    quads = pairs[:, 0::2] + pairs[:, 1::2]
    total = quads[:, 0] + quads[:, 1]
    odd = (z < 0).sum(-1) % 2 == 1
    score2 = torch.where(odd, total - 2 * u.amin(-1), total)
    index = torch.where(2 * score1 >= score2, index1, _START2 + best_even_signs(z))
    return torch.where(torch.isfinite(z).all(-1), index, 0)


# --- Backends of the decoder: each maps z (N, 8) contiguous -> (N,) int64, the same indices ------


@torch.library.custom_op("fastvq::e8_shell_decode_torch", mutates_args=())
def _decode_torch(z: torch.Tensor) -> torch.Tensor:
    return _decode(z.to(compute_dtype(z.dtype)))


@_decode_torch.register_fake
def _(z):
    return z.new_empty(z.shape[0], dtype=torch.int64)


# Triton: an opaque custom op (importing fastvq must not import Triton).
@torch.library.custom_op("fastvq::e8_shell_decode_triton", mutates_args=())
def _decode_triton(z: torch.Tensor) -> torch.Tensor:
    from fastvq.kernels.e8 import e8_shell_decode_triton

    return e8_shell_decode_triton(z)


@_decode_triton.register_fake
def _(z):
    return z.new_empty(z.shape[0], dtype=torch.int64)


# A build from before fastvq::e8_shell_decode existed has no schema to attach a fake to.
_HAS_KERNEL = has_kernel("e8_shell_decode", "CPU")
if _HAS_KERNEL:

    @torch.library.register_fake("fastvq::e8_shell_decode")
    def _(z):
        return z.new_empty(z.shape[0], dtype=torch.int64)


_KERNELS = {
    "torch": _decode_torch,
    "triton": _decode_triton,
    "cpu": lambda z: torch.ops.fastvq.e8_shell_decode(z),
}


def _pick(backend: str, device: torch.device, op: str, has_kernel: bool) -> str:
    """The backend of e8_shell_quantize (op "e8_shell_decode") or e8_nearest; has_kernel: whether
    fastvq._C has the C++ kernel `op`."""
    check_choice("backend", backend, E8_BACKENDS)
    if backend == "auto":
        if device.type == "cuda" and backends(device)["triton"].available:
            return "triton"
        return "cpu" if device.type == "cpu" and has_kernel else "torch"
    # Every backend takes float64 (computed in float64): checked as for float32.
    name = pick_backend(backend, device, torch.float32)
    if name == "cpu" and not has_kernel:
        raise ValueError(
            f"backend 'cpu' is unavailable: fastvq._C has no kernel for {op} (a build from "
            "before it existed: rebuild the extension)"
        )
    return name


def e8_shell_quantize(
    z: torch.Tensor, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The shell vector of largest inner product with each row: argmax_k <z, codebook[k]>.

    Args:
        z: (..., 8) float32, float64, bfloat16 or float16, any strides.
        backend: "auto" (C++ on CPU tensors, Triton on CUDA tensors), "triton", "cpu" or
            "torch"; every backend returns the same indices, bit for bit.

    Returns:
        indices (...) int64 in [0, 240) and codes (..., 8) in z's dtype, e8_shell_codes(indices):
        squared norm 2 (divide by sqrt(2) for unit codes).

    Decoded from the shell's two shapes (the two largest |z| against sum |z| with a sign-parity
    fix, about 150 instructions per row) rather than 240 dot products. Ties go to the lowest index,
    exact up to the rounding of the scores (float32, float64 for float64; half inputs widen
    exactly); zero rows and rows with NaN or Inf get index 0; rows beyond 2^64 are scaled by
    2^-100 first, which keeps the scores finite.

    Gradient: straight-through, as leech_quantize: codes carry dL/dz = dL/dcodes.
    """
    check_vectors("z", z, 8)
    name = _pick(backend, z.device, "e8_shell_decode", _HAS_KERNEL)
    return quantize_rows(z, _KERNELS[name], _lookup)
