"""VectorQuantize: a drop-in for vector-quantize-pytorch's VectorQuantize on fastvq's ops, plus the
HouseholderVQ and HyperCodebook presets from the seed papers.

Every hot step is a fastvq op: search + gather + gradient estimator (fastvq.quantize), EMA
statistics (fastvq.ema_update_ + fastvq.ema_codebook), dead codes (fastvq.reset_dead_codes_) and
k-means initialisation (fastvq.kmeans). Memory is O(N D + K D) per step: no N x K distance or
one-hot matrix is built (the peer builds two), the stochastic sampler works on row chunks and the
orthogonal regulariser on a D x D Gram matrix.

Supported vector-quantize-pytorch 1.32.0 options (same names, defaults and return convention
(quantized, indices, loss); positional up to commitment_weight, keyword-only after it, where the
peer's next positional parameters are options fastvq does not implement): dim, codebook_size,
codebook_dim, heads, separate_codebook_per_head, decay, eps, freeze_codebook, kmeans_init,
kmeans_iters, sync_kmeans, use_cosine_sim, layernorm_after_project_in, threshold_ema_dead_code,
channel_last, accept_image_fmap, accept_3d_fmap, commitment_weight, orthogonal_reg_weight,
orthogonal_reg_active_codes_only, orthogonal_reg_max_codes, stochastic_sample_codes,
sample_codebook_temp, rotation_trick, sync_codebook, ema_update, learnable_codebook,
return_zeros_for_masked_padding, route_gradients_to_input; forward(x, mask=, lens=, topk=,
sample_codebook_temp=, freeze_codebook=, return_loss_breakdown=, ema_update=). Peer state dicts
(keys "_codebook.embed", ...) load as is; fastvq's own keys ("embed", ...) do not load into the
peer.

forward(x, topk=k) (heads=1 only, as the peer): the k nearest codes of every row
(fastvq.nearest_code(k=), nearest first, ties to the lower index; k = min(topk, codebook_size)
<= 128), or in training with stochastic_sample_codes the top k of the peer's Gumbel-perturbed
logits (row chunks). quantized (..., k, dim) (channel-first layouts: (B, dim, ..., k)), indices
(..., k), loss (..., k): the per-candidate commitment MSE (against the projected, normalized
input), times commitment_weight (unweighted at weight 0 in eval, as the peer), 0 at masked rows,
plus the orthogonal loss in training; in training AND eval, as the peer. Each candidate's output
is the module's estimator (STE / rotation trick / householder) between x and that code. No EMA,
no dead-code reset in top-k mode (as the peer); the k-means init still runs in training.
ResidualVQ's beam search builds on it.

Not supported (ValueError when given a non-default value): commitment_use_cross_entropy_loss,
codebook_diversity_loss_weight, codebook_diversity_temperature, straight_through,
directional_reparam, directional_reparam_variance, vq_bridge, manual_ema_update,
in_place_codebook_optimizer, manual_in_place_optimizer_update, affine_param, sync_affine_param,
affine_param_batch_decay, affine_param_codebook_decay, sync_update_v, and forward's
indices (cross-entropy to given codes), codebook_transform_fn, ema_update_weight,
accum_ema_update; topk with heads > 1 (the peer asserts) or above 128 (after clamping to
codebook_size: fastvq.nearest_code's top-k limit).

Deliberate differences from the peer (each tested as fastvq's behaviour):
- eval() freezes the codebook completely: no EMA, no dead-code reset and no k-means init (the
  peer runs its k-means init in eval mode too). Quantized outputs in eval mode still carry the
  estimator's gradient to x (the peer's are detached from x there); the loss is 0 as the peer's.
- k-means init uses fastvq.kmeans (k-means++ seeding, empty clusters re-seeded from far rows)
  instead of the peer's random-row seeding; the codebook equals the centroids exactly and its
  statistics are set consistently (cluster_size = counts, embed_avg = centroid * smoothed count),
  so no code collapses to 0 as the peer's empty clusters do. Fewer rows than codes: the rows are
  repeated to seed k-means, with a warning (as the peer warns).
- Dead-code reset: embed_avg of a reset code is new_code * smoothed(threshold), so that the next
  EMA-free read of the codebook returns the new code (the peer stores new_code * threshold), and
  when more codes are dead than there are rows every dead code is replaced, rows repeating (the
  peer defers the surplus to later steps).
- use_cosine_sim searches by cosine similarity, the codes normalized too; the peer takes the
  dot product with the stored codes. The two agree while the codes are unit vectors (an EMA
  codebook, normalized at every update), not once a Parameter codebook (orthogonal_reg_weight)
  has moved off the sphere or a loaded codebook was not normalized. Either way the output is
  the stored code.
- rotation_trick=True follows the paper on rows of tiny norm: the gradient scales by |q| / |z|
  as long as |z|^2 does not underflow to 0 (float32: |z| above about 2.6e-23), and the
  degenerate rows of fastvq.quantize's docstring (z = 0 among them) are straight-through. The
  peer clamps norms at 1e-6, so below that its output drifts from the code and its gradient is
  capped.
- With a mask, the commitment loss compares the quantized vectors with the projected (and, for
  cosine, normalized) inputs, as without a mask; the peer compares with the raw input there (a
  shape error or a wrong target with codebook_dim, heads or use_cosine_sim). A mask with no valid
  row gives a zero loss (the peer's is NaN).
- lens= makes a mask over the sequence axis of every layout (the peer uses x.shape[1], the feature
  axis for channel_last=False).
- get_codes_from_indices returns (..., heads * codebook_dim) for shared-codebook heads too, maps
  index -1 (masked padding) to a zero code, and get_output_from_indices applies project_out before
  moving channels first (the peer applies the Linear to the channel-first tensor).
- The orthogonal regulariser of the active codes only counts unmasked rows' codes.
- learnable_codebook=True defaults ema_update to False (the peer asks for ema_update=False).
- dtypes: the EMA statistics (cluster_size, embed_avg) stay float32 accumulators whatever the
  module's dtype: module.to(torch.bfloat16) / .half() casts the codebook (and projections) but
  not them (float64 casts make them float64); the peer casts them too and its bf16 EMA stalls
  (see _apply). The search, EMA and losses run in float32 under autocast and after a bf16 / fp16
  cast alike (rows are cast to float32, a low-precision codebook is promoted; a float64 codebook
  promotes the search to float64); outputs come back in x's dtype.
- topk must be an int (the peer takes int(topk) of anything). In training with
  commitment_weight 0 the top-k loss is zeros of shape (..., k) (the peer returns a scalar 0),
  and LossBreakdown.commitment is the per-candidate MSE whatever the weight.

torch.compile: forward compiles with fullgraph=True in eval and in training (topk= too), the EMA
update included (fastvq.ema_update_ / ema_codebook are custom ops; a buffer codebook is replaced
by the updated tensor, never written in place under the estimator's saved codes; _update says
where it is written in place instead). A float hyperparameter changed from step to step (a decay
warm-up, commitment_weight, sample_codebook_temp) compiles once more, at its second value, after
which it is a graph input (dynamo's automatic dynamic). Compiled, a training step under
torch.inference_mode leaves an inference-tensor codebook that later training steps cannot use
(eager, it is written in place): use eval() or torch.no_grad there. Activation checkpointing of a
training step that updates the codebook is a RuntimeError at the recomputation (which would
update it again and quantize with the new codebook); frozen or in eval() it checkpoints.
Deliberate graph breaks, eager by design: the k-means init (data-dependent, first training
step), dead-code replacement (threshold_ema_dead_code > 0), torch.unique of
orthogonal_reg_active_codes_only,
and the update of a Parameter codebook (orthogonal_reg_weight > 0: written through .data, which
a compiled graph would drop).
"""

import contextlib
import functools
import operator
import warnings
from collections import namedtuple

import torch
import torch.nn.functional as F
from torch import nn

import fastvq
from fastvq._ext import register_namedtuple
from fastvq.nn.scalar import check_input, check_mask, describe, project_codes, project_in
from fastvq.ops._backends import autocast_off, check_backend, pick_backend
from fastvq.ops._validate import (
    INDEX_DTYPES,
    NonFiniteError,
    check_choice,
    check_finite,
    check_floating,
    check_index_range,
    check_index_tensor,
    check_int,
    check_no_tangent,
    check_real,
    check_tensor,
)
from fastvq.ops.codebook import (
    ACCUMULATORS,
    _ema_update,
    _process_group,
    _sample_rows,
    _smoothed,
    _stats_backend,
)
from fastvq.ops.nearest_code import MAX_TOPK
from fastvq.ops.quantize import _quantize_fwd

