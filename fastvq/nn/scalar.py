"""Codebook-free quantizer modules FSQ, LFQ, BSQ and LatentQuantize.

Drop-in for vector-quantize-pytorch 1.32.0 (same constructor arguments, same return tuples, same
index order), built on fastvq.fsq / lfq / bsq / binary_entropy_loss. No module
here stores or builds its implicit codebook (K x d): indices map to codes by arithmetic and the
entropy regularizer of LFQ / BSQ is the factorized one of fastvq.binary_entropy_loss, O(N d).

Shared layout helpers (used by fastvq.nn.lattice, .projected and .residual too):
channel-first inputs (b, d, *spatial) are moved to (b, n, d) and back, as the peer does.
"""

import math
import numbers
from collections import namedtuple

import torch
import torch.nn.functional as F
from torch import nn

from fastvq._ext import register_namedtuple
from fastvq.nn._constants import ConstantBuffers
from fastvq.ops._validate import (
    check_finite,
    check_floating,
    check_index_range,
    check_index_tensor,
    check_int,
    check_positive,
    check_real,
)
from fastvq.ops.quantize import straight_through
from fastvq.ops.scalar import (
    MAX_BITS,
    _check_levels,
    _radix,
    binary_entropy_loss,
    bsq,
    bsq_codes,
    fsq,
    fsq_codes,
    lfq,
    lfq_codes,
)

Return = register_namedtuple(namedtuple("Return", ["quantized", "indices", "entropy_aux_loss"]))
LossBreakdown = register_namedtuple(
    namedtuple("LossBreakdown", ["per_sample_entropy", "batch_entropy", "commitment"])
)

# --- helpers shared by the fastvq.nn modules ---------------------------------------------------


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """F.mse_loss(a, b) for equal shapes, but 0 (not NaN) when empty: an empty batch has no
    error. In float32 at least (bf16 / fp16 inputs: a float32 loss, as every layer's)."""
    acc = loss_dtype(torch.promote_types(a.dtype, b.dtype))
    return (a.to(acc) - b.to(acc)).square().sum() / max(a.numel(), 1)


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a layer's losses for inputs of `dtype`: float32, or float64."""
    return torch.promote_types(dtype, torch.float32)


def describe(module: nn.Module, *names: str) -> str:
    """extra_repr's text: `name=value` for each of module's named attributes."""
    return ", ".join(f"{n}={getattr(module, n)!r}" for n in names)


def check_mask(mask, shape: tuple, device: torch.device) -> None:
    """TypeError unless a tensor; ValueError unless bool, of `shape` and on x's `device`."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool or mask.shape != shape:
        raise ValueError(
            f"mask must be a bool tensor of shape {tuple(shape)}, got {mask.dtype} "
            f"{tuple(mask.shape)}"
        )
    if mask.device != device:
        raise ValueError(f"mask must be on x's device {device}, got {mask.device}")


def check_input(name: str, x, dim: int, min_ndim: int = 2) -> None:
    """TypeError unless a floating tensor; ValueError unless x.ndim >= min_ndim and the feature
    dimension (last, after any channel-first move) is `dim`."""
    check_floating(name, x)
    if x.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got {tuple(x.shape)}")
    if x.shape[-1] != dim:
        raise ValueError(
            f"{name}'s feature dimension must be {dim}, got {x.shape[-1]} (shape {tuple(x.shape)})"
        )


def project_in(name: str, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x), where layer is a module's project_in: TypeError naming x when a Linear's weights
    and x differ in dtype outside autocast (nn.Linear's own error names neither)."""
    w = getattr(layer, "weight", None)
    if w is not None and x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(
            f"{name} is {x.dtype} but the module's project_in weights are {w.dtype}: cast the "
            "module to that dtype or run it under torch.autocast"
        )
    return layer(x)


def project_codes(layer: nn.Module, codes: torch.Tensor) -> torch.Tensor:
    """layer(codes) for a module's project_out, in its weights' dtype: codes decoded from
    indices are float32 in a module cast to bf16 or float64 (and init_from's project_in takes
    encoder outputs of any floating dtype)."""
    w = next(iter(layer.parameters()), None)
    return layer(codes if w is None else codes.to(w.dtype))


