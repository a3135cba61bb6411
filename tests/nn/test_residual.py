"""fastvq.nn.residual: ResidualVQ, GroupedResidualVQ, ResidualFSQ, ResidualLFQ, ResidualSimVQ.

Oracle: vector-quantize-pytorch 1.32.0 (the peer) with the same config and the peer's state dict
loaded into fastvq, on the same inputs for several training steps: indices (tie-aware), outputs,
input gradients, losses and the EMA state of every layer. Documented differences (shared
codebook EMA, channel-first layouts) are tested against plain float64 formulas.
"""

import copy

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
from fastvq.nn.vector_quantize import VectorQuantize

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


@pytest.mark.parametrize("beam", [None, 2])
def test_all_codes_are_the_codes_quantized_with_in_training(beam):
    # The layers update their codebooks (EMA, dead codes) during the forward: return_all_codes
    # gives the codes the output was built from, not those indices in the updated codebooks.
    rvq = ResidualVQ(dim=DIM, num_quantizers=Q, codebook_size=K, beam_size=beam,
                     threshold_ema_dead_code=1, quantize_dropout=True).train()  # fmt: skip
    x = _randn(2, 20, DIM)
    mask = torch.arange(20) < torch.tensor([20, 13])[:, None]
    before = [layer.codebook.clone() for layer in rvq.layers]
    q, idx, _, codes = rvq(x, mask=mask, return_all_codes=True, rand_quantize_dropout_fixed_seed=3)
    assert not torch.equal(rvq.layers[0].codebook, before[0]), "the update ran"
    torch.testing.assert_close(codes.sum(0)[mask], q[mask], rtol=0, atol=1e-6)
    for layer, c, i in zip(before, codes, idx.unbind(-1), strict=True):
        assert torch.equal(c, torch.where(i[..., None] >= 0, layer[i.clamp(min=0)], 0.0))


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


@pytest.mark.parametrize("beam", [None, 3])
def test_shared_codebook_masked_update_leaves_out_padding(beam):
    # One EMA step over every layer's rows of the valid positions (float64 reference).
    rvq = ResidualVQ(dim=DIM, num_quantizers=Q, codebook_size=K, shared_codebook=True,
                     rotation_trick=False, decay=0.7, beam_size=beam)  # fmt: skip
    layer = rvq.layers[0]
    book = layer.embed[0].detach().double().clone()
    cs, ea = layer.cluster_size[0].double().clone(), layer.embed_avg[0].double().clone()
    x = _randn(3, 12, DIM, seed=2) * 2
    mask = torch.arange(12) < torch.tensor([12, 3, 7])[:, None]
    _, idx, _ = rvq(x, mask=mask)
    valid = mask.reshape(-1)
    flat = idx.reshape(-1, Q)
    assert bool((flat[~valid] == -1).all()) and bool((flat[valid] >= 0).all())
    residual, rows = x.reshape(-1, DIM).double(), []
    for i in range(Q):
        rows.append(residual)
        residual = residual - book[flat[:, i].clamp(min=0)]
    w = valid.double().repeat(Q)
    onehot = F.one_hot(flat.T.reshape(-1).clamp(min=0), K).double() * w[:, None]
    cs = 0.7 * cs + 0.3 * onehot.sum(0)
    ea = 0.7 * ea + 0.3 * onehot.T @ torch.cat(rows)
    smoothed = (cs + 1e-5) / (cs.sum() + K * 1e-5) * cs.sum()
    tol = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(layer.cluster_size[0].double(), cs, **tol)
    torch.testing.assert_close(layer.embed[0].double(), ea / smoothed[:, None], **tol)


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


# --- beam search (beam_size / eval_beam_size / beam_score_quantizer_weights) ------------------


def _to_peer_state(state):
    """fastvq's state dict with the peer's key names (layers.{i}._codebook.embed, ...)."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "layers" and parts[2] in ("initted", "cluster_size", "embed_avg", "embed"):
            key = ".".join([*parts[:2], "_codebook", *parts[2:]])
        out[key] = value
    return out


def _path(z, books, idx, cosine):
    """float64 layer inputs (rows the layer searches: normalized for cosine) and codes along the
    paths idx (m, Q) (-1: layer not run)."""
    residual, rows, codes = z.double(), [], []
    for layer in range(idx.shape[-1]):
        a = idx[:, layer]
        code = books[layer].double()[a.clamp(min=0)] * (a >= 0)[:, None]
        rows.append(F.normalize(residual, dim=-1) if cosine else residual)
        codes.append(code)
        residual = residual - code
    return rows, codes


def _path_scores(z, books, idx, cosine, weights, cw=1.0):
    rows, codes = _path(z, books, idx, cosine)
    return sum(
        w * cw * (c - r).square().mean(-1) for w, r, c in zip(weights, rows, codes, strict=True)
    )


def _check_beam_state(ours, z, books, states, idx, mask, cosine, decay=0.8, eps=1e-5):
    """Every layer that ran took one EMA step on the chosen path's rows (float64 reference)."""
    rows, _ = _path(z, books, idx, cosine)
    for layer, (cs, ea), r, a in zip(ours.layers, states, rows, idx.T, strict=True):
        if bool((a == -1).all()):  # dropped layer: untouched
            assert torch.equal(layer.cluster_size[0], cs) and torch.equal(layer.embed_avg[0], ea)
            continue
        w = (a >= 0).double() if mask is None else mask.double()
        onehot = F.one_hot(a.clamp(min=0), cs.shape[0]).double() * w[:, None]
        cs = decay * cs.double() + (1 - decay) * onehot.sum(0)
        ea = decay * ea.double() + (1 - decay) * onehot.T @ r
        n = cs.sum()
        book = ea / ((cs + eps) / (n + cs.numel() * eps) * n)[:, None]
        book = F.normalize(book, dim=-1) if cosine else book
        tol = {"rtol": 1e-5, "atol": 1e-5}
        torch.testing.assert_close(layer.cluster_size[0].double(), cs, **tol)
        torch.testing.assert_close(layer.embed_avg[0].double(), ea, **tol)
        torch.testing.assert_close(layer.embed[0].double(), book, **tol)


