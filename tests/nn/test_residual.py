"""fastvq.nn.residual: ResidualVQ, GroupedResidualVQ, ResidualFSQ, ResidualLFQ, ResidualSimVQ.

Oracle: vector-quantize-pytorch 1.32.0 (the peer) with the same config and the peer's state dict
loaded into fastvq, on the same inputs for several training steps: indices (tie-aware), outputs,
input gradients, losses and the EMA state of every layer. Documented differences (shared
codebook EMA, channel-first layouts) are tested against plain float64 formulas.
"""

import pytest
import torch
import torch.nn.functional as F

from fastvq.nn.residual import (
    GroupedResidualFSQ,
    GroupedResidualLFQ,
    GroupedResidualVQ,
    ResidualFSQ,
    ResidualLFQ,
    ResidualSimVQ,
    ResidualVQ,
)

DIM, K, Q = 8, 32, 3


def _peer():
    return pytest.importorskip("vector_quantize_pytorch")


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _perturbed_peer(cls, **config):
    torch.manual_seed(0)
    peer = cls(**config)
    # Perturb parameters and codebooks so that copying them is what makes the two agree.
    with torch.no_grad():
        for t in peer.parameters():
            t.add_(torch.randn_like(t) * 0.1)
        for name, t in peer.named_buffers():
            if name.endswith("_codebook.embed"):
                t.mul_(torch.rand(t.shape[:-1])[..., None] + 0.5)
                if config.get("use_cosine_sim"):
                    t.copy_(F.normalize(t, dim=-1))
                peer.get_buffer(name.replace(".embed", ".embed_avg")).copy_(t)
    return peer


def _load(ours, peer):
    result = ours.load_state_dict(peer.state_dict())
    assert not result.missing_keys and not result.unexpected_keys


def _first_tie(ours, z, books, ip, iv, cosine):
    """Tie-aware comparison of (m, Q) indices: the first layer where they differ must be a tie
    (distance gap within float32 rounding) on the residual both saw. Returns True if equal."""
    residual = z.double()
    for layer in range(ip.shape[-1]):
        a, b = iv[:, layer], ip[:, layer]
        valid = b >= 0
        book = books[layer].double()
        r = F.normalize(residual, dim=-1) if cosine else residual
        d = -(r @ book.T) if cosine else torch.cdist(r, book)
        best = d.min(1).values
        tol = 1e-5 * (1 + best.abs())
        assert bool((d.gather(1, a.clamp(min=0)[:, None])[:, 0] - best <= tol)[valid].all())
        diff = (a != b) & valid
        if diff.any():
            gap = (d.gather(1, a[:, None]) - d.gather(1, b[:, None])).abs()[:, 0]
            assert bool((gap[diff] <= tol[diff]).all()), "peer and fastvq differ off a tie"
            return False
        residual = residual - book[a.clamp(min=0)] * valid[:, None]
    return True


def _train_steps(config, shape=(3, 20, DIM), steps=3, mask_fn=None, seeds=None):
    vqp = _peer()
    config = {"dim": DIM, "num_quantizers": Q, "codebook_size": K, **config}
    peer = _perturbed_peer(vqp.ResidualVQ, **config)
    ours = ResidualVQ(**config)
    _load(ours, peer)
    g = torch.Generator().manual_seed(1)
    compared = 0
    for step in range(steps):
        x = torch.randn(*shape, generator=g) * 2
        mask = mask_fn(g) if mask_fn else None
        kwargs = {} if mask is None else {"mask": mask}
        if seeds is not None:
            kwargs["rand_quantize_dropout_fixed_seed"] = seeds[step]
        books = [b.detach().clone() for b in ours.codebooks]
        xp, xv = x.clone().requires_grad_(), x.clone().requires_grad_()
        qp, ip, lp = peer(xp, **kwargs)
        qv, iv, lv = ours(xv, **kwargs)
        assert qv.shape == qp.shape == x.shape and iv.shape == ip.shape and lv.shape == (Q,)
        z = ours.project_in(x).detach().reshape(-1, ours.codebook_dim)
        cosine = config.get("use_cosine_sim", False)
        if not _first_tie(ours, z, books, ip.reshape(-1, Q), iv.reshape(-1, Q), cosine):
            _load(ours, peer)  # a tie went the other way: resynchronise
            continue
        assert torch.equal(iv, ip)
        torch.testing.assert_close(qv, qp, atol=3e-5, rtol=1e-5)
        torch.testing.assert_close(lv, lp, atol=1e-6, rtol=1e-5)
        grad = torch.randn(qp.shape, generator=g)
        ((qp * grad).sum() + lp.sum()).backward()
        ((qv * grad).sum() + lv.sum()).backward()
        torch.testing.assert_close(xv.grad, xp.grad, atol=3e-5, rtol=1e-4)
        for layer_p, layer_v in zip(peer.layers, ours.layers, strict=True):
            for name in ("embed", "cluster_size", "embed_avg"):
                theirs = getattr(layer_p._codebook, name).detach()
                torch.testing.assert_close(getattr(layer_v, name).detach(), theirs)
        compared += 1
    assert compared >= steps - 1, "too many tied steps: pick another seed"
    return peer, ours


