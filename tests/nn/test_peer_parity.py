"""fastvq.nn.VectorQuantize against vector-quantize-pytorch's VectorQuantize (the peer).

Both layers start from the same state (the peer's state dict loads into fastvq as is), see the same
inputs for several training steps, and must agree after every step on indices (tie-aware),
quantized outputs, input gradients, losses and the EMA state (embed, cluster_size, embed_avg).
Where the peer draws random numbers (dead-code replacement, k-means seeding) the test compares
properties instead. Documented deliberate differences are tested in test_vector_quantize.py.
"""

import pytest
import torch

from fastvq.nn.residual import ResidualFSQ
from fastvq.nn.vector_quantize import VectorQuantize

vqp = pytest.importorskip("vector_quantize_pytorch")

DIM, K = 16, 64
STATE = ("embed", "cluster_size", "embed_avg")


def _pair(**config):
    torch.manual_seed(0)
    peer = vqp.VectorQuantize(dim=DIM, codebook_size=K, **config)
    ours = VectorQuantize(dim=DIM, codebook_size=K, **config)
    # Perturb the projections and the codebook so the copy is checked (not equal by default init).
    with torch.no_grad():
        for t in peer.parameters():
            t.add_(torch.randn_like(t) * 0.1)
        peer._codebook.embed.mul_(torch.rand(peer._codebook.embed.shape[:-1])[..., None] * 40 + 1)
        if config.get("use_cosine_sim"):
            peer._codebook.embed.copy_(torch.nn.functional.normalize(peer._codebook.embed, dim=-1))
        peer._codebook.embed_avg.copy_(peer._codebook.embed)
    missing = ours.load_state_dict(peer.state_dict())
    assert not missing.missing_keys and not missing.unexpected_keys
    return peer, ours


def _rows(ours: VectorQuantize, seq: torch.Tensor) -> list[torch.Tensor]:
    """The (M, codebook_dim) rows each codebook searches, as fastvq builds them."""
    with torch.no_grad():
        z = ours.project_in(seq).float().reshape(*seq.shape[:2], ours.heads, ours.codebook_dim)
        if ours.use_cosine_sim:
            z = torch.nn.functional.normalize(z, dim=-1, eps=1e-6)
    if ours.num_codebooks == 1:
        return [z.reshape(-1, ours.codebook_dim)]
    return [z[:, :, h].reshape(-1, ours.codebook_dim) for h in range(ours.heads)]


def _check_indices(ours, seq, codebooks, ip, iv) -> bool:
    """Tie-aware: every fastvq index must be a nearest code (within float32 rounding) and may
    differ from the peer's only where the two codes are equally near. Returns True if equal."""
    heads = ours.heads
    ip, iv = ip.reshape(*seq.shape[:2], heads), iv.reshape(*seq.shape[:2], heads)
    for c, rows in enumerate(_rows(ours, seq)):
        sel = slice(None) if ours.num_codebooks == 1 else c
        a, b = ip[:, :, sel].reshape(-1), iv[:, :, sel].reshape(-1)
        cb = codebooks[c].double()
        d = torch.cdist(rows.double(), cb) if not ours.use_cosine_sim else -(rows.double() @ cb.T)
        best = d.min(dim=1).values
        scale = 1e-5 * (1 + best.abs())
        valid = b >= 0  # masked padding has index -1 in both (checked by the caller)
        a, b, d, best, scale = a[valid], b[valid], d[valid], best[valid], scale[valid]
        assert bool(((d.gather(1, b[:, None])[:, 0] - best) <= scale).all()), "not nearest"
        diff = a != b
        if diff.any():
            gap = (d.gather(1, a[:, None]) - d.gather(1, b[:, None])).abs()[:, 0]
            assert bool((gap[diff] <= scale[diff]).all()), "peer and fastvq differ off a tie"
    return torch.equal(ip, iv)


def _codebooks(ours):
    return [cb.detach().clone() for cb in ours.embed]


def _as_seq(ours, x):
    if ours.accept_image_fmap:
        return x.flatten(2).transpose(1, 2)
    return x if ours.channel_last else x.transpose(1, 2)