def _beam_steps(config, shape=(3, 20, DIM), steps=3, mask_fn=None, seeds=None):
    """Training steps against the peer. The peer's post-search EMA update reaches only layer 0
    (its t[..., 0, :] picks layer 0's residuals, and zip stops there): layer 0 is compared with
    the peer, every layer with a float64 EMA step on the chosen path, and the peer is then given
    fastvq's state so that both start the next step equal."""
    vqp = _peer()
    config = {"dim": DIM, "num_quantizers": Q, "codebook_size": K, **config}
    peer = _perturbed_peer(vqp.ResidualVQ, **config)
    ours = ResidualVQ(**config)
    _load(ours, peer)
    cosine = config.get("use_cosine_sim", False)
    g = torch.Generator().manual_seed(1)
    compared = 0
    for step in range(steps):
        x = torch.randn(*shape, generator=g) * 2
        mask = mask_fn(g) if mask_fn else None
        kwargs = {} if mask is None else {"mask": mask}
        if seeds is not None:
            kwargs["rand_quantize_dropout_fixed_seed"] = seeds[step]
        books = [b.detach().clone() for b in ours.codebooks]
        states = [(layer.cluster_size[0].clone(), layer.embed_avg[0].clone())
                  for layer in ours.layers]  # fmt: skip
        xp, xv = x.clone().requires_grad_(), x.clone().requires_grad_()
        qp, ip, lp = peer(xp, **kwargs)
        qv, iv, lv = ours(xv, **kwargs)
        assert qv.shape == qp.shape == x.shape and iv.shape == ip.shape and lv.shape == (Q,)
        z = ours.project_in(x).detach().reshape(-1, ours.codebook_dim)
        flat_mask = None if mask is None else mask.reshape(-1)
        if not torch.equal(iv, ip):  # tie-aware: the two paths must score the same
            diff = (iv != ip).reshape(-1, Q).any(1)
            weights = ours.beam_score_weights.tolist()
            sv = _path_scores(z, books, iv.reshape(-1, Q), cosine, weights)[diff]
            sp = _path_scores(z, books, ip.reshape(-1, Q), cosine, weights)[diff]
            torch.testing.assert_close(sv, sp, rtol=1e-5, atol=1e-6)
        else:
            torch.testing.assert_close(qv, qp, atol=3e-5, rtol=1e-5)
            torch.testing.assert_close(lv, lp, atol=1e-6, rtol=1e-5)
            grad = torch.randn(qp.shape, generator=g)
            ((qp * grad).sum() + lp.sum()).backward()
            ((qv * grad).sum() + lv.sum()).backward()
            torch.testing.assert_close(xv.grad, xp.grad, atol=3e-5, rtol=1e-4)
            for name in ("embed", "cluster_size", "embed_avg"):
                theirs = getattr(peer.layers[0]._codebook, name).detach()
                torch.testing.assert_close(getattr(ours.layers[0], name).detach(), theirs)
            compared += 1
        _check_beam_state(ours, z, books, states, iv.reshape(-1, Q), flat_mask, cosine,
                          config.get("decay", 0.8))  # fmt: skip
        peer.load_state_dict(_to_peer_state(ours.state_dict()))
    assert compared >= steps - 1, "too many tied steps: pick another seed"
    return peer, ours


@pytest.mark.parametrize("beam", [2, 4])
@pytest.mark.parametrize(
    "config",
    [
        {"rotation_trick": False},
        {},  # rotation trick
        {"use_cosine_sim": True, "decay": 0.9},
        {"codebook_dim": 4, "commitment_weight": 0.3},  # projections
        {"codebook_size": (16, 32, 8), "quant_grad_frac": 0.5},
    ],
    ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default",
)
def test_beam_search_training_matches_peer(config, beam):
    _beam_steps({**config, "beam_size": beam})


@pytest.mark.parametrize("beam", [2, 4])
def test_beam_search_masked_matches_peer(beam):
    def mask_fn(g):
        lens = torch.randint(1, 21, (3,), generator=g)
        lens[0] = 20
        return torch.arange(20) < lens[:, None]

    _beam_steps({"beam_size": beam, "rotation_trick": beam == 4}, mask_fn=mask_fn)


def test_beam_search_with_quantize_dropout_matches_peer():
    config = {"beam_size": 3, "quantize_dropout": True, "quantize_dropout_cutoff_index": 1}
    _, ours = _beam_steps(config, seeds=[3, 11, 7])
    _, idx, losses = ours(_randn(2, 4, DIM), rand_quantize_dropout_fixed_seed=3)
    assert bool((idx[..., -1] == -1).all()) and losses[-1] == 0  # seed 3 drops the last layer