@pytest.mark.parametrize(
    "config",
    [
        {"rotation_trick": False},
        {},  # the peer's default: rotation trick
        {"use_cosine_sim": True, "decay": 0.9},
        {"codebook_dim": 4, "commitment_weight": 0.3},  # projections
        {"codebook_size": (16, 32, 8), "quant_grad_frac": 0.5},
        {"quantize_dropout": True, "quantize_dropout_cutoff_index": 1},
    ],
    ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default",
)
def test_residual_vq_training_matches_peer(config):
    seeds = [3, 11, 7] if config.get("quantize_dropout") else None
    _, ours = _train_steps(config, seeds=seeds)
    if seeds is not None:  # the seeds above drop a layer in some step: dropout was exercised
        x = _randn(2, 4, DIM)
        _, idx, losses = ours(x, rand_quantize_dropout_fixed_seed=3)
        assert bool((idx[..., -1] == -1).all()) and losses[-1] == 0


def test_residual_vq_masked_matches_peer():
    def mask_fn(g):
        lens = torch.randint(1, 21, (3,), generator=g)
        lens[0] = 20
        return torch.arange(20) < lens[:, None]

    _train_steps({"rotation_trick": False}, mask_fn=mask_fn)


def test_residual_vq_eval_and_codes_match_peer():
    vqp = _peer()
    config = dict(dim=DIM, num_quantizers=Q, codebook_size=K, codebook_dim=6)
    peer = _perturbed_peer(vqp.ResidualVQ, **config).eval()
    ours = ResidualVQ(**config).eval()
    _load(ours, peer)
    x = _randn(2, 9, DIM)
    qp, ip, lp, cp = peer(x, return_all_codes=True)
    qv, iv, lv, cv = ours(x, return_all_codes=True)
    assert torch.equal(iv, ip) and not lv.any() and not lp.any()
    torch.testing.assert_close(qv, qp)
    torch.testing.assert_close(cv, cp)
    torch.testing.assert_close(ours.get_output_from_indices(iv), peer.get_output_from_indices(ip))
    torch.testing.assert_close(ours.codebooks, peer.codebooks)
    # coarse codes (dropout-style): missing trailing layers count as zero codes
    coarse = ours.get_codes_from_indices(iv[..., :1])
    assert coarse.shape == cv.shape and not coarse[1:].any()
    torch.testing.assert_close(coarse[0], cv[0])