def unrotate(codes: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """codes @ rot.T in the module's dtype (rot's), computed in float32 at least, as forward
    does for codes decoded from indices."""
    dtype = torch.promote_types(codes.dtype, rot.dtype)
    return (codes.to(dtype) @ rot.t().to(dtype)).to(rot.dtype)


def to_channel_last(x: torch.Tensor, move: bool):
    """(b, d, *spatial) -> ((b, n, d), spatial) if move, else (x, None)."""
    check_floating("x", x)
    if not move:
        return x, None
    if x.dim() < 3:
        raise ValueError(f"a channel-first x must be (b, d, ...), got shape {tuple(x.shape)}")
    spatial = tuple(x.shape[2:])
    return x.movedim(1, -1).reshape(x.shape[0], math.prod(spatial), x.shape[1]), spatial


def from_channel_last(y: torch.Tensor, spatial, features: int = 1, channel_first: bool = True):
    """Undo to_channel_last on y (b, n, *rest): -> (b, *spatial, *rest), then the last
    `features` dimension moves to 1 if channel_first (outputs; indices keep it last)."""
    if spatial is None or y is None:
        return y
    y = y.reshape(y.shape[0], *spatial, *y.shape[2:])
    return y.movedim(-1, 1) if channel_first and features else y


def _check_codes(codes, codebook_dim: int) -> None:
    check_floating("codes", codes)
    if codes.dim() == 0 or codes.shape[-1] != codebook_dim:
        raise ValueError(
            f"codes must have shape (..., codebook_dim = {codebook_dim}), got {tuple(codes.shape)}"
        )
    check_finite(False, codes=codes)


def _mixed_radix(digits: torch.Tensor, levels) -> torch.Tensor:
    """(..., d) int64 digits -> (...) int64, dimension 0 least significant (fsq's order)."""
    basis, _ = _radix(tuple(levels), digits.device)
    return (digits * basis).sum(-1)


def _digits(indices: torch.Tensor, levels) -> torch.Tensor:
    """(...) integer -> (..., d) int64 digits of the mixed-radix index (inverse of _mixed_radix)."""
    basis, lv = _radix(tuple(levels), indices.device)
    return indices.to(torch.int64)[..., None].div(basis, rounding_mode="floor").remainder(lv)


def _orthogonal(d: int) -> torch.Tensor:
    rot = torch.empty(d, d)
    nn.init.orthogonal_(rot)
    return rot


# --- FSQ ---------------------------------------------------------------------------------------


class FSQ(ConstantBuffers):
    """Finite scalar quantization (Mentzer et al. 2024), vector-quantize-pytorch's FSQ.

    forward(z) -> (quantized, indices). z: (b, n, dim) channel-last, or channel-first
    (b, dim, *spatial) when channel_first or z.ndim >= 4 (images, video); float32 / bf16 / fp16 /
    float64 (with a projection, dim != len(levels) * num_codebooks, the projection's dtype or
    autocast: TypeError otherwise, as for any nn.Linear). quantized has z's shape and dtype;
    indices (b, n) int64, or (b, *spatial), with a trailing num_codebooks dimension when
    keep_num_codebooks_dim (default: num_codebooks > 1).

    The default (tanh) bound is fastvq.fsq (fused kernel on GPU); preserve_symmetry (the
    symmetric grid 2k/(L-1) - 1 of arXiv 2411.19842, needed by ResidualFSQ) and
    bound_hard_clamp run as plain elementwise torch ops, as in the peer. z is not checked for
    NaN: a NaN component quantizes as 0 would (the peer: a NaN code and index -2^31); its
    gradient is NaN through the default bound, 0 through the other two.

    Differences from the peer (documented, tested):
      - levels of 2 are allowed without preserve_symmetry (grid {-1, 0}, as fastvq.fsq); the peer
        asserts there.
      - bound_hard_clamp with a level L > 1000: the rounded bound is clamped to the L levels (as
        fastvq.fsq's); the peer's reaches one level past each end there (codes beyond [-1, 1],
        indices that decode to other codes). Below L = 1001 the clamp never acts.
      - indices are int64 (the peer's are int32) and always mapped digit-exactly, never by a
        float round of the code.
      - no `implicit_codebook` buffer (K x d); `codebook` is None.
      - bf16 / fp16 with force_quantization_f32=False is still quantized in float32 by the
        default bound (fastvq.fsq computes in float32); the peer rounds in half precision.
      - `scale` is accepted and unused, as in the peer.
    """

    def __init__(
        self,
        levels,
        dim: int | None = None,
        num_codebooks: int = 1,
        keep_num_codebooks_dim: bool | None = None,
        scale: float | None = None,
        allowed_dtypes: tuple = (torch.float32, torch.float64),
        channel_first: bool = False,
        projection_has_bias: bool = True,
        return_indices: bool = True,
        force_quantization_f32: bool = True,
        preserve_symmetry: bool = False,
        noise_dropout: float = 0.0,
        bound_hard_clamp: bool = False,
        orthogonal_rotation: bool = False,
    ):
        super().__init__()
        self.levels = list(_check_levels(levels))
        self.num_codebooks = check_int("num_codebooks", num_codebooks)
        if keep_num_codebooks_dim is None:
            keep_num_codebooks_dim = self.num_codebooks > 1
        if self.num_codebooks > 1 and not keep_num_codebooks_dim:
            raise ValueError("keep_num_codebooks_dim must be True when num_codebooks > 1")
        noise_dropout = check_real("noise_dropout", noise_dropout, 0.0, 1.0)
        if noise_dropout > 0 and not preserve_symmetry:
            raise ValueError("noise_dropout > 0 needs preserve_symmetry=True (as in the peer)")
        self.keep_num_codebooks_dim = keep_num_codebooks_dim
        self.codebook_dim = len(self.levels)
        self.effective_codebook_dim = self.codebook_dim * self.num_codebooks
        self.dim = self.effective_codebook_dim if dim is None else check_int("dim", dim)
        self.scale = scale
        if not isinstance(allowed_dtypes, (tuple, list, set, frozenset)) or not all(
            isinstance(t, torch.dtype) for t in allowed_dtypes
        ):
            raise TypeError(
                f"allowed_dtypes must be a tuple of torch.dtype, got {allowed_dtypes!r}"
            )
        self.allowed_dtypes = tuple(allowed_dtypes)
        self.channel_first = channel_first
        self.return_indices = return_indices
        self.force_quantization_f32 = force_quantization_f32
        self.preserve_symmetry = preserve_symmetry
        self.noise_dropout = noise_dropout
        self.bound_hard_clamp = bound_hard_clamp
        self.codebook_size = math.prod(self.levels)
        self.has_projections = self.dim != self.effective_codebook_dim
        proj = self.has_projections
        e, b = self.effective_codebook_dim, projection_has_bias
        self.project_in = nn.Linear(self.dim, e, bias=b) if proj else nn.Identity()
        self.project_out = nn.Linear(e, self.dim, bias=b) if proj else nn.Identity()
        self.orthogonal_rotation = orthogonal_rotation
        if orthogonal_rotation:
            self.register_buffer("orthogonal_rot", _orthogonal(self.codebook_dim))
        self.register_constant("_levels_f", self.levels)  # for the symmetric grid

    @property
    def codebook(self):
        return None

    def _symmetric(self, z: torch.Tensor):
        """Symmetric grid: codes 2k/(L-1) - 1, k = floor((L-1)(t(z)+1)/2 + 1/2), t = tanh or
        clamp to [-1, 1]; straight-through on the floor (dcodes/dz = t'(z))."""
        lm1 = self._levels_f.to(z.dtype) - 1
        t = z.clamp(-1.0, 1.0) if self.bound_hard_clamp else torch.tanh(z)
        bracket = lm1 * (t + 1) / 2 + 0.5
        k = bracket.floor()
        codes = (2.0 / lm1) * (bracket + (k - bracket).detach()) - 1.0
        digits = k.detach().clamp(min=0).minimum(lm1).to(torch.int64)
        return codes, _mixed_radix(digits, self.levels)

    def _hard_clamp_bound(self, z: torch.Tensor):
        # The tanh bound with tanh replaced by clamp(-1, 1) (and no atanh shift), as the peer.
        lv = self._levels_f.to(z.dtype)
        half_l = (lv - 1) * (1 + 1e-3) / 2
        offset = torch.where(self._levels_f.remainder(2) == 0, 0.5, 0.0).to(z.dtype)
        b = (z + offset / half_l).clamp(-1.0, 1.0) * half_l - offset
        half_width = torch.div(lv, 2, rounding_mode="floor")
        # From L = 1001 up the (1 + 1e-3) stretch puts b's ends past the outer levels (L = 1003:
        # +-501.5 rounds to +-502, half_width 501): clamp to the L integers, as fastvq.fsq does,
        # or the digit spills into the next dimension's and the index decodes to another code.
        r = b.round().maximum(-half_width).minimum(lv - 1 - half_width)
        codes = (b + (r - b).detach()) / half_width
        digits = (r.detach() + half_width).to(torch.int64)
        return codes, _mixed_radix(digits, self.levels)

    def _quantize(self, z: torch.Tensor):
        if not (self.preserve_symmetry or self.bound_hard_clamp):
            return fsq(z, self.levels)
        # A NaN component quantizes as 0 (fastvq.fsq's level 0): cast to int64, NaN made an
        # index near -2^63 and a NaN code.
        z = torch.where(z.isnan(), 0.0, z)
        if self.preserve_symmetry:
            return self._symmetric(z)
        return self._hard_clamp_bound(z)

    def _noise(self, codes: torch.Tensor) -> torch.Tensor:
        if not self.training or self.noise_dropout == 0:
            return codes
        where = torch.full_like(codes, self.noise_dropout).bernoulli_().bool()
        return torch.where(where, codes + torch.rand_like(codes) - 0.5, codes).clamp(-1.0, 1.0)

    def extra_repr(self) -> str:
        return describe(self, "levels", "dim", "num_codebooks")

    def forward(self, z: torch.Tensor):
        check_floating("z", z)
        move = z.dim() >= 4 or self.channel_first
        z, spatial = to_channel_last(z, move)
        check_input("z", z, self.dim)
        z = project_in("z", self.project_in, z)
        z = z.unflatten(-1, (self.num_codebooks, self.codebook_dim))
        if self.orthogonal_rotation:
            z = z @ self.orthogonal_rot.to(z.dtype)
        orig_dtype = z.dtype
        if self.force_quantization_f32 and orig_dtype not in self.allowed_dtypes:
            z = z.float()
        codes, indices = self._quantize(z)
        codes = self._noise(codes)
        if self.orthogonal_rotation:
            codes = codes @ self.orthogonal_rot.t().to(codes.dtype)
        out = self.project_out(codes.flatten(-2).to(orig_dtype))
        if not self.keep_num_codebooks_dim:
            indices = indices.squeeze(-1)
        out = from_channel_last(out, spatial)
        indices = from_channel_last(indices, spatial, channel_first=False)
        return out, (indices if self.return_indices else None)

    @property
    def implicit_codebook(self) -> torch.Tensor:
        """All codebook_size codes (codebook_size, codebook_dim), before rotation and
        project_out, as the peer's buffer (built on each access here: it is O(K d))."""
        indices = torch.arange(self.codebook_size, device=self._levels_f.device)
        return self._codes(indices, self._levels_f.dtype)

    def indices_to_level_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Per-dimension level indices (..., codebook_dim) int64 in [0, L_i)."""
        check_index_tensor("indices", indices)
        return _digits(indices, self.levels)

    def _codes(self, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.preserve_symmetry:
            lm1 = self._levels_f.to(dtype) - 1
            return _digits(indices, self.levels).to(dtype) * (2.0 / lm1) - 1.0
        return fsq_codes(indices, self.levels, dtype=dtype)

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """Indices (...) int64 of grid codes (..., codebook_dim), implicit_codebook's rows (before
        rotation and project_out): the inverse of its index -> code map. Values between levels
        take the nearest level, those beyond the grid the outer one; NaN or Inf: ValueError."""
        _check_codes(codes, self.codebook_dim)
        lv, c = self._levels_f.double(), codes.double()
        half = torch.div(lv, 2, rounding_mode="floor")
        digits = (c + 1) * (lv - 1) / 2 if self.preserve_symmetry else c * half + half
        return _mixed_radix(digits.round().clamp(min=0).minimum(lv - 1).long(), self.levels)

    def _output_codes(self, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The codes forward outputs for indices, before project_out: rotated back."""
        codes = self._codes(indices, dtype)
        return unrotate(codes, self.orthogonal_rot) if self.orthogonal_rotation else codes

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes for indices as returned by forward: (b, n[, c]) -> (b, n, dim), or channel-first
        (b, dim, *spatial) for image-shaped indices or channel_first."""
        check_index_tensor("indices", indices)
        is_img = indices.dim() >= 3 + int(self.keep_num_codebooks_dim)
        if not self.keep_num_codebooks_dim:
            indices = indices[..., None]
        if indices.dim() == 0 or indices.shape[-1] != self.num_codebooks:
            raise ValueError(
                f"indices' last dimension must be num_codebooks = {self.num_codebooks}, "
                f"got shape {tuple(indices.shape)}"
            )
        check_index_range("indices", indices, 0, self.codebook_size)  # else the digits wrap
        codes = self._output_codes(indices, self._levels_f.dtype)
        codes = project_codes(self.project_out, codes.flatten(-2))
        if is_img or self.channel_first:
            codes = codes.movedim(-1, 1)
        return codes


# --- LFQ / BSQ ---------------------------------------------------------------------------------


class CosineSimLinear(nn.Module):
    """x -> normalize(x) @ normalize(W, dim=0) * scale; the peer's cosine-similarity project_in."""

    def __init__(self, dim_in: int, dim_out: int, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.randn(dim_in, dim_out))

    def forward(self, x):
        return F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=0) * self.scale