@pytest.mark.parametrize("config", [{"shared_codebook": True}, {"beam_size": 2}], ids=str)
def test_orthogonal_loss_gradient_is_that_of_the_codebook_it_was_computed_on(config):
    # The shared-codebook and beam paths update the Parameter codebook in place after the loss:
    # its gradient must be the loss's own, at the pre-update codebook (it mixed in the update).
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=8, num_quantizers=2, codebook_size=16, orthogonal_reg_weight=1.0,
                     commitment_weight=0.0, decay=0.5, **config)  # fmt: skip
    before = [layer.embed.detach().clone().requires_grad_() for layer in rvq.layers]
    _, _, losses = rvq(_randn(4, 20, 8) * 3)
    losses.sum().backward()

    def ortho(c):  # Shin et al.'s loss over one head's n codes
        normed = torch.nn.functional.normalize(c, dim=-1, eps=1e-6)
        n = c.shape[-2]
        return (normed.transpose(-1, -2) @ normed).square().sum() / n**2 - 1 / n

    shared = config.get("shared_codebook", False)
    expected = 2 * ortho(before[0]) if shared else sum(ortho(b) for b in before)
    torch.testing.assert_close(losses.sum(), expected.detach())
    expected.backward()
    for layer, b in zip(rvq.layers[:1] if shared else rvq.layers, before, strict=False):
        assert not torch.equal(layer.embed.detach(), b.detach()), "the update ran"
        torch.testing.assert_close(layer.embed.grad, b.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", [{"shared_codebook": True}, {"beam_size": 2}], ids=str)
def test_rotation_gradient_uses_the_codes_before_the_parameter_update(config):
    # The Parameter codebook (orthogonal regulariser) is written in place after the search: the
    # rotation trick's backward must read the codes it quantized with, as a frozen step does.
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=8, num_quantizers=2, codebook_size=16, orthogonal_reg_weight=1.0,
                     decay=0.5, **config)  # fmt: skip
    frozen = copy.deepcopy(rvq)
    x = _randn(4, 20, 8, seed=1) * 3
    g = _randn(4, 20, 8, seed=2)
    grads = []
    for module, freeze in ((frozen, True), (rvq, False)):
        xg = x.clone().requires_grad_()
        q, idx, _ = module(xg, freeze_codebook=freeze)
        (q * g).sum().backward()
        grads.append((idx, xg.grad))
    assert not torch.equal(rvq.layers[0].embed, frozen.layers[0].embed), "the update ran"
    assert torch.equal(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[1][1], grads[0][1])


def test_quantize_dropout_multiple_past_the_stack_keeps_every_layer():
    # Q = 3 with multiples of 2: a drawn index of 2 rounds up to 3, past the last layer; greedy
    # and beam search then both run all three (the beam search indexed layer 3).
    for beam in (1, 2):
        rvq = ResidualVQ(dim=8, num_quantizers=3, codebook_size=16, quantize_dropout=True,
                         quantize_dropout_multiple_of=2, beam_size=beam)  # fmt: skip
        for seed in range(12):
            _, idx, _ = rvq(_randn(2, 5, 8), rand_quantize_dropout_fixed_seed=seed)
            assert bool((idx >= 0).all()) or bool((idx[..., 2] == -1).all()), (beam, seed)