def test_shared_codebook_one_ema_step_over_all_layers():
    """Documented difference: the peer decays the shared statistics once per layer; fastvq makes
    one EMA step over all layers' residuals (a float64 reference here). The search itself (same
    codes for every layer) matches the peer."""
    vqp = _peer()
    config = dict(dim=DIM, num_quantizers=Q, codebook_size=K, shared_codebook=True,
                  rotation_trick=False, decay=0.7)  # fmt: skip
    peer = _perturbed_peer(vqp.ResidualVQ, **config)
    ours = ResidualVQ(**config)
    _load(ours, peer)
    assert ours.layers[0] is ours.layers[2]
    layer = ours.layers[0]
    book = layer.embed[0].detach().double().clone()
    cs, ea = layer.cluster_size[0].double().clone(), layer.embed_avg[0].double().clone()
    x = _randn(3, 20, DIM, seed=4) * 2
    qp, ip, lp = peer(x)
    qv, iv, lv = ours(x)
    assert torch.equal(iv, ip)
    torch.testing.assert_close(qv, qp, atol=3e-5, rtol=1e-5)
    torch.testing.assert_close(lv, lp)
    # reference: the residual of every layer against the fixed codebook, then one EMA step
    residual, rows = x.reshape(-1, DIM).double(), []
    for q in range(Q):
        rows.append(residual)
        residual = residual - book[iv.reshape(-1, Q)[:, q]]
    rows = torch.cat(rows)
    idx = iv.reshape(-1, Q).T.reshape(-1)
    onehot = F.one_hot(idx, K).double()
    cs = 0.7 * cs + 0.3 * onehot.sum(0)
    ea = 0.7 * ea + 0.3 * onehot.T @ rows
    smoothed = (cs + 1e-5) / (cs.sum() + K * 1e-5) * cs.sum()
    torch.testing.assert_close(layer.cluster_size[0].double(), cs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.embed[0].double(), ea / smoothed[:, None], rtol=1e-5,
                               atol=1e-5)  # fmt: skip


