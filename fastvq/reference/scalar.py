"""Plain-PyTorch specifications of the scalar (codebook-free) quantizers FSQ, LFQ and BSQ and of the
factorized entropy regularizer used with LFQ / BSQ.

Written for clarity, with autograd doing every gradient (straight through as
value + (x - x.detach()), which keeps the value bit-exact), in whatever floating dtype z has;
fastvq.ops.scalar computes the same values with closed-form backward passes and fused kernels.
Shapes: z (..., d) -> codes (..., d), indices (...,) int64.

- FSQ (Mentzer et al., "Finite Scalar Quantization: VQ-VAE Made Simple"): each dimension i with
  L_i levels is bounded by b = tanh(z + shift) * h - offset, h = (L_i - 1)(1 + eps) / 2,
  offset = 1/2 for even L_i (0 for odd), shift = atanh(offset / h) so that b(0) = 0; rounded
  (half to even) with a straight-through gradient, clamped to the L_i integers
  -(L_i // 2) .. L_i - 1 - L_i // 2, and divided by L_i // 2: codes lie in [-1, 1]. Index:
  mixed radix with dimension 0 the least significant digit, digit_i = level + L_i // 2.
- LFQ (Yu et al., MAGVIT-v2): codes sign(z) in {-1, +1}, with z >= 0 -> +1 (zero included);
  index bit i set when code i is +1; gradient straight through (identity).
- BSQ (Zhao et al., "Image and video tokenization with binary spherical quantization"):
  u = z / |z|, codes sign(u) / sqrt(d); the straight-through estimator sits on u (the paper's
  u + sg(code - u)), so dL/dz is dL/du pulled back through the normalization. A zero row has
  u = 0, codes +1/sqrt(d) and gradient 0. Same index as LFQ of z.
"""

import itertools
import math

import torch

from fastvq.reference.nearest_code import inv_norm

FSQ_EPS = 1e-3


def _straight_through(value: torch.Tensor, smooth: torch.Tensor) -> torch.Tensor:
    """`value` exactly (x - x.detach() is 0), with the gradient of `smooth`."""
    return value.detach() + (smooth - smooth.detach())


def _fsq_params(levels, dtype, device):
    lv = torch.tensor(levels, dtype=torch.float64)
    half_l = (lv - 1) * (1 + FSQ_EPS) / 2
    offset = torch.where(lv.remainder(2) == 0, 0.5, 0.0).to(torch.float64)
    shift = torch.atanh(offset / half_l)
    half_width = torch.floor(lv / 2)
    cast = lambda t: t.to(dtype=dtype, device=device)  # noqa: E731
    return cast(shift), cast(half_l), cast(offset), cast(half_width), cast(lv - 1 - half_width)


def fsq_bound(z: torch.Tensor, levels) -> torch.Tensor:
    """The smooth part of FSQ: b = tanh(z + shift) * h - offset, (..., d) in z's dtype."""
    shift, half_l, offset, _, _ = _fsq_params(levels, z.dtype, z.device)
    return torch.tanh(z + shift) * half_l - offset


def fsq(z: torch.Tensor, levels) -> tuple[torch.Tensor, torch.Tensor]:
    """FSQ codes (..., d) in z's dtype (values k / (L_i // 2)) and mixed-radix indices (...,) int64.

    The gradient of the codes is that of fsq_bound(z) / (L // 2) (straight through the rounding).
    """
    _, _, _, half_width, top = _fsq_params(levels, z.dtype, z.device)
    b = fsq_bound(z, levels)
    r = torch.minimum(torch.maximum(torch.round(b), -half_width), top)
    codes = _straight_through(r / half_width, b / half_width)
    basis = torch.tensor([math.prod(levels[:i]) for i in range(len(levels))], device=z.device)
    digits = (r.detach() + half_width).to(torch.int64)
    return codes, (digits * basis).sum(-1)


