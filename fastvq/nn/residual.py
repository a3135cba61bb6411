"""Residual quantizers: ResidualVQ, ResidualFSQ, ResidualLFQ, ResidualSimVQ and the grouped forms
of the first three, drop-ins for vector-quantize-pytorch 1.32.0's classes of the same names (same
constructor arguments, forward arguments and return tuples).

One mechanism (_Residual) serves all four: project in, then Q layers each quantize what the
previous ones left (residual = residual - sg(q_l)), the outputs add up, project out. Quantize
dropout (SoundStream / Encodec): in training a random layer r in [cutoff, Q) (rounded up to a
multiple) ends the chain; later layers give index -1 and loss 0. The random index comes from a
seed drawn with torch's generator and summed over ranks, as the peer does, so every rank of a
DDP job drops the same layers. Subclasses only say how one layer quantizes and how indices map
back to codes. _Grouped splits the feature axis into groups, one residual stack each.

torch.compile: the stacks compile with fullgraph=True (training included, ResidualVQ's beam
search too); with quantize dropout the dropout draw is a graph break (host RNG), and the graph
specializes on the layer it picks.

ResidualVQ beam search (the peer's beam_size, eval_beam_size, beam_score_quantizer_weights and
forward(beam_size=); beam_size > 1 searches, 1 or None is the greedy chain): every kept path's
residual takes its layer's k = min(beam_size, codebook_size) nearest codes
(VectorQuantize.forward(topk=)'s search, Gumbel top-k under stochastic_sample_codes in training),
path scores add -loss * beam_score_quantizer_weights[l] (loss: the layer's per-candidate
commitment loss, as its topk forward returns it), the best beam_size paths survive each layer
and the best one the last layer that runs (quantize dropout's last layer included). Candidates are
scored without gradients (O(N beam^2) numbers, codes gathered in row chunks); only the kept pairs
go through the estimator and the loss, so memory stays O(N beam D), never N x K. Returns what
the peer returns: the best path's quantized output, indices (-1 at masked rows and dropped
layers) and per-layer losses = that path's candidate losses averaged over (unmasked) rows, in
eval as well. After the search, in training, each layer that ran takes its EMA / dead-code step
on the best path's residuals and codes (masked rows left out).

Returns: ResidualVQ / ResidualLFQ -> (quantized, indices (..., Q) int64, losses (Q,) float32
[, all_codes (Q, ..., codebook_dim)]); ResidualFSQ -> (quantized, indices[, all_codes]);
grouped forms stack indices (G, ..., Q) and losses (G, Q); their all_codes is the peer's tuple
of the G groups' (Q, ...) codes.

Deliberate differences from the peer (tested as fastvq's behaviour):
- shared_codebook: every layer searches the same codebook, and the step ends with ONE EMA update
  (and one dead-code check) over all layers' residuals together. The peer decays the shared
  statistics once per layer (decay^Q per step, later layers weighted more) and also checks
  dead codes after every layer.
- accept_image_fmap / accept_3d_fmap / channel_last=False work (with projections too): the
  layout is converted once around the stack, indices are (b, *spatial, Q). The peer's
  ResidualVQ raises a shape error for these layouts, and its ResidualFSQ with is_channel_first
  returns indices (b, Q, *spatial); fastvq's are (b, *spatial, Q) everywhere, the layout
  get_codes_from_indices takes.
- The residual chain runs in float32 (under bf16 autocast and in a module cast to bf16 / fp16
  too, whose VectorQuantize layers keep float32 EMA statistics); quantized is cast back to the
  projection's output dtype.
- get_codes_from_indices accepts fewer than Q trailing indices (coarse codes) without
  quantize_dropout, and returns codes in x's layout channel-last (Q, b, *spatial, d);
  get_output_from_indices returns what forward returns (x's layout) at unmasked rows; a masked
  row (index -1) decodes to project_out(0) (the projection's bias), as the peer's.
- ResidualLFQ.get_codes_from_indices with spherical=True returns the normalized codes the
  forward uses (the peer reads its layers' unnormalized `codebook` buffers there).
- Beam search: after the search every layer that ran updates its EMA / dead codes; the peer's
  update reaches layer 0 only (its final t[..., 0, :] picks layer 0 of the saved residuals, and
  the zip over layers stops there). freeze_codebook=True also freezes the post-search update
  (the peer ignores it there). kmeans_init works (the peer's init on the beams' 4-d input fails
  for batch > 1): each layer clusters its inputs of every beam. With commitment_weight 0 in
  training, paths are ranked by the unweighted MSE (the peer's scores are then all 0, an
  arbitrary pick). Equal path scores keep the lower (beam, rank) (torch.topk's choice is
  unspecified). A shared codebook takes one update over all layers' chosen rows (as without
  beam search). orthogonal_reg_active_codes_only counts the kept candidates' codes. beam_size
  and eval_beam_size are ints <= 128 (fastvq.nearest_code's top-k limit).
- ResidualVQ in training: return_all_codes gives the codes the layers quantized with (the peer
  looks the indices up in the codebooks its EMA / dead-code step has just moved, so they do not
  sum to quantized), and freeze_codebook=True given to the constructor freezes every layer
  unless forward's freeze_codebook says otherwise (the peer's forward default False overrides
  it).
- Not supported (ValueError): heads > 1 (the peer asserts too), implicit_neural_codebook, diveq,
  forward's indices (cross-entropy to given codes), num_codebooks > 1 inside a residual FSQ / LFQ
  layer.
"""

import contextlib
import math
import numbers
import random
from collections import namedtuple

import torch
import torch.nn.functional as F
from torch import nn

from fastvq.nn._constants import ConstantBuffers
from fastvq.nn.projected import SimVQ
from fastvq.nn.scalar import (
    FSQ,
    LFQ,
    check_input,
    check_mask,
    describe,
    from_channel_last,
    project_codes,
    project_in,
)
from fastvq.nn.vector_quantize import (
    VectorQuantize,
    _candidate_mse,
    _is_distributed,
    _l2norm,
    _snapshot,
    check_finite_on_every_rank,
    eager_only,
    refuse_recomputation,
)
from fastvq.ops._backends import autocast_off
from fastvq.ops._validate import (
    check_floating,
    check_index_tensor,
    check_int,
    check_positive,
    check_real,
)
from fastvq.ops.nearest_code import MAX_TOPK, nearest_code

_UNSUPPORTED_RVQ = {
    "implicit_neural_codebook": False,
    "mlp_kwargs": None,
    "diveq": False,
}


@eager_only
def sync_seed(device, high: int = 10_000) -> int:
    """The peer's get_maybe_sync_seed: a random int from torch's generator, summed over ranks so
    that every rank draws the same dropout layer."""
    seed = torch.randint(0, high, (), device=device)
    if _is_distributed():
        torch.distributed.all_reduce(seed)
    return int(seed.item())


def _clamp_values(value, d: int) -> torch.Tensor:
    """ResidualFSQ's soft_clamp_input_value: one positive finite number, or one per level."""
    value = value.tolist() if isinstance(value, torch.Tensor) else value
    values = [value] if isinstance(value, numbers.Real) else value
    if not isinstance(values, list | tuple) or len(values) not in (1, d):
        raise ValueError(
            f"soft_clamp_input_value must be a number or {d} numbers (one per level), got {value!r}"
        )
    values = [check_positive("soft_clamp_input_value", v) for v in values]
    return torch.tensor(values if len(values) > 1 else values[0], dtype=torch.float32, device="cpu")