def test_grouped_residual_vq_matches_peer():
    vqp = _peer()
    config = dict(dim=DIM, groups=2, num_quantizers=2, codebook_size=16, rotation_trick=False)
    peer = _perturbed_peer(vqp.GroupedResidualVQ, **config)
    ours = GroupedResidualVQ(**config)
    _load(ours, peer)
    for step in range(2):
        x = _randn(2, 10, DIM, seed=step)
        torch.manual_seed(step)  # the groups' shared dropout seed comes from torch's generator
        qp, ip, lp = peer(x)
        torch.manual_seed(step)
        qv, iv, lv = ours(x)
        assert iv.shape == (2, 2, 10, 2) and lv.shape == (2, 2)
        assert torch.equal(iv, ip)
        torch.testing.assert_close(qv, qp)
        torch.testing.assert_close(lv, lp)
    torch.testing.assert_close(ours.codebooks, peer.codebooks)
    ours.eval()
    q, idx, _ = ours(x)
    torch.testing.assert_close(ours.get_output_from_indices(idx), q)
    assert ours.get_codes_from_indices(idx).shape == (2, 2, 2, 10, DIM // 2)


# --- layouts, dropout, state -----------------------------------------------------------------


@pytest.mark.parametrize(
    "config, shape, idx_shape",
    [
        ({"accept_image_fmap": True, "codebook_dim": 4}, (2, DIM, 3, 5), (2, 3, 5, Q)),
        ({"accept_3d_fmap": True}, (1, DIM, 2, 3, 2), (1, 2, 3, 2, Q)),
        ({"channel_last": False, "codebook_dim": 5}, (2, DIM, 7), (2, 7, Q)),
        ({}, (4, DIM), (4, Q)),
    ],
)
def test_residual_vq_layouts(config, shape, idx_shape):
    # The peer raises shape errors for channel-first layouts: fastvq's own behaviour is checked.
    rvq = ResidualVQ(dim=DIM, num_quantizers=Q, codebook_size=K, **config).eval()
    x = _randn(*shape)
    q, idx, losses, codes = rvq(x, return_all_codes=True)
    assert q.shape == x.shape and idx.shape == idx_shape and losses.shape == (Q,)
    assert codes.shape == (Q, *idx_shape[:-1], rvq.codebook_dim)
    torch.testing.assert_close(rvq.get_output_from_indices(idx), q)
    # the channel-last reference: same module on the channel-last sequence
    first = x.dim() >= 3 and rvq.channel_first
    seq = x.movedim(1, -1).reshape(x.shape[0], -1, DIM) if first else x.reshape(-1, 1, DIM)
    z = rvq.project_in(seq).reshape(-1, rvq.codebook_dim).double()
    for layer in range(Q):
        book = rvq.layers[layer].codebook.double()
        flat = idx.reshape(-1, Q)[:, layer]
        want = torch.cdist(z, book).argmin(1)
        assert torch.equal(flat, want)
        z = z - book[flat]


def test_quantize_dropout_cutoff_and_multiple():
    rvq = ResidualVQ(
        dim=DIM, num_quantizers=8, codebook_size=K, quantize_dropout=True,
        quantize_dropout_cutoff_index=2, quantize_dropout_multiple_of=4,
    )  # fmt: skip
    x = _randn(2, 5, DIM)
    kept = set()
    for seed in range(20):
        _, idx, losses = rvq(x, rand_quantize_dropout_fixed_seed=seed)
        run = int((idx[0, 0] >= 0).sum())
        assert bool((idx[..., :run] >= 0).all()) and bool((idx[..., run:] == -1).all())
        assert bool((losses[run:] == 0).all()) and bool((losses[:run] > 0).all())
        kept.add(run)
    assert kept == {4, 8}  # last index in [2, 8) rounded up to a multiple of 4, minus one
    with torch.no_grad():
        out = rvq.eval()(x)[1]
    assert bool((out >= 0).all())  # no dropout in eval


def test_init_from_clusters_layer_by_layer():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(8, DIM, generator=g) * 6
    offsets = torch.randn(4, DIM, generator=g)
    # every point = one of 8 centres + one of 4 offsets (+ noise): two residual layers of 8 and 4
    # codes fit it exactly
    x = centres.repeat_interleave(4, 0) + offsets.repeat(8, 1)
    x = x.repeat(5, 1) + 0.01 * torch.randn(160, DIM, generator=g)
    rvq = ResidualVQ(dim=DIM, codebook_size=(8, 4), kmeans_iters=10)
    rvq.init_from(x, generator=torch.Generator().manual_seed(1))
    assert all(bool(layer.initted) for layer in rvq.layers)
    # layer 0: the blob means (centre + mean offset); layer 1 then finds the offsets
    blobs = centres + offsets.mean(0)
    assert bool((torch.cdist(blobs, rvq.layers[0].codebook).min(1).values < 0.1).all())
    q, _, _ = rvq.eval()(x[None])
    assert (q[0] - x).square().mean() < 0.01
    with pytest.raises(ValueError, match="encoder_outputs"):
        rvq.init_from(torch.randn(4, DIM + 1))


def test_state_dict_bf16_and_freeze():
    config = dict(dim=DIM, num_quantizers=Q, codebook_size=K, codebook_dim=4)
    rvq = ResidualVQ(**config)
    x = _randn(2, 6, DIM)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, idx, losses = rvq(x)
    assert q.dtype == torch.bfloat16 and losses.dtype == torch.float32
    assert all(layer.embed.dtype == torch.float32 for layer in rvq.layers)
    rvq2 = ResidualVQ(**config)
    rvq2.load_state_dict(rvq.state_dict())
    rvq.eval(), rvq2.eval()
    for a, b in zip(rvq(x), rvq2(x), strict=True):
        assert torch.equal(a, b)
    before = {k: v.clone() for k, v in rvq.state_dict().items()}
    rvq.train()
    rvq(x, freeze_codebook=True)
    rvq.eval()(x)
    for k, v in rvq.state_dict().items():
        assert torch.equal(v, before[k]), k


# --- ResidualFSQ / ResidualLFQ -------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        (dict(levels=[5, 4, 3], num_quantizers=3), (2, 9, 3)),
        (dict(levels=[7, 5], num_quantizers=2, dim=6), (2, 5, 6)),
        (dict(levels=[5, 3], num_quantizers=3, bound_hard_clamp=False), (2, 5, 2)),
        (dict(levels=[4, 4], num_quantizers=4, quantize_dropout=True), (2, 6, 2)),
    ],
)
def test_residual_fsq_matches_peer(kwargs, shape):
    vqp = _peer()
    torch.manual_seed(0)
    peer = vqp.ResidualFSQ(**kwargs)
    ours = ResidualFSQ(**kwargs)
    _load(ours, peer)
    x = _randn(*shape) * 1.5
    xp, xv = x.clone().requires_grad_(), x.clone().requires_grad_()
    qp, ip = peer(xp, rand_quantize_dropout_fixed_seed=5)
    qv, iv = ours(xv, rand_quantize_dropout_fixed_seed=5)
    assert torch.equal(iv, ip.long())
    if kwargs.get("quantize_dropout"):
        assert bool((iv == -1).any())  # seed 5 drops a layer
    torch.testing.assert_close(qv, qp, atol=1e-6, rtol=1e-5)
    g = torch.randn_like(qp)
    qp.backward(g)
    qv.backward(g)
    torch.testing.assert_close(xv.grad, xp.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.get_codes_from_indices(iv), peer.get_codes_from_indices(ip))
    torch.testing.assert_close(ours.get_output_from_indices(iv), qv)