def test_beam_search_eval_matches_peer():
    # eval_beam_size, per-layer score weights, a mask and return_all_codes; eval losses are the
    # chosen path's commitment losses (0 without beam search, as the peer).
    vqp = _peer()
    config = dict(dim=DIM, num_quantizers=Q, codebook_size=K, codebook_dim=6, beam_size=2,
                  eval_beam_size=5, beam_score_quantizer_weights=[1.0, 0.3, 2.0])  # fmt: skip
    peer = _perturbed_peer(vqp.ResidualVQ, **config).eval()
    ours = ResidualVQ(**config).eval()
    _load(ours, peer)
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    x = _randn(3, 11, DIM, seed=2) * 2
    mask = torch.arange(11) < torch.tensor([11, 4, 8])[:, None]
    for kwargs in ({}, {"mask": mask}, {"beam_size": 3}):
        qp, ip, lp, cp = peer(x, return_all_codes=True, **kwargs)
        qv, iv, lv, cv = ours(x, return_all_codes=True, **kwargs)
        assert torch.equal(iv, ip)
        torch.testing.assert_close(qv, qp, atol=3e-5, rtol=1e-5)
        torch.testing.assert_close(lv, lp, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(cv, cp)
        assert bool((lv > 0).all())
        if "mask" in kwargs:
            assert bool((iv[~mask] == -1).all()) and not qv[~mask].any()
    # the per-layer score weights change the search (and the peer agrees, above)
    uniform = ResidualVQ(**{**config, "beam_score_quantizer_weights": None}).eval()
    _load(uniform, peer)
    assert not torch.equal(uniform(x, beam_size=3)[1], iv)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_beam_size_one_is_the_greedy_path():
    # beam_size=1 is the greedy forward (as the peer); the beam machinery with one beam (called
    # directly) gives the same indices, outputs, gradients, training losses and EMA state.
    config = dict(dim=DIM, num_quantizers=Q, codebook_size=K, codebook_dim=6, decay=0.7)
    torch.manual_seed(0)
    greedy = ResidualVQ(**config)
    beam = ResidualVQ(**config, beam_size=1)
    beam.load_state_dict(greedy.state_dict())
    x = _randn(3, 9, DIM, seed=3) * 2
    mask = torch.arange(9) < torch.tensor([9, 2, 6])[:, None]
    for kwargs in ({}, {"mask": mask}):
        xg, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        qg, ig, lg = greedy(xg, **kwargs)
        qb, ib, lb = beam._beam_run(
            beam._begin(xb, kwargs.get("mask"), None), False, 1, None, False
        )
        assert torch.equal(ib, ig)
        torch.testing.assert_close(qb, qg)
        torch.testing.assert_close(lb, lg)
        grad = _randn(*qg.shape, seed=4)
        ((qg * grad).sum() + lg.sum()).backward()
        ((qb * grad).sum() + lb.sum()).backward()
        torch.testing.assert_close(xb.grad, xg.grad)
        for (name, a), b in zip(greedy.state_dict().items(), beam.state_dict().values(),
                                strict=True):  # fmt: skip
            torch.testing.assert_close(b, a, msg=name)
    q1, i1, _ = beam(x)  # the public beam_size=1: the greedy forward
    q2, i2, _ = greedy(x)
    assert torch.equal(i1, i2)


def test_beam_search_candidate_scores_in_many_chunks(monkeypatch):
    # The candidates' MSE is gathered in row chunks of at most 2^20 elements, which the small
    # tests never exceed: with chunks of 5 rows (a ragged last one), every row is still scored
    # and the search picks what one chunk picks.
    import fastvq.nn.vector_quantize as vqmod

    rows, codebook = _randn(23, 6, seed=1), _randn(11, 6, seed=2)
    idx = torch.randint(0, 11, (23, 3), generator=torch.Generator().manual_seed(3))
    want = (codebook[idx] - rows[:, None]).square().mean(-1)
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=DIM, num_quantizers=Q, codebook_size=K, beam_size=3).eval()
    x = _randn(2, 9, DIM, seed=4)
    q1, i1, _ = rvq(x)
    monkeypatch.setattr(vqmod, "_SAMPLE_CHUNK_ELEMENTS", 5 * 3 * 6)
    torch.testing.assert_close(vqmod._candidate_mse(rows, codebook, idx), want)
    monkeypatch.setattr(vqmod, "_SAMPLE_CHUNK_ELEMENTS", 5 * 3 * DIM)
    q2, i2, _ = rvq(x)
    assert torch.equal(i2, i1)
    torch.testing.assert_close(q2, q1)


@pytest.mark.parametrize("cosine", [False, True])
def test_beam_search_beats_greedy_on_average(cosine):
    # The searched objective (sum of per-layer commitment losses) and the final residual error
    # are lower on average with beams than on the greedy path.
    torch.manual_seed(0)
    config = dict(dim=DIM, num_quantizers=Q, codebook_size=16, use_cosine_sim=cosine)
    rvq = ResidualVQ(**config).eval()
    x = _randn(4, 64, DIM, seed=5)
    z = x.reshape(-1, DIM)
    books = list(rvq.codebooks)
    _, greedy_idx, _ = rvq(x)
    scores = {}
    for beam in (1, 2, 4, 8):
        _, idx, losses = rvq(x, beam_size=beam)
        s = _path_scores(z, books, idx.reshape(-1, Q), cosine, [1.0] * Q)
        if beam > 1:  # the returned losses are the chosen path's, averaged over rows
            torch.testing.assert_close(losses.sum().double(), s.mean(), rtol=1e-5, atol=1e-7)
        scores[beam] = s.mean()
    assert scores[2] < scores[1] and scores[4] < scores[1] and scores[8] <= scores[4] + 1e-6
    g_scores = _path_scores(z, books, greedy_idx.reshape(-1, Q), cosine, [1.0] * Q)
    torch.testing.assert_close(scores[1], g_scores.mean())
    if not cosine:  # l2: the final residual error is the last layer's loss
        err = {}
        for beam in (1, 4):
            q, _, _ = rvq(x, beam_size=beam)
            err[beam] = (q - x).square().mean()
        assert err[4] < err[1]


def test_beam_search_without_commitment_weight_ranks_by_the_error():
    # commitment_weight 0 scores every path 0 in the peer (an arbitrary pick); fastvq ranks by
    # the unweighted error, the ranking any positive weight gives.
    x = _randn(4, 64, DIM, seed=7)
    outs = []
    for weight in (0.0, 1.0, 3.0):
        torch.manual_seed(0)
        rvq = ResidualVQ(dim=DIM, num_quantizers=Q, codebook_size=16, commitment_weight=weight)
        outs.append(rvq.eval()(x, beam_size=4)[1])
    greedy = rvq(x)[1]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert not torch.equal(outs[0], greedy)


