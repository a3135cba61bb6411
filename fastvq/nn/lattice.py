"""Fixed lattice-shell codebooks as quantizer modules: LeechQuantize (196,560 codes in 24-d,
Lambda24-SQ) and E8Quantize (240 codes in 8-d).

Both quantize the direction of a (projected) input, u = z / |z|, to the unit shell vector of
largest inner product with u, decoded from the lattice structure (fastvq.lattice) rather than by
a search over the codebook, so nothing of size N x K (or even K x D) is built in the forward.
Return convention of vector-quantize-pytorch's VectorQuantize: (quantized, indices, loss).
"""

import math

import torch
from torch import nn

from fastvq.lattice import (
    E8_SHELL_SIZE,
    LEECH_SIZE,
    e8_shell_codes,
    e8_shell_quantize,
    leech_codes,
    leech_quantize,
)
from fastvq.lattice._common import unit_rows
from fastvq.nn.scalar import (
    check_input,
    describe,
    from_channel_last,
    loss_dtype,
    mse,
    project_codes,
    project_in,
)
from fastvq.ops._backends import pick_backend
from fastvq.ops._validate import (
    check_floating,
    check_index_tensor,
    check_int,
    check_no_tangent,
    check_real,
)
from fastvq.ops.quantize import _quantize_fwd, straight_through


def attach_gradient(z: torch.Tensor, q: torch.Tensor, grad: str) -> torch.Tensor:
    """q (..., D) with the value of q and the gradient estimator `grad` towards z (..., D).

    "ste": dL/dz = dL/dq. "rotation": the rotation trick, computed by fastvq.quantize's fused
    estimator with q as a one-row-per-vector codebook (indices 0..N-1), so no D x D matrix is
    built. q itself receives no gradient (fixed codebooks).
    """
    q = q.detach().to(z.dtype)
    if grad == "ste":
        return straight_through(z, q)
    check_no_tangent("the rotation trick", z)
    d = z.shape[-1]
    z2, q2 = z.reshape(-1, d).contiguous(), q.reshape(-1, d).contiguous()
    rows = torch.arange(z2.shape[0], device=z.device)
    use_triton = pick_backend("auto", z.device, z.dtype) == "triton"
    out, _ = _quantize_fwd(z2, q2, rows, "rotation", use_triton)
    return out.view(z.shape)