def fsq_codes(indices: torch.Tensor, levels, dtype=torch.float32) -> torch.Tensor:
    """Codes (..., d) for mixed-radix indices (...,), by repeated division (dimension 0 first)."""
    rest, out = indices.to(torch.int64), []
    for level in levels:
        out.append((rest.remainder(level) - level // 2).double() / (level // 2))
        rest = rest.div(level, rounding_mode="floor")
    return torch.stack(out, dim=-1).to(dtype)


def fsq_codebook(levels, dtype=torch.float64) -> torch.Tensor:
    """All prod(levels) codes in index order, (prod(levels), d), built by enumeration."""
    grids = [[(k - level // 2) / (level // 2) for k in range(level)] for level in levels]
    # itertools.product varies its last factor fastest; index order varies dimension 0 fastest.
    rows = [tuple(reversed(p)) for p in itertools.product(*reversed(grids))]
    return torch.tensor(rows, dtype=dtype)


def _bits(indices: torch.Tensor, d: int) -> torch.Tensor:
    return (indices.to(torch.int64)[..., None] >> torch.arange(d, device=indices.device)) & 1


def lfq(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LFQ codes (..., d) in {-1, +1} (z >= 0 -> +1) and indices (...,) = sum_i [z_i >= 0] 2^i."""
    q = torch.where(z >= 0, 1.0, -1.0).to(z.dtype)
    weights = 2 ** torch.arange(z.shape[-1], device=z.device, dtype=torch.int64)
    return _straight_through(q, z), ((z >= 0).to(torch.int64) * weights).sum(-1)


def lfq_codes(indices: torch.Tensor, d: int, dtype=torch.float32) -> torch.Tensor:
    """Codes (..., d) in {-1, +1} for bit-packed indices (...,): +1 where bit i is set."""
    return (2 * _bits(indices, d) - 1).to(dtype)


def bsq(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BSQ codes (..., d) = sign(z / |z|) / sqrt(d) (a zero row: all +1/sqrt(d)) and LFQ's indices.

    Straight through to u = z / |z| (u = 0 and no gradient for a zero row).
    """
    u = z * inv_norm(z)
    scale = torch.tensor(
        1 / math.sqrt(z.shape[-1]), dtype=torch.promote_types(z.dtype, torch.float32)
    )
    q = torch.where(z >= 0, scale, -scale).to(z.dtype)
    _, indices = lfq(z.detach())
    return _straight_through(q, u), indices


def bsq_codes(indices: torch.Tensor, d: int, dtype=torch.float32) -> torch.Tensor:
    """Codes (..., d) in {-1/sqrt(d), +1/sqrt(d)} for bit-packed indices (...,)."""
    return lfq_codes(indices, d, torch.float64).mul(1 / math.sqrt(d)).to(dtype)


def _binary_inputs(z: torch.Tensor, quantizer: str) -> tuple[torch.Tensor, float]:
    """(x, s): the vector that is quantized (z, or z / |z| for BSQ) and the code magnitude."""
    if quantizer == "lfq":
        return z, 1.0
    return z * inv_norm(z), 1 / math.sqrt(z.shape[-1])


def binary_entropy_loss(
    z: torch.Tensor, inv_temperature: float, quantizer: str = "lfq"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factorized entropies (per_sample_entropy, codebook_entropy), scalars in nats.

    q(c | x) = softmax over the 2^d codes c of -inv_temperature * |x - c|^2, x = z (LFQ, c in
    {-1, +1}^d) or z / |z| (BSQ, c in {-1/sqrt(d), +1/sqrt(d)}^d), factorizes exactly into
    independent bits with p(c_i = +) = sigmoid(4 * inv_temperature * s * x_i), s = code magnitude.
    per_sample_entropy = mean over rows of sum_i H(p_i)   (exactly E[H(q(. | x))]);
    codebook_entropy   = sum_i H(mean over rows of p_i)   (>= H(mean over rows of q(. | x))).
    """
    x, s = _binary_inputs(z.reshape(-1, z.shape[-1]), quantizer)
    a = 4 * inv_temperature * s * x
    logp, logm = torch.nn.functional.logsigmoid(a), torch.nn.functional.logsigmoid(-a)
    p = torch.sigmoid(a)
    per_sample = -(p * logp + (1 - p) * logm).sum(-1).mean()
    mean_p = p.mean(0)
    codebook = -(torch.xlogy(mean_p, mean_p) + torch.xlogy(1 - mean_p, 1 - mean_p)).sum()
    return per_sample, codebook


def binary_entropy_loss_explicit(
    z: torch.Tensor, inv_temperature: float, quantizer: str = "lfq"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same two entropies by enumerating all 2^d codes (small d only): per_sample_entropy =
    mean_n H(q(. | x_n)) and codebook_entropy = H(mean_n q(. | x_n)), the joint entropy of the
    batch-averaged distribution, which the factorized codebook entropy bounds from above."""
    d = z.shape[-1]
    x, s = _binary_inputs(z.reshape(-1, d), quantizer)
    codes = lfq_codes(torch.arange(2**d, device=z.device), d, x.dtype) * s
    logits = -inv_temperature * (x[:, None, :] - codes[None]).square().sum(-1)
    logq = torch.log_softmax(logits, dim=-1)
    per_sample = -(logq.exp() * logq).sum(-1).mean()
    avg = logq.exp().mean(0)
    return per_sample, -torch.xlogy(avg, avg).sum()
