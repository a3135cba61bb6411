"""Quantizers over projected codebooks: SimVQ (a frozen random codebook through a learned map)
and RandomProjectionQuantizer (BEST-RQ: a frozen random projection onto a frozen codebook).

Both search with fastvq.nearest_code / fastvq.quantize, so no N x K distance matrix is built
(the peer's SimVQ calls torch.cdist; its RandomProjectionQuantizer keeps all distances).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastvq.nn.scalar import check_input, describe, from_channel_last, mse
from fastvq.ops._backends import autocast_off
from fastvq.ops._validate import (
    check_floating,
    check_index_range,
    check_index_tensor,
    check_int,
    check_real,
)
from fastvq.ops.nearest_code import nearest_code
from fastvq.ops.quantize import quantize

# Rows of logits per chunk of the cross-entropy: chunk x K float32 stays <= 16 MiB.
_CE_ELEMENTS = 1 << 22


def _pack(x: torch.Tensor, channel_first: bool):
    """(b, ..., d) or channel-first (b, d, ...) -> ((b, n, d), undo(y, features))."""
    check_floating("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dimensions, got {tuple(x.shape)}")
    if channel_first:
        spatial = tuple(x.shape[2:])
        x = x.movedim(1, -1).reshape(x.shape[0], math.prod(spatial), x.shape[1])
        return x, lambda y, feat: from_channel_last(y, spatial, channel_first=feat)
    lead = tuple(x.shape[1:-1])
    x3 = x.reshape(x.shape[0], math.prod(lead), x.shape[-1])
    return x3, lambda y, feat: y.reshape(y.shape[0], *lead, *y.shape[2:])


class SimVQ(nn.Module):
    """SimVQ (Zhu et al. 2024), vector-quantize-pytorch's SimVQ.

    The codebook is implicit: code_transform(frozen_codebook), a frozen Gaussian codebook
    (codebook_size, frozen_codebook_dim) * frozen_codebook_dim^-1/2 through a learned map
    (default Linear(frozen_codebook_dim, dim, bias=False); pass any Module, e.g. a small MLP).
    forward(x) -> (quantized, indices, loss). x: (b, ..., dim), or (b, dim, ...) with
    channel_first; indices (b, ...) int64 (nearest code in l2, fastvq.quantize);
    loss = commitment_weight * (mse(sg(x), q) + input_to_quantize_commit_loss_weight *
    mse(x, sg(q))). The output carries the rotation trick (rotation_trick=True) or
    straight-through gradient to x and no gradient to the codebook: the transform learns
    through the loss only, as in the peer. The loss is computed in eval() too (the peer's is;
    every other fastvq.nn layer returns 0 there).

    Differences from the peer: the search never builds the N x K distances; quantized is cast
    to x's dtype (bf16 x with a float32 transform works; the peer's cdist raises); the
    forward value is the code exactly (the peer's rotated value differs by rounding).
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_transform: nn.Module | None = None,
        init_fn=None,
        channel_first: bool = False,
        rotation_trick: bool = True,
        input_to_quantize_commit_loss_weight: float = 0.25,
        commitment_weight: float = 1.0,
        frozen_codebook_dim: int | None = None,
    ):
        super().__init__()
        self.dim = check_int("dim", dim)
        self.codebook_size = check_int("codebook_size", codebook_size)
        frozen_dim = self.dim if frozen_codebook_dim is None else frozen_codebook_dim
        frozen_dim = check_int("frozen_codebook_dim", frozen_dim)
        codebook = torch.randn(self.codebook_size, frozen_dim) * frozen_dim**-0.5
        if init_fn is not None:
            if not callable(init_fn):
                raise TypeError(f"init_fn must be callable, got {type(init_fn).__name__}")
            shape = tuple(codebook.shape)
            codebook = init_fn(codebook)
            check_floating("init_fn's result", codebook)
            if codebook.shape != shape:
                raise ValueError(
                    f"init_fn must return a codebook of shape {shape} (codebook_size, "
                    f"frozen_codebook_dim), got {tuple(codebook.shape)}"
                )
        self.register_buffer("frozen_codebook", codebook)
        if codebook_transform is None:
            codebook_transform = nn.Linear(frozen_dim, self.dim, bias=False)
        if not callable(codebook_transform):
            raise TypeError(
                "codebook_transform must be an nn.Module mapping (K, frozen_codebook_dim) to "
                f"(K, dim), got {type(codebook_transform).__name__}"
            )
        self.code_transform = codebook_transform
        self.channel_first = channel_first
        self.rotation_trick = rotation_trick
        self.input_to_quantize_commit_loss_weight = check_real(
            "input_to_quantize_commit_loss_weight", input_to_quantize_commit_loss_weight, 0.0
        )
        self.commitment_weight = check_real("commitment_weight", commitment_weight, 0.0)

    @property
    def codebook(self) -> torch.Tensor:
        """The implicit codebook (codebook_size, dim), differentiable in the transform; float32
        under autocast too, as every fastvq.nn codebook."""
        with autocast_off(self.frozen_codebook.device.type):
            codes = self.code_transform(self.frozen_codebook)
        if codes.shape != (self.codebook_size, self.dim):
            raise ValueError(
                f"codebook_transform must map (K, frozen_codebook_dim) to (K, {self.dim}), "
                f"got {tuple(codes.shape)}"
            )
        return codes

    def extra_repr(self) -> str:
        return describe(self, "dim", "codebook_size", "rotation_trick", "commitment_weight")

    def forward(self, x: torch.Tensor, *, check_inputs_finite: bool = True):
        """check_inputs_finite=False skips the NaN / Inf check of x and the codebook (its one
        host sync), as in fastvq.quantize."""
        x, restore = _pack(x, self.channel_first)
        check_input("x", x, self.dim)
        codebook = self.codebook
        grad = "rotation" if self.rotation_trick else "ste"
        out, indices = quantize(
            x, codebook.detach(), grad=grad, check_inputs_finite=check_inputs_finite
        )
        # F.embedding, not codebook[indices]: indexing's backward on CPU adds rows with
        # unordered atomics, so the transform's gradient changed from run to run.
        q = F.embedding(indices, codebook)
        loss = mse(x.detach().to(q.dtype), q) + self.input_to_quantize_commit_loss_weight * mse(
            x.to(q.dtype), q.detach()
        )
        return (
            restore(out.to(x.dtype), True),
            restore(indices, False),
            loss * self.commitment_weight,
        )

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes (b, ..., dim) (channel-first (b, dim, ...) with channel_first) for (b, ...)."""
        check_index_tensor("indices", indices, self.codebook.device)
        check_index_range("indices", indices, 0, self.codebook_size)
        codes = self._codes(indices)
        return codes.movedim(-1, 1) if self.channel_first else codes

    def _codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(..., dim) codes of indices in range, unchecked (ResidualSimVQ checks its stack once)."""
        # int64: a uint8 tensor would index as a boolean mask
        return self.code_transform(self.frozen_codebook[indices.long()])

    get_output_from_indices = indices_to_codes