LossBreakdown = register_namedtuple(
    namedtuple(
        "LossBreakdown", ["commitment", "codebook_diversity", "orthogonal_reg", "inplace_optimize"]
    )
)

GRADS = ("ste", "rotation", "householder")
# Peer options fastvq does not implement, with the peer's defaults: accepted only at the default.
_UNSUPPORTED = {
    "commitment_use_cross_entropy_loss": False,
    "codebook_diversity_loss_weight": 0.0,
    "codebook_diversity_temperature": 100.0,
    "straight_through": False,
    "directional_reparam": False,
    "directional_reparam_variance": 5e-3,
    "sync_affine_param": False,
    "vq_bridge": None,
    "manual_ema_update": False,
    "in_place_codebook_optimizer": None,
    "manual_in_place_optimizer_update": False,
    "affine_param": False,
    "affine_param_batch_decay": 0.99,
    "affine_param_codebook_decay": 0.9,
    "sync_update_v": 0.0,
}
# Rows per chunk of the stochastic sampler's (rows, K) logits: 2^20 floats (4 MiB) whatever N.
_SAMPLE_CHUNK_ELEMENTS = 1 << 20
# The peer's l2norm epsilon (F.normalize eps=1e-6) for inputs and codes under use_cosine_sim.
_NORM_EPS = 1e-6
# A deliberate graph break: the function always runs eagerly. torch's lazy form of
# torch.compiler.disable, which imports torch._dynamo (1.5 s, most of `import fastvq.nn`) at the
# first call instead of at decoration.
eager_only = getattr(torch, "_disable_dynamo", torch.compiler.disable)


def _l2norm(t: torch.Tensor) -> torch.Tensor:
    return F.normalize(t, dim=-1, eps=_NORM_EPS)


def _leader_counts(counts: list[int], group: bool, device) -> list[int]:
    """counts as they are on rank 0 (one broadcast when group), else as given."""
    if not group:
        return counts
    t = torch.tensor(counts, dtype=torch.int64, device=device)
    torch.distributed.broadcast(t, src=0)
    return t.tolist()


