"""Every fastvq.nn module cast whole to float16, bfloat16 or float64 (module.to(dtype), as pure
low-precision training does) trains and evaluates on inputs of that dtype; VectorQuantize's EMA
statistics stay float32 (float64 after a float64 cast) and the cast module's EMA tracks the float32
module's; state dicts load across dtypes."""

import copy
import warnings

import pytest
import torch

from fastvq.nn import (
    BSQ,
    FSQ,
    LFQ,
    E8Quantize,
    GroupedResidualVQ,
    HouseholderVQ,
    HyperCodebook,
    LatentQuantize,
    LeechQuantize,
    RandomProjectionQuantizer,
    ResidualFSQ,
    ResidualLFQ,
    ResidualSimVQ,
    ResidualVQ,
    SimVQ,
    VectorQuantize,
)

D, K = 16, 32
DTYPES = [torch.float16, torch.bfloat16, torch.float64]
STATS = ("cluster_size", "embed_avg")


def _mask(x):
    mask = torch.ones(x.shape[:2], dtype=torch.bool)
    mask[0, -2:] = False
    return {"mask": mask}


# name: (factory, forward keyword arguments for x (2, 6, D))
MODULES = {
    "vq_projected": (lambda: VectorQuantize(D, K, codebook_dim=8), None),
    "vq_ste_masked": (lambda: VectorQuantize(D, K, rotation_trick=False), _mask),
    "vq_learnable": (lambda: VectorQuantize(D, K, learnable_codebook=True), None),
    "vq_kmeans_dead": (
        lambda: VectorQuantize(D, K, kmeans_init=True, threshold_ema_dead_code=2),
        None,
    ),
    "vq_cosine_heads": (
        lambda: VectorQuantize(D, K, heads=2, separate_codebook_per_head=True, use_cosine_sim=True),
        None,
    ),
    "vq_shared_heads": (lambda: VectorQuantize(D, K, heads=2, codebook_dim=8), None),
    "vq_orthogonal": (
        lambda: VectorQuantize(
            D, K, orthogonal_reg_weight=1.0, orthogonal_reg_active_codes_only=True
        ),
        None,
    ),
    "vq_stochastic": (lambda: VectorQuantize(D, K, stochastic_sample_codes=True), None),
    "vq_topk": (lambda: VectorQuantize(D, K), lambda x: {"topk": 2}),
    "householder": (lambda: HouseholderVQ(D, K), None),
    "hyper": (lambda: HyperCodebook(D, K, codebook_dim=8, embed_dim=8, hidden_dim=16), None),
    "rvq": (lambda: ResidualVQ(dim=D, num_quantizers=2, codebook_size=K, codebook_dim=8), _mask),
    "rvq_beam": (lambda: ResidualVQ(dim=D, num_quantizers=2, codebook_size=K, beam_size=2), None),
    "rvq_shared": (
        lambda: ResidualVQ(dim=D, num_quantizers=2, codebook_size=K, shared_codebook=True),
        None,
    ),
    "grvq": (lambda: GroupedResidualVQ(dim=D, groups=2, num_quantizers=2, codebook_size=K), None),
    "simvq": (lambda: SimVQ(D, K), None),
    "rsimvq": (lambda: ResidualSimVQ(dim=D, num_quantizers=2, codebook_size=K), None),
    "rpq": (lambda: RandomProjectionQuantizer(dim=D, codebook_size=K, codebook_dim=8), None),
    "fsq": (lambda: FSQ([8, 5, 5, 5], dim=D), None),
    "rfsq": (lambda: ResidualFSQ(dim=D, levels=[8, 5, 5], num_quantizers=2), None),
    "lfq": (lambda: LFQ(dim=D, codebook_size=16), None),
    "rlfq": (lambda: ResidualLFQ(dim=D, codebook_size=16, num_quantizers=2), None),
    "bsq": (lambda: BSQ(dim=D, codebook_size=16), None),
    "latent": (lambda: LatentQuantize(levels=[5, 5, 8], dim=D), None),
    "leech": (lambda: LeechQuantize(dim=D), None),
    "e8": (lambda: E8Quantize(dim=D), None),
}


def _vqs(module):
    return [m for m in module.modules() if isinstance(m, VectorQuantize) and hasattr(m, "embed")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(MODULES))