def _ce_chunk(u, codebook, target):
    logits = u @ codebook.T
    return F.cross_entropy(logits, target, ignore_index=-1, reduction="sum")


class RandomProjectionQuantizer(nn.Module):
    """BEST-RQ's random-projection quantizer (Chiu et al. 2022), vector-quantize-pytorch's.

    Nothing is trained: x -> LayerNorm without affine (norm=True) -> a frozen Xavier-normal
    projection per codebook (num_codebooks, dim, codebook_dim) -> the nearest of codebook_size
    frozen unit codes by cosine similarity (fastvq.nearest_code). forward(x) with x (b, n, dim)
    returns indices (b, n) int64, or (b, n, num_codebooks) when num_codebooks > 1.
    forward(x, indices) returns the cross-entropy of the cosine similarities against `indices`
    (-1 ignored), as the peer, computed in row chunks (with recomputation in the backward) so
    the N x K logits never exist at once; with every target -1 it is 0 (the peer's mean over no
    targets: NaN).

    The peer's extra keyword arguments (forwarded to its VectorQuantize) raise a ValueError: its
    quantizer always runs in eval mode with a cosine codebook, which is all this class does.
    Difference from the peer: with num_codebooks > 1 the peer's VectorQuantize adds an
    untrained Linear(h * e, h * h * e) and codebooks of dimension h * e, so no head sees its own
    projection alone; fastvq keeps one projection and one e-dimensional codebook per head
    (BEST-RQ's multi-codebook form). num_codebooks = 1 matches the peer.
    Buffers: rand_projs (num_codebooks, dim, codebook_dim), codebook (num_codebooks, K,
    codebook_dim) with unit rows (the peer's vq._codebook.embed).
    """

    def __init__(
        self,
        *,
        dim: int,
        codebook_size: int,
        codebook_dim: int,
        num_codebooks: int = 1,
        norm: bool = True,
        **vq_kwargs,
    ):
        super().__init__()
        if vq_kwargs:
            raise ValueError(
                f"{sorted(vq_kwargs)} not supported by fastvq.nn.RandomProjectionQuantizer: the "
                "peer forwards them to a VectorQuantize that is never trained"
            )
        self.dim = check_int("dim", dim)
        self.codebook_size = check_int("codebook_size", codebook_size)
        self.codebook_dim = check_int("codebook_dim", codebook_dim)
        self.num_codebooks = check_int("num_codebooks", num_codebooks)
        projs = torch.empty(self.num_codebooks, self.dim, self.codebook_dim)
        nn.init.xavier_normal_(projs)
        self.register_buffer("rand_projs", projs)
        codes = torch.empty(self.num_codebooks, self.codebook_size, self.codebook_dim)
        nn.init.kaiming_uniform_(codes)
        self.register_buffer("codebook", F.normalize(codes, dim=-1))
        self.norm = nn.LayerNorm(self.dim, elementwise_affine=False) if norm else nn.Identity()
        self._register_load_state_dict_pre_hook(_peer_rpq_keys)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        check_floating("x", x)
        if x.dim() != 3:
            raise ValueError(f"x must be (b, n, dim), got shape {tuple(x.shape)}")
        check_input("x", x, self.dim)
        x = self.norm(x)
        return torch.einsum("bnd,hde->bnhe", x, self.rand_projs.to(x.dtype))

    def forward(self, x: torch.Tensor, indices: torch.Tensor | None = None):
        z = self._project(x)
        if indices is not None:
            return self._cross_entropy(z, indices)
        out = torch.stack(
            [
                nearest_code(z[:, :, h], self.codebook[h], metric="cosine")
                for h in range(self.num_codebooks)
            ],
            dim=-1,
        )
        return out if self.num_codebooks > 1 else out.squeeze(-1)

    def _cross_entropy(self, z: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        check_index_tensor("indices", indices)
        expect = z.shape[:2] if self.num_codebooks == 1 else z.shape[:3]
        if indices.shape != expect:
            raise ValueError(f"indices must have shape {tuple(expect)}, got {tuple(indices.shape)}")
        check_index_range("indices", indices, -1, self.codebook_size, " (-1: ignored)")
        target = indices.reshape(*z.shape[:2], -1).long()
        u = F.normalize(z, dim=-1)
        rows = max(1, _CE_ELEMENTS // self.codebook_size)
        total = z.new_zeros((), dtype=torch.float32)
        for h in range(self.num_codebooks):
            uh, th = u[:, :, h].reshape(-1, self.codebook_dim), target[..., h].reshape(-1)
            cb = self.codebook[h].to(u.dtype)
            # Traced (torch.compile, torch.export), one chunk: a loop over the rows would
            # specialize N (a recompile per batch size, an export error with a dynamic batch).
            # The price is the N x K logits at once, as the peer's.
            n = uh.shape[0]
            step, starts = (n, (0,)) if torch.compiler.is_compiling() else (rows, range(0, n, rows))
            for s in starts:
                args = (uh[s : s + step], cb, th[s : s + step])
                if torch.is_grad_enabled() and uh.requires_grad:
                    part = checkpoint(_ce_chunk, *args, use_reentrant=False)
                else:
                    part = _ce_chunk(*args)
                total = total + part.float()
        count = (target != -1).sum().clamp(min=1)
        return total / count


def _peer_rpq_keys(state_dict, prefix, *args, **kwargs) -> None:
    """Load vector-quantize-pytorch's RandomProjectionQuantizer state dicts (num_codebooks = 1;
    with more, its layout differs): its vq._codebook.embed is this codebook, and the EMA
    statistics of its never-trained VectorQuantize are dropped."""
    peer = prefix + "vq._codebook."
    if peer + "embed" in state_dict and prefix + "codebook" not in state_dict:
        state_dict[prefix + "codebook"] = state_dict.pop(peer + "embed")
        for name in ("initted", "cluster_size", "embed_avg"):
            state_dict.pop(peer + name, None)