def test_beam_search_shared_codebook_one_update():
    # The search matches the peer; the shared codebook then takes one EMA step over every
    # layer's chosen-path rows (fastvq's shared-codebook semantics, float64 reference).
    vqp = _peer()
    config = dict(dim=DIM, num_quantizers=Q, codebook_size=K, shared_codebook=True,
                  rotation_trick=False, decay=0.7, beam_size=3)  # fmt: skip
    peer = _perturbed_peer(vqp.ResidualVQ, **config)
    ours = ResidualVQ(**config)
    _load(ours, peer)
    layer = ours.layers[0]
    book = layer.embed[0].detach().double().clone()
    cs, ea = layer.cluster_size[0].double().clone(), layer.embed_avg[0].double().clone()
    x = _randn(3, 20, DIM, seed=4) * 2
    qp, ip, lp = peer(x)
    qv, iv, lv = ours(x)
    assert torch.equal(iv, ip)
    torch.testing.assert_close(qv, qp, atol=3e-5, rtol=1e-5)
    torch.testing.assert_close(lv, lp)
    rows, _ = _path(x.reshape(-1, DIM), [book] * Q, iv.reshape(-1, Q), False)
    idx = iv.reshape(-1, Q).T.reshape(-1)
    onehot = F.one_hot(idx, K).double()
    cs = 0.7 * cs + 0.3 * onehot.sum(0)
    ea = 0.7 * ea + 0.3 * onehot.T @ torch.cat(rows)
    smoothed = (cs + 1e-5) / (cs.sum() + K * 1e-5) * cs.sum()
    torch.testing.assert_close(layer.cluster_size[0].double(), cs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.embed[0].double(), ea / smoothed[:, None], rtol=1e-5,
                               atol=1e-5)  # fmt: skip


def test_beam_search_kmeans_init_freeze_and_layouts():
    # k-means init runs on each layer's input (the peer's crashes for batch > 1); a frozen
    # codebook is not updated after the search (the peer's update_indices ignores the freeze).
    rvq = ResidualVQ(dim=DIM, num_quantizers=Q, codebook_size=8, kmeans_init=True, beam_size=2)
    x = _randn(3, 30, DIM, seed=6)
    rvq(x)
    assert all(bool(layer.initted) for layer in rvq.layers)
    state = {k: v.clone() for k, v in rvq.state_dict().items()}
    rvq(x, freeze_codebook=True)
    for k, v in rvq.state_dict().items():
        assert torch.equal(v, state[k]), k
    rvq(x)
    assert not torch.equal(rvq.layers[2].embed, state["layers.2.embed"])
    # layouts: an image fmap and one token give what the channel-last sequence gives
    img = ResidualVQ(dim=DIM, num_quantizers=Q, codebook_size=K, accept_image_fmap=True,
                     codebook_dim=4, beam_size=3).eval()  # fmt: skip
    seq = ResidualVQ(dim=DIM, num_quantizers=Q, codebook_size=K, codebook_dim=4,
                     beam_size=3).eval()  # fmt: skip
    seq.load_state_dict(img.state_dict())
    x = _randn(2, DIM, 3, 5, seed=7)
    q, idx, losses, codes = img(x, return_all_codes=True)
    q2, idx2, losses2 = seq(x.flatten(2).transpose(1, 2))
    assert idx.shape == (2, 3, 5, Q) and codes.shape == (Q, 2, 3, 5, 4)
    assert torch.equal(idx.reshape(2, 15, Q), idx2)
    torch.testing.assert_close(q.flatten(2).transpose(1, 2), q2)
    torch.testing.assert_close(losses, losses2)
    torch.testing.assert_close(img.get_output_from_indices(idx), q)
    one = ResidualVQ(dim=DIM, num_quantizers=Q, codebook_size=K, beam_size=3).eval()
    tokens = _randn(5, DIM, seed=8)
    q, idx, losses = one(tokens)
    q2, idx2, losses2 = one(tokens[:, None])
    assert idx.shape == (5, Q) and torch.equal(idx, idx2[:, 0])
    torch.testing.assert_close(q, q2[:, 0])
    torch.testing.assert_close(losses, losses2)


def test_beam_search_kmeans_init_leaves_out_masked_rows():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 30, DIM, generator=g)
    x[1, 10:] = 1000.0 + torch.randn(20, DIM, generator=g)  # padding: never a centroid
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 10:] = False
    rvq = ResidualVQ(dim=DIM, num_quantizers=2, codebook_size=8, kmeans_init=True, beam_size=2,
                     ema_update=False)  # fmt: skip
    rvq(x, mask=mask)
    for layer in rvq.layers:
        assert bool(layer.initted) and layer.embed.abs().max() < 20


# --- layouts, dropout, state -----------------------------------------------------------------