def test_cast_module_trains_and_evaluates(name, dtype):
    factory, kwargs = MODULES[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # k-means init of 12 rows into 32 codes warns
        module = factory().to(dtype)
        x = torch.randn(2, 6, D, dtype=dtype)
        if name == "latent":  # channel-first
            x = x.transpose(1, 2)
        extra = kwargs(x) if kwargs else {}
        for training in (True, True, False):
            module.train(training)
            xi = x.clone().requires_grad_()
            out = module(xi, **extra)
            if name == "rpq":
                assert out.dtype == torch.int64 and out.shape == (2, 6)
                continue
            q = out[0]
            assert q.dtype == dtype and torch.isfinite(q).all(), name
            total = q.float().square().mean()
            if isinstance(out[-1], torch.Tensor) and out[-1].is_floating_point():
                loss = out[-1]
                assert torch.isfinite(loss).all(), name
                total = total + loss.float().sum()
            if training:
                total.backward()
                assert xi.grad is not None and torch.isfinite(xi.grad).all(), name
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for vq in _vqs(module):
        assert vq.cluster_size.dtype == vq.embed_avg.dtype == acc
        assert vq.embed.dtype == dtype  # the codebook takes the module's dtype
        assert torch.isfinite(vq.embed).all() and torch.isfinite(vq.cluster_size).all()


# --- the cast module's EMA tracks the float32 module's -------------------------------------

# (VectorQuantize arguments, steps); dim 8, no projection, so both modules see the same rows.
EMA_CONFIGS = {
    "rotation": ({}, 3),
    "ste_masked": ({"rotation_trick": False}, 3),
    "cosine_heads": (
        {"heads": 2, "codebook_dim": 4, "separate_codebook_per_head": True, "use_cosine_sim": True},
        3,
    ),
    "shared_heads": ({"heads": 2, "codebook_dim": 4}, 3),
    "orthogonal": ({"orthogonal_reg_weight": 1.0}, 3),
    "householder": ({"grad": "householder"}, 3),
    # k-means init (step 1) and dead-code reset (step 2, half the codes unused). Later steps
    # would search exact duplicates of codes (reset codes), which rounding orders differently.
    "kmeans_dead": ({"kmeans_init": True, "threshold_ema_dead_code": 3.5}, 2),
}


def _separated_batches(vq, dtype, steps, gen):
    """Codes (C, K, Dc) representable in dtype, set as both modules' codebook (unless k-means
    init), and batches of rows near them: the nearest code is never in doubt."""
    c, dc, heads = vq.num_codebooks, vq.codebook_dim, vq.heads
    codes = torch.randn(c, 16, dc, generator=gen)
    if vq.use_cosine_sim:
        codes = torch.nn.functional.normalize(codes, dim=-1)
    codes = codes.to(dtype).float()
    noise = 0.0 if vq.kmeans_init else 0.02
    batches = []
    for step in range(steps):
        # k-means: every code 4 times (its centroids are the codes), then half of them.
        used = 16 if step == 0 or not vq.kmeans_init else 8
        idx = torch.arange(used).repeat(64 // used)[torch.randperm(64, generator=gen)]
        rows = [codes[h if c > 1 else 0][idx.roll(h)] for h in range(heads)]
        x = torch.cat(rows, dim=-1) + noise * torch.randn(64, heads * dc, generator=gen)
        batches.append(x.reshape(2, 32, heads * dc).to(dtype))
    return codes, batches


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", list(EMA_CONFIGS))
def test_cast_ema_tracks_float32(config, dtype):
    kwargs, steps = EMA_CONFIGS[config]
    torch.manual_seed(0)
    ref = VectorQuantize(8, 16, decay=0.8, **kwargs)
    gen = torch.Generator().manual_seed(1)
    codes, batches = _separated_batches(ref, dtype, steps, gen)
    if not ref.kmeans_init:
        with torch.no_grad():
            ref.embed.copy_(codes)
            ref.embed_avg.copy_(codes)
    vq = copy.deepcopy(ref).to(dtype)
    exact = dtype != torch.float64  # float64: float64 statistics, equal up to float32 rounding
    mask = torch.ones(2, 32, dtype=torch.bool)
    mask[1, 20:] = False
    for step, x in enumerate(batches):
        extra = {"mask": mask} if config == "ste_masked" else {}
        torch.manual_seed(10 + step)  # the same dead-code draws
        q_ref, idx_ref, loss_ref = ref(x.float(), **extra)
        torch.manual_seed(10 + step)
        q, idx, loss = vq(x, **extra)
        assert q.dtype == dtype and torch.isfinite(loss)
        assert torch.equal(idx, idx_ref), f"step {step}"
        for name in STATS:
            got, want = getattr(vq, name), getattr(ref, name)
            assert got.dtype == (torch.float32 if exact else torch.float64), name
            if exact:
                assert torch.equal(got, want), f"{name}, step {step}"
            else:
                torch.testing.assert_close(got.float(), want, msg=f"{name}, step {step}")
        assert vq.embed.dtype == dtype
        # the codebook: the float32 module's, rounded to the module's dtype
        if exact:
            assert torch.equal(vq.embed.detach(), ref.embed.detach().to(dtype)), f"step {step}"
        else:
            torch.testing.assert_close(vq.embed.detach().float(), ref.embed.detach())
        if exact:
            torch.testing.assert_close(q, q_ref.to(dtype))
        else:
            torch.testing.assert_close(q.float(), q_ref)
        if exact and step == 0 and config != "orthogonal":  # (its loss reads updated codes)
            assert torch.equal(loss, loss_ref)  # same codes and rows: losses in float32 alike
        torch.testing.assert_close(loss.float(), loss_ref, rtol=2e-2, atol=1e-4)
    assert not torch.equal(vq.cluster_size, torch.ones_like(vq.cluster_size))  # it trained


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cast_orthogonal_loss_in_float32(dtype):
    # The regulariser's Gram matrix of a low-precision codebook is computed in float32.
    torch.manual_seed(0)
    ref = VectorQuantize(8, 16, orthogonal_reg_weight=1.0)
    with torch.no_grad():
        ref.embed.copy_(ref.embed.to(dtype))
    vq = copy.deepcopy(ref).to(dtype)
    x = torch.randn(2, 9, 8).to(dtype)
    *_, parts_ref = ref(x.float(), freeze_codebook=True, return_loss_breakdown=True)
    *_, parts = vq(x, freeze_codebook=True, return_loss_breakdown=True)
    assert parts.orthogonal_reg.dtype == torch.float32
    assert torch.equal(parts.orthogonal_reg, parts_ref.orthogonal_reg)


def test_cast_rvq_ema_tracks_float32():
    # A shared codebook (one deferred EMA step over both layers' residuals), no projection: the
    # residual chain runs in float32 on the same values in both modules, the search too (the
    # codebook starts representable in bf16), so indices and statistics agree exactly.
    torch.manual_seed(0)
    ref = ResidualVQ(dim=8, num_quantizers=2, codebook_size=16, decay=0.8, shared_codebook=True)
    gen = torch.Generator().manual_seed(1)
    codes, batches = _separated_batches(ref.layers[0], torch.bfloat16, 1, gen)
    with torch.no_grad():
        ref.layers[0].embed.copy_(codes)
        ref.layers[0].embed_avg.copy_(codes)
    vq = copy.deepcopy(ref).bfloat16()
    q_ref, idx_ref, losses_ref = ref(batches[0].float())
    q, idx, losses = vq(batches[0])
    assert q.dtype == torch.bfloat16 and torch.isfinite(losses).all()
    assert torch.equal(idx, idx_ref)
    torch.testing.assert_close(q, q_ref.bfloat16())
    torch.testing.assert_close(losses, losses_ref, rtol=2e-2, atol=1e-4)
    layer, layer_ref = vq.layers[0], ref.layers[0]
    for name in STATS:
        assert getattr(layer, name).dtype == torch.float32, name
        assert torch.equal(getattr(layer, name), getattr(layer_ref, name)), name
    assert torch.equal(layer.embed, layer_ref.embed.bfloat16())


# --- casts and state dicts ------------------------------------------------------------------


def _trained_vq():
    torch.manual_seed(0)
    vq = VectorQuantize(8, 16, heads=2, separate_codebook_per_head=True, codebook_dim=4)
    vq(torch.randn(2, 9, 8))
    return vq


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_cast_keeps_statistics_unrounded(dtype):
    vq = _trained_vq()
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    vq.to(dtype)
    for name in STATS:  # not rounded on the way: bit-equal
        assert torch.equal(getattr(vq, name), before[name]), name
    assert vq.embed.dtype == dtype and torch.equal(vq.embed, before["embed"].to(dtype))
    vq.float()
    for name in STATS:
        assert torch.equal(getattr(vq, name), before[name]), name
    vq.double()
    assert vq.cluster_size.dtype == vq.embed_avg.dtype == vq.embed.dtype == torch.float64
    vq.half()  # from float64: back to float32 statistics
    assert vq.cluster_size.dtype == vq.embed_avg.dtype == torch.float32
    assert torch.equal(vq.cluster_size, before["cluster_size"])


def test_state_dict_across_dtypes():
    vq = _trained_vq()
    sd32 = vq.state_dict()
    # a float32 checkpoint into a bf16-cast module
    low = VectorQuantize(8, 16, heads=2, separate_codebook_per_head=True, codebook_dim=4)
    low.bfloat16().load_state_dict(sd32)
    for name in STATS:
        got = getattr(low, name)
        assert got.dtype == torch.float32 and torch.equal(got, sd32[name]), name
    assert low.embed.dtype == torch.bfloat16
    assert torch.equal(low.embed, sd32["embed"].bfloat16())
    x = torch.randn(2, 5, 8, dtype=torch.bfloat16)
    low(x)  # trains
    # and back: the bf16 module's checkpoint holds float32 statistics
    sd16 = low.state_dict()
    assert sd16["cluster_size"].dtype == torch.float32 and sd16["embed"].dtype == torch.bfloat16
    full = VectorQuantize(8, 16, heads=2, separate_codebook_per_head=True, codebook_dim=4)
    full.load_state_dict(sd16)
    for name in (*STATS, "embed"):
        assert torch.equal(getattr(full, name), sd16[name].float()), name
    full.eval(), low.eval()
    assert torch.equal(full(x.float())[1], low(x)[1])


def _as_peer(state_dict):
    """vector-quantize-pytorch's keys (prefix._codebook.name), its floating buffers in bf16 as
    `peer.bfloat16()` leaves them."""
    out = {}
    for key, value in state_dict.items():
        prefix, _, name = key.rpartition(".")
        if name in ("embed", "cluster_size", "embed_avg", "initted"):
            key = f"{prefix}._codebook.{name}" if prefix else f"_codebook.{name}"
        out[key] = value.bfloat16() if value.is_floating_point() else value
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_peer_state_dict_loads_into_cast_module(dtype):
    peer_sd = _as_peer(_trained_vq().state_dict())
    vq = VectorQuantize(8, 16, heads=2, separate_codebook_per_head=True, codebook_dim=4)
    vq.to(dtype).load_state_dict(peer_sd)
    for name in STATS:
        got = getattr(vq, name)
        assert got.dtype == torch.float32, name
        assert torch.equal(got, peer_sd[f"_codebook.{name}"].float()), name
    assert vq.embed.dtype == dtype and torch.equal(vq.embed, peer_sd["_codebook.embed"].to(dtype))
    # inside a ResidualVQ: layers.<i>._codebook.* keys
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=8, num_quantizers=2, codebook_size=16)
    rvq(torch.randn(2, 5, 8))
    peer_sd = _as_peer(rvq.state_dict())
    assert "layers.1._codebook.cluster_size" in peer_sd
    cast = ResidualVQ(dim=8, num_quantizers=2, codebook_size=16).to(dtype)
    cast.load_state_dict(peer_sd)
    layer = cast.layers[1]
    assert layer.cluster_size.dtype == torch.float32
    assert torch.equal(layer.cluster_size, peer_sd["layers.1._codebook.cluster_size"].float())
    cast(torch.randn(2, 5, 8, dtype=dtype))  # trains


# Layers whose constructor fixes constant buffers (not in the state dict): ResidualVQ's beam
# weights, ResidualFSQ's scales and clamp, FSQ's levels, LFQ's zero.
CONSTANTS = {
    "rvq_beam": lambda: ResidualVQ(
        dim=D,
        num_quantizers=3,
        codebook_size=K,
        beam_size=2,
        beam_score_quantizer_weights=[1, 2, 3],
    ),
    "rfsq": lambda: ResidualFSQ(levels=[7, 5, 4], num_quantizers=3, dim=D),
    "rfsq_hard": lambda: ResidualFSQ(
        levels=[8, 5, 5, 5], num_quantizers=4, dim=D, bound_hard_clamp=True
    ),
    "fsq_symmetric": lambda: FSQ([5, 4, 3], dim=D, preserve_symmetry=True),
    "lfq": lambda: LFQ(dim=D, codebook_size=16),
}


def _eval(module, x):
    with torch.no_grad():
        out = module.eval()(x)
    return out[0] if isinstance(out[0], tuple) else out


@pytest.mark.parametrize("name", list(CONSTANTS))
def test_meta_build_then_to_empty_and_load_restores_every_value(name):
    # The checkpoint-restore idiom: a skeleton built on the meta device (the residual stacks
    # crashed there, reading .item() of their checks), to_empty, load_state_dict. Constant
    # buffers are not in the state dict: they held uninitialized memory (other indices, NaN, an
    # LFQ loss of -1.7e37).
    torch.manual_seed(0)
    trained = CONSTANTS[name]()
    with torch.device("meta"):
        skeleton = CONSTANTS[name]()
    restored = skeleton.to_empty(device="cpu")
    restored.load_state_dict(trained.state_dict())
    for (key, a), (_, b) in zip(trained.named_buffers(), restored.named_buffers(), strict=True):
        assert torch.equal(a, b), key
    x = torch.randn(2, 40, D)
    for a, b in zip(_eval(trained, x), _eval(restored, x), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cast_residual_fsq_quantizes_with_float32_constants(dtype):
    # Its docstring: the residual chain runs in float32 in a module cast to bf16 / fp16 too. The
    # cast rounded the scales and clamp values, so a bf16 copy of a checkpoint gave other tokens
    # (55 % of the last layer's indices for these levels) on the same bf16-exact input.
    torch.manual_seed(0)
    for kwargs in ({"levels": [8, 5, 5, 5]}, {"levels": [7, 7, 7], "bound_hard_clamp": True}):
        module = ResidualFSQ(num_quantizers=4, **kwargs)  # no projections: dim = len(levels)
        cast = copy.deepcopy(module).to(dtype)
        for name in ("scales", "soft_clamp_input_value"):
            want = getattr(module, name)
            assert want is None or torch.equal(getattr(cast, name), want), name
        x = torch.randn(4, 500, len(kwargs["levels"])).to(dtype)
        assert torch.equal(_eval(cast, x)[1], _eval(module, x.float())[1])


@pytest.mark.parametrize(
    "build, dim",
    [
        (lambda: E8Quantize(dim=8, commitment_weight=1.0), 8),
        (lambda: LeechQuantize(dim=24, commitment_weight=1.0), 24),
        (lambda: LatentQuantize(levels=[5, 6, 7, 8], dim=4, commitment_loss_weight=0.5), 4),
    ],
    ids=["e8", "leech", "latent"],
)
def test_bf16_autocast_losses_are_float32(build, dim):
    # These returned a bf16 loss for bf16 input (a bf16 sum of squares), every other layer a
    # float32 one; LatentQuantize also searched its float32 values rounded to bf16. (No
    # projections: the float32 module then sees the same rows.)
    torch.manual_seed(0)
    module = build().train()
    x = torch.randn(2, dim, 300) if isinstance(module, LatentQuantize) else torch.randn(2, 40, dim)
    x = x.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, indices, loss = module(x)
        assert module.eval()(x)[2].dtype == torch.float32
    _, want_indices, want = module.train()(x.float())
    assert loss.dtype == torch.float32 and torch.equal(indices, want_indices)
    torch.testing.assert_close(loss, want, rtol=1e-2, atol=0)


def test_constants_keep_what_a_user_put_there():
    # The CPU copy follows the buffer: an assigned or in-place edited constant survives casts
    # and a meta round trip, and a .to() to the same device keeps the buffer itself.
    module = ResidualFSQ(levels=[8, 5, 5], num_quantizers=3)
    module.scales = torch.ones(3, 3)
    module.to(torch.float16)
    assert module.scales.dtype == torch.float32 and torch.equal(module.scales, torch.ones(3, 3))
    module.scales.mul_(2)
    module.to("meta").to_empty(device="cpu")
    assert torch.equal(module.scales, torch.full((3, 3), 2.0))
    scales = module.scales
    assert module.to("cpu").scales is scales
    with torch.inference_mode():  # built there: inference tensors, which track no versions
        built = ResidualFSQ(levels=[8, 5, 5], num_quantizers=3).to(torch.bfloat16)
    assert built.scales.dtype == torch.float32


def test_constants_are_copies_kept_float32_and_read_back_only_when_touched():
    # From a mutation run: a constant aliased the caller's tensor; an assigned constant in
    # another dtype stayed in it; a meta buffer assigned before to_empty must not be read; an
    # explicit clamp value was made on the default device (meta, in a meta build); untouched
    # constants are not copied back to the CPU at every cast (a host sync on a GPU).
    w = torch.tensor([1.0, 2.0, 3.0])
    rvq = ResidualVQ(
        dim=8, num_quantizers=3, codebook_size=16, beam_size=2, beam_score_quantizer_weights=w
    )
    w.mul_(0)
    assert torch.equal(rvq.beam_score_weights, torch.tensor([1.0, 2.0, 3.0]))
    module = ResidualFSQ(levels=[8, 5, 5], num_quantizers=3)
    want = module.scales.clone()
    module.scales = want.half()  # the user's values, kept as float32 (fp16: .to returns them)
    module.to(torch.float16)
    assert module.scales.dtype == torch.float32 and torch.equal(module.scales, want.half().float())
    module.scales = want.clone()
    module.half()
    stored = module._constants["scales"]
    module.half().to("meta").to_empty(device="cpu")
    assert module._constants["scales"] is stored and torch.equal(module.scales, want)
    module.to("meta")
    module.scales = torch.empty(3, 3, device="meta")
    module.to_empty(device="cpu")
    assert torch.equal(module.scales, want)
    with torch.device("meta"):
        clamped = ResidualFSQ(
            levels=[8, 5, 5], num_quantizers=2, soft_clamp_input_value=1.5, bound_hard_clamp=False
        )
    assert torch.equal(clamped.to_empty(device="cpu").soft_clamp_input_value, torch.tensor(1.5))


def test_float32_losses_and_input_dtype_outputs():
    from fastvq.nn.scalar import mse

    assert mse(torch.ones(3), torch.zeros(3, dtype=torch.float64)).dtype == torch.float64
    latent = LatentQuantize(levels=[5, 6, 7, 8], dim=4, commitment_loss_weight=0.5)
    out, _, loss = latent(torch.randn(2, 4, 30).bfloat16())
    assert out.dtype == torch.bfloat16 and loss.dtype == torch.float32


def test_repr_names_the_hyperparameters():
    assert "dim=8, codebook_size=16, codebook_dim=8, heads=1, metric='l2', grad='rotation'" in repr(
        VectorQuantize(8, 16)
    )
    assert "dim=8, num_quantizers=3, quantize_dropout=False" in repr(
        ResidualVQ(dim=8, num_quantizers=3, codebook_size=16)
    )
    assert "levels=[8, 5, 5], dim=3" in repr(FSQ([8, 5, 5]))
    assert "codebook_size=196560" in repr(LeechQuantize())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cast_module_candidates_on_every_backend(dtype):
    # Top-k, stochastic sampling and beam search gather codes for given indices: float32 rows
    # with the cast codebook, which the Triton body refused ("z must be ... of bfloat16").
    from fastvq import backends

    names = [b for b in ("cpu", "torch", "triton") if backends()[b].available]
    x = torch.randn(2, 9, D).to(dtype)
    results = []
    for backend in names:
        torch.manual_seed(0)
        vq = VectorQuantize(D, K, backend=backend).to(dtype).eval()
        torch.manual_seed(0)
        sampled = VectorQuantize(D, K, backend=backend, stochastic_sample_codes=True).to(dtype)
        rvq = ResidualVQ(dim=D, num_quantizers=2, codebook_size=K, backend=backend).to(dtype)
        torch.manual_seed(1)
        results.append(
            (vq(x, topk=2)[1], sampled(x)[1], rvq.eval()(x, beam_size=2)[1])
        )  # fmt: skip
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)
    assert len(names) >= 2