def _frac_gradient(t: torch.Tensor, frac: float) -> torch.Tensor:
    if frac <= 0:
        return t.detach()
    return frac * t + (1.0 - frac) * t.detach()


class _Residual(ConstantBuffers):
    """Shared residual stack. Subclasses build self.layers and define _layer (one layer's
    quantization of (b, n, d) float32 rows) and _layer_codes ((m,) indices -> (m, d) codes)."""

    returns_loss = True
    dropout_needs_grad = False  # the peer's FSQ / LFQ stacks drop layers only with grad enabled

    def _setup(
        self,
        dim: int,
        codebook_dim: int,
        num_quantizers: int,
        quantize_dropout: bool,
        cutoff: int,
        multiple_of: int,
        channel_first,
        bias: bool = True,
    ) -> None:
        self.dim, self.codebook_dim = dim, codebook_dim
        self.num_quantizers = num_quantizers
        self.has_projections = dim != codebook_dim
        proj = self.has_projections
        self.project_in = nn.Linear(dim, codebook_dim, bias=bias) if proj else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim, bias=bias) if proj else nn.Identity()
        self.quantize_dropout = bool(quantize_dropout) and num_quantizers > 1
        self.quantize_dropout_cutoff_index = check_int("quantize_dropout_cutoff_index", cutoff, 0)
        if self.quantize_dropout and cutoff >= num_quantizers:
            raise ValueError(
                f"quantize_dropout_cutoff_index must be < num_quantizers = {num_quantizers}, "
                f"got {cutoff}"
            )
        self.quantize_dropout_multiple_of = check_int("quantize_dropout_multiple_of", multiple_of)
        # True: (b, d, *spatial); False: (b, ..., d); None: channel-first when x.ndim >= 4.
        self.channel_first = channel_first

    # --- layout ----------------------------------------------------------------------------------

    def _check_layout(self, x: torch.Tensor) -> bool:
        """ValueError for a wrong rank or feature size; returns whether x is channel-first."""
        first = x.dim() >= 4 if self.channel_first is None else self.channel_first
        if x.dim() < (3 if first else 2):
            layout = "(b, dim, ...)" if first else "(b, ..., dim)"
            raise ValueError(f"x must be {layout} with dim = {self.dim}, got {tuple(x.shape)}")
        if x.shape[1 if first else -1] != self.dim:
            axis = "1 (channel-first)" if first else "-1"
            raise ValueError(
                f"x's feature dimension (axis {axis}) must be dim = {self.dim}, got "
                f"{tuple(x.shape)}"
            )
        return first

    def _to_seq(self, x: torch.Tensor):
        """x -> (b, n, dim) and restore(y (b, n, ...), features) to x's layout."""
        check_floating("x", x)
        if self._check_layout(x):
            spatial = tuple(x.shape[2:])
            # math.prod, not -1: an empty batch has no size to infer
            seq = x.movedim(1, -1).reshape(x.shape[0], math.prod(spatial), x.shape[1])
            return seq, lambda y, feat: from_channel_last(y, spatial, channel_first=feat)
        lead = tuple(x.shape[1:-1])
        seq = x.reshape(x.shape[0], math.prod(lead), x.shape[-1])
        return seq, lambda y, feat: y.reshape(y.shape[0], *lead, *y.shape[2:])

    # --- forward -------------------------------------------------------------------------------

    def _dropout_active(self) -> bool:
        grad_ok = torch.is_grad_enabled() or not self.dropout_needs_grad
        return bool(self.training and self.quantize_dropout and grad_ok)

    @eager_only
    def _dropout_index(self, device, seed) -> int:
        """The last layer that runs this step. Host RNG (and an all-reduce under DDP): eager, a
        graph break under torch.compile, which specializes on the index it returns."""
        seed = sync_seed(device) if seed is None else seed
        index = random.Random(seed).randrange(
            self.quantize_dropout_cutoff_index, self.num_quantizers
        )
        m = self.quantize_dropout_multiple_of
        if m != 1:
            index = math.ceil((index + 1) / m) * m - 1
        # A multiple past the stack (m not dividing Q) keeps every layer, as in the peer.
        return min(index, self.num_quantizers - 1)

    def _prepare(self, z: torch.Tensor) -> torch.Tensor:
        """Hook on the projected rows before the first layer (ResidualFSQ's soft clamp)."""
        return z

    def _begin(self, x, mask, seed):
        """A forward's (b, n, dim) rows, their restore function, the projected rows, the last
        layer that runs (None: all; quantize dropout draws it) and the (b, n) mask (or None)."""
        seq, restore = self._to_seq(x)
        b, n = seq.shape[:2]
        if mask is not None:
            check_mask(mask, (b, n), seq.device)
        z = project_in("x", self.project_in, seq)
        if seed is not None:  # else random.Random takes True, 3.5 or "1" as seeds
            seed = check_int("rand_quantize_dropout_fixed_seed", seed, 0)
        last = self._dropout_index(seq.device, seed) if self._dropout_active() else None
        return seq, restore, z, last, mask

    def _run(self, begun, return_all_codes, quant_grad_frac=0.0, checked=False, **layer_kwargs):
        """begun: _begin's tuple; checked: the stack's rows and codebooks were checked for NaN /
        Inf (ResidualVQ's one check), so its layers skip their own checks."""
        seq, restore, z, last, mask = begun
        b, n = seq.shape[:2]
        out_dtype = z.dtype
        with autocast_off(seq.device.type):
            residual = self._prepare(z.float())
            if checked:
                layer_kwargs = {**layer_kwargs, "check_inputs_finite": False}
            out = torch.zeros_like(residual)
            indices, losses, codes = [], [], []
            for q_index in range(self.num_quantizers):
                if last is not None and q_index > last:
                    indices.append(torch.full((b, n), -1, dtype=torch.long, device=seq.device))
                    losses.append(residual.new_zeros(()))
                    codes.append(None)
                    continue
                q, idx, loss = self._layer(q_index, residual, mask, **layer_kwargs)
                q = q.float()
                residual = residual - _frac_gradient(q, quant_grad_frac)
                out = out + q
                indices.append(idx.long())
                losses.append(loss.float())
                codes.append(q.detach() if return_all_codes else None)
        quantized = self.project_out(out.to(out_dtype))
        quantized = self._finish(quantized, seq, mask)
        indices = torch.stack(indices, dim=-1)
        ret = [restore(quantized, True), restore(indices, False)]
        if self.returns_loss:
            ret.append(torch.stack(losses))
        if return_all_codes:
            codes = self._all_codes(indices, codes)  # (Q, b, n, d)
            ret.append(torch.stack([restore(c, False) for c in codes]))
        return tuple(ret)

    def _all_codes(self, indices, codes):
        """return_all_codes' (Q, b, n, d) codes of a forward's (b, n, Q) indices, given each
        layer's (b, n, d) output value (None where the layer was dropped)."""
        return self._codes_seq(indices)

    def _finish(self, quantized, seq, mask):
        return quantized

    def extra_repr(self) -> str:
        return describe(self, "dim", "num_quantizers", "quantize_dropout")

    def forward(
        self,
        x: torch.Tensor,
        return_all_codes: bool = False,
        rand_quantize_dropout_fixed_seed: int | None = None,
    ):
        """The stacks without a mask (ResidualFSQ, ResidualSimVQ); the others override it."""
        return self._run(self._begin(x, None, rand_quantize_dropout_fixed_seed), return_all_codes)

    # --- indices -> codes ----------------------------------------------------------------------

    def _codes_seq(self, indices: torch.Tensor) -> torch.Tensor:
        """(b, m, q) indices, q <= Q, -1 for dropped -> (Q, b, m, codebook_dim) float32 codes."""
        check_index_tensor("indices", indices)
        q = indices.shape[-1]
        if q > self.num_quantizers:
            raise ValueError(
                f"indices' last dimension must be at most num_quantizers = "
                f"{self.num_quantizers}, got shape {tuple(indices.shape)}"
            )
        if indices.numel() and not torch.compiler.is_compiling():  # one host sync for the stack
            # Each layer against its own size: ResidualVQ's may differ ((4, 32): layer 1's codes
            # 4 ... 31 are valid, layer 0's are not).
            flat = indices.reshape(-1, q).long()
            lows, highs = torch.stack([flat.amin(0), flat.amax(0)]).tolist()
            sizes = getattr(self, "codebook_sizes", None) or [self.codebook_size] * q
            for layer, (lo, hi, k) in enumerate(zip(lows, highs, sizes[:q], strict=True)):
                if lo < -1 or hi >= k:  # -1 alone marks a dropped layer
                    raise ValueError(
                        f"indices must lie in [-1, {k}) (-1: a dropped layer), got values from "
                        f"{lo} to {hi} (layer {layer})"
                    )
        indices = F.pad(indices.long(), (0, self.num_quantizers - q), value=-1)
        codes = []
        for layer_index in range(self.num_quantizers):
            idx = indices[..., layer_index]
            valid = idx >= 0
            c = self._layer_codes(layer_index, idx.clamp(min=0).reshape(-1)).float()
            c = c.reshape(*idx.shape, c.shape[-1]) * valid[..., None]
            codes.append(c)
        return torch.stack(codes)

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (b, *spatial, q) as forward returns them (q <= num_quantizers; -1 or missing
        trailing layers give zero codes) -> (Q, b, *spatial, codebook_dim) float32."""
        check_index_tensor("indices", indices)
        if indices.dim() < 2:
            raise ValueError(f"indices must be (b, ..., q), got shape {tuple(indices.shape)}")
        flat = indices.reshape(indices.shape[0], math.prod(indices.shape[1:-1]), indices.shape[-1])
        codes = self._codes_seq(flat)
        return codes.reshape(codes.shape[0], *indices.shape[:-1], codes.shape[-1])

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """project_out(sum of the layers' codes), in the layout forward returns quantized."""
        codes = self.get_codes_from_indices(indices).sum(0)
        out = project_codes(self.project_out, codes)
        first = indices.dim() >= 4 if self.channel_first is None else self.channel_first
        return out.movedim(-1, 1) if first and out.dim() >= 3 else out


class ResidualVQ(_Residual):
    """Residual VQ (SoundStream, Algorithm 1) over fastvq.nn.VectorQuantize layers.

    ResidualVQ(*, dim, num_quantizers, codebook_size (int or one per layer), codebook_dim=None,
    shared_codebook=False, heads=1, quantize_dropout=False, quantize_dropout_cutoff_index=0,
    quantize_dropout_multiple_of=1, accept_image_fmap=False, quant_grad_frac=0.,
    return_zeros_for_masked_padding=True, beam_size=None, eval_beam_size=None (default
    beam_size), beam_score_quantizer_weights=None (Q floats, default 1), **vq_kwargs) with
    vq_kwargs any VectorQuantize argument (decay, commitment_weight, kmeans_init,
    threshold_ema_dead_code, use_cosine_sim, rotation_trick, sync_codebook, channel_last,
    accept_3d_fmap, ...). Beam search: see the module docstring.

    forward(x, mask=None, indices=None (the peer's cross-entropy targets: not supported, must be
    None), return_all_codes=False, sample_codebook_temp=None, freeze_codebook=None (each
    layer's own, given to the constructor), beam_size=None (default beam_size in training,
    eval_beam_size in eval), rand_quantize_dropout_fixed_seed=None) -> (quantized (x's shape),
    indices (b, *spatial, Q) int64 (-1: dropped layer or masked padding), losses (Q,) float32
    [, all_codes (Q, b, *spatial, codebook_dim)]). x: (b, n, dim), (b, dim) or, channel-first,
    (b, dim, n) / (b, dim, h, w) / (b, dim, t, h, w) with channel_last=False /
    accept_image_fmap / accept_3d_fmap. mask: (b, n) bool, True at valid positions.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_quantizers: int | None = None,
        codebook_size,
        codebook_dim: int | None = None,
        shared_codebook: bool = False,
        heads: int = 1,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        accept_image_fmap: bool = False,
        quant_grad_frac: float = 0.0,
        return_zeros_for_masked_padding: bool = True,
        beam_size: int | None = None,
        eval_beam_size: int | None = None,
        beam_score_quantizer_weights=None,
        **vq_kwargs,
    ):
        super().__init__()
        for name, default in _UNSUPPORTED_RVQ.items():
            if name in vq_kwargs and vq_kwargs.pop(name) not in (default, {}, [], ()):
                raise ValueError(f"{name} is not supported by fastvq.nn.ResidualVQ")
        if heads != 1:
            raise ValueError(f"ResidualVQ supports heads=1 only (as the peer), got heads={heads}")
        for name in ("codebook_size", "codebook_dim", "dim", "separate_codebook_per_head"):
            if name in vq_kwargs:
                raise TypeError(f"ResidualVQ got {name!r} twice")
        dim = check_int("dim", dim)
        sizes = tuple(codebook_size) if isinstance(codebook_size, (tuple, list)) else None
        if num_quantizers is None:
            if sizes is None:
                raise ValueError("ResidualVQ needs num_quantizers or a tuple of codebook_size")
            num_quantizers = len(sizes)
        num_quantizers = check_int("num_quantizers", num_quantizers)
        sizes = sizes or (codebook_size,) * num_quantizers
        if len(sizes) != num_quantizers:
            raise ValueError(
                f"codebook_size has {len(sizes)} entries for num_quantizers = {num_quantizers}"
            )
        sizes = tuple(check_int("codebook_size", k) for k in sizes)
        codebook_dim = dim if codebook_dim is None else check_int("codebook_dim", codebook_dim)
        accept_3d = vq_kwargs.pop("accept_3d_fmap", False)
        channel_last = vq_kwargs.pop("channel_last", True)
        if accept_image_fmap and accept_3d:
            raise ValueError("accept_image_fmap and accept_3d_fmap are mutually exclusive")
        self.accept_image_fmap, self.accept_3d_fmap = accept_image_fmap, accept_3d
        self._fmap_ndim = 4 if accept_image_fmap else 5 if accept_3d else None
        channel_first = bool(accept_image_fmap or accept_3d or not channel_last)
        self._setup(
            dim,
            codebook_dim,
            num_quantizers,
            quantize_dropout,
            quantize_dropout_cutoff_index,
            quantize_dropout_multiple_of,
            channel_first,
        )
        self.quant_grad_frac = check_real("quant_grad_frac", quant_grad_frac, 0.0, 1.0)
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        self.codebook_sizes = sizes
        self.uniform_codebook_size = len(set(sizes)) == 1
        self.shared_codebook = bool(shared_codebook)
        if self.shared_codebook and not self.uniform_codebook_size:
            raise ValueError("shared_codebook needs the same codebook_size for every layer")

        def make(k):
            return VectorQuantize(
                dim=codebook_dim,
                codebook_size=k,
                codebook_dim=codebook_dim,
                return_zeros_for_masked_padding=return_zeros_for_masked_padding,
                **vq_kwargs,
            )

        if self.shared_codebook:
            # One layer under every index: state dict keys layers.{i}.* as the peer's (which
            # shares its _codebook module between the layers).
            shared = make(sizes[0])
            self.layers = nn.ModuleList([shared] * num_quantizers)
        else:
            self.layers = nn.ModuleList([make(k) for k in sizes])

        # Beam search (the peer's beam_size / eval_beam_size / beam_score_quantizer_weights).
        if eval_beam_size is not None and beam_size is None:
            raise ValueError("eval_beam_size needs beam_size (as the peer)")
        self.beam_size = None if beam_size is None else _check_beam("beam_size", beam_size)
        if eval_beam_size is not None:
            eval_beam_size = _check_beam("eval_beam_size", eval_beam_size)
        self.eval_beam_size = self.beam_size if eval_beam_size is None else eval_beam_size
        if beam_score_quantizer_weights is None:
            beam_score_quantizer_weights = [1.0] * num_quantizers
        weights = torch.as_tensor(beam_score_quantizer_weights, dtype=torch.float32, device="cpu")
        if weights.shape != (num_quantizers,) or not bool(weights.isfinite().all()):
            raise ValueError(
                f"beam_score_quantizer_weights must hold num_quantizers = {num_quantizers} finite "
                f"numbers, got {beam_score_quantizer_weights!r}"
            )
        self.register_constant("beam_score_weights", weights)

    def _check_layout(self, x):
        if self._fmap_ndim is not None and x.dim() != self._fmap_ndim:
            layout = "(b, dim, h, w)" if self._fmap_ndim == 4 else "(b, dim, t, h, w)"
            raise ValueError(f"x must have shape {layout} with dim = {self.dim}, got {x.shape}")
        if self._fmap_ndim is None and x.dim() not in (2, 3):
            raise ValueError(
                f"x must be (b, n, dim), (b, dim, n) or (b, dim) (or a feature map with "
                f"accept_image_fmap / accept_3d_fmap), got shape {tuple(x.shape)}"
            )
        return super()._check_layout(x)

    @property
    def codebook_size(self) -> int:
        return self.codebook_sizes[0]

    @property
    def codebooks(self):
        """(Q, K, codebook_dim) (a tuple when the sizes differ)."""
        books = tuple(layer.codebook.detach() for layer in self.layers)
        return torch.stack(books) if self.uniform_codebook_size else books

    def init_from(
        self,
        encoder_outputs: torch.Tensor,
        iters: int | None = None,
        generator: torch.Generator | None = None,
        batches: int = 1,
    ) -> None:
        """k-means initialization from encoder outputs (..., dim), layer by layer: layer l
        clusters (VectorQuantize.init_from) what the layers before it leave of the projected
        outputs. A shared codebook is initialized once, from the first layer's input. batches:
        how many training batches the outputs hold (VectorQuantize.init_from divides the EMA
        counts by it)."""
        check_input("encoder_outputs", encoder_outputs, self.dim)
        with torch.no_grad():
            residual = project_codes(self.project_in, encoder_outputs.reshape(-1, self.dim))
            residual = residual.float()
            layers = self.layers[:1] if self.shared_codebook else self.layers
            for layer in layers:
                layer.init_from(residual, iters, generator, batches)
                codebook = layer.codebook.detach()
                idx = nearest_code(residual, codebook, metric=layer.metric, backend=layer.backend)
                residual = residual - codebook[idx]

    def _layer(
        self,
        i,
        residual,
        mask,
        sample_codebook_temp=None,
        freeze_codebook=None,
        check_inputs_finite=True,
    ):
        return self.layers[i](
            residual,
            mask=mask,
            sample_codebook_temp=sample_codebook_temp,
            freeze_codebook=freeze_codebook,
            check_inputs_finite=check_inputs_finite,
        )

    def _stack_finite(self, z, last) -> dict | None:
        """What the stack's one NaN / Inf check covers, as check_finite's keyword arguments: its
        projected input rows z and the codebook of every layer that runs, the layers' own checks
        (z, codebook) in one host sync instead of one per layer (4 per step at 4 layers).
        Residuals stay finite from finite rows and codes within the search's contract (|z|, |c|
        below about 2.6e19, fastvq.nearest_code). Checked before any layer updates its codebook,
        where a layer's own check let the layers before it update. None (the layers check, as
        before) where a layer may run its k-means init first (which names x in its own check):
        until it is known initted."""
        layers = self.layers[: self.num_quantizers if last is None else last + 1]
        for layer in layers:
            pending_init = layer.training and layer.kmeans_init and not layer._initted_known()
            if pending_init or layer.codebook_generator is not None:
                return None
        layers = layers[:1] if self.shared_codebook else layers  # one codebook under all
        # The rows are searched in float32: a widening cast keeps NaN / Inf as they are, but a
        # float64 z (float64 x without projections, a float64 module) may overflow float32.
        z = z.float() if z.dtype == torch.float64 else z
        return {"z": z, "codebook": [layer._codebooks() for layer in layers]}

    def _layer_codes(self, i, idx):
        return self.layers[i]._lookup(idx, check=False)  # _codes_seq checked the whole stack

    def _all_codes(self, indices, codes):
        # The codes the layers quantized with: in training their codebooks have moved since.
        # 0 where a layer was dropped (None; layer 0 always runs) or a row masked (index -1).
        zero = torch.zeros_like(codes[0])
        return torch.stack([
            zero if c is None else torch.where(i[..., None] >= 0, c, 0.0)
            for i, c in zip(indices.unbind(-1), codes, strict=True)
        ])  # fmt: skip

    def _finish(self, quantized, seq, mask):
        if mask is None:
            return quantized
        fill = torch.zeros_like(quantized) if self.return_zeros_for_masked_padding else seq
        return torch.where(mask[..., None], quantized, fill.to(quantized.dtype))

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        indices=None,
        return_all_codes: bool = False,
        sample_codebook_temp: float | None = None,
        freeze_codebook: bool | None = None,
        beam_size: int | None = None,
        rand_quantize_dropout_fixed_seed: int | None = None,
        *,
        check_inputs_finite: bool = True,
    ):
        """check_inputs_finite=False skips the stack's NaN / Inf check of its input and
        codebooks (one host sync per forward) and its layers' own."""
        finite, step = self._plan(
            x, mask, indices, return_all_codes, sample_codebook_temp, freeze_codebook, beam_size,
            rand_quantize_dropout_fixed_seed,
        )  # fmt: skip
        if finite is not None and check_inputs_finite:
            check_finite_on_every_rank(self._synced(), **finite)
        return self._step(step, finite is not None or not check_inputs_finite)

    def _synced(self) -> bool:
        """Whether a training step's layers join collectives (sync_codebook): the stack's check
        then stops every rank together (check_finite_on_every_rank)."""
        return self.training and any(layer._group(True) for layer in self.layers)

    def _plan(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        indices=None,
        return_all_codes: bool = False,
        sample_codebook_temp: float | None = None,
        freeze_codebook: bool | None = None,
        beam_size: int | None = None,
        rand_quantize_dropout_fixed_seed: int | None = None,
    ):
        """forward's first half (arguments, layout, projection, the dropout draw): returns
        (finite, step): the stack's NaN / Inf check as check_finite's keyword arguments (None:
        its layers check) and what _step(step, checked) runs. GroupedResidualVQ plans every
        group, then checks all of them at once."""
        check_floating("x", x)
        if indices is not None:
            raise ValueError("forward's indices (cross-entropy loss) is not supported by fastvq")
        if beam_size is not None:
            beam_size = _check_beam("beam_size", beam_size)
        if sample_codebook_temp is not None:
            sample_codebook_temp = check_real("sample_codebook_temp", sample_codebook_temp, 0.0)
        if x.dim() == 2:  # one token per row, as the peer's VectorQuantize
            if mask is not None:
                raise ValueError("mask needs a sequence (b, n, dim), got one token (b, dim)")
            # the sequence of one token in this module's layout: (b, dim, 1) channel first
            first = self.channel_first is True
            finite, step = self._plan(
                x[..., None] if first else x[:, None], None, None, return_all_codes,
                sample_codebook_temp, freeze_codebook, beam_size, rand_quantize_dropout_fixed_seed,
            )  # fmt: skip
            return finite, step._replace(one_token=first)
        if self._fmap_ndim is not None and mask is not None:
            raise ValueError("mask is not supported with image or 3d feature maps")
        if beam_size is None:
            beam_size = self.beam_size if self.training else self.eval_beam_size
        begun = self._begin(x, mask, rand_quantize_dropout_fixed_seed)
        finite = self._stack_finite(begun[2], begun[3])
        return finite, _Step(
            begun, return_all_codes, sample_codebook_temp, freeze_codebook, beam_size, None
        )

    def _step(self, step, checked: bool):
        """forward's second half: the stack on _plan's rows (checked: its one finite check ran,
        the layers skip theirs)."""
        begun, return_all_codes, temp, freeze, beam_size, first = step
        if beam_size is not None and beam_size > 1:
            out = self._beam_run(begun, return_all_codes, beam_size, temp, freeze, checked)
        else:
            kwargs = dict(sample_codebook_temp=temp, freeze_codebook=freeze)
            shared = self.shared_codebook and self.training
            with self.layers[0]._deferred_update() if shared else contextlib.nullcontext():
                out = self._run(begun, return_all_codes, self.quant_grad_frac, checked, **kwargs)
        if first is None:
            return out
        # one token per row: drop the sequence axis of its one-token sequence again
        squeeze = [out[0][..., 0] if first else out[0][:, 0], out[1][:, 0], out[2]]
        if return_all_codes:  # (Q, b, n, d) in either layout
            squeeze.append(out[3][:, :, 0])
        return tuple(squeeze)

    # --- beam search ---------------------------------------------------------------------------

    def _layer_updates(self, layer, freeze: bool | None) -> bool:
        return bool(
            layer.training
            and not _frozen(layer, freeze)
            and layer.codebook_generator is None
            and (layer.ema_update or layer.threshold_ema_dead_code > 0)
        )

    def _beam_run(self, begun, return_all_codes, beam, temp, freeze, checked=False):
        """The peer's beam search: every kept path's residual takes its layer's top-k codes
        (k = min(beam, codebook_size)), path scores add -loss_l * beam_score_weights[l], and the
        best `beam` paths survive each layer (the best one at the last layer). Candidates are
        scored without gradients (O(M beam^2) numbers); only the kept pairs go through the
        estimator and the loss, so memory is O(M beam D), never M x K. After the search, in
        training, each layer's EMA / dead codes see the chosen path's residuals and codes.
        begun: _begin's tuple; checked: the stack's one finite check ran (the layers skip)."""
        seq, restore, z, last, mask = begun
        b, n = seq.shape[:2]
        out_dtype = z.dtype
        final = self.num_quantizers - 1 if last is None else last
        if any(self._layer_updates(layer, freeze) for layer in self.layers[: final + 1]):
            refuse_recomputation()  # as VectorQuantize.forward: before the search
        m = b * n
        row_mask = None if mask is None else mask.reshape(m)
        with autocast_off(seq.device.type):
            z0 = z.float().reshape(m, 1, z.shape[-1])
            d = z0.shape[-1]
            check = not checked
            residual, out = z0, torch.zeros_like(z0)
            scores = z0.new_zeros(m, 1)
            steps = []  # per layer: parent beam (m, keep), code (m, keep), loss (m, keep)
            for i in range(final + 1):
                layer = self.layers[i]
                j = residual.shape[1]
                k = min(beam, layer.codebook_size)
                keep = 1 if i == final else beam
                rows = residual.reshape(m * j, d)
                rows = _l2norm(rows) if layer.use_cosine_sim else rows
                rep_mask = None if row_mask is None else row_mask.repeat_interleave(j)
                if layer.training and layer.kmeans_init and not layer._initted_known():
                    layer._init_from_rows([rows], None if rep_mask is None else [rep_mask])
                codebook = layer._codebooks()[0]
                cb = codebook.detach()
                t = layer.sample_codebook_temp if temp is None else temp
                cand = layer._topk_search(rows, cb, k, t, check)  # (m j, k), nearest first
                # The peer's score: the layer's per-candidate loss (commitment-weighted; the
                # plain MSE at commitment_weight 0), 0 at masked rows.
                mse = _candidate_mse(rows.detach(), cb, cand)
                cw = layer.commitment_weight
                cand_loss = mse * cw if cw > 0 else mse
                if rep_mask is not None:
                    cand_loss = torch.where(rep_mask[:, None], cand_loss, 0.0)
                weight = self.beam_score_weights[i]
                flat = scores[..., None] + (-cand_loss.view(m, j, k) * weight)
                flat = flat.view(m, j * k)
                if j * k > keep:  # best first; equal scores keep the lower (beam, rank)
                    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
                    order = order[:, :keep]
                    scores = flat.gather(1, order)
                else:
                    order = torch.arange(j * k, device=flat.device).expand(m, -1)
                    scores = flat
                parent = torch.div(order, k, rounding_mode="floor")
                code = cand.view(m, j * k).gather(1, order)
                take = parent[..., None].expand(-1, -1, d)
                r_sel = residual.gather(1, take)
                r_in = _l2norm(r_sel) if layer.use_cosine_sim else r_sel
                # A codebook written in place by the update below (a Parameter, a DataParallel
                # replica's): the estimator reads a copy (as VectorQuantize.forward).
                update = self._layer_updates(layer, freeze) and layer._updates_in_place()
                q, loss, _, _ = layer._topk_apply(
                    r_in, code, row_mask, codebook, _frozen(layer, freeze),
                    cb=_snapshot(cb) if update else cb,
                )  # fmt: skip
                q = q.float()
                residual = r_sel - _frac_gradient(q, self.quant_grad_frac)
                out = out.gather(1, take) + q
                steps.append((parent, code, loss, q.detach()))
            # Backtrack the best path (beam 0 of the last layer).
            pick = torch.zeros(m, 1, dtype=torch.long, device=z0.device)
            codes, losses = [None] * (final + 1), [None] * (final + 1)
            values = [None] * self.num_quantizers  # the chosen path's codes: return_all_codes
            for i in reversed(range(final + 1)):
                parent, code, loss, q = steps[i]
                codes[i] = code.gather(1, pick)[:, 0]
                losses[i] = loss.gather(1, pick)[:, 0]
                if return_all_codes:
                    values[i] = q.gather(1, pick[..., None].expand(-1, -1, d))[:, 0]
                pick = parent.gather(1, pick)
            self._beam_update(z0[:, 0].detach(), codes, row_mask, freeze)
            losses = torch.stack(losses, dim=-1).float()  # (m, layers run)
            if row_mask is None:  # an empty batch: 0, as the greedy path (mean would be NaN)
                losses = losses.mean(0) if losses.shape[0] else losses.sum(0)
            else:
                valid = row_mask[:, None]
                losses = torch.where(valid, losses, 0.0).sum(0) / row_mask.sum().clamp(min=1)
            losses = F.pad(losses, (0, self.num_quantizers - final - 1))
            indices = torch.stack(codes, dim=-1)
            indices = F.pad(indices, (0, self.num_quantizers - final - 1), value=-1)
            if row_mask is not None:
                indices = indices.masked_fill(~row_mask[:, None], -1)
            quantized = out[:, 0]
        quantized = self.project_out(quantized.reshape(b, n, d).to(out_dtype))
        quantized = self._finish(quantized, seq, mask)
        indices = indices.reshape(b, n, self.num_quantizers)
        ret = [restore(quantized, True), restore(indices, False), losses]
        if return_all_codes:
            values = [None if v is None else v.reshape(b, n, d) for v in values]
            all_codes = self._all_codes(indices, values)  # (Q, b, n, d)
            ret.append(torch.stack([restore(c, False) for c in all_codes]))
        return tuple(ret)

    def _beam_update(self, z0, codes, row_mask, freeze: bool) -> None:
        """EMA / dead codes of each layer that ran, on the chosen path's residuals (recomputed
        from z0 and the chosen codes exactly as the search formed them) and codes; a shared
        codebook takes one update over all layers' rows (as without beam search)."""
        layers = self.layers[: len(codes)]
        if not any(self._layer_updates(layer, freeze) for layer in layers):
            return
        with torch.no_grad():
            residual, rows = z0, []
            for layer, code in zip(layers, codes, strict=True):
                rows.append(_l2norm(residual) if layer.use_cosine_sim else residual)
                q = layer._codebooks()[0].detach()[code].float()
                residual = residual - _frac_gradient(q, self.quant_grad_frac)
        masks = None if row_mask is None else [row_mask]
        if self.shared_codebook:
            layer = self.layers[0]
            if masks is not None:
                masks = [row_mask.repeat(len(codes))]
            layer._update_or_defer([torch.cat(rows)], [torch.cat(codes)], masks, layer.ema_update)
            return
        for layer, r, code in zip(layers, rows, codes, strict=True):
            if self._layer_updates(layer, freeze):
                layer._update_or_defer([r], [code], masks, layer.ema_update)