class LFQ(ConstantBuffers):
    """Lookup-free quantization (MAGVIT-v2), vector-quantize-pytorch's LFQ (spherical=True: BSQ).

    forward(x, inv_temperature=100., return_loss_breakdown=False, mask=None)
        -> (quantized, indices, aux_loss), or with return_loss_breakdown ((quantized, indices,
        aux_loss), LossBreakdown(per_sample_entropy, batch_entropy, commitment)) as the peer.
        x: (b, n, dim), or channel-first (b, dim, *spatial) when channel_first or x.ndim >= 4.
        indices: int64, bit j of the d-bit index is dimension d - 1 - j (dimension 0
        is the most significant bit, the peer's order). aux_loss = entropy_loss_weight *
        (per_sample_entropy - diversity_gamma * batch_entropy) + commitment_loss_weight *
        commitment in training, 0 in eval.

    Quantization is fastvq.lfq (spherical: fastvq.bsq) with codes +-codebook_scale
    (+-codebook_scale / sqrt(d)) and the straight-through gradient of the peer. Entropies are
    fastvq.binary_entropy_loss, O(N d) memory instead of the peer's N x 2^d probabilities.

    Differences from the peer (documented, tested):
      - batch_entropy is the sum of the per-bit entropies of the batch-averaged bit marginals,
        an upper bound on the peer's joint entropy of the averaged 2^d-way distribution (equal
        to it for a single token); per_sample_entropy is the same quantity. Entropies are exact
        where the peer clamps probabilities at 1e-5 inside the log (differences ~1e-5).
      - x_i == 0 quantizes to +scale (the peer: -scale).
      - with a mask, the entropies are those of the unmasked rows; the peer's batch_entropy
        there averages each row's distribution over its own bits, which gives the per-sample
        entropy (an all-True mask changes the peer's loss, not fastvq's).
      - no `codebook` buffer of all 2^d codes (`codebook` is None); codebook_dim <= 62.
      - in eval the output keeps the straight-through gradient (the peer returns the codes
        without a path to x).
      - frac_per_sample_entropy < 1 draws its subset with torch.randperm (a different random
        stream from the peer's).
      - under DDP (a process group of several ranks), batch_entropy is that of the bit marginals
        of all ranks' rows together (the peer averages the ranks' means: the same for equal
        shards), so every rank must run each training forward: two all-reduces per codebook.

    Under torch.compile an inv_temperature changed from step to step (annealed) compiles once
    more, at its second value, after which it is a graph input (dynamo's automatic dynamic; torch
    2.13: torch 2.11 still compiles each value).
    """

    spherical_default = False

    def __init__(
        self,
        *,
        dim: int | None = None,
        codebook_size: int | None = None,
        entropy_loss_weight: float = 0.1,
        commitment_loss_weight: float = 0.0,
        diversity_gamma: float = 1.0,
        straight_through_activation: nn.Module | None = None,
        num_codebooks: int = 1,
        keep_num_codebooks_dim: bool | None = None,
        codebook_scale: float = 1.0,
        frac_per_sample_entropy: float = 1.0,
        has_projections: bool | None = None,
        projection_has_bias: bool = True,
        soft_clamp_input_value: float | None = None,
        cosine_sim_project_in: bool = False,
        cosine_sim_project_in_scale: float | None = None,
        channel_first: bool | None = None,
        experimental_softplus_entropy_loss: bool = False,
        entropy_loss_offset: float = 5.0,
        spherical: bool | None = None,
        force_quantization_f32: bool = True,
        orthogonal_rotation: bool = False,
    ):
        super().__init__()
        if dim is None and codebook_size is None:
            raise ValueError("LFQ needs dim or codebook_size")
        if codebook_size is None:
            codebook_size = 2 ** check_int("dim", dim)
        codebook_size = check_int("codebook_size", codebook_size, 2)
        if codebook_size & (codebook_size - 1):
            raise ValueError(f"codebook_size must be a power of 2, got {codebook_size}")
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_size.bit_length() - 1
        if self.codebook_dim > MAX_BITS:
            raise ValueError(f"codebook_size must be <= 2^{MAX_BITS}, got 2^{self.codebook_dim}")
        self.num_codebooks = check_int("num_codebooks", num_codebooks)
        codebook_dims = self.codebook_dim * self.num_codebooks
        self.dim = codebook_dims if dim is None else check_int("dim", dim)
        if keep_num_codebooks_dim is None:
            keep_num_codebooks_dim = self.num_codebooks > 1
        if self.num_codebooks > 1 and not keep_num_codebooks_dim:
            raise ValueError("keep_num_codebooks_dim must be True when num_codebooks > 1")
        self.keep_num_codebooks_dim = keep_num_codebooks_dim
        frac = check_real("frac_per_sample_entropy", frac_per_sample_entropy, 0.0, 1.0)
        if frac == 0:
            raise ValueError("frac_per_sample_entropy must be in (0, 1], got 0")
        codebook_scale = check_positive("codebook_scale", codebook_scale)
        if soft_clamp_input_value is not None:
            soft_clamp_input_value = check_positive(
                "soft_clamp_input_value", soft_clamp_input_value
            )
        if cosine_sim_project_in_scale is not None:
            cosine_sim_project_in_scale = check_positive(
                "cosine_sim_project_in_scale", cosine_sim_project_in_scale
            )
        if soft_clamp_input_value is not None and soft_clamp_input_value < codebook_scale:
            raise ValueError(
                f"soft_clamp_input_value ({soft_clamp_input_value}) must be >= codebook_scale "
                f"({codebook_scale})"
            )
        if has_projections is None:
            has_projections = self.dim != codebook_dims
        self.has_projections = has_projections
        if not self.has_projections and self.dim != codebook_dims:
            raise ValueError(
                f"has_projections=False needs dim == log2(codebook_size) * num_codebooks = "
                f"{codebook_dims}, got dim {self.dim}"
            )
        if not self.has_projections:
            self.project_in = nn.Identity()
        elif cosine_sim_project_in:
            scale = cosine_sim_project_in_scale
            scale = codebook_scale if scale is None else scale
            self.project_in = CosineSimLinear(self.dim, codebook_dims, scale)
        else:
            self.project_in = nn.Linear(self.dim, codebook_dims, bias=projection_has_bias)
        self.project_out = (
            nn.Linear(codebook_dims, self.dim, bias=projection_has_bias)
            if self.has_projections
            else nn.Identity()
        )
        self.channel_first = channel_first
        self.activation = straight_through_activation
        self.spherical = self.spherical_default if spherical is None else spherical
        self.orthogonal_rotation = orthogonal_rotation
        if orthogonal_rotation:
            self.register_buffer("orthogonal_rot", _orthogonal(self.codebook_dim))
        self.frac_per_sample_entropy = frac
        self.diversity_gamma = check_real("diversity_gamma", diversity_gamma, 0.0)
        self.entropy_loss_weight = check_real("entropy_loss_weight", entropy_loss_weight, 0.0)
        self.codebook_scale = codebook_scale
        self.commitment_loss_weight = check_real(
            "commitment_loss_weight", commitment_loss_weight, 0.0
        )
        self.soft_clamp_input_value = soft_clamp_input_value
        self.entropy_loss_offset = check_real("entropy_loss_offset", entropy_loss_offset, -math.inf)
        self.experimental_softplus_entropy_loss = experimental_softplus_entropy_loss
        self.force_quantization_f32 = force_quantization_f32
        self.register_constant("zero", 0.0)
        # Unused by fastvq; a persistent (d,) buffer in the peer, kept so its checkpoints load.
        self.register_buffer("mask", 2 ** torch.arange(self.codebook_dim - 1, -1, -1))

    @property
    def codebook(self):
        return None

    def _quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., d) -> (+-scale codes [/ sqrt(d)] with the straight-through gradient, indices).

        fastvq numbers dimension i as bit i; flipping the last axis gives the peer's order
        (dimension 0 most significant). lfq(x / s) * s keeps the identity gradient and exact
        +-s values."""
        s = self.codebook_scale
        flipped = x.flip(-1)
        if self.spherical:
            codes, indices = bsq(flipped)
            codes = codes * s
        else:
            codes, indices = lfq(flipped / s)
            codes = codes * s
        codes = codes.flip(-1)
        if self.activation is not None and not isinstance(self.activation, nn.Identity):
            # value from the codes, gradient through the activation (the peer's STE)
            a = self.activation(x)
            codes = straight_through(a, codes.detach())
        return codes, indices

    def _entropies(self, x: torch.Tensor, inv_temperature: float):
        """Per-sample and batch entropy (nats), each averaged over codebooks; x (m, c, d)."""
        if self.frac_per_sample_entropy < 1:
            m = x.shape[0]
            keep = torch.randperm(m, device=x.device)[: int(m * self.frac_per_sample_entropy)]
            x = x[keep]
        s = self.codebook_scale
        # The peer's softmax over codes +-s (+-s / sqrt(d)) is fastvq's over +-1 (+-1 / sqrt(d))
        # with the temperature scaled by s (s^2: the normalized input carries s too).
        if self.spherical:
            kind, inv_t = "bsq", inv_temperature * s * s
        else:
            kind, inv_t = "lfq", inv_temperature * s
        # As the peer: under DDP the batch entropy is that of all ranks' rows.
        dist = torch.distributed
        synced = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        per_sample, batch = [], []
        for c in range(x.shape[1]):
            ps, cb = binary_entropy_loss(
                x[:, c], inv_temperature=inv_t, quantizer=kind, all_reduce=synced
            )
            per_sample.append(ps)
            batch.append(cb)
        return torch.stack(per_sample).mean(), torch.stack(batch).mean()

    def extra_repr(self) -> str:
        return describe(
            self, "dim", "codebook_size", "num_codebooks", "spherical", "entropy_loss_weight",
            "commitment_loss_weight",
        )  # fmt: skip

    def forward(
        self,
        x: torch.Tensor,
        inv_temperature: float = 100.0,
        return_loss_breakdown: bool = False,
        mask: torch.Tensor | None = None,
    ):
        check_floating("x", x)
        # Checked here, not only where the entropies use it: eval skips them.
        inv_temperature = check_positive("inv_temperature", inv_temperature)
        move = x.dim() >= 4 if self.channel_first is None else self.channel_first
        x, spatial = to_channel_last(x, move)
        check_input("x", x, self.dim)
        if mask is not None:
            check_mask(mask, x.shape[:-1], x.device)
        x = project_in("x", self.project_in, x)
        if self.soft_clamp_input_value is not None:
            c = self.soft_clamp_input_value
            x = (x / c).tanh() * c
        x = x.unflatten(-1, (self.num_codebooks, self.codebook_dim))
        if self.orthogonal_rotation:
            x = x @ self.orthogonal_rot.to(x.dtype)
        orig_dtype = x.dtype
        if self.force_quantization_f32:
            x = x.float()
        if self.spherical:
            x = F.normalize(x, dim=-1) * self.codebook_scale
        codes, indices = self._quantize(x)

        zero = self.zero.to(x.dtype)
        per_sample = batch = commit = aux = zero
        if self.training:
            rows = (x if mask is None else x[mask]).reshape(-1, *x.shape[-2:])
            per_sample, batch = self._entropies(rows, inv_temperature)
            aux = per_sample - self.diversity_gamma * batch
            if self.experimental_softplus_entropy_loss:
                aux = F.softplus(aux + self.entropy_loss_offset)
            if self.commitment_loss_weight > 0:
                target = codes.detach()
                commit = mse(x, target) if mask is None else mse(x[mask], target[mask])
        aux_loss = aux * self.entropy_loss_weight + commit * self.commitment_loss_weight

        codes = codes.to(orig_dtype)
        if self.orthogonal_rotation:
            codes = codes @ self.orthogonal_rot.t().to(codes.dtype)
        out = self.project_out(codes.flatten(-2))
        out = from_channel_last(out, spatial)
        indices = from_channel_last(indices, spatial, channel_first=False)
        if not self.keep_num_codebooks_dim:
            indices = indices.squeeze(-1)
        ret = Return(out, indices, aux_loss)
        if not return_loss_breakdown:
            return ret
        return ret, LossBreakdown(per_sample, batch, commit)

    def _codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(..., c) indices -> (..., c, codebook_dim) float32 codes before project_out."""
        codes_fn = bsq_codes if self.spherical else lfq_codes
        codes = codes_fn(indices, self.codebook_dim).flip(-1) * self.codebook_scale
        if self.orthogonal_rotation:
            codes = unrotate(codes, self.orthogonal_rot)
        return codes

    def indices_to_codes(self, indices: torch.Tensor, project_out: bool = True) -> torch.Tensor:
        """Codes for indices as returned by forward: (b, n[, c]) -> (b, n, dim) (channel-first
        (b, dim, *spatial) for image-shaped indices or channel_first=True)."""
        check_index_tensor("indices", indices)
        is_img = indices.dim() >= 3 + int(self.keep_num_codebooks_dim)
        transpose = is_img if self.channel_first is None else self.channel_first
        if not self.keep_num_codebooks_dim:
            indices = indices[..., None]
        if indices.dim() == 0 or indices.shape[-1] != self.num_codebooks:
            raise ValueError(
                f"indices' last dimension must be num_codebooks = {self.num_codebooks}, "
                f"got shape {tuple(indices.shape)}"
            )
        check_index_range("indices", indices, 0, self.codebook_size)  # else the bits wrap
        codes = self._codes(indices).flatten(-2)
        if project_out:
            codes = project_codes(self.project_out, codes)
        return codes.movedim(-1, 1) if transpose else codes