def _run(config, shape=(3, 40, DIM), steps=3, make_mask=None, use_lens=False, train=True):
    peer, ours = _pair(**config)
    peer.train(train)
    ours.train(train)
    g = torch.Generator().manual_seed(1)
    compared = 0
    for _ in range(steps):
        x = torch.randn(*shape, generator=g) * 2
        mask = make_mask(g) if make_mask is not None else None
        kwargs = {}
        if mask is not None:
            lens = mask.sum(1)
            kwargs = {"lens": lens} if use_lens else {"mask": mask}
        xp, xv = x.clone().requires_grad_(), x.clone().requires_grad_()
        codebooks = _codebooks(ours)
        qp, ip, lp = peer(xp, **kwargs)
        qv, iv, lv = ours(xv, **kwargs)
        assert qv.shape == qp.shape and iv.shape == ip.shape and iv.dtype == torch.int64
        equal = _check_indices(ours, _as_seq(ours, x), codebooks, ip, iv)
        if mask is not None:
            assert torch.equal(ip == -1, iv == -1)
        if not equal:  # a tie went the other way: resynchronise and go on
            ours.load_state_dict(peer.state_dict())
            continue
        torch.testing.assert_close(qv, qp, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(lv, lp, atol=1e-6, rtol=1e-5)
        if train:
            grad = torch.randn(qp.shape, generator=g)
            (qp * grad).sum().backward()
            (qv * grad).sum().backward()
            torch.testing.assert_close(xv.grad, xp.grad, atol=2e-5, rtol=1e-4)
        for name in STATE:
            theirs = getattr(peer._codebook, name)
            ours_state = getattr(ours, name).detach()
            torch.testing.assert_close(ours_state, theirs.detach(), atol=1e-5, rtol=1e-5)
        compared += 1
    assert compared >= steps - 1, "too many tied steps: pick another seed"
    return peer, ours


@pytest.mark.parametrize(
    "config",
    [
        {"rotation_trick": False},  # plain l2 EMA with the straight-through estimator
        {},  # the peer's default: rotation trick
        {"use_cosine_sim": True},
        {"use_cosine_sim": True, "rotation_trick": False},
        {"commitment_weight": 0.37, "decay": 0.9, "rotation_trick": False},
        {"codebook_dim": 8},
        {"codebook_dim": 8, "layernorm_after_project_in": True, "use_cosine_sim": True},
        {"heads": 2, "codebook_dim": 8},
        {"heads": 2, "codebook_dim": 8, "separate_codebook_per_head": True},
        {"heads": 4, "separate_codebook_per_head": True, "rotation_trick": False},
        {"ema_update": False, "rotation_trick": False},
    ],
    ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default",
)
def test_training_steps_match_peer(config):
    _run(config)


def test_eval_matches_peer_and_leaves_state():
    peer, ours = _run({}, train=False, steps=2)
    for name in STATE:
        torch.testing.assert_close(getattr(ours, name).detach(), getattr(peer._codebook, name))


@pytest.mark.parametrize("use_lens", [False, True])
@pytest.mark.parametrize("rotation_trick", [False, True])
def test_masked_sequences_match_peer(use_lens, rotation_trick):
    def make_mask(g):
        lens = torch.randint(1, 41, (3,), generator=g)
        lens[0] = 40
        return torch.arange(40) < lens[:, None]

    _run({"rotation_trick": rotation_trick}, make_mask=make_mask, use_lens=use_lens)


def test_image_fmap_matches_peer():
    _run({"accept_image_fmap": True, "codebook_dim": 8}, shape=(2, DIM, 6, 5))


def test_channel_first_matches_peer():
    _run({"channel_last": False, "use_cosine_sim": True}, shape=(2, DIM, 30))


def test_orthogonal_regularizer_matches_peer():
    # Every code counts (no sampling), so the regulariser is deterministic: loss and codebook
    # gradient must agree.
    peer, ours = _pair(orthogonal_reg_weight=3.0, rotation_trick=False)
    x = torch.randn(4, 30, DIM)
    _, _, lp = peer(x)
    _, _, lv = ours(x)
    torch.testing.assert_close(lv, lp, rtol=1e-5, atol=1e-6)
    lp.backward()
    lv.backward()
    torch.testing.assert_close(ours.embed.grad, peer._codebook.embed.grad, rtol=1e-4, atol=1e-7)


def test_learnable_codebook_matches_peer():
    peer, ours = _pair(learnable_codebook=True, ema_update=False, commitment_weight=0.5)
    x = torch.randn(4, 30, DIM)
    xp, xv = x.clone().requires_grad_(), x.clone().requires_grad_()
    qp, ip, lp = peer(xp)
    qv, iv, lv = ours(xv)
    assert torch.equal(ip, iv)
    torch.testing.assert_close(lv, lp)
    grad = torch.randn_like(qp)
    ((qp * grad).sum() + lp).backward()
    ((qv * grad).sum() + lv).backward()
    torch.testing.assert_close(xv.grad, xp.grad, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(ours.embed.grad, peer._codebook.embed.grad, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("use_cosine_sim", [False, True])
def test_dead_code_reset_matches_peer_properties(use_cosine_sim):
    # cluster_size starts at 1; after one step at decay 0.8 an unused code has 0.8 < 0.9 and is
    # replaced by a batch row in both layers (the rows drawn differ: compare what they share).
    threshold = 0.9
    peer, ours = _pair(
        threshold_ema_dead_code=threshold, use_cosine_sim=use_cosine_sim, rotation_trick=False
    )
    x = torch.randn(2, 20, DIM) * 2  # 40 rows for 64 codes: some codes are surely unused
    before = ours.embed.detach().clone()
    _, ip, _ = peer(x)
    _, iv, _ = ours(x)
    assert torch.equal(ip, iv)
    cs_p, cs_v = peer._codebook.cluster_size[0], ours.cluster_size[0]
    torch.testing.assert_close(cs_v, cs_p)
    dead = cs_v == threshold
    assert 0 < int(dead.sum()) and torch.equal(dead, ~torch.isin(torch.arange(K), iv))
    live = ~dead
    for layer_embed in (peer._codebook.embed[0], ours.embed[0].detach()):
        rows = _rows(ours, x)[0]
        nearest = torch.cdist(layer_embed[dead].double(), rows.double()).min(dim=1).values
        assert bool((nearest < 1e-5).all()), "a reset code is not a batch row"
        assert not torch.equal(layer_embed[dead], before[0][dead])
    torch.testing.assert_close(ours.embed[0, live].detach(), peer._codebook.embed[0, live])
    torch.testing.assert_close(ours.embed_avg[0, live], peer._codebook.embed_avg[0, live])


def test_kmeans_init_matches_peer_properties():
    # Both seed k-means randomly (the peer from random rows, fastvq by k-means++): compare what
    # any k-means init guarantees. Blobs with one well-separated cluster per code.
    g = torch.Generator().manual_seed(3)
    k = 8
    centres = torch.randn(k, DIM, generator=g) * 10
    x = (centres[torch.arange(k).repeat(25)] + 0.1 * torch.randn(200, DIM, generator=g))[None]
    peer = vqp.VectorQuantize(dim=DIM, codebook_size=k, kmeans_init=True, kmeans_iters=10)
    ours = VectorQuantize(dim=DIM, codebook_size=k, kmeans_init=True, kmeans_iters=10)
    assert not bool(ours.initted) and not ours.embed.abs().any()
    peer(x)
    ours(x)
    assert bool(ours.initted) and bool(peer._codebook.initted)
    torch.testing.assert_close(ours.cluster_size.sum(), peer._codebook.cluster_size.sum())
    # fastvq recovers every blob centre (k-means++ seeding); the peer's random seeding may merge
    # two blobs, so only fastvq's codebook is required to hit all of them.
    err = torch.cdist(centres, ours.codebook.detach()).min(dim=1).values
    assert bool((err < 0.1).all())


# --- forward(topk=k): the k nearest codes per row (ResidualVQ's beam search uses it) ------------

TOPK = 3


def _check_topk_indices(rows, codebook, ip, iv, cosine) -> bool:
    """Tie-aware check of (M, k) candidate lists (rows of -1: masked in both): fastvq's must be
    the k nearest codes in order, up to float32 rounding, and may differ from the peer's only
    between equally near codes. Returns True if the lists are equal."""
    valid = ip[:, 0] >= 0
    assert torch.equal(valid, iv[:, 0] >= 0)
    rows, cb = rows.double()[valid], codebook.double()
    ip, iv = ip[valid], iv[valid]
    d = -(rows @ cb.T) if cosine else torch.cdist(rows, cb)
    best = d.sort(dim=1).values[:, : iv.shape[1]]
    tol = 1e-5 * (1 + best.abs())
    assert bool(((d.gather(1, iv) - best).abs() <= tol).all()), "not the k nearest, in order"
    diff = iv != ip
    if diff.any():
        gap = (d.gather(1, iv) - d.gather(1, ip)).abs()
        assert bool((gap[diff] <= tol[diff]).all()), "peer and fastvq differ off a tie"
    return not diff.any()


def _topk_seq(ours, x):
    return x[:, None] if x.dim() == 2 else _as_seq(ours, x)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "config, shape, masked",
    [
        ({"rotation_trick": False}, (3, 20, DIM), False),
        ({}, (3, 20, DIM), False),  # rotation trick between x repeated k times and the codes
        ({"use_cosine_sim": True}, (3, 20, DIM), False),
        ({"codebook_dim": 8, "commitment_weight": 0.37}, (3, 20, DIM), False),
        ({"channel_last": False}, (2, DIM, 9), False),
        ({"accept_image_fmap": True, "codebook_dim": 8}, (2, DIM, 3, 4), False),
        ({}, (5, DIM), False),  # one token
        ({"rotation_trick": False}, (3, 20, DIM), True),
        ({"return_zeros_for_masked_padding": False}, (3, 20, DIM), True),
        ({"learnable_codebook": True, "ema_update": False, "commitment_weight": 0.5},
         (3, 20, DIM), False),
        ({"orthogonal_reg_weight": 2.0, "rotation_trick": False}, (3, 20, DIM), False),
    ],
    ids=lambda c: (",".join(f"{k}={v}" for k, v in c.items()) or "default")
    if isinstance(c, dict) else str(c),
)  # fmt: skip
def test_topk_matches_peer(config, shape, masked, train):
    peer, ours = _pair(**config)
    peer.train(train)
    ours.train(train)
    before = {name: getattr(ours, name).detach().clone() for name in STATE}
    g = torch.Generator().manual_seed(5)
    compared = 0
    for _ in range(2):
        x = torch.randn(*shape, generator=g) * 2
        kwargs = {}
        if masked:
            lens = torch.randint(1, shape[1] + 1, (shape[0],), generator=g)
            kwargs["mask"] = torch.arange(shape[1]) < lens[:, None]
        xp, xv = x.clone().requires_grad_(), x.clone().requires_grad_()
        qp, ip, lp = peer(xp, topk=TOPK, **kwargs)
        qv, iv, lv = ours(xv, topk=TOPK, **kwargs)
        assert qv.shape == qp.shape and iv.shape == ip.shape and lv.shape == lp.shape
        assert iv.shape[-1] == TOPK and iv.dtype == torch.int64 and lv.shape == iv.shape
        rows = _rows(ours, _topk_seq(ours, x))[0]
        equal = _check_topk_indices(
            rows, ours.embed[0].detach(), ip.reshape(-1, TOPK), iv.reshape(-1, TOPK),
            config.get("use_cosine_sim", False),
        )  # fmt: skip
        if not equal:  # a tie went the other way: next input
            continue
        torch.testing.assert_close(qv, qp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lv, lp, atol=1e-6, rtol=1e-5)
        if train:  # the peer's eval outputs carry no gradient (a documented difference)
            grad = torch.randn(qp.shape, generator=g)
            ((qp * grad).sum() + lp.sum()).backward()
            ((qv * grad).sum() + lv.sum()).backward()
            torch.testing.assert_close(xv.grad, xp.grad, atol=2e-5, rtol=1e-4)
            if isinstance(ours.embed, torch.nn.Parameter):
                theirs = peer._codebook.embed.grad
                torch.testing.assert_close(ours.embed.grad, theirs, atol=1e-6, rtol=1e-4)
                ours.embed.grad = peer._codebook.embed.grad = None
        compared += 1
    assert compared >= 1, "tied every time: pick another seed"
    # top-k mode never updates the codebook statistics (as the peer)
    for name in STATE:
        assert torch.equal(getattr(ours, name).detach(), before[name]), name
        torch.testing.assert_close(getattr(peer._codebook, name).detach(), before[name])


def test_topk_eval_loss_gradient_of_a_learnable_codebook_matches_peer():
    # In eval the peer's top-k loss still compares the learnable codes (not detached) with the
    # input: its gradient reaches the codebook and x, as fastvq's.
    torch.manual_seed(0)
    config = dict(dim=DIM, codebook_size=K, learnable_codebook=True, ema_update=False,
                  commitment_weight=0.5)  # fmt: skip
    peer = vqp.VectorQuantize(**config).eval()
    ours = VectorQuantize(**config).eval()
    with torch.no_grad():
        peer._codebook.embed.mul_(torch.rand(1, K, 1) * 4 + 1)
    ours.load_state_dict(peer.state_dict())
    x = torch.randn(2, 7, DIM, generator=torch.Generator().manual_seed(1))
    xp, xv = x.clone().requires_grad_(), x.clone().requires_grad_()
    _, ip, lp = peer(xp, topk=3)
    _, iv, lv = ours(xv, topk=3)
    assert torch.equal(iv, ip)
    torch.testing.assert_close(lv, lp)
    lp.sum().backward()
    lv.sum().backward()
    assert ours.embed.grad is not None and bool(ours.embed.grad.any())
    torch.testing.assert_close(ours.embed.grad, peer._codebook.embed.grad)
    torch.testing.assert_close(xv.grad, xp.grad)


@pytest.mark.parametrize("topk", [None, 2])
@pytest.mark.parametrize(
    "config",
    [{"learnable_codebook": True, "ema_update": False}, {"orthogonal_reg_weight": 1.0}],
    ids=["learnable", "orthogonal"],
)
@pytest.mark.parametrize("rows_need_grad", [True, False], ids=["route=False", "frozen rows"])
def test_codes_send_their_gradient_to_a_parameter_codebook(config, topk, rows_need_grad):
    # route_gradients_to_input=False: the output is the looked-up codes, no gradient to x, the
    # downstream gradient to a Parameter codebook (fastvq detached it: a learnable codebook
    # learned from the loss only). Rows that need no gradient (a frozen encoder's features):
    # the peer skips its estimator there, so its codebook learns from the output (fastvq's got
    # None).
    if topk and "orthogonal_reg_weight" in config:
        pytest.skip("top-k takes no orthogonal regulariser")
    peer, ours = _pair(route_gradients_to_input=not rows_need_grad, **config)
    x = torch.randn(2, 32, DIM, requires_grad=rows_need_grad)
    grads = []
    for m in (peer, ours):
        out = m(x) if topk is None else m(x, topk=topk)
        out[0].square().sum().backward()
        assert x.grad is None
        (g,) = [p.grad for n, p in m.named_parameters() if n.endswith("embed")]
        grads.append(g)
    assert grads[1] is not None and grads[1].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0].view_as(grads[1]))