# ResidualVQ._plan's hand-over to _step; one_token: None, or whether the one-token sequence
# _plan made of a (b, dim) input is channel-first.
_Step = namedtuple(
    "_Step", ["begun", "return_all_codes", "temp", "freeze", "beam_size", "one_token"]
)


def _frozen(layer, freeze: bool | None) -> bool:
    """forward's freeze_codebook (None: each layer's own, as VectorQuantize.forward)."""
    return layer.freeze_codebook if freeze is None else freeze


def _check_beam(name: str, value) -> int:
    value = check_int(name, value, 1)
    if value > MAX_TOPK:
        raise ValueError(
            f"{name} must be at most {MAX_TOPK} (fastvq.nearest_code's top-k limit), got {value}"
        )
    return value


class ResidualFSQ(_Residual):
    """Residual FSQ (vector-quantize-pytorch's ResidualFSQ): layer l quantizes residual / s_l with
    a symmetric FSQ (preserve_symmetry=True) and scales back, s_l = levels^-l per dimension; the
    input is first soft-clamped to +-(1 + 1/(L-1)) (with the default bound_hard_clamp=True).

    ResidualFSQ(*, levels, num_quantizers, dim=None, is_channel_first=False,
    quantize_dropout=False, quantize_dropout_cutoff_index=0, quantize_dropout_multiple_of=1,
    soft_clamp_input_value=None, bound_hard_clamp=True, **fsq_kwargs).
    forward(x, return_all_codes=False, rand_quantize_dropout_fixed_seed=None) -> (quantized,
    indices (b, *spatial, Q) int64[, all_codes]).
    """

    returns_loss = False
    dropout_needs_grad = True

    def __init__(
        self,
        *,
        levels,
        num_quantizers: int,
        dim: int | None = None,
        is_channel_first: bool = False,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        soft_clamp_input_value=None,
        bound_hard_clamp: bool = True,
        **fsq_kwargs,
    ):
        super().__init__()
        if fsq_kwargs.get("num_codebooks", 1) != 1:
            raise ValueError("ResidualFSQ supports num_codebooks=1 per layer only")
        if not isinstance(levels, list | tuple):
            raise TypeError(f"levels must be a list of ints, got {type(levels).__name__}")
        levels = list(levels)
        codebook_dim = len(levels)
        dim = codebook_dim if dim is None else check_int("dim", dim)
        num_quantizers = check_int("num_quantizers", num_quantizers)
        self._setup(
            dim,
            codebook_dim,
            num_quantizers,
            quantize_dropout,
            quantize_dropout_cutoff_index,
            quantize_dropout_multiple_of,
            bool(is_channel_first),
        )
        self.is_channel_first = bool(is_channel_first)  # the peer's attribute
        self.levels = levels
        self.layers = nn.ModuleList(
            FSQ(
                levels=levels,
                dim=codebook_dim,
                preserve_symmetry=True,
                bound_hard_clamp=bound_hard_clamp,
                **fsq_kwargs,
            )
            for _ in range(num_quantizers)
        )
        self.codebook_size = self.layers[0].codebook_size
        lv = torch.tensor(levels, dtype=torch.float32, device="cpu")
        if bool((lv < 2).any()):
            raise ValueError(f"levels must all be >= 2, got {levels}")
        scales = torch.stack([lv**-i for i in range(num_quantizers)])
        if scales.min() < torch.finfo(torch.float32).tiny:  # else residual / scale is inf, NaN
            raise ValueError(
                f"levels {levels} with num_quantizers = {num_quantizers}: the last layer's scale "
                f"L^-(num_quantizers - 1) leaves float32's range; use fewer layers or levels"
            )
        self.register_constant("scales", scales)
        if bound_hard_clamp:
            if soft_clamp_input_value is not None:
                raise ValueError("soft_clamp_input_value is set by bound_hard_clamp=True")
            soft_clamp_input_value = 1 + 1 / (lv - 1)
        elif soft_clamp_input_value is not None:
            soft_clamp_input_value = _clamp_values(soft_clamp_input_value, len(levels))
        self.register_constant("soft_clamp_input_value", soft_clamp_input_value)

    def _prepare(self, z):
        c = self.soft_clamp_input_value
        return z if c is None else (z / c).tanh() * c

    def _layer(self, i, residual, mask):
        scale = self.scales[i]
        q, idx = self.layers[i](residual / scale)
        return q * scale, idx, residual.new_zeros(())

    def _layer_codes(self, i, idx):
        return self.layers[i]._output_codes(idx, torch.float32) * self.scales[i]

    @property
    def codebooks(self) -> torch.Tensor:
        """(Q, K, codebook_dim): each layer's implicit codebook, before its scale (the peer's)."""
        return torch.stack([layer.implicit_codebook for layer in self.layers])