def check_finite_on_every_rank(synced: bool, **tensors) -> None:
    """check_finite(**tensors), and where `synced` (a layer whose step joins collectives:
    synced statistics or k-means) on every rank at once: a rank that raised alone left the
    others waiting in the next all-reduce until the process group's timeout (30 minutes by
    default). One all-reduce of a flag after the check's sync; skipped while compiling, as the
    check is."""
    if not synced or torch.compiler.is_compiling():
        check_finite(**tensors)
        return
    import torch.distributed as dist

    group = _process_group("sync_codebook", True)
    error = None
    try:
        check_finite(**tensors)
    except NonFiniteError as e:
        error = e
    device = next(t for v in tensors.values() for t in ([v] if torch.is_tensor(v) else v)).device
    ok = torch.tensor(error is None, dtype=torch.int32, device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
    if error is not None:
        raise error
    if not ok.item():
        raise NonFiniteError(
            "another rank's quantizer input (z) or codebook contains NaN or Inf, so every rank "
            "stops; pass check_inputs_finite=False to skip this check"
        )


def _is_distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class CodebookMLP(nn.Module):
    """Hyper-net codebook of meta-quantization (Qin & Zhang, "Learning to Quantize for Training
    Vector-Quantized Networks"): codebook = MLP(E), E a learned (K, embed_dim) embedding with a
    standard Gaussian init, MLP = Linear(embed_dim, hidden_dim) -> Tanh -> Linear(hidden_dim,
    codebook_dim) with PyTorch's default init; the paper's setting is 32 -> 256 -> 32.

    forward() -> (K, codebook_dim) codebook in the MLP's dtype, differentiable in the embedding
    and the MLP.
    """

    def __init__(
        self, codebook_size: int, codebook_dim: int = 32, embed_dim: int = 32, hidden_dim: int = 256
    ):
        super().__init__()
        k = check_int("codebook_size", codebook_size, 1)
        d = check_int("codebook_dim", codebook_dim, 1)
        e = check_int("embed_dim", embed_dim, 1)
        h = check_int("hidden_dim", hidden_dim, 1)
        self.codebook_size, self.codebook_dim = k, d
        self.embedding = nn.Parameter(torch.randn(k, e))
        self.mlp = nn.Sequential(nn.Linear(e, h), nn.Tanh(), nn.Linear(h, d))

    def forward(self) -> torch.Tensor:
        return self.mlp(self.embedding)


class VectorQuantize(nn.Module):
    """Vector quantizer with vector-quantize-pytorch's constructor and forward (see the module
    docstring for the supported options and the documented differences).

    forward(x) -> (quantized, indices, loss):
      x: (B, N, dim) (channel_last), (B, dim, N) (channel_last=False), (B, dim) (one token),
         (B, dim, H, W) (accept_image_fmap) or (B, dim, T, H, W) (accept_3d_fmap); any floating
         dtype (bf16 under autocast, or a module cast with .to(dtype), is fine: search and EMA run
         in float32 and the EMA statistics stay float32), but where the module projects (dim !=
         heads * codebook_dim) x must have the projection's dtype outside autocast (TypeError
         otherwise), as for any nn.Linear.
      quantized: x's shape; indices: int64 of x's shape without the feature axis, with a trailing
         heads axis when heads > 1 (-1 at masked padding); loss: float32 scalar, in training
         commitment_weight * commitment (+ orthogonal_reg_weight * orthogonal loss), else 0.
      mask: (B, N) bool, True at valid positions (or lens: (B,) lengths): padded rows get zero
         (or input, with return_zeros_for_masked_padding=False) outputs and index -1, and are
         left out of the EMA, the loss, k-means and dead-code replacement.
      topk: k candidates per row (see the module docstring): quantized gains a k axis before
         the feature axis (last for channel-first layouts), indices and loss end with k.

    fastvq extensions (keyword-only): grad ("ste" | "rotation" | "householder", overrides
    rotation_trick), codebook_generator (a module whose forward() returns the (K, codebook_dim)
    codebook; trained by gradient, regenerated every forward), codebook_loss_weight (learnable
    codebooks: separate VQ-VAE codebook loss ||sg(z) - q||^2 with this weight instead of the
    peer's single ||z - q||^2 term with gradients to both), backend (the search, the EMA
    statistics' scatter and the k-means init: "torch" runs the plain-PyTorch reference
    throughout) and precision (the search); forward's check_inputs_finite (keyword-only,
    default True: as in fastvq.quantize, one host sync per forward, every head at once;
    ResidualVQ checks its whole stack at once and passes False to its layers).

    kmeans_init: the first training forward runs the init and sets the `initted` buffer (kept in
    the state dict); later forwards skip it without reading the buffer from the device, until
    it is written again: load_state_dict, .to(device), an in-place write by hand (fill_, copy_)
    or a new tensor make the next training forward read it once more (and re-run the init where
    it is False). Not seen: writes through .data or numpy, and collectives (dist.broadcast,
    DDP's buffer broadcast); under DDP load every rank's state, not rank 0's alone.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_dim: int | None = None,
        heads: int = 1,
        separate_codebook_per_head: bool = False,
        decay: float = 0.8,
        eps: float = 1e-5,
        freeze_codebook: bool = False,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        sync_kmeans: bool = True,
        use_cosine_sim: bool = False,
        layernorm_after_project_in: bool = False,
        threshold_ema_dead_code: float = 0,
        channel_last: bool = True,
        accept_image_fmap: bool = False,
        accept_3d_fmap: bool = False,
        commitment_weight: float = 1.0,
        # Keyword-only from here: the peer's next positional parameters are ones fastvq does not
        # implement (commitment_use_cross_entropy_loss, ...), so a positional call would bind
        # values to other parameters than the peer does.
        *,
        orthogonal_reg_weight: float = 0.0,
        orthogonal_reg_active_codes_only: bool = False,
        orthogonal_reg_max_codes: int | None = None,
        stochastic_sample_codes: bool = False,
        sample_codebook_temp: float = 1.0,
        rotation_trick: bool | None = None,
        sync_codebook: bool | None = None,
        ema_update: bool | None = None,
        learnable_codebook: bool | None = None,
        return_zeros_for_masked_padding: bool = True,
        route_gradients_to_input: bool = True,
        grad: str | None = None,
        codebook_generator: nn.Module | None = None,
        codebook_loss_weight: float | None = None,
        backend: str = "auto",
        precision: str = "exact",
        **peer_options,
    ):
        super().__init__()
        for name, value in peer_options.items():
            if name not in _UNSUPPORTED:
                raise TypeError(f"VectorQuantize got an unexpected keyword argument {name!r}")
            if value != _UNSUPPORTED[name]:
                raise ValueError(
                    f"{name}={value!r} is not supported by fastvq.nn.VectorQuantize (only the "
                    f"default {_UNSUPPORTED[name]!r})"
                )
        dim = check_int("dim", dim, 1)
        codebook_size = check_int("codebook_size", codebook_size, 1)
        codebook_dim = dim if codebook_dim is None else check_int("codebook_dim", codebook_dim, 1)
        heads = check_int("heads", heads, 1)
        self.decay = check_real("decay", decay, 0.0, 1.0)
        self.eps = check_real("eps", eps, 0.0)
        self.kmeans_iters = check_int("kmeans_iters", kmeans_iters, 0)
        self.threshold_ema_dead_code = check_real(
            "threshold_ema_dead_code", threshold_ema_dead_code, 0.0
        )
        self.commitment_weight = check_real("commitment_weight", commitment_weight, 0.0)
        self.orthogonal_reg_weight = check_real("orthogonal_reg_weight", orthogonal_reg_weight, 0)
        self.sample_codebook_temp = check_real("sample_codebook_temp", sample_codebook_temp, 0.0)
        if orthogonal_reg_max_codes is not None:
            orthogonal_reg_max_codes = check_int(
                "orthogonal_reg_max_codes", orthogonal_reg_max_codes, 1
            )
        if codebook_loss_weight is not None:
            codebook_loss_weight = check_real("codebook_loss_weight", codebook_loss_weight, 0.0)
        check_backend(backend)
        check_choice("precision", precision, ("exact", "fast"))
        has_generator = codebook_generator is not None
        if has_generator and not isinstance(codebook_generator, nn.Module):
            raise TypeError(
                "codebook_generator must be an nn.Module whose forward() returns the codebook, "
                f"got {type(codebook_generator).__name__}"
            )

        # Defaults as the peer's; a generated codebook is learnable and never EMA-updated.
        learnable = bool(has_generator if learnable_codebook is None else learnable_codebook)
        ema_update = bool(not learnable if ema_update is None else ema_update)
        if rotation_trick is None:
            rotation_trick = grad in (None, "rotation") and dim > 1
        if grad is None:
            grad = "rotation" if rotation_trick else "ste"
        check_choice("grad", grad, GRADS)
        if rotation_trick and grad != "rotation":
            raise ValueError(f"rotation_trick=True conflicts with grad={grad!r}")

        if accept_image_fmap and accept_3d_fmap:
            raise ValueError("accept_image_fmap and accept_3d_fmap are mutually exclusive")
        if learnable and ema_update:
            raise ValueError("learnable_codebook=True is not compatible with ema_update=True")
        if learnable and use_cosine_sim:
            raise ValueError("use_cosine_sim=True is not compatible with a learnable codebook")
        if codebook_loss_weight is not None and not learnable:
            raise ValueError("codebook_loss_weight needs a learnable codebook")
        if orthogonal_reg_active_codes_only and heads > 1 and separate_codebook_per_head:
            raise ValueError(
                "orthogonal_reg_active_codes_only is not compatible with separate_codebook_per_head"
            )
        if has_generator:
            if not learnable or ema_update:
                raise ValueError("codebook_generator needs learnable_codebook and no ema_update")
            if kmeans_init or self.threshold_ema_dead_code > 0:
                raise ValueError(
                    "codebook_generator is not compatible with kmeans_init or "
                    "threshold_ema_dead_code > 0 (a generated codebook cannot be overwritten)"
                )
            if heads > 1 and separate_codebook_per_head:
                raise ValueError("codebook_generator supports one (shared) codebook only")

        self.dim, self.heads, self.codebook_size = dim, heads, codebook_size
        self.codebook_dim = codebook_dim
        self.separate_codebook_per_head = bool(separate_codebook_per_head and heads > 1)
        self.num_codebooks = heads if self.separate_codebook_per_head else 1
        self.freeze_codebook = freeze_codebook
        self.kmeans_init, self.sync_kmeans = kmeans_init, sync_kmeans
        self.use_cosine_sim = use_cosine_sim
        self.metric = "cosine" if use_cosine_sim else "l2"
        self.channel_last = channel_last
        self.accept_image_fmap, self.accept_3d_fmap = accept_image_fmap, accept_3d_fmap
        self.orthogonal_reg_active_codes_only = orthogonal_reg_active_codes_only
        self.orthogonal_reg_max_codes = orthogonal_reg_max_codes
        self.stochastic_sample_codes = stochastic_sample_codes
        self.rotation_trick, self.grad = grad == "rotation", grad
        self.sync_codebook = _is_distributed() if sync_codebook is None else bool(sync_codebook)
        self.ema_update, self.learnable_codebook = ema_update, learnable
        self.codebook_loss_weight = codebook_loss_weight
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        self.route_gradients_to_input = route_gradients_to_input
        self.backend, self.precision = backend, precision

        inner = codebook_dim * heads
        self.has_projections = inner != dim
        if self.has_projections:
            self.project_in = nn.Linear(dim, inner)
            if layernorm_after_project_in:
                self.project_in = nn.Sequential(self.project_in, nn.LayerNorm(inner))
            self.project_out = nn.Linear(inner, dim)
        else:
            self.project_in, self.project_out = nn.Identity(), nn.Identity()

        self.codebook_generator = codebook_generator
        # A list while _deferred_update() collects the updates of several forwards.
        self._deferred = None
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        if has_generator:
            return
        c = self.num_codebooks
        if kmeans_init:
            embed = torch.zeros(c, codebook_size, codebook_dim)
        else:
            # The peer's init: kaiming-uniform over the (C, K, D) tensor, bound sqrt(6 / (K D)).
            embed = nn.init.kaiming_uniform_(torch.empty(c, codebook_size, codebook_dim))
            if use_cosine_sim:
                embed = _l2norm(embed)
        self.register_buffer("cluster_size", torch.ones(c, codebook_size))
        self.register_buffer("embed_avg", embed.clone())
        # A parameter when trained by gradient (learnable, or the orthogonal regulariser's
        # gradient on an EMA codebook, as the peer does).
        if learnable or self.orthogonal_reg_weight > 0:
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)
        self._register_load_state_dict_pre_hook(_rename_peer_keys)

    # (the `initted` tensor, its version counter) once it is known True: see _is_initted.
    _initted_seen = None
    # EMA statistics, kept float32 (float64 after a float64 cast) whatever the module's dtype.
    _EMA_STATS = ("cluster_size", "embed_avg")

    def _apply(self, fn, recurse=True):
        """module.to(dtype), .half(), .bfloat16() cast the codebook (searched in float32 all the
        same) but keep the EMA statistics float32, moved unrounded from the tensors they were.
        bf16 keeps 8 significant bits, so a change under half an ulp, 2^-9 to 2^-8 (0.2-0.4 %) of
        the value, rounds away; a decay-0.99 step changes a statistic by 1 % of its gap to the
        batch's value, so gaps under 20-40 % are lost and the EMA stalls: a count of 100 meeting
        110 every step stays at 100 in bf16 (100.1 rounds to 100), and stops at 109.4 in fp16.
        float32 and float64 casts apply as given."""
        before = {name: self._buffers.get(name) for name in self._EMA_STATS}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers.get(name)
            if old is not None and new is not None and new.dtype not in ACCUMULATORS:
                self._buffers[name] = old.to(device=new.device, dtype=torch.float32)
        return self

    # --- codebook access -----------------------------------------------------------------------

    def _codebooks(self) -> torch.Tensor:
        """(C, K, codebook_dim) codebook(s), differentiable when generated/learnable; in the
        module's dtype (a generated codebook: float32)."""
        if self.codebook_generator is not None:
            codebook = self.codebook_generator()
            k, d = self.codebook_size, self.codebook_dim
            check_tensor("codebook_generator's output", codebook)
            if codebook.shape != (k, d):
                raise ValueError(
                    f"codebook_generator must return shape {(k, d)}, got {tuple(codebook.shape)}"
                )
            return codebook.float()[None]
        return self.embed

    @property
    def _codebook(self) -> "VectorQuantize":
        """The layer itself, for peer code that reads vq._codebook.embed, .cluster_size,
        .embed_avg or .initted (the peer keeps them on a codebook submodule; fastvq on the
        layer, with the same shapes)."""
        return self

    @property
    def codebook(self) -> torch.Tensor:
        """(K, codebook_dim), or (heads, K, codebook_dim) with separate_codebook_per_head.
        Assigning one also sets the EMA sums to match it (the counts kept) and marks the layer
        initialised (no k-means init replaces it)."""
        if self.codebook_generator is not None:
            with torch.no_grad():
                return self._codebooks()[0]
        return self.embed if self.separate_codebook_per_head else self.embed[0]

    @codebook.setter
    def codebook(self, codes: torch.Tensor) -> None:
        if self.codebook_generator is not None:
            raise ValueError("a generated codebook cannot be assigned")
        check_floating("codebook", codes)  # an integer or bool tensor would be cast silently
        shape = self.codebook.shape  # the getter's: (heads,) K, codebook_dim
        if codes.shape != shape:  # a (D, K) transpose of as many elements would scramble codes
            raise ValueError(f"codebook must have shape {tuple(shape)}, got {tuple(codes.shape)}")
        with torch.no_grad():
            self.embed.copy_(codes.reshape(self.embed.shape))
            # The next EMA step rebuilds the codebook from embed_avg / cluster_size, and a
            # pending k-means init would overwrite it: the statistics follow the new codes (the
            # counts kept, as k-means init sets them) and the layer counts as initialised.
            for c, (cs, es) in enumerate(zip(self.cluster_size, self.embed_avg, strict=True)):
                es.copy_(self.embed[c] * _smoothed(cs, self.eps)[:, None])
            self.initted.fill_(True)
        self._see_initted()

    def export_codebook(self) -> torch.Tensor:
        """The current codebook as a plain tensor (detached copy), e.g. to drop the hyper-net."""
        return self.codebook.detach().clone()

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes (before project_out) for indices shaped like forward's; -1 gives a zero code.

        Returns (B, ..., heads * codebook_dim), channels first for image / 3d fmaps and
        channel_last=False, like the peer.
        """
        codes = self._lookup(indices)
        return self._channels_first(codes)

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """project_out(codes): what forward returns for those indices (in x's layout)."""
        return self._channels_first(project_codes(self.project_out, self._lookup(indices)))

    def _lookup(self, indices: torch.Tensor, check: bool = True) -> torch.Tensor:
        """(..., d) codes of indices (..., heads) (or (...) with one head); check: the range
        check, one host sync (a residual stack checks all its layers' indices at once)."""
        codebooks = self._codebooks().detach()
        check_index_tensor("indices", indices, codebooks.device)
        if self.heads > 1:
            if indices.dim() == 0 or indices.shape[-1] != self.heads:
                raise ValueError(
                    f"indices must end with a heads axis of {self.heads}, got {indices.shape}"
                )
        else:
            indices = indices[..., None]
        idx = indices.long()
        if check:  # else IndexError, or -2 a silent zero code
            check_index_range("indices", idx, -1, self.codebook_size, " (-1: masked padding)")
        valid = (idx >= 0)[..., None]
        idx = idx.clamp(min=0)
        # F.embedding: a deterministic backward into a learnable codebook (indexing's is not).
        if self.num_codebooks == 1:
            codes = F.embedding(idx, codebooks[0])
        else:
            codes = torch.stack(
                [F.embedding(idx[..., h], codebooks[h]) for h in range(self.heads)], dim=-2
            )
        codes = codes * valid
        return codes.flatten(-2)

    def _channels_first(self, t: torch.Tensor) -> torch.Tensor:
        if self.accept_image_fmap or self.accept_3d_fmap or not self.channel_last:
            return t.movedim(-1, 1)
        return t

    # --- forward -------------------------------------------------------------------------------

    def extra_repr(self) -> str:
        return describe(
            self, "dim", "codebook_size", "codebook_dim", "heads", "metric", "grad", "decay",
            "commitment_weight", "kmeans_init", "threshold_ema_dead_code",
        )  # fmt: skip

    def forward(
        self,
        x: torch.Tensor,
        indices: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        lens: torch.Tensor | None = None,
        topk: int | None = None,
        sample_codebook_temp: float | None = None,
        freeze_codebook: bool | None = None,
        return_loss_breakdown: bool = False,
        codebook_transform_fn=None,
        ema_update_weight: torch.Tensor | None = None,
        accum_ema_update: bool = False,
        ema_update: bool | None = None,
        *,
        check_inputs_finite: bool = True,
    ):
        for name, value in (
            ("indices", indices),
            ("codebook_transform_fn", codebook_transform_fn),
            ("ema_update_weight", ema_update_weight),
        ):
            if value is not None:
                raise ValueError(f"forward's {name} is not supported by fastvq.nn.VectorQuantize")
        if accum_ema_update:
            raise ValueError("accum_ema_update=True is not supported by fastvq.nn.VectorQuantize")
        k = None if topk is None else self._check_topk(topk)
        z, mask, restore = self._to_rows(x, mask, lens)
        freeze = self.freeze_codebook if freeze_codebook is None else freeze_codebook
        do_ema = self.ema_update if ema_update is None else ema_update
        temp = self.sample_codebook_temp
        if sample_codebook_temp is not None:
            temp = check_real("sample_codebook_temp", sample_codebook_temp, 0.0)
        b, n = z.shape[:2]
        out_dtype = z.dtype
        # Search, EMA and losses in float32 whatever the autocast dtype (as the peer).
        with autocast_off(z.device.type):
            z = z.float().reshape(b, n, self.heads, self.codebook_dim)
            if self.use_cosine_sim:
                z = _l2norm(z)
            rows, row_mask = self._split(z, mask)
            if self.training and self.kmeans_init and not self._initted_known():
                if check_inputs_finite and self._group(self.sync_kmeans):  # before its all-reduces
                    check_finite_on_every_rank(True, z=z)
                self._init_from_rows(rows, row_mask)
            if k is not None:
                # heads == 1: one codebook, rows (b n, codebook_dim); no codebook update.
                m = None if row_mask is None else row_mask[0]
                codebook = self._codebooks()[0]
                idx = self._topk_search(rows[0], codebook.detach(), k, temp, check_inputs_finite)
                r_rep = rows[0][:, None].expand(-1, k, -1)
                q, loss, commit, ortho = self._topk_apply(r_rep, idx, m, codebook, freeze)
        if k is not None:
            quantized = self.project_out(q.reshape(b, n, k, self.codebook_dim).to(out_dtype))
            quantized, idx, loss = restore(quantized, idx.reshape(b, n, k), loss.reshape(b, n, k))
            if not return_loss_breakdown:
                return quantized, idx, loss
            commit = restore(None, None, commit.reshape(b, n, k))[2]
            zero = ortho.new_zeros(())
            return quantized, idx, loss, LossBreakdown(commit, zero, ortho, zero)
        with autocast_off(z.device.type):
            codebooks = self._codebooks()
            update = self.training and not freeze and self.codebook_generator is None
            update = update and (do_ema or self.threshold_ema_dead_code > 0)
            if update:
                refuse_recomputation()
            stochastic = self._samples(temp)
            check = check_inputs_finite
            synced = update and self._group(True)
            if check and (self.num_codebooks > 1 or stochastic or synced):
                # Every head's rows and codebook in one host sync, not one per head; sampled
                # codes have no search to check them (a NaN row would reach the EMA).
                check_finite_on_every_rank(synced, z=z, codebook=codebooks)
                check = False
            qs, idxs, codes = [], [], []
            for c, zc in enumerate(rows):
                # A codebook updated in place below (a Parameter, a DataParallel replica's) is
                # copied first: the estimator's backward reads the codes it quantized with (K x D,
                # small next to the search). A buffer codebook is replaced by a new tensor
                # instead, so needs none.
                cb = codebooks[c].detach()
                cb = _snapshot(cb) if update and self._updates_in_place() else cb
                if stochastic:
                    idx = _gumbel_indices(zc.detach(), cb, self.metric, temp)
                    q = _gather(zc, cb, idx, self.grad, self.backend)
                else:
                    q, idx = fastvq.quantize(
                        zc,
                        cb,
                        metric=self.metric,
                        grad=self.grad,
                        precision=self.precision,
                        backend=self.backend,
                        check_inputs_finite=check,
                    )
                if not (self.route_gradients_to_input and zc.requires_grad):
                    q = _codes_without_estimator(q, idx, codebooks[c])
                qs.append(q)
                idxs.append(idx)
                if self.learnable_codebook and self.training:
                    codes.append(F.embedding(idx, codebooks[c]))  # codebook-loss gradient path
            if update:
                self._update_or_defer(rows, idxs, row_mask, do_ema)
            loss, commit, ortho = self._losses(rows, qs, idxs, codes, row_mask, freeze, z)
        quantized, embed_ind = self._merge(qs, idxs, b, n)
        quantized = self.project_out(quantized.to(out_dtype))
        quantized, embed_ind = restore(quantized, embed_ind)
        if not return_loss_breakdown:
            return quantized, embed_ind, loss
        zero = loss.new_zeros(())
        return quantized, embed_ind, loss, LossBreakdown(commit, zero, ortho, zero)

    def _to_rows(self, x, mask, lens):
        """(B, N, heads * codebook_dim) projected rows, (B, N) bool mask or None, and a function
        mapping (B, N, dim) outputs and (B, N[, heads]) indices back to x's layout."""
        check_floating("x", x)
        if mask is not None and lens is not None:
            raise ValueError("pass mask or lens, not both")
        fmap = self.accept_image_fmap or self.accept_3d_fmap
        if fmap:
            ndim = 4 if self.accept_image_fmap else 5
            layout = "(B, dim, H, W)" if self.accept_image_fmap else "(B, dim, T, H, W)"
            if x.dim() != ndim or x.shape[1] != self.dim:
                raise ValueError(f"x must have shape {layout} with dim = {self.dim}, got {x.shape}")
            if mask is not None or lens is not None:
                raise ValueError("mask / lens are not supported with image or 3d feature maps")
            spatial = x.shape[2:]
            seq = x.flatten(2).transpose(1, 2)
        elif x.dim() == 2:
            if x.shape[1] != self.dim:
                raise ValueError(f"x must have shape (B, dim) with dim = {self.dim}, got {x.shape}")
            if mask is not None or lens is not None:
                raise ValueError("mask / lens need a sequence (B, N, dim), got one token (B, dim)")
            seq = x[:, None]
        elif x.dim() == 3:
            feat = 2 if self.channel_last else 1
            if x.shape[feat] != self.dim:
                layout = "(B, N, dim)" if self.channel_last else "(B, dim, N)"
                raise ValueError(f"x must have shape {layout} with dim = {self.dim}, got {x.shape}")
            seq = x if self.channel_last else x.transpose(1, 2)
        else:
            raise ValueError(
                f"x must be (B, N, dim), (B, dim, N) or (B, dim) (or an image / 3d fmap with "
                f"accept_image_fmap / accept_3d_fmap), got {x.dim()} dimensions"
            )
        b, n = seq.shape[:2]
        if lens is not None:
            check_tensor("lens", lens)
            if lens.shape != (b,) or lens.dtype not in INDEX_DTYPES:  # uint16: torch's error
                raise ValueError(f"lens must be an integer tensor of shape ({b},), got {lens}")
            mask = torch.arange(n, device=seq.device) < lens[:, None].to(seq.device)
        if mask is not None:
            check_mask(mask, (b, n), seq.device)
        orig = seq

        def restore(quantized, indices, loss=None):
            """quantized (B, N[, k], dim), indices (B, N[, heads or k]) and, with topk, the
            per-candidate loss (B, N, k) (indices' layout); None entries pass through."""
            if quantized is not None and mask is not None:
                fill = torch.zeros_like(orig) if self.return_zeros_for_masked_padding else orig
                if quantized.dim() == 4:  # topk: (B, N, k, dim)
                    fill = fill[:, :, None]
                keep = mask.view(b, n, *([1] * (quantized.dim() - 2)))
                quantized = torch.where(keep, quantized, fill.to(quantized.dtype))
                keep = mask if indices.dim() == 2 else mask[..., None]
                indices = indices.masked_fill(~keep, -1)
            if fmap:
                if quantized is not None:
                    quantized = quantized.movedim(-1, 1)
                    quantized = quantized.reshape(b, self.dim, *spatial, *quantized.shape[3:])
                indices, loss = (
                    None if t is None else t.reshape(b, *spatial, *t.shape[2:])
                    for t in (indices, loss)
                )
            elif x.dim() == 2:
                quantized, indices, loss = (None if t is None else t[:, 0]
                                            for t in (quantized, indices, loss))  # fmt: skip
            elif not self.channel_last and quantized is not None:
                quantized = quantized.movedim(-1, 1)
            return (quantized, indices) if loss is None else (quantized, indices, loss)

        return project_in("x", self.project_in, seq), mask, restore

    def _split(self, z, mask):
        """Per codebook: (M, codebook_dim) rows and (M,) bool mask (or None). z: (B, N, H, Dc)."""
        if self.num_codebooks == 1:
            rows = [z.reshape(-1, self.codebook_dim)]
            masks = (
                None if mask is None else [mask[..., None].expand(-1, -1, self.heads).reshape(-1)]
            )
        else:
            rows = [z[:, :, h].reshape(-1, self.codebook_dim) for h in range(self.heads)]
            masks = None if mask is None else [mask.reshape(-1)] * self.heads
        return rows, masks

    def _merge(self, qs, idxs, b, n):
        if self.num_codebooks == 1:
            q = qs[0].reshape(b, n, self.heads * self.codebook_dim)
            idx = idxs[0].reshape(b, n, self.heads)
        else:
            q = torch.stack([t.reshape(b, n, self.codebook_dim) for t in qs], dim=2).flatten(2)
            idx = torch.stack([t.reshape(b, n) for t in idxs], dim=2)
        return q, (idx[..., 0] if self.heads == 1 else idx)

    # --- top-k (forward(topk=) and ResidualVQ's beam search) ------------------------------------

    def _check_topk(self, topk) -> int:
        """The peer's min(int(topk), codebook_size), with its assertion as a ValueError."""
        if self.heads > 1:
            raise ValueError(f"topk needs heads=1 (as the peer), got heads={self.heads}")
        k = min(check_int("topk", topk, 1), self.codebook_size)
        if k > MAX_TOPK:
            raise ValueError(
                f"topk must be at most {MAX_TOPK} (fastvq.nearest_code's top-k limit) or "
                f"codebook_size, got topk={topk} for codebook_size={self.codebook_size}"
            )
        return k

    def _topk_search(self, rows, codebook, k: int, temp: float, check: bool = True):
        """(M, k) int64 candidates for (M, codebook_dim) float32 rows (normalized for cosine),
        nearest first; in training with stochastic_sample_codes, the top k of the peer's
        Gumbel-perturbed logits (row chunks, never M x K). check: nearest_code's
        check_inputs_finite."""
        rows = rows.detach()
        if self._samples(temp):
            return _gumbel_indices(rows, codebook, self.metric, temp, k)
        return fastvq.nearest_code(
            rows,
            codebook,
            metric=self.metric,
            precision=self.precision,
            backend=self.backend,
            k=k,
            check_inputs_finite=check,
        )

    def _samples(self, temp: float) -> bool:
        """Whether a forward at this temperature samples codes (Gumbel) instead of searching:
        then no finite check runs on its rows."""
        return self.training and self.stochastic_sample_codes and temp > 0

    def _topk_apply(self, r_rep, idx, row_mask, codebook, freeze: bool, cb=None):
        """The k candidates' outputs and losses, as the peer's topk forward.

        r_rep: (M, k, codebook_dim) float32 rows, each repeated for its k candidates (or, in beam
        search, one row per beam); idx: (M, k); row_mask: (M,) bool or None; codebook: the layer's
        (K, codebook_dim) codebook (differentiable when learnable); cb: the detached codes the
        estimator reads (default codebook.detach()).
        Returns q (M, k, codebook_dim) (the estimator between each row and its code), loss (M, k),
        commitment (M, k) (unweighted per-candidate MSE, 0 at masked rows), ortho (scalar).
        """
        m, k, d = r_rep.shape
        cb = codebook.detach() if cb is None else cb
        q = _gather(r_rep.reshape(m * k, d), cb, idx.reshape(-1), self.grad, self.backend)
        q = q.view(m, k, d)
        if not (self.route_gradients_to_input and r_rep.requires_grad):
            q = _codes_without_estimator(q, idx, codebook)
        learnable = self.learnable_codebook
        codes = F.embedding(idx, codebook) if learnable else None
        zero = r_rep.new_zeros(())
        # The peer: commitment target = the codes, differentiable for a learnable codebook (in
        # training only when not frozen and, in fastvq, without a separate codebook loss).
        if self.training:
            learn = learnable and not freeze
            joint = learn and self.codebook_loss_weight is None
        else:
            learn, joint = False, learnable
        commit = ((codes if joint else q.detach()) - r_rep).square().mean(-1)
        if row_mask is not None:
            commit = torch.where(row_mask[:, None], commit, 0.0)
        cw = self.commitment_weight
        if not self.training:  # the peer's eval loss: weighted, or unweighted at weight 0
            return q, (commit * cw if cw > 0 else commit), commit, zero
        loss = commit * cw if cw > 0 else torch.zeros_like(commit)
        if learn and self.codebook_loss_weight is not None:
            e2 = (codes - r_rep.detach()).square().mean(-1)
            if row_mask is not None:
                e2 = torch.where(row_mask[:, None], e2, 0.0)
            loss = loss + e2 * self.codebook_loss_weight
        ortho = zero
        if self.orthogonal_reg_weight > 0:
            ortho = self._orthogonal_loss([idx], None if row_mask is None else [row_mask])
            loss = loss + ortho * self.orthogonal_reg_weight
        return q, loss, commit, ortho

    # --- codebook learning (eager: data-dependent branches and host syncs) ----------------------

    def _group(self, sync: bool):
        return True if sync and self.sync_codebook else False

    def _initted_known(self) -> bool:
        """Whether `initted` is known True without reading it (no host sync): it was read or set
        True, and since then neither replaced (.to(device), load_state_dict(assign=True)) nor
        written in place (load_state_dict, copy_ / fill_ by hand, the trainer's meta step putting
        its buffers back: each bumps the tensor's version counter)."""
        if torch.compiler.is_compiling():
            # dynamo reads no version counter: it guards on whether `initted` was seen True, so
            # a compiled step after the init holds neither the init nor a graph break. Writes
            # to `initted` by hand under compile go unseen; load_state_dict's do not.
            return self._initted_seen is not None
        seen, buf = self._initted_seen, self.initted
        return seen is not None and seen[0] is buf and seen[1] == buf._version

    def _see_initted(self) -> None:
        """Record that `initted` holds True now (inference tensors have no version: not kept)."""
        buf = self.initted
        self._initted_seen = None if buf.is_inference() else (buf, buf._version)

    def _is_initted(self) -> bool:
        """bool(initted), reading the buffer (a host sync) only until it is known True: the init
        runs once, and a read in every training step would stall the stream for good. Writes
        the version counter misses are missed here too: through .data or numpy, and collectives
        (dist.broadcast, DDP's buffer broadcast, which hand every rank rank 0's value): a rank
        whose `initted` is known True skips the init even if rank 0's turned False that way."""
        if self._initted_known():
            return True
        if not bool(self.initted):
            return False
        self._see_initted()
        return True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._read_initted()

    def __getstate__(self):
        # A copy (copy.deepcopy, pickle, torch.save) reads `initted` afresh: its buffer's version
        # counter restarts at 0, so a recorded version of 2 could be reached again by writes.
        state = dict(super().__getstate__())
        state.pop("_initted_seen", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._read_initted()

    def _read_initted(self) -> None:
        """After a load or a copy: read `initted` once, there rather than in the next training
        step, where compiled it was a graph break (fullgraph=True failed on a resumed model)."""
        self._initted_seen = None
        buf = self._buffers.get("initted")
        # Plain tensors with values only: not meta, fake or other subclasses (FSDP's DTensor),
        # whose flag is read at the next training step as before.
        if type(buf) is torch.Tensor and not buf.is_meta and not torch.compiler.is_compiling():
            if bool(buf):
                self._see_initted()

    @eager_only
    def _init_from_rows(self, rows, row_mask) -> None:
        if self._is_initted():
            return
        if row_mask is not None:
            rows = [r[m] for r, m in zip(rows, row_mask, strict=True)]
        self._kmeans_into_state(rows, self.kmeans_iters, None, 1)

    @torch.no_grad()
    def _kmeans_into_state(self, rows, iters, generator, batches) -> None:
        group = self._group(self.sync_kmeans)
        k = self.codebook_size
        # Synced, rank 0's row counts pick the branch on every rank (k-means, or rows repeated:
        # rank 0 draws either way): ranks with other counts would join other collectives.
        counts = _leader_counts([r.shape[0] for r in rows], group, rows[0].device)
        for c, r in enumerate(rows):
            r = r.detach().float()
            if counts[c] == 0:
                raise ValueError(
                    "x: k-means init needs at least one (unmasked) row in the batch that runs it "
                    "(on rank 0 when synced)"
                )
            if counts[c] >= k:
                centroids = fastvq.kmeans(
                    r,
                    k,
                    iters,
                    metric=self.metric,
                    generator=generator,
                    backend=self.backend,
                    all_reduce=group,
                )
            else:
                # Fewer rows than codes: every row becomes a code, repeated (Lloyd iterations
                # cannot separate duplicates); dead-code replacement spreads them later.
                warnings.warn(
                    f"k-means init received {r.shape[0]} vectors for a codebook of {k}: rows are "
                    "repeated",
                    stacklevel=3,
                )
                if r.shape[0] > 0:
                    centroids = r[_sample_rows(r.shape[0], k, generator, r.device)]
                else:  # a synced rank without rows receives rank 0's
                    centroids = r.new_empty(k, r.shape[1])
                if self.use_cosine_sim:
                    centroids = _l2norm(centroids)
                if group:
                    torch.distributed.broadcast(centroids, src=0)
            idx = fastvq.nearest_code(r, centroids, metric=self.metric, backend=self.backend)
            cs, es = self.cluster_size[c], self.embed_avg[c]
            # decay 0: the statistics become the rows' counts (all-reduced when synced), per
            # training batch: the units the EMA keeps them in, which threshold_ema_dead_code
            # and the weight of the next batches' rows assume.
            fastvq.ema_update_(cs, es, r, idx, 0.0, all_reduce=group, backend=self.backend)
            if batches != 1:
                cs.div_(batches)
            es.copy_(centroids * _smoothed(cs, self.eps)[:, None])
            self.embed.data[c].copy_(centroids)
        self.initted.fill_(True)
        self._see_initted()  # the next steps skip the init without reading the buffer

    def _update(self, rows, idxs, row_mask, do_ema: bool) -> None:
        """EMA statistics (in place), then the new codebook. A buffer codebook is replaced by a
        new tensor rather than written in place: the estimator's backward (rotation trick)
        reads the codes it quantized with, and torch.compile's partitioner may recompute a
        forward-time copy from the buffer itself. A Parameter codebook (orthogonal regulariser,
        learnable) is written through .data; the forward quantized with a copy of it. Written in
        place too: a DataParallel replica's buffer (an attribute set on the replica would be lost
        with it; its device-0 buffers are the module's own), after a copy like a Parameter's;
        and under torch.inference_mode in eager mode (no backward; the new tensor would be an
        inference tensor, which no later training step could save for its backward)."""
        if self._param_codebook():
            self._update_param(rows, idxs, row_mask, do_ema)
            return
        self._update_stats(rows, idxs, row_mask, do_ema)

    @eager_only
    def _update_param(self, rows, idxs, row_mask, do_ema: bool) -> None:
        # Writes through .data are invisible to torch.compile (inductor drops them): eager.
        self._update_stats(rows, idxs, row_mask, do_ema)

    def _update_stats(self, rows, idxs, row_mask, do_ema: bool) -> None:
        group = self._group(True)
        masks = [None] * len(rows) if row_mask is None else row_mask
        # fastvq.ema_update_'s work without its checks, which this module's own buffers, rows,
        # masks and indices pass by construction (indices in [0, K) from its search or sampler:
        # the range check would cost a host sync per codebook per step); the backend, the
        # deterministic mode and the process group resolved once per step, not per codebook.
        stats = self.embed_avg
        float64 = torch.float64 in (stats.dtype, rows[0].dtype)
        name = _stats_backend(self.backend, stats.device, float64)
        deterministic = torch.are_deterministic_algorithms_enabled()
        pg = _process_group("all_reduce", group)
        param = self._param_codebook()
        with torch.no_grad():
            for c, (r, idx) in enumerate(zip(rows, idxs, strict=True)):
                cs, es = self.cluster_size[c], self.embed_avg[c]
                _ema_update(cs, es, r.detach(), idx, self.decay, masks[c], deterministic, name, pg)
            if param:
                embed = self.embed.data
            elif do_ema:
                embed = torch.empty_like(self.embed)  # every codebook is written below
            elif self.threshold_ema_dead_code > 0:
                embed = self.embed.clone()
            else:
                return
            if do_ema:
                for c in range(self.num_codebooks):
                    # fastvq.ema_codebook without its argument checks
                    smoothed = _smoothed(self.cluster_size[c], self.eps)[:, None]
                    code = self.embed_avg[c] / smoothed
                    embed[c] = _l2norm(code) if self.use_cosine_sim else code
        if self.threshold_ema_dead_code > 0:
            self._reset_dead(embed, rows, masks, group)
        if param:
            return
        # (dynamo cannot trace is_inference_mode_enabled: compiled, the buffer is replaced)
        inference = not torch.compiler.is_compiling() and torch.is_inference_mode_enabled()
        if inference or self._is_replica:
            with torch.no_grad():
                self.embed.copy_(embed)
        else:
            self.embed = embed

    def _param_codebook(self) -> bool:
        # A DataParallel replica holds its Parameters as plain tensors (views of them on device
        # 0) and lists them in _former_parameters: they are updated as Parameters still.
        former = self.__dict__.get("_former_parameters") or {}
        return isinstance(self.embed, nn.Parameter) or "embed" in former

    # nn.DataParallel sets it on each replica (torch.nn.Module._replicate_for_data_parallel).
    _is_replica = False

    def _updates_in_place(self) -> bool:
        return self._param_codebook() or self._is_replica

    @eager_only
    @torch.no_grad()
    def _reset_dead(self, embed, rows, masks, group) -> None:
        """Dead-code replacement: data-dependent row selection (and a broadcast when synced)
        runs eagerly, a deliberate graph break under torch.compile."""
        lives = [
            r.detach() if w is None else r.detach()[w] for r, w in zip(rows, masks, strict=True)
        ]
        # Synced, every rank joins the reset (its first rank holding rows draws them), or none
        # does: where no rank has a row left unmasked.
        counts = [live.shape[0] for live in lives]
        if group:
            most = torch.tensor(counts, device=rows[0].device)
            torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
            counts = most.tolist()
        for c, live in enumerate(lives):
            if counts[c] > 0:
                fastvq.reset_dead_codes_(
                    embed[c],
                    self.cluster_size[c],
                    self.embed_avg[c],
                    live,
                    self.threshold_ema_dead_code,
                    eps=self.eps,
                    broadcast=group,
                )

    def _update_or_defer(self, rows, idxs, row_mask, do_ema: bool) -> None:
        if self._deferred is None:
            self._update(rows, idxs, row_mask, do_ema)
            return
        if self._deferred and self._deferred[0][3] != do_ema:
            raise ValueError(
                "forward's ema_update must be the same for every forward whose codebook updates "
                "are deferred together (defer_codebook_updates)"
            )
        # Copies: the rows may be views of the caller's input, the indices are returned and the
        # mask is the caller's, any of which may change before the update runs.
        mask = None if row_mask is None else [m.clone() for m in row_mask]
        rows = [r.detach().clone() for r in rows]
        self._deferred.append((rows, [i.clone() for i in idxs], mask, do_ema))

    @contextlib.contextmanager
    def _deferred_update(self):
        """Within the block, forwards search a fixed codebook and only collect their rows; on
        exit one update (EMA and dead codes) runs on all of them together. ResidualVQ's shared
        codebook uses it: every layer searches the same codes, then one EMA step sees all
        layers' residuals. Nested, the outermost block collects and updates."""
        if self._deferred is not None:
            yield
            return
        self._deferred = []
        try:
            yield
            batches = self._deferred
        finally:
            self._deferred = None
        if not batches:
            return
        rows, idxs, masks = [], [], []
        for c in range(self.num_codebooks):
            rows.append(torch.cat([b[0][c] for b in batches]))
            idxs.append(torch.cat([b[1][c] for b in batches]))
            if any(b[2] is not None for b in batches):
                ones = [torch.ones_like(b[1][c], dtype=torch.bool) for b in batches]
                masks.append(torch.cat([b[2][c] if b[2] is not None else o
                                        for b, o in zip(batches, ones, strict=True)]))  # fmt: skip
        self._update(rows, idxs, masks or None, batches[0][3])

    def init_from(
        self,
        encoder_outputs: torch.Tensor,
        iters: int | None = None,
        generator: torch.Generator | None = None,
        batches: int = 1,
    ) -> None:
        """k-means (fastvq.kmeans) of encoder outputs into the codebook and its EMA state.

        encoder_outputs: (..., dim) floating, in x's feature space before project_in (B, N, dim
        rows; channel-last whatever the module's layout). Projected, split into heads and
        normalized (use_cosine_sim) as in forward, clustered per codebook with `iters` Lloyd
        iterations (default kmeans_iters); then codebook = centroids, cluster_size = counts /
        batches and embed_avg = centroids * smoothed cluster_size, and the module is marked
        initted. batches: how many training batches encoder_outputs holds. The EMA keeps counts
        per training batch (threshold_ema_dead_code compares with them, and they weigh the old
        codes against the next batch's rows), so the counts of 64 batches' rows start the EMA
        64 times too confident unless divided.
        """
        check_input("encoder_outputs", encoder_outputs, self.dim)
        if self.codebook_generator is not None:
            raise ValueError("init_from is not available with a codebook_generator")
        iters = self.kmeans_iters if iters is None else check_int("iters", iters, 0)
        batches = check_int("batches", batches, 1)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        with torch.no_grad():
            z = project_codes(self.project_in, encoder_outputs.reshape(1, -1, self.dim)).float()
            z = z.reshape(1, -1, self.heads, self.codebook_dim)
            if self.use_cosine_sim:
                z = _l2norm(z)
            rows, _ = self._split(z, None)
            self._kmeans_into_state(rows, iters, generator, batches)

    # --- losses --------------------------------------------------------------------------------

    def _losses(self, rows, qs, idxs, codes, row_mask, freeze, z):
        zero = z.new_zeros(())
        if not self.training:
            return zero, zero, zero
        loss = commit = ortho = zero
        learn = self.learnable_codebook and not freeze
        if self.commitment_weight > 0 or (learn and self.codebook_loss_weight is not None):
            # Per-codebook sums of squares, added without a leading 0 + ...: an op fewer each,
            # and the same bits (0 + s is s for any such sum: never -0).
            sq_commit, sq_codebook = [], []
            count = zero
            for c, (r, q) in enumerate(zip(rows, qs, strict=True)):
                w = None if row_mask is None else row_mask[c].to(r.dtype)[:, None]
                if learn and self.codebook_loss_weight is None:
                    # The peer's learnable codebook: one term, gradients to codes and inputs.
                    d2 = (codes[c] - r).square()
                else:
                    d2 = (q.detach() - r).square()
                sq_commit.append((d2 if w is None else d2 * w).sum())
                if learn and self.codebook_loss_weight is not None:
                    e2 = (codes[c] - r.detach()).square()
                    sq_codebook.append((e2 if w is None else e2 * w).sum())
                count = count + (r.numel() if w is None else w.sum() * r.shape[1])
            count = count.clamp(min=1) if torch.is_tensor(count) else max(count, 1)
            commit = functools.reduce(operator.add, sq_commit) / count
            loss = commit * self.commitment_weight
            if learn and self.codebook_loss_weight is not None:
                codebook_loss = functools.reduce(operator.add, sq_codebook) / count
                loss = loss + codebook_loss * self.codebook_loss_weight
        if self.orthogonal_reg_weight > 0:
            ortho = self._orthogonal_loss(idxs, row_mask)
            loss = loss + ortho * self.orthogonal_reg_weight
        return loss, commit, ortho

    def _orthogonal_loss(self, idxs, row_mask) -> torch.Tensor:
        """Eq. (2) of Shin et al. 2021 as the peer: sum over heads of ||C^ C^T||_F^2 / (H n^2)
        - 1/n over n normalized codes, computed as ||C^T C^||_F^2 (a D x D Gram matrix: O(D^2)
        memory instead of the peer's O(n^2)). On a copy of a Parameter codebook: a shared or beam
        update writes the codebook in place after this loss, and the backward must see the
        values the loss was computed from."""
        codebook = self._codebooks()
        if self._param_codebook():
            codebook = _snapshot(codebook)
        codebook = codebook.to(torch.promote_types(codebook.dtype, torch.float32))  # bf16: float32
        if self.orthogonal_reg_active_codes_only:
            used = idxs[0] if row_mask is None else idxs[0][row_mask[0]]
            codebook = codebook[:, torch.unique(used)]
        num = codebook.shape[1]
        if self.orthogonal_reg_max_codes is not None and num > self.orthogonal_reg_max_codes:
            keep = torch.randperm(num, device=codebook.device)[: self.orthogonal_reg_max_codes]
            codebook = codebook[:, keep]
        h, num = codebook.shape[:2]
        if num == 0:  # no valid row, so no active code (the peer's loss is NaN there)
            return codebook.sum() * 0.0  # 0, still attached to the codebook's graph
        normed = _l2norm(codebook)
        gram = normed.transpose(1, 2) @ normed
        return gram.square().sum() / (h * num**2) - 1 / num


@eager_only
def _snapshot(t: torch.Tensor) -> torch.Tensor:
    """A copy made outside any compiled graph: inside one, the partitioner may recompute a clone
    in the backward from the (by then updated) Parameter codebook."""
    return t.clone()


def _rename_peer_keys(state_dict, prefix, *args, **kwargs) -> None:
    """Load vector-quantize-pytorch state dicts: "_codebook.embed" -> "embed", etc."""
    for key in [k for k in state_dict if k.startswith(prefix + "_codebook.")]:
        state_dict[prefix + key[len(prefix + "_codebook.") :]] = state_dict.pop(key)


def _gumbel_indices(z, codebook, metric: str, temp: float, topk: int | None = None):
    """argmax_k(logit[n, k] / temp + Gumbel noise), logit = -||z - c|| (the peer's clamped
    Euclidean distance, not squared) or the cosine similarity; rows in chunks so that memory is
    O(chunk x K) with chunk x K <= 2^20. With topk: the topk largest perturbed logits, (N, topk),
    largest first (the peer's gumbel_sample(topk=))."""
    k = codebook.shape[0]
    codebook = codebook.to(z.dtype)  # a module cast to bf16 / fp16 / float64: float32 rows
    if metric == "cosine":
        codebook = _l2norm(codebook)
    c2 = codebook.square().sum(1)
    shape = (z.shape[0],) if topk is None else (z.shape[0], topk)
    out = torch.empty(shape, dtype=torch.int64, device=z.device)
    step = max(1, _SAMPLE_CHUNK_ELEMENTS // k)
    for start in range(0, z.shape[0], step):
        zc = z[start : start + step]
        dots = zc @ codebook.T
        if metric == "cosine":
            logits = dots
        else:
            d2 = zc.square().sum(1, keepdim=True) + c2 - 2 * dots
            logits = -d2.clamp(min=1e-8).sqrt()
        u = torch.rand_like(logits).clamp(min=1e-20)
        gumbel = -(-u.log()).clamp(min=1e-20).log()
        perturbed = logits / temp + gumbel
        if topk is None:
            out[start : start + step] = perturbed.argmax(dim=1)
        else:
            out[start : start + step] = perturbed.topk(topk, dim=1).indices
    return out


def _candidate_mse(rows, codebook, idx) -> torch.Tensor:
    """mean((codebook[idx[m, j]] - rows[m])^2) over the features: (M, D) rows, (M, k) indices ->
    (M, k), without gradients, gathering codes for row chunks of at most 2^20 elements (one chunk
    when traced)."""
    m, k = idx.shape
    out = rows.new_empty(m, k)
    if torch.compiler.is_compiling():
        # Traced (torch.compile, torch.export), one chunk: with a dynamic batch, a loop over
        # range(m) would specialize m to the traced value (a recompile per batch size, an export
        # error). The price is the whole (M, k, D) gather at once: beam search's rows are paths
        # (M = tokens x beam, k = beam), so 134 MB of float32 at 65,536 tokens, beam 4, D 32.
        step, starts = m, (0,)
    else:
        step = max(1, _SAMPLE_CHUNK_ELEMENTS // (k * rows.shape[1]))
        starts = range(0, m, step)
    with torch.no_grad():
        for start in starts:
            codes = codebook[idx[start : start + step]]
            out[start : start + step] = (codes - rows[start : start + step, None]).square().mean(-1)
    return out


def refuse_recomputation() -> None:
    """RuntimeError inside an autograd backward pass, where activation checkpointing recomputes
    a forward: for a forward that updates a codebook (which would run twice, and the recomputed
    codes come from the updated codebook)."""
    if not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1:
        raise RuntimeError(
            "VectorQuantize ran a training forward inside a backward pass, as "
            "torch.utils.checkpoint's recomputation does: its codebook update would run "
            "twice and the recomputed codes come from the updated codebook. Checkpoint "
            "the layers around the quantizer instead (or freeze its codebook there)"
        )


def _codes_without_estimator(q, idx, codebook) -> torch.Tensor:
    """route_gradients_to_input=False, or rows that need no gradient (a frozen encoder's): the
    codes themselves, q's values, with no gradient to the input and, as the peer's, the gradient
    of a lookup to a codebook that is a Parameter (the peer skips its estimator where
    x.requires_grad is False, so its codebook learns from the output there)."""
    if not codebook.requires_grad:
        return q.detach()
    return F.embedding(idx, codebook).to(q.dtype)


def _gather(z, codebook, indices, grad: str, backend: str) -> torch.Tensor:
    """codebook[indices] with fastvq.quantize's estimator for given (sampled) indices."""
    check_no_tangent("quantize", z, codebook)
    # One dtype, as fastvq.quantize promotes them: float32 rows with a bf16 / fp16 codebook (a
    # cast module) are float32 for every backend (the Triton body takes one dtype only).
    dtype = torch.promote_types(z.dtype, codebook.dtype)
    z, codebook = z.to(dtype).contiguous(), codebook.to(dtype).contiguous()
    use_triton = pick_backend(backend, z.device, dtype) == "triton"
    q, _ = _quantize_fwd(z, codebook, indices, grad, use_triton)
    return q


class HouseholderVQ(VectorQuantize):
    """The rotated VQ-VAE quantizer (seed paper "Vector Quantization for Neural Networks"): EMA
    codebook (decay 0.99), commitment 0.25, and gradients through a Householder reflection
    (fastvq.quantize grad="householder"). Other VectorQuantize arguments pass through."""

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        decay: float = 0.99,
        commitment_weight: float = 0.25,
        grad: str = "householder",
        **kwargs,
    ):
        super().__init__(
            dim,
            codebook_size,
            decay=decay,
            commitment_weight=commitment_weight,
            grad=grad,
            **kwargs,
        )


class HyperCodebook(VectorQuantize):
    """Meta-quantization's hyper-net codebook as a quantizer: codebook = CodebookMLP(embedding)
    (default 32 -> 256 -> 32, Tanh), regenerated on every forward and trained by gradient (no EMA,
    straight-through estimator): loss = commitment_weight * ||z - sg(q)||^2 +
    codebook_loss_weight * ||sg(z) - q||^2 (the paper's alpha, beta). The bi-level
    hyper-gradient step lives in fastvq.train.meta; export_codebook() returns the plain codebook
    so the hyper-net can be dropped after training.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_dim: int = 32,
        embed_dim: int = 32,
        hidden_dim: int = 256,
        commitment_weight: float = 0.25,
        codebook_loss_weight: float = 1.0,
        rotation_trick: bool = False,
        **kwargs,
    ):
        generator = CodebookMLP(codebook_size, codebook_dim, embed_dim, hidden_dim)
        super().__init__(
            dim,
            codebook_size,
            codebook_dim=codebook_dim,
            commitment_weight=commitment_weight,
            rotation_trick=rotation_trick,
            codebook_generator=generator,
            codebook_loss_weight=codebook_loss_weight,
            **kwargs,
        )


@contextlib.contextmanager
def defer_codebook_updates(module: nn.Module):
    """Gradient accumulation for EMA codebooks: `with defer_codebook_updates(model):` around an
    optimizer step's micro-batches makes them update every VectorQuantize in `module` (residual
    stacks' layers too) as one batch of them all would.

    Within the block each training forward searches the codebook as it was on entry and only
    collects its rows; on exit each quantizer runs one EMA / dead-code update on all of them.
    Without it, k micro-batches apply the decay k times per step, each update counting a k-th of
    the rows, and later micro-batches search codes the earlier ones moved. An exception in the
    block discards the collected rows (no update). k-means init (kmeans_init=True) still runs on
    the first training forward's rows, and dead-code resets draw their rows from the global
    generator at the block's end (so random numbers drawn between the quantizer and the end of
    the block, such as dropout's, move them). Every forward in the block must pass the same
    ema_update. Not for nn.DataParallel, whose replicas would collect rows on several devices.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    with contextlib.ExitStack() as stack:
        # Entered last to first, so that they exit (and update, drawing dead-code rows from the
        # global generator) in module order, as a forward updates its layers.
        for m in reversed(list(module.modules())):
            if isinstance(m, VectorQuantize):
                stack.enter_context(m._deferred_update())
        yield