def test_residual_fsq_channel_first_indices_last():
    # Documented difference: indices (b, *spatial, Q) (the peer moves Q to axis 1).
    rfsq = ResidualFSQ(levels=[5, 5], num_quantizers=2, dim=4, is_channel_first=True)
    x = _randn(2, 4, 3, 5)
    q, idx, codes = rfsq(x, return_all_codes=True)
    assert q.shape == x.shape and idx.shape == (2, 3, 5, 2) and codes.shape == (2, 2, 3, 5, 2)
    last = ResidualFSQ(levels=[5, 5], num_quantizers=2, dim=4)
    last.load_state_dict(rfsq.state_dict())
    q_last, idx_last = last(x.movedim(1, -1))
    assert torch.equal(idx_last, idx)
    torch.testing.assert_close(q_last.movedim(-1, 1), q)
    torch.testing.assert_close(rfsq.get_output_from_indices(idx), q)
    grouped = GroupedResidualFSQ(dim=8, groups=2, levels=[5, 3], num_quantizers=2)
    q, idx = grouped(_randn(2, 5, 8))
    assert q.shape == (2, 5, 8) and idx.shape == (2, 2, 5, 2)
    torch.testing.assert_close(grouped.get_output_from_indices(idx), q)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(codebook_size=16, num_quantizers=3),
        dict(codebook_size=8, num_quantizers=2, commitment_loss_weight=0.3, dim=5),
        dict(codebook_size=16, num_quantizers=2, soft_clamp_input_value=2.0, spherical=True),
    ],
)
def test_residual_lfq_matches_peer(kwargs):
    vqp = _peer()
    # diversity_gamma=0: fastvq's batch entropy is the factorized bound (documented in LFQ, tested
    # in test_scalar.py), so the layers' losses are compared on the per-sample and commitment terms.
    kwargs = {"dim": 4, "diversity_gamma": 0.0, **kwargs}
    torch.manual_seed(0)
    peer = vqp.ResidualLFQ(**kwargs)
    ours = ResidualLFQ(**kwargs)
    _load(ours, peer)
    x = _randn(3, 5, kwargs["dim"])
    mask = torch.arange(5) < torch.tensor([5, 2, 4])[:, None]
    xp, xv = x.clone().requires_grad_(), x.clone().requires_grad_()
    qp, ip, lp = peer(xp, mask=mask)
    qv, iv, lv = ours(xv, mask=mask)
    assert torch.equal(iv, ip.long()) and lv.shape == (kwargs["num_quantizers"],)
    torch.testing.assert_close(qv, qp, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lv, lp, atol=1e-5, rtol=1e-4)
    g = torch.randn_like(qp)
    qp.backward(g)
    qv.backward(g)
    torch.testing.assert_close(xv.grad, xp.grad, atol=1e-5, rtol=1e-4)
    ours.eval(), peer.eval()
    qv, iv, lv = ours(x)
    # Per layer against the peer's LFQ.indices_to_codes: the peer's ResidualLFQ reads its layers'
    # `codebook` buffers, which are not normalized under spherical=True (so they differ from its
    # own forward there); fastvq's codes are the forward's.
    want = torch.stack(
        [layer.indices_to_codes(iv[..., i], project_out=False) for i, layer in
         enumerate(peer.layers)]
    )  # fmt: skip
    torch.testing.assert_close(ours.get_codes_from_indices(iv), want)
    torch.testing.assert_close(ours.get_output_from_indices(iv), qv)
    assert not lv.any()