class ResidualLFQ(_Residual):
    """Residual LFQ (vector-quantize-pytorch's ResidualLFQ): layer l is an LFQ with codebook_scale
    2^-l (soft_clamp_input_value halves per layer); losses are the layers' aux losses (entropy
    and commitment), shape (Q,).

    ResidualLFQ(*, dim, num_quantizers, codebook_size, quantize_dropout=False,
    quantize_dropout_cutoff_index=0, quantize_dropout_multiple_of=1, soft_clamp_input_value=None,
    channel_first=None, **lfq_kwargs) (spherical=True gives residual BSQ).
    forward(x, mask=None, return_all_codes=False, rand_quantize_dropout_fixed_seed=None)
    -> (quantized, indices (b, *spatial, Q) int64, losses (Q,)[, all_codes]).
    """

    dropout_needs_grad = True

    def __init__(
        self,
        *,
        dim: int,
        num_quantizers: int,
        codebook_size: int,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        soft_clamp_input_value: float | None = None,
        channel_first: bool | None = None,
        **lfq_kwargs,
    ):
        super().__init__()
        if lfq_kwargs.get("num_codebooks", 1) != 1:
            raise ValueError("ResidualLFQ supports num_codebooks=1 per layer only")
        codebook_size = check_int("codebook_size", codebook_size, 2)
        if codebook_size & (codebook_size - 1):
            raise ValueError(f"codebook_size must be a power of 2, got {codebook_size}")
        codebook_dim = codebook_size.bit_length() - 1
        num_quantizers = check_int("num_quantizers", num_quantizers)
        self._setup(
            check_int("dim", dim),
            codebook_dim,
            num_quantizers,
            quantize_dropout,
            quantize_dropout_cutoff_index,
            quantize_dropout_multiple_of,
            channel_first,
        )
        self.codebook_size = codebook_size
        layers = []
        for i in range(num_quantizers):
            layers.append(
                LFQ(
                    dim=codebook_dim,
                    codebook_size=codebook_size,
                    codebook_scale=2.0**-i,
                    soft_clamp_input_value=soft_clamp_input_value,
                    **lfq_kwargs,
                )
            )
            if soft_clamp_input_value is not None:
                soft_clamp_input_value *= 0.5
        self.layers = nn.ModuleList(layers)

    def _layer(self, i, residual, mask):
        return tuple(self.layers[i](residual, mask=mask))

    def _layer_codes(self, i, idx):
        return self.layers[i]._codes(idx[..., None]).flatten(-2)

    @property
    def codebooks(self) -> torch.Tensor:
        """(Q, K, codebook_dim): every code of each layer, as get_codes_from_indices gives them
        (the peer's buffers where spherical=False; O(Q K d) memory, built on each access)."""
        idx = torch.arange(self.codebook_size, device=self.layers[0].mask.device)[:, None]
        return torch.stack([layer._codes(idx).flatten(-2) for layer in self.layers])

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        return_all_codes: bool = False,
        rand_quantize_dropout_fixed_seed: int | None = None,
    ):
        return self._run(self._begin(x, mask, rand_quantize_dropout_fixed_seed), return_all_codes)