class _ShellQuantize(nn.Module):
    """Shared body of LeechQuantize and E8Quantize; subclasses set the shell."""

    shell_dim: int
    shell_size: int
    name: str

    def __init__(
        self,
        dim: int | None = None,
        codebook_size: int | None = None,
        codebook_dim: int | None = None,
        commitment_weight: float = 1.0,
        rotation_trick: bool = False,
        accept_image_fmap: bool = False,
        channel_last: bool = True,
        projection_has_bias: bool = True,
    ):
        super().__init__()
        self.dim = self.shell_dim if dim is None else check_int("dim", dim)
        if (
            codebook_size is not None
            and check_int("codebook_size", codebook_size) != self.shell_size
        ):
            raise ValueError(
                f"codebook_size of {self.name} is fixed at {self.shell_size}, got {codebook_size}"
            )
        if codebook_dim is not None and codebook_dim != self.shell_dim:
            raise ValueError(
                f"codebook_dim of {self.name} is fixed at {self.shell_dim} (a lattice codebook); "
                f"got {codebook_dim}: set dim for a projection instead"
            )
        self.codebook_size = self.shell_size
        self.codebook_dim = self.shell_dim
        self.commitment_weight = check_real("commitment_weight", commitment_weight, 0.0)
        self.rotation_trick = rotation_trick
        self.accept_image_fmap = accept_image_fmap
        self.channel_last = channel_last
        self.has_projections = self.dim != self.shell_dim
        d, k, bias = self.dim, self.shell_dim, projection_has_bias
        self.project_in = nn.Linear(d, k, bias=bias) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(k, d, bias=bias) if self.has_projections else nn.Identity()
        # Follows .to(device) where the module has no parameters (no projections).
        self.register_buffer("_anchor", torch.empty(0), persistent=False)

    # subclasses: u (..., D) -> (indices (...), unit codes (..., D) in u's dtype), and
    # indices -> unit codes; _decode must trace under torch.compile without a graph break.
    def _decode(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _unit_codes(self, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    @property
    def codebook(self) -> torch.Tensor:
        """All unit codes (codebook_size, codebook_dim) float32, built on access (not stored)."""
        return self._unit_codes(
            torch.arange(self.shell_size, device=self._anchor.device), torch.float32
        )

    def _layout(self, x):
        """-> (b, n, dim) and a function restoring outputs / indices to the input's layout."""
        check_floating("x", x)
        if self.accept_image_fmap:
            if x.dim() != 4:
                raise ValueError(f"accept_image_fmap needs x (b, c, h, w), got {tuple(x.shape)}")
            spatial = tuple(x.shape[2:])
            x = x.flatten(2).transpose(1, 2)
            return x, lambda y, feat: from_channel_last(y, spatial, channel_first=feat)
        if not self.channel_last:
            if x.dim() != 3:
                raise ValueError(f"channel_last=False needs x (b, dim, n), got {tuple(x.shape)}")
            return x.transpose(1, 2), lambda y, feat: y.transpose(1, 2) if feat else y
        return x, lambda y, feat: y

    def extra_repr(self) -> str:
        return describe(self, "dim", "codebook_size", "rotation_trick", "commitment_weight")

    def forward(self, x: torch.Tensor):
        """x: (b, n, dim) (or (b, dim, n) with channel_last=False, (b, dim, h, w) with
        accept_image_fmap), float32 / bf16 / fp16 / float64 (with a projection, dim != the
        lattice's, the projection's dtype or autocast: TypeError otherwise, as for any
        nn.Linear). Returns quantized (x's shape and
        dtype), indices (b, n) or (b, h, w) int64 in [0, codebook_size), and the commitment
        loss commitment_weight * mse(u, sg(code)) (0-d; 0 in eval). A row holding NaN or Inf
        is not checked: it gets code 0, and the loss (in training) and its gradient are NaN."""
        x, restore = self._layout(x)
        check_input("x", x, self.dim)
        z = project_in("x", self.project_in, x)
        # A zero row (fp16 padding) stays 0, never NaN. Rows of any magnitude keep their
        # direction, which is all the shells decode (unit_rows).
        u = unit_rows(z.to(torch.promote_types(z.dtype, torch.float32))).to(z.dtype)
        indices, q = self._decode(u.detach())
        loss = u.new_zeros((), dtype=loss_dtype(u.dtype))
        if self.training and self.commitment_weight > 0:
            loss = mse(u, q) * self.commitment_weight
        out = attach_gradient(u, q, "rotation" if self.rotation_trick else "ste")
        out = self.project_out(out)
        return restore(out, True), restore(indices, False), loss

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Unit codes (..., codebook_dim) float32 for indices (...)."""
        check_index_tensor("indices", indices)
        return self._unit_codes(indices, torch.float32)

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """What forward returns as quantized for these indices ((b, n) -> (b, n, dim), or
        the input's channel-first layout)."""
        check_index_tensor("indices", indices)
        w = next(iter(self.project_out.parameters()), None)  # decoded in its dtype: float64 too
        codes = self._unit_codes(indices, torch.float32 if w is None else w.dtype)
        out = project_codes(self.project_out, codes)
        if self.accept_image_fmap or not self.channel_last:
            out = out.movedim(-1, 1)
        return out


class LeechQuantize(_ShellQuantize):
    """Spherical Leech quantization (Lambda24-SQ): the 196,560 minimal vectors of the Leech
    lattice, normalized, as a fixed codebook (no codebook parameters, no codebook loss).

    LeechQuantize(dim=None, codebook_size=None, codebook_dim=None, commitment_weight=1.,
    rotation_trick=False, accept_image_fmap=False, channel_last=True, projection_has_bias=True):
    dim != 24 adds Linear projections dim -> 24 -> dim (trained through the estimator);
    codebook_size / codebook_dim may only repeat the fixed 196560 / 24 (ValueError otherwise).
    The code for u = z / |z| is argmax_k <u, c_k> (fastvq.lattice.leech_quantize, structured
    decoder, ties to the lowest index); the gradient is straight-through on u, or the rotation
    trick (rotation_trick=True). forward -> (quantized, indices, commitment loss).
    The Lambda24-SQ post trains without a commitment loss ("thanks to the non-parametric nature,
    the commitment loss is gone too"): commitment_weight=0 is that recipe (configs/leech.yaml);
    the default 1.0 is VectorQuantize's.
    """

    shell_dim, shell_size, name = 24, LEECH_SIZE, "LeechQuantize"

    def _decode(self, u):
        return leech_quantize(u)

    def _unit_codes(self, indices, dtype):
        return leech_codes(indices, dtype)


class E8Quantize(_ShellQuantize):
    """The 240 minimal vectors of E8, normalized, as a fixed codebook in 8-d.

    Same arguments and behaviour as LeechQuantize with 8 / 240 in place of 24 / 196560
    (fastvq.lattice.e8_shell_quantize decodes).
    """

    shell_dim, shell_size, name = 8, E8_SHELL_SIZE, "E8Quantize"

    def _decode(self, u):
        indices, codes = e8_shell_quantize(u)
        return indices, _unit(codes, u.dtype)

    def _unit_codes(self, indices, dtype):
        return _unit(e8_shell_codes(indices), dtype)


def _unit(codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Shell vectors (squared norm 2, exact in every dtype) -> unit vectors in `dtype`, divided in
    float32 (float64 for float64) and rounded once."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return (codes.to(acc) / math.sqrt(2)).to(dtype)