def test_grouped_residual_lfq_shapes():
    grouped = GroupedResidualLFQ(dim=8, groups=2, codebook_size=16, num_quantizers=2)
    q, idx, losses = grouped(_randn(2, 5, 8))
    assert q.shape == (2, 5, 8) and idx.shape == (2, 2, 5, 2) and losses.shape == (2, 2)
    grouped.eval()
    q, idx, _ = grouped(_randn(2, 5, 8))
    torch.testing.assert_close(grouped.get_output_from_indices(idx), q)


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, kwargs, error, match",
    [
        (ResidualVQ, dict(codebook_size=0), ValueError, "codebook_size"),
        (ResidualVQ, dict(codebook_size=(8, 8)), ValueError, "codebook_size has 2"),
        (ResidualVQ, dict(num_quantizers=0), ValueError, "num_quantizers"),
        (ResidualVQ, dict(heads=2), ValueError, "heads"),
        (ResidualVQ, dict(codebook_size=(8, 8, 4), shared_codebook=True), ValueError, "shared"),
        (ResidualVQ, dict(quantize_dropout=True, quantize_dropout_cutoff_index=3), ValueError,
         "cutoff"),
        (ResidualVQ, dict(implicit_neural_codebook=True), ValueError, "implicit"),
        (ResidualVQ, dict(beam_size=4), ValueError, "beam_size"),
        (ResidualVQ, dict(decay=2.0), ValueError, "decay"),
        (ResidualFSQ, dict(levels=[1, 4]), ValueError, "levels"),
        (ResidualLFQ, dict(codebook_size=12), ValueError, "power of 2"),
        (GroupedResidualVQ, dict(groups=3), ValueError, "divisible"),
    ],
)  # fmt: skip
def test_bad_construction(cls, kwargs, error, match):
    base = {
        ResidualVQ: dict(dim=DIM, num_quantizers=Q, codebook_size=K),
        ResidualFSQ: dict(levels=[4, 4], num_quantizers=2),
        ResidualLFQ: dict(dim=4, codebook_size=16, num_quantizers=2),
        GroupedResidualVQ: dict(dim=DIM, num_quantizers=2, codebook_size=K),
    }[cls]
    with pytest.raises(error, match=match):
        cls(**{**base, **kwargs})


def test_bad_calls():
    rvq = ResidualVQ(dim=DIM, num_quantizers=Q, codebook_size=K)
    with pytest.raises(ValueError, match="dim = 8"):
        rvq(torch.randn(2, 5, DIM + 1))
    with pytest.raises(ValueError, match="got shape"):
        rvq(torch.randn(2, 3, 4, DIM))
    with pytest.raises(TypeError, match="x must be"):
        rvq(torch.randint(0, 3, (2, 5, DIM)))
    with pytest.raises(ValueError, match="mask"):
        rvq(torch.randn(2, 5, DIM), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="indices"):
        rvq(torch.randn(2, 5, DIM), indices=torch.zeros(2, 5, Q, dtype=torch.long))
    with pytest.raises(TypeError, match="indices"):
        rvq.get_codes_from_indices(torch.zeros(2, 5, Q))
    with pytest.raises(ValueError, match="at most num_quantizers"):
        rvq.get_codes_from_indices(torch.zeros(2, 5, Q + 1, dtype=torch.long))
    img = ResidualVQ(dim=DIM, num_quantizers=Q, codebook_size=K, accept_image_fmap=True)
    with pytest.raises(ValueError, match=r"\(b, dim, h, w\)"):
        img(torch.randn(2, 5, DIM))
    rfsq = ResidualFSQ(levels=[4, 4], num_quantizers=2, dim=6, is_channel_first=True)
    with pytest.raises(ValueError, match="axis 1"):
        rfsq(torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match="feature axis"):
        GroupedResidualVQ(dim=DIM, groups=2, num_quantizers=2, codebook_size=K)(
            torch.randn(2, 5, DIM + 2)
        )


@pytest.mark.parametrize(
    "make",
    [
        lambda: GroupedResidualVQ(
            dim=DIM, groups=2, num_quantizers=2, codebook_size=16, accept_image_fmap=True
        ),
        lambda: GroupedResidualFSQ(
            dim=DIM, groups=2, levels=[5, 5], num_quantizers=2, accept_image_fmap=True
        ),
        lambda: ResidualLFQ(dim=DIM, codebook_size=16, num_quantizers=2),  # 4-d: channel-first
    ],
)
def test_image_fmaps_round_trip(make):
    module = make().eval()
    x = _randn(2, DIM, 3, 4)
    q, idx = module(x)[:2]
    grouped = hasattr(module, "rvqs")
    assert q.shape == x.shape and idx.shape == ((2,) if grouped else ()) + (2, 3, 4, 2)
    torch.testing.assert_close(module.get_output_from_indices(idx), q)