class ResidualSimVQ(_Residual):
    """vector-quantize-pytorch's ResidualSimVQ: Q fastvq.nn.SimVQ layers on the residual chain,
    no projections, the rotation trick on by default.

    ResidualSimVQ(*, dim, num_quantizers, codebook_size, heads=1, quantize_dropout=False,
    quantize_dropout_cutoff_index=0, quantize_dropout_multiple_of=1, channel_first=False,
    rotation_trick=True, **sim_vq_kwargs) with sim_vq_kwargs any SimVQ argument
    (codebook_transform, init_fn, frozen_codebook_dim, commitment_weight,
    input_to_quantize_commit_loss_weight). A codebook_transform module passed here is shared by
    every layer, as in the peer.
    forward(x, return_all_codes=False, rand_quantize_dropout_fixed_seed=None) -> (quantized,
    indices (b, *spatial, Q) int64, losses (Q,) float32[, all_codes (Q, b, *spatial, dim)]).
    x: (b, ..., dim), or (b, dim, ...) with channel_first.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_quantizers: int,
        codebook_size: int,
        heads: int = 1,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        channel_first: bool = False,
        rotation_trick: bool = True,
        **sim_vq_kwargs,
    ):
        super().__init__()
        if heads != 1:
            raise ValueError(f"ResidualSimVQ supports heads=1 only (as the peer), got {heads}")
        dim = check_int("dim", dim)
        self._setup(
            dim,
            dim,
            check_int("num_quantizers", num_quantizers),
            quantize_dropout,
            quantize_dropout_cutoff_index,
            quantize_dropout_multiple_of,
            bool(channel_first),
        )
        # The stack converts the layout once: its layers see (b, n, dim) rows.
        self.layers = nn.ModuleList(
            SimVQ(dim, codebook_size, rotation_trick=rotation_trick, **sim_vq_kwargs)
            for _ in range(num_quantizers)
        )
        self.codebook_size = self.layers[0].codebook_size

    @property
    def codebooks(self) -> torch.Tensor:
        """(Q, K, dim), differentiable in the layers' transforms (SimVQ.codebook)."""
        return torch.stack([layer.codebook for layer in self.layers])

    def forward(
        self,
        x: torch.Tensor,
        return_all_codes: bool = False,
        rand_quantize_dropout_fixed_seed: int | None = None,
        *,
        check_inputs_finite: bool = True,
    ):
        """check_inputs_finite=False skips the layers' NaN / Inf checks (a host sync each)."""
        begun = self._begin(x, None, rand_quantize_dropout_fixed_seed)
        return self._run(begun, return_all_codes, checked=not check_inputs_finite)

    def _layer(self, i, residual, mask, check_inputs_finite=True):
        return self.layers[i](residual, check_inputs_finite=check_inputs_finite)

    def _layer_codes(self, i, idx):
        return self.layers[i]._codes(idx)  # _codes_seq checked the whole stack