class BSQ(LFQ):
    """Binary spherical quantization (Zhao et al. 2024): LFQ with spherical=True by default.

    The peer has no BSQ class; this is its LFQ(spherical=True): x is normalized per codebook,
    codes are +-codebook_scale / sqrt(d), the straight-through estimator sits on the normalized
    x (fastvq.bsq), and the entropies are those of the BSQ paper's soft quantization.
    Same arguments and returns as LFQ.
    """

    spherical_default = True


# --- LatentQuantize ----------------------------------------------------------------------------


def _nearest_value(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """int64 index, shape x.shape, of the value nearest each entry of x: |x - v| in their
    promoted dtype (bf16 latents under autocast meet float32 values, not rounded ones), ties to
    the lower index, as the peer's argmin. A search in the sorted values compares each entry with
    its two neighbours only: exact, where nearest_code's |x|^2 - 2 x v + |v|^2 loses values that
    have drifted far from 0 for their spacing to rounding relative to |x| |v|."""
    dtype = torch.promote_types(x.dtype, values.dtype)
    x, values = x.to(dtype).contiguous(), values.to(dtype)
    ordered, order = torch.sort(values, stable=True)  # equal values stay in index order
    above = torch.searchsorted(ordered, x).clamp_(max=values.numel() - 1)
    # The first of the equal values below x: the lowest index among them.
    below = torch.searchsorted(ordered, ordered[(above - 1).clamp_(min=0)])
    d_above, d_below = (x - ordered[above]).abs(), (x - ordered[below]).abs()
    i_above, i_below = order[above], order[below]
    take_above = (d_above < d_below) | ((d_above == d_below) & (i_above < i_below))
    return torch.where(take_above, i_above, i_below)


class LatentQuantize(nn.Module):
    """Latent quantization (Hsu et al. 2023), vector-quantize-pytorch's LatentQuantize.

    Each latent dimension i snaps to the nearest of its own L_i learnable values (initialized
    evenly in [-0.5, 0.5] with 0 in the middle), straight-through. forward(z) ->
    (quantized, indices, loss). z is channel-first, (b, dim, *spatial) (also for 3-D input,
    as the peer); indices (b, *spatial) int64 (with a trailing num_codebooks dimension when
    keep_num_codebooks_dim); in training loss = commitment_loss_weight * mse(z, sg(q)) +
    quantization_loss_weight * mse(sg(z), q), the paper's two terms, with z the latents (after
    project_in) and q their values: the first pulls the latents toward their codes, the second
    the values toward the latents that chose them, which is how the values are learned (with
    quantization_loss_weight 0 or None they get no gradient: under DDP, find_unused_parameters).
    0 in eval.

    Differences from the peer (documented, tested):
      - the losses: the peer takes both as mse(input, out) through the straight-through
        estimator, so the values get no gradient at all, and with equal weights (the defaults)
        the two terms' gradients on z cancel exactly. Without projections the loss's value is
        the peer's.
      - indices are the argmin positions (mixed radix) themselves; the peer re-derives them from
        the code values assuming the initial grid and truncates with int32, so its indices are
        wrong once the values have been learned (and can be off by one from float error).
        Ties go to the lower value index, as the peer's argmin.
      - indices_to_codes uses the current (learned) values; the peer's uses the initial grid.
      - optimize_values=False keeps the values as buffers (they follow .to(device) and the
        state dict); in_place_codebook_optimizer is not supported (ValueError; the peer's path
        reads an attribute it never sets).
      - no implicit_codebook buffer (K x d); `codebook` is None.
      - keep_num_codebooks_dim=False with num_codebooks > 1 is a ValueError, as in FSQ and LFQ
        (the peer silently keeps the dimension), and indices_to_codes checks the indices' shape
        and range [0, codebook_size) (the peer wraps out-of-range indices modulo the levels).
    """

    def __init__(
        self,
        levels,
        dim: int,
        commitment_loss_weight: float | None = 0.1,
        quantization_loss_weight: float | None = 0.1,
        num_codebooks: int = 1,
        codebook_dim: int = -1,
        keep_num_codebooks_dim: bool | None = None,
        optimize_values: bool | None = True,
        in_place_codebook_optimizer=None,
    ):
        super().__init__()
        if in_place_codebook_optimizer is not None:
            raise ValueError("in_place_codebook_optimizer is not supported by fastvq")
        if isinstance(codebook_dim, bool) or not isinstance(codebook_dim, numbers.Integral):
            raise TypeError(
                f"codebook_dim must be an int (-1: len(levels)), got {type(codebook_dim).__name__}"
            )
        if isinstance(levels, numbers.Integral) and not isinstance(levels, bool):
            if codebook_dim < 1:
                raise ValueError("an int `levels` needs codebook_dim >= 1")
            levels = [int(levels)] * codebook_dim
        self.levels = list(_check_levels(levels))
        self.dim = check_int("dim", dim)
        self.codebook_dim = codebook_dim if codebook_dim > 0 else len(self.levels)
        if self.codebook_dim != len(self.levels):
            raise ValueError(
                f"codebook_dim ({self.codebook_dim}) must equal len(levels) ({len(self.levels)})"
            )
        self.num_codebooks = check_int("num_codebooks", num_codebooks)
        if keep_num_codebooks_dim is None:
            keep_num_codebooks_dim = self.num_codebooks > 1
        if self.num_codebooks > 1 and not keep_num_codebooks_dim:
            raise ValueError("keep_num_codebooks_dim must be True when num_codebooks > 1")
        self.keep_num_codebooks_dim = bool(keep_num_codebooks_dim)
        self.effective_codebook_dim = self.codebook_dim * self.num_codebooks
        # None: no such loss (0).
        c = 0.0 if commitment_loss_weight is None else commitment_loss_weight
        q = 0.0 if quantization_loss_weight is None else quantization_loss_weight
        self.commitment_loss_weight = check_real("commitment_loss_weight", c, 0.0)
        self.quantization_loss_weight = check_real("quantization_loss_weight", q, 0.0)
        self.has_projections = self.dim != self.effective_codebook_dim
        e = self.effective_codebook_dim
        self.project_in = nn.Linear(self.dim, e) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(e, self.dim) if self.has_projections else nn.Identity()
        self.codebook_size = math.prod(self.levels)
        values = [
            torch.linspace(-0.5, 0.5, n) if n % 2 else torch.arange(n) / n - 0.5
            for n in self.levels
        ]
        self.optimize_values = bool(optimize_values)
        if self.optimize_values:
            self.values_per_latent = nn.ParameterList([nn.Parameter(v) for v in values])
        else:  # fixed by the levels: kept out of the state dict, as the peer's plain tensors
            for i, v in enumerate(values):
                self.register_buffer(f"_values_{i}", v, persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # State dicts that hold the fixed values (fastvq's before they left it) still load.
        if not self.optimize_values:
            for i in range(self.codebook_dim):
                state_dict.pop(f"{prefix}_values_{i}", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def codebook(self):
        return None

    def _values(self, i: int) -> torch.Tensor:
        if self.optimize_values:
            return self.values_per_latent[i]
        return getattr(self, f"_values_{i}")

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (..., codebook_dim) -> (codes with straight-through gradient, indices (...), the
        codes with their gradient to the values only)."""
        digits, codes = [], []
        values = [self._values(i) for i in range(self.codebook_dim)]
        check_finite(z=z.detach(), values=[v.detach() for v in values])
        for i, v in enumerate(values):
            idx = _nearest_value(z[..., i].detach(), v.detach())
            digits.append(idx)
            codes.append(F.embedding(idx, v[:, None])[..., 0])  # deterministic backward
        q = torch.stack(codes, -1).to(z.dtype)
        return (
            straight_through(z, q.detach()),
            _mixed_radix(torch.stack(digits, -1), self.levels),
            q,
        )

    def extra_repr(self) -> str:
        return describe(self, "levels", "dim", "num_codebooks", "optimize_values")

    def forward(self, z: torch.Tensor):
        z, spatial = to_channel_last(z, True)
        check_input("z", z, self.dim)
        z = project_in("z", self.project_in, z)
        z = z.unflatten(-1, (self.num_codebooks, self.codebook_dim))
        codes, indices, q = self.quantize(z)
        out = from_channel_last(self.project_out(codes.flatten(-2)), spatial)
        indices = from_channel_last(indices, spatial, channel_first=False)
        if not self.keep_num_codebooks_dim:
            indices = indices.squeeze(-1)
        loss = out.new_zeros((), dtype=loss_dtype(out.dtype))
        if self.training and self.commitment_loss_weight:
            loss = loss + self.commitment_loss_weight * mse(z, q.detach())
        if self.training and self.quantization_loss_weight:
            loss = loss + self.quantization_loss_weight * mse(z.detach(), q)
        return out, indices, loss

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """Indices (...) int64 of codes (..., codebook_dim): each dimension's nearest current
        value (ties to the lower value index), as forward indexes its latents; exact for the
        values themselves. NaN or Inf: ValueError."""
        _check_codes(codes, self.codebook_dim)
        with torch.no_grad():
            return self.quantize(codes)[1]

    def indices_to_codes(self, indices: torch.Tensor, project_out: bool = True) -> torch.Tensor:
        """Codes (b, dim, *spatial) for indices (b, *spatial[, c]), from the current values."""
        check_index_tensor("indices", indices)
        keep = self.keep_num_codebooks_dim
        if indices.dim() < 1 + keep or (keep and indices.shape[-1] != self.num_codebooks):
            want = f"(b, *spatial, {self.num_codebooks})" if keep else "(b, *spatial)"
            raise ValueError(f"indices must be {want}, got shape {tuple(indices.shape)}")
        check_index_range("indices", indices, 0, self.codebook_size)
        if not keep:
            indices = indices[..., None]
        digits = _digits(indices, self.levels)
        codes = torch.stack([self._values(i)[digits[..., i]] for i in range(self.codebook_dim)], -1)
        codes = codes.flatten(-2)
        if project_out:
            codes = self.project_out(codes)
        return codes.movedim(-1, 1)