def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(DIM, 16), torch.nn.ReLU(), torch.nn.Linear(16, DIM))


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        ({}, (3, 20, DIM)),  # the peer's default: rotation trick
        ({"rotation_trick": False, "frozen_codebook_dim": 5, "commitment_weight": 0.5}, (2, 9, 8)),
        ({"channel_first": True, "input_to_quantize_commit_loss_weight": 0.1}, (2, DIM, 4, 5)),
        ({"quantize_dropout": True, "quantize_dropout_cutoff_index": 1}, (3, 20, DIM)),
        ({"codebook_transform": _mlp}, (3, 20, DIM)),  # one module for every layer, as the peer
    ],  # fmt: skip
    ids=["default", "ste,frozen_dim", "channel_first", "dropout", "shared_mlp"],
)
def test_residual_simvq_matches_peer(kwargs, shape):
    vqp = _peer()
    config = {"dim": DIM, "num_quantizers": Q, "codebook_size": K, **kwargs}
    if "codebook_transform" in kwargs:  # a fresh module each: the peer's and ours must not share
        config["codebook_transform"] = kwargs["codebook_transform"]()
    torch.manual_seed(0)
    peer = vqp.ResidualSimVQ(**config)
    if "codebook_transform" in kwargs:
        config["codebook_transform"] = kwargs["codebook_transform"]()
    ours = ResidualSimVQ(**config)
    assert (ours.layers[0].code_transform is ours.layers[2].code_transform) == (
        "codebook_transform" in kwargs
    )
    _load(ours, peer)
    seed = 3  # drops the last layer with quantize_dropout (randrange(1, 3) = 1)
    x = _randn(*shape) * 2
    xp, xv = x.clone().requires_grad_(), x.clone().requires_grad_()
    qp, ip, lp, cp = peer(xp, return_all_codes=True, rand_quantize_dropout_fixed_seed=seed)
    qv, iv, lv, cv = ours(xv, return_all_codes=True, rand_quantize_dropout_fixed_seed=seed)
    assert qv.shape == qp.shape == x.shape and iv.shape == ip.shape and lv.shape == (Q,)
    if kwargs.get("quantize_dropout"):
        assert bool((iv[..., -1] == -1).all()) and lv[-1] == 0
    books = ours.codebooks.detach()
    torch.testing.assert_close(books, peer.codebooks.detach())
    z = (x.movedim(1, -1) if ours.channel_first else x).reshape(-1, DIM)
    assert _first_tie(ours, z, books, ip.reshape(-1, Q), iv.reshape(-1, Q), False)
    assert torch.equal(iv, ip)
    torch.testing.assert_close(qv, qp, atol=3e-5, rtol=1e-5)
    torch.testing.assert_close(lv, lp, atol=1e-6, rtol=1e-5)
    if ours.channel_first:  # documented difference: codes channel-last, as every residual stack
        cp = cp.movedim(2, -1)
    torch.testing.assert_close(cv, cp, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.get_output_from_indices(iv), peer.get_output_from_indices(ip))
    grad = torch.randn(qp.shape, generator=torch.Generator().manual_seed(2))
    ((qp * grad).sum() + lp.sum()).backward()
    ((qv * grad).sum() + lv.sum()).backward()
    torch.testing.assert_close(xv.grad, xp.grad, atol=3e-5, rtol=1e-4)
    for (name, a), b in zip(peer.named_parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_residual_simvq_bad_arguments():
    with pytest.raises(ValueError, match="heads"):
        ResidualSimVQ(dim=DIM, num_quantizers=2, codebook_size=K, heads=2)
    with pytest.raises(ValueError, match="num_quantizers"):
        ResidualSimVQ(dim=DIM, num_quantizers=0, codebook_size=K)
    with pytest.raises(ValueError, match="codebook_size"):
        ResidualSimVQ(dim=DIM, num_quantizers=2, codebook_size=0)
    rsim = ResidualSimVQ(dim=DIM, num_quantizers=2, codebook_size=K)
    with pytest.raises(ValueError, match="num_quantizers"):
        rsim.get_codes_from_indices(torch.zeros(2, 3, 3, dtype=torch.long))