@pytest.mark.parametrize(
    "config, shape, idx_shape",
    [
        ({"accept_image_fmap": True, "codebook_dim": 4}, (2, DIM, 3, 5), (2, 3, 5, Q)),
        ({"accept_3d_fmap": True}, (1, DIM, 2, 3, 2), (1, 2, 3, 2, Q)),
        ({"channel_last": False, "codebook_dim": 5}, (2, DIM, 7), (2, 7, Q)),
        ({}, (4, DIM), (4, Q)),
        ({"channel_last": False}, (4, DIM), (4, Q)),  # one token, as VectorQuantize takes it
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
    with torch.no_grad():  # no dropout in eval (one call would pass half the time with it)
        outs = [rvq.eval()(x)[1] for _ in range(8)]
    assert all(bool((out >= 0).all()) and torch.equal(out, outs[0]) for out in outs)


@pytest.mark.parametrize("frac", [0.0, 0.25])
def test_quant_grad_frac_scales_the_residual_gradient(frac):
    # Straight-through layers, no projections: d(sum_l q_l)/dx = sum_l (1 - frac)^l.
    rvq = ResidualVQ(dim=DIM, num_quantizers=Q, codebook_size=K, rotation_trick=False,
                     quant_grad_frac=frac).eval()  # fmt: skip
    x = _randn(2, 5, DIM).requires_grad_()
    q, _, _ = rvq(x)
    g = _randn(2, 5, DIM, seed=1)
    (q * g).sum().backward()
    scale = sum((1 - frac) ** i for i in range(Q))
    torch.testing.assert_close(x.grad, g * scale)


@pytest.mark.parametrize("cls, kwargs", [
    (ResidualFSQ, dict(levels=[5, 5], num_quantizers=4)),
    (ResidualLFQ, dict(dim=4, codebook_size=16, num_quantizers=4)),
])  # fmt: skip
def test_fsq_lfq_stacks_drop_layers_only_with_grad_enabled(cls, kwargs):
    # As the peer: ResidualFSQ / ResidualLFQ apply quantize dropout only when grad is enabled.
    rq = cls(quantize_dropout=True, **kwargs)
    x = _randn(2, 5, rq.dim)
    dropped = 0
    for seed in range(6):
        with torch.no_grad():
            idx = rq(x, rand_quantize_dropout_fixed_seed=seed)[1]
        assert bool((idx >= 0).all()), seed
        dropped += int((rq(x, rand_quantize_dropout_fixed_seed=seed)[1] == -1).any())
    assert dropped > 0  # the same seeds drop layers with grad enabled


@pytest.mark.parametrize("cls", [ResidualVQ, ResidualSimVQ])
def test_vq_stacks_drop_layers_under_no_grad_too(cls):
    # As the peer: the VQ stacks apply quantize dropout in training whatever grad mode.
    rq = cls(dim=DIM, num_quantizers=4, codebook_size=16, quantize_dropout=True)
    with torch.no_grad():
        dropped = [
            bool((rq(_randn(2, 5, DIM), rand_quantize_dropout_fixed_seed=s)[1] == -1).any())
            for s in range(6)
        ]
    assert any(dropped)


def test_residual_vq_masked_rows_and_returned_codes():
    # return_zeros_for_masked_padding=False gives masked rows their input back (the peer's);
    # return_all_codes' codes carry no gradient to x.
    rvq = ResidualVQ(dim=DIM, num_quantizers=2, codebook_size=16,
                     return_zeros_for_masked_padding=False)  # fmt: skip
    x = _randn(2, 6, DIM).requires_grad_()
    mask = torch.tensor([[True] * 6, [True] * 2 + [False] * 4])
    q, idx, _, codes = rvq(x, mask=mask, return_all_codes=True)
    assert torch.equal(q[~mask], x[~mask]) and bool((idx[~mask] == -1).all())
    assert not torch.equal(q[mask], x[mask]) and not codes.requires_grad


def test_grouped_stacks_drop_the_same_layers():
    grvq = GroupedResidualVQ(dim=DIM, groups=2, num_quantizers=4, codebook_size=16,
                             quantize_dropout=True)  # fmt: skip
    torch.manual_seed(0)
    runs = set()
    for step in range(8):
        _, idx, _ = grvq(_randn(2, 5, DIM, seed=step))
        run = (idx[:, 0, 0] >= 0).sum(-1)  # layers run, per group
        assert run[0] == run[1], step
        runs.add(int(run[0]))
    assert len(runs) > 1  # dropout varied
    # A fixed seed is every group's, at every call (it was replaced by a drawn one).
    runs = [grvq(_randn(2, 5, DIM), rand_quantize_dropout_fixed_seed=1)[1] for _ in range(6)]
    assert len({tuple((idx >= 0).sum(-1)[:, 0, 0].tolist()) for idx in runs}) == 1


def test_residual_fsq_with_orthogonal_rotation_decodes_its_indices():
    # The decoders took the layers' codes before the rotation was undone (off by up to 2.3).
    torch.manual_seed(0)
    for m, d in [
        (ResidualFSQ(levels=[3, 3], num_quantizers=2, orthogonal_rotation=True), 2),
        (GroupedResidualFSQ(dim=4, groups=2, levels=[3, 3], num_quantizers=2,
                            orthogonal_rotation=True), 4),
    ]:  # fmt: skip
        for train in (True, False):
            q, idx, codes = m.train(train)(_randn(3, 7, d), return_all_codes=True)
            torch.testing.assert_close(m.get_output_from_indices(idx), q)
            per_layer = torch.cat(codes, -1) if isinstance(codes, tuple) else codes  # groups
            torch.testing.assert_close(per_layer.sum(0), q)


def test_grouped_codebooks_of_unequal_layers():
    grvq = GroupedResidualVQ(dim=DIM, groups=2, num_quantizers=2, codebook_size=(4, 8))
    books = grvq.codebooks
    assert len(books) == 2 and [b.shape[0] for b in books[1]] == [4, 8]


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


def test_shared_codebook_init_from_clusters_the_first_layers_input_once():
    # Re-clustered at every layer, the shared codebook fitted the last, small residual.
    torch.manual_seed(17)
    rvq = ResidualVQ(dim=DIM, num_quantizers=3, codebook_size=8, shared_codebook=True)
    alone = VectorQuantize(DIM, 8)
    x = _randn(256, DIM, seed=8) * 4
    rvq.init_from(x, iters=4, generator=torch.Generator().manual_seed(3))
    alone.init_from(x, iters=4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(rvq.layers[0].codebook, alone.codebook, rtol=0, atol=0)


def test_grouped_init_from_initialises_each_group_from_its_features():
    # Group g's stack is its ResidualVQ.init_from on features [g D / G, (g + 1) D / G).
    torch.manual_seed(16)
    grvq = GroupedResidualVQ(dim=2 * DIM, groups=2, num_quantizers=2, codebook_size=8)
    alone = copy.deepcopy(grvq.rvqs)
    x = torch.randn(3, 64, 2 * DIM)
    x[..., DIM:] += 5.0  # the second group's features elsewhere: a swap would show
    grvq.init_from(x, iters=3, generator=torch.Generator().manual_seed(2), batches=2)
    g = torch.Generator().manual_seed(2)
    for rvq, chunk in zip(alone, (x[..., :DIM], x[..., DIM:]), strict=True):
        rvq.init_from(chunk, iters=3, generator=g, batches=2)
    for a, b in zip(grvq.state_dict().values(), alone.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert grvq.rvqs[1].layers[0].codebook.mean() > 4.0
    with pytest.raises(ValueError, match="encoder_outputs"):
        grvq.init_from(torch.randn(4, DIM))


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


@pytest.mark.parametrize(
    "cls, config",
    [(ResidualVQ, {}), (ResidualVQ, {"beam_size": 2}), (GroupedResidualVQ, {"groups": 2})],
    ids=["greedy", "beam", "grouped"],
)
def test_freeze_codebook_given_to_the_constructor(cls, config):
    # vq_kwargs reach every layer: a frozen layer keeps its codebook, EMA and (learnable) grad
    # in training unless forward says otherwise; forward's default used to unfreeze them all.
    torch.manual_seed(0)
    rvq = cls(dim=DIM, num_quantizers=2, codebook_size=K, freeze_codebook=True, **config)
    learnable = cls(dim=DIM, num_quantizers=2, codebook_size=K, freeze_codebook=True,
                    learnable_codebook=True, ema_update=False, **config)  # fmt: skip
    x = _randn(2, 12, DIM)
    before = {k: v.clone() for k, v in rvq.state_dict().items()}
    rvq.train()(x)
    assert all(torch.equal(v, before[k]) for k, v in rvq.state_dict().items())
    xg = x.clone().requires_grad_()
    q, _, losses = learnable.train()(xg)
    (q.sum() + losses.sum()).backward()
    assert xg.grad is not None and all(p.grad is None for p in learnable.parameters())
    rvq(x, freeze_codebook=False)  # forward's argument still wins
    assert not all(torch.equal(v, before[k]) for k, v in rvq.state_dict().items())


# --- ResidualFSQ / ResidualLFQ -------------------------------------------------------------------


def test_residual_fsq_lfq_codebooks_match_peer():
    # The peer's `codebooks` (its layers' implicit / +-scale codebooks); the grouped stacks
    # stack them per group (their property raised AttributeError before ResidualFSQ had one).
    vqp = _peer()
    stacks = [
        (ResidualFSQ, dict(dim=2, levels=[5, 4], num_quantizers=3)),
        (ResidualLFQ, dict(dim=4, codebook_size=16, num_quantizers=3)),
        (GroupedResidualFSQ, dict(dim=4, groups=2, levels=[8, 5, 3], num_quantizers=2)),
        (GroupedResidualLFQ, dict(dim=8, groups=2, codebook_size=16, num_quantizers=3)),
    ]
    for cls, config in stacks:
        ours, peer = cls(**config), getattr(vqp, cls.__name__)(**config)
        assert torch.equal(ours.codebooks, peer.codebooks), cls.__name__
    rlfq = ResidualLFQ(dim=4, codebook_size=16, num_quantizers=3)
    idx = torch.randint(0, 16, (2, 5, 3))
    rows = [rlfq.codebooks[q][idx[..., q]] for q in range(3)]
    assert torch.equal(rlfq.get_codes_from_indices(idx), torch.stack(rows))


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


def test_grouped_positional_arguments_follow_the_peers():
    # The peers' forwards: VQ (x, indices, return_all_codes, ...), FSQ (x, return_all_codes),
    # LFQ (x, mask, return_all_codes); one shared signature read FSQ's True and LFQ's mask as
    # indices.
    x = _randn(2, 5, 8)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    fsq = GroupedResidualFSQ(dim=8, groups=2, levels=[8, 5, 5, 3], num_quantizers=2)
    out = fsq(x, True)
    # all_codes: the peer's tuple of the groups' codes (user code torch.cat's it)
    assert len(out) == 3 and isinstance(out[2], tuple)
    assert [c.shape for c in out[2]] == [(2, 2, 5, 4)] * 2
    lfq = GroupedResidualLFQ(dim=8, groups=2, codebook_size=16, num_quantizers=2)
    torch.manual_seed(0)
    by_position = lfq(x, mask, True)
    torch.manual_seed(0)
    by_name = lfq(x, mask=mask, return_all_codes=True)
    assert len(by_position) == 4
    for a, b in zip(by_position[:3], by_name[:3], strict=True):
        assert torch.equal(a, b)
    assert all(map(torch.equal, by_position[3], by_name[3]))
    vq = GroupedResidualVQ(dim=8, groups=2, codebook_size=16, num_quantizers=2).eval()
    assert len(vq(x, None, True)) == 4
    with pytest.raises(ValueError, match="indices"):
        vq(x, torch.zeros(2, 2, 5, 2, dtype=torch.long))


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
        (ResidualVQ, dict(beam_size=0), ValueError, "beam_size"),
        (ResidualVQ, dict(beam_size=129), ValueError, "beam_size must be at most 128"),
        (ResidualVQ, dict(beam_size=2.5), TypeError, "beam_size"),
        (ResidualVQ, dict(eval_beam_size=2), ValueError, "eval_beam_size needs beam_size"),
        (ResidualVQ, dict(beam_size=2, eval_beam_size=0), ValueError, "eval_beam_size"),
        (ResidualVQ, dict(beam_size=2, beam_score_quantizer_weights=[1.0, 2.0]), ValueError,
         "beam_score_quantizer_weights"),
        (ResidualVQ, dict(beam_size=2, beam_score_quantizer_weights=[1.0, 2.0, float("nan")]),
         ValueError, "beam_score_quantizer_weights"),
        (ResidualVQ, dict(decay=2.0), ValueError, "decay"),
        (ResidualVQ, dict(quant_grad_frac=float("nan")), ValueError,
         r"quant_grad_frac must be in \[0, 1\], got nan"),
        (ResidualVQ, dict(quant_grad_frac="x"), TypeError, "quant_grad_frac must be a real"),
        (ResidualFSQ, dict(levels=[1, 4]), ValueError, "levels"),
        (ResidualFSQ, dict(levels=4), TypeError, "levels must be a list of ints, got int"),
        (ResidualFSQ, dict(bound_hard_clamp=False, soft_clamp_input_value=[1.0, 2.0, 3.0]),
         ValueError, r"soft_clamp_input_value must be a number or 2 numbers \(one per level\)"),
        (ResidualFSQ, dict(bound_hard_clamp=False, soft_clamp_input_value=0.0), ValueError,
         "soft_clamp_input_value must be finite and > 0"),
        (ResidualFSQ, dict(bound_hard_clamp=False, soft_clamp_input_value="a"), ValueError,
         "soft_clamp_input_value must be a number"),
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


def test_beam_search_on_an_empty_batch_has_zero_losses():
    # As the greedy path: no row, no loss (a mean over no rows would be NaN).
    rvq = ResidualVQ(dim=DIM, num_quantizers=Q, codebook_size=K, beam_size=2)
    for training in (True, False):
        rvq.train(training)
        for x in (torch.randn(0, 5, DIM), torch.randn(2, 0, DIM)):
            out, idx, losses = rvq(x)
            assert out.shape == x.shape and idx.shape == (*x.shape[:2], Q)
            assert torch.equal(losses, torch.zeros(Q)), (training, x.shape)


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
    with pytest.raises(ValueError, match="mask"):  # the beam-search path checks it too
        rvq(torch.randn(2, 5, DIM), mask=torch.ones(2, 4, dtype=torch.bool), beam_size=2)
    for beam, error in ((0, ValueError), (129, ValueError), (1.5, TypeError)):
        with pytest.raises(error, match="beam_size"):
            rvq(torch.randn(2, 5, DIM), beam_size=beam)
    for temp, error in ((-1.0, ValueError), (float("nan"), ValueError), ("hot", TypeError)):
        with pytest.raises(error, match="sample_codebook_temp"):
            rvq(torch.randn(2, 5, DIM), sample_codebook_temp=temp)
    rlfq = ResidualLFQ(dim=4, codebook_size=16, num_quantizers=2)
    for layer, x in ((rvq, torch.randn(2, 5, DIM)), (rlfq, torch.randn(2, 5, 4))):
        with pytest.raises(TypeError, match="mask must be a bool tensor, got list"):
            layer(x, mask=[[True] * 5] * 2)
    with pytest.raises(ValueError, match="indices"):
        rvq(torch.randn(2, 5, DIM), indices=torch.zeros(2, 5, Q, dtype=torch.long))
    with pytest.raises(TypeError, match="indices"):
        rvq.get_codes_from_indices(torch.zeros(2, 5, Q))
    with pytest.raises(ValueError, match="at most num_quantizers"):
        rvq.get_codes_from_indices(torch.zeros(2, 5, Q + 1, dtype=torch.long))
    for bad in (-2, K):  # -1 alone means dropped
        with pytest.raises(ValueError, match=rf"indices must lie in \[-1, {K}\)"):
            rvq.get_codes_from_indices(torch.tensor([[[0, bad]]]))
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


def test_decoding_checks_each_layer_against_its_own_codebook_size():
    # Checked against the first layer's size, layer 1's valid codes 4 ... 31 were refused (a
    # tokenizer on this stack could not decode its own tokens) and layer 1 of (8, 4) took code 6.
    for sizes, idx in (((4, 32), [0, 31]), ((8, 4), [7, 3])):
        rvq = ResidualVQ(dim=DIM, codebook_size=sizes).eval()
        x = torch.randn(1, 5, DIM)
        _, indices, _ = rvq(x)
        assert torch.equal(rvq.get_output_from_indices(indices), rvq(x)[0])
        rvq.get_output_from_indices(torch.tensor([[idx]]))
    with pytest.raises(ValueError, match=r"must lie in \[-1, 4\) .* from 6 to 6 \(layer 1\)"):
        rvq.get_output_from_indices(torch.tensor([[[7, 6]]]))