class _Grouped(nn.Module):
    """dim split into `groups` equal chunks, each quantized by its own residual stack; all
    groups share one dropout seed per step (the peer's convention)."""

    residual_cls: type

    def __init__(self, *, dim: int, groups: int = 1, accept_image_fmap: bool = False, **kwargs):
        super().__init__()
        self.dim = check_int("dim", dim)
        self.groups = check_int("groups", groups)
        if dim % groups:
            raise ValueError(f"dim ({dim}) must be divisible by groups ({groups})")
        self.accept_image_fmap = accept_image_fmap
        if accept_image_fmap:
            kwargs["accept_image_fmap"] = True
        self.rvqs = nn.ModuleList(
            self.residual_cls(dim=dim // groups, **kwargs) for _ in range(groups)
        )
        self.codebook_size = self.rvqs[0].codebook_size

    def _split_dim(self, x) -> int:
        first = self.rvqs[0].channel_first
        first = x.dim() >= 4 if first is None else first
        return 1 if first else -1

    @property
    def codebooks(self):
        """(G, Q, K, codebook_dim): each group's stack's codebooks; a tuple of the groups' tuples
        where the layers' sizes differ (the stacks' codebooks are tuples then)."""
        books = [rvq.codebooks for rvq in self.rvqs]
        return torch.stack(books) if isinstance(books[0], torch.Tensor) else tuple(books)

    def get_codes_from_indices(self, indices) -> torch.Tensor:
        """indices (G, b, ..., q) -> (G, Q, b, ..., codebook_dim)."""
        self._check_groups(indices)
        return torch.stack(
            [r.get_codes_from_indices(i) for r, i in zip(self.rvqs, indices, strict=True)]
        )

    def get_output_from_indices(self, indices) -> torch.Tensor:
        self._check_groups(indices)
        outs = [r.get_output_from_indices(i) for r, i in zip(self.rvqs, indices, strict=True)]
        first = self.rvqs[0].channel_first
        first = outs[0].dim() >= 4 if first is None else first
        return torch.cat(outs, dim=1 if first else -1)

    def _check_groups(self, indices):
        check_index_tensor("indices", indices)
        if indices.dim() == 0 or len(indices) != self.groups:
            raise ValueError(
                f"indices must have a leading groups axis of {self.groups}, got "
                f"{tuple(indices.shape)}"
            )

    def extra_repr(self) -> str:
        return describe(self, "dim", "groups")

    def _forward(self, x: torch.Tensor, return_all_codes: bool, kwargs: dict):
        """The subclasses' forward, whose positional arguments follow their peers'."""
        check_floating("x", x)
        axis = self._split_dim(x)
        if x.dim() < 2 or x.shape[axis] != self.dim:
            raise ValueError(
                f"x's feature axis ({axis}) must have dim = {self.dim}, got {tuple(x.shape)}"
            )
        # The peer draws a seed in every training step; only a stack with dropout needs one (a
        # host sync, so a graph break under torch.compile). One given is every group's.
        seed = kwargs.pop("rand_quantize_dropout_fixed_seed", None)
        if seed is None and self.training and self.rvqs[0].quantize_dropout:
            seed = sync_seed(x.device)
        kwargs.update(return_all_codes=return_all_codes, rand_quantize_dropout_fixed_seed=seed)
        outs = self._run_groups(x.chunk(self.groups, dim=axis), kwargs)
        parts = list(zip(*outs, strict=True))
        # all_codes stays the peer's tuple of the groups' (Q, b, ..., d) codes (user code
        # torch.cat's it): indices and losses are stacked.
        codes = [parts.pop()] if return_all_codes else []
        return (torch.cat(parts[0], dim=axis), *(torch.stack(p) for p in parts[1:]), *codes)

    def _run_groups(self, chunks, kwargs) -> list:
        """Each group's stack on its chunk of the features: its forward's outputs."""
        return [rvq(chunk, **kwargs) for rvq, chunk in zip(self.rvqs, chunks, strict=True)]


class GroupedResidualVQ(_Grouped):
    """vector-quantize-pytorch's GroupedResidualVQ: GroupedResidualVQ(*, dim, groups=1,
    accept_image_fmap=False, **ResidualVQ kwargs); forward(x, indices=None,
    return_all_codes=False, sample_codebook_temp=None, freeze_codebook=None, mask=None,
    check_inputs_finite=True) -> (quantized, indices (G, b, ..., Q), losses (G, Q)[, all_codes: a
    tuple of the G groups' (Q, b, ..., d)]).

    One NaN / Inf check per forward for all groups (one host sync; check_inputs_finite=False
    skips it): every group's projected rows and the codebooks of its layers that run, before any
    group searches or updates its codebooks; the error names the group ("z of group 1 contains
    NaN or Inf"). A group whose layers check themselves (sampled codes, a k-means init not yet
    known done: see ResidualVQ) still does."""

    residual_cls = ResidualVQ

    def init_from(
        self,
        encoder_outputs: torch.Tensor,
        iters: int | None = None,
        generator: torch.Generator | None = None,
        batches: int = 1,
    ) -> None:
        """k-means initialization from encoder outputs (..., dim): group g's stack
        (ResidualVQ.init_from) from features g * dim / groups onwards, as forward splits them."""
        check_input("encoder_outputs", encoder_outputs, self.dim)
        chunks = encoder_outputs.chunk(self.groups, dim=-1)
        for rvq, chunk in zip(self.rvqs, chunks, strict=True):
            rvq.init_from(chunk, iters, generator, batches)

    def forward(
        self,
        x: torch.Tensor,
        indices=None,
        return_all_codes: bool = False,
        sample_codebook_temp: float | None = None,
        freeze_codebook: bool | None = None,
        mask: torch.Tensor | None = None,
        **kwargs,
    ):
        if indices is not None:
            raise ValueError("forward's indices (cross-entropy loss) is not supported by fastvq")
        kwargs.update(sample_codebook_temp=sample_codebook_temp, freeze_codebook=freeze_codebook)
        return self._forward(x, return_all_codes, dict(kwargs, mask=mask))

    def _run_groups(self, chunks, kwargs) -> list:
        """Every group's stack planned (layout, projection), then one check, then the stacks
        run: ResidualVQ's forward in two halves, so hooks on self.rvqs[g] do not fire."""
        check = kwargs.pop("check_inputs_finite", True)
        plans = [rvq._plan(chunk, **kwargs) for rvq, chunk in zip(self.rvqs, chunks, strict=True)]
        finite = {
            f"{name} of group {g}": tensors
            for g, (checks, _) in enumerate(plans)
            for name, tensors in (checks or {}).items()
        }
        if finite and check:
            check_finite_on_every_rank(any(rvq._synced() for rvq in self.rvqs), **finite)
        return [
            rvq._step(step, checks is not None or not check)
            for rvq, (checks, step) in zip(self.rvqs, plans, strict=True)
        ]


class GroupedResidualFSQ(_Grouped):
    """GroupedResidualFSQ(*, dim, groups=1, **ResidualFSQ kwargs) -> (quantized, indices
    (G, b, ..., Q)[, all_codes])."""

    residual_cls = ResidualFSQ

    def __init__(self, *, dim: int, groups: int = 1, accept_image_fmap: bool = False, **kwargs):
        if accept_image_fmap:
            kwargs["is_channel_first"] = True
        super().__init__(dim=dim, groups=groups, **kwargs)
        self.accept_image_fmap = accept_image_fmap

    def forward(self, x: torch.Tensor, return_all_codes: bool = False, **kwargs):
        return self._forward(x, return_all_codes, kwargs)


class GroupedResidualLFQ(_Grouped):
    """GroupedResidualLFQ(*, dim, groups=1, **ResidualLFQ kwargs) -> (quantized, indices
    (G, b, ..., Q), losses (G, Q)[, all_codes])."""

    residual_cls = ResidualLFQ

    def __init__(self, *, dim: int, groups: int = 1, accept_image_fmap: bool = False, **kwargs):
        if accept_image_fmap:
            kwargs["channel_first"] = True
        super().__init__(dim=dim, groups=groups, **kwargs)
        self.accept_image_fmap = accept_image_fmap

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        return_all_codes: bool = False,
        **kwargs,
    ):
        return self._forward(x, return_all_codes, dict(kwargs, mask=mask))