def test_peer_attributes_user_code_reads():
    peer, ours = _pair(kmeans_init=True)
    x = torch.randn(2, 32, DIM)
    peer(x), ours(x)
    for name in ("embed", "cluster_size", "embed_avg", "initted"):
        mine, theirs = getattr(ours._codebook, name), getattr(peer._codebook, name)
        assert mine.shape == theirs.shape and mine.dtype == theirs.dtype, name
    assert torch.equal(ours._codebook.embed, ours.embed)
    config = dict(levels=[3, 3], num_quantizers=2, dim=4, is_channel_first=True)
    assert ResidualFSQ(**config).is_channel_first is vqp.ResidualFSQ(**config).is_channel_first


def test_positional_parameters_are_the_peers_or_refused():
    # The peer's 19th positional parameter is commitment_use_cross_entropy_loss, which fastvq
    # does not implement: positionally, fastvq bound that value to orthogonal_reg_weight.
    import inspect

    def positional(cls):
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        return [p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]

    ours, peers = positional(VectorQuantize), positional(vqp.VectorQuantize)
    assert ours == peers[: len(ours)] and ours[-1] == "commitment_weight"
    args = (8, 16, None, 1, False, 0.8, 1e-5, False, False, 10, True, False, False, 0.0, True)
    args += (False, False, 1.0)
    VectorQuantize(*args)
    with pytest.raises(TypeError, match="positional"):
        VectorQuantize(*args, 0.5)
