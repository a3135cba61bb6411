"""fastvq.nn.scalar: FSQ, LFQ, BSQ, LatentQuantize.

Oracle: vector-quantize-pytorch 1.32.0 with the same config and copied weights, on the same
input; where fastvq documents a difference, its own behaviour is tested against a direct formula.
"""

import math

import pytest
import torch

from fastvq.nn.scalar import BSQ, FSQ, LFQ, LatentQuantize


def _seed(n=0):
    torch.manual_seed(n)


def _peer():
    return pytest.importorskip("vector_quantize_pytorch")


def _copy(peer, mine):
    missing, unexpected = mine.load_state_dict(peer.state_dict(), strict=False)
    assert not missing and not unexpected, (missing, unexpected)


# --- FSQ ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        (dict(levels=[8, 5, 5, 3]), (2, 7, 4)),
        (dict(levels=[4, 5, 3], dim=10, num_codebooks=2), (2, 5, 10)),
        (dict(levels=[7, 5], dim=6), (2, 6, 3, 2)),  # image fmap, projections
        (dict(levels=[5, 4], dim=2, channel_first=True), (3, 2, 5)),
        (dict(levels=[5, 5, 5], orthogonal_rotation=True), (2, 9, 3)),
        (dict(levels=[2, 5, 4], preserve_symmetry=True), (2, 9, 3)),
        (dict(levels=[3, 4], preserve_symmetry=True, bound_hard_clamp=True), (2, 9, 2)),
    ],
)
def test_fsq_matches_peer(kwargs, shape):
    vq = _peer()
    _seed(1)
    peer = vq.FSQ(**kwargs)
    mine = FSQ(**kwargs)
    _copy(peer, mine)
    z = torch.randn(shape) * 2
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    out_p, idx_p = peer(z1)
    out_m, idx_m = mine(z2)
    assert out_m.shape == out_p.shape == z.shape and idx_m.shape == idx_p.shape
    assert torch.equal(idx_m, idx_p.long())
    torch.testing.assert_close(out_m, out_p, atol=1e-6, rtol=1e-5)
    g = torch.randn_like(out_p)
    out_p.backward(g)
    out_m.backward(g)
    torch.testing.assert_close(z2.grad, z1.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mine.indices_to_codes(idx_m), peer.indices_to_codes(idx_p))


def test_fsq_hard_clamp_matches_peer():
    vq = _peer()
    peer = vq.FSQ(levels=[5, 4, 3], bound_hard_clamp=True)
    mine = FSQ(levels=[5, 4, 3], bound_hard_clamp=True)
    _seed(2)
    z = torch.randn(2, 11, 3) * 1.5
    out_p, idx_p = peer(z)
    out_m, idx_m = mine(z)
    assert torch.equal(idx_m, idx_p.long())
    torch.testing.assert_close(out_m, out_p)


def test_fsq_level_two_without_symmetry_is_allowed():
    # The peer asserts here; fastvq's grid for L = 2 is {-1, 0} (fastvq.fsq).
    _seed(3)
    m = FSQ(levels=[2, 3])
    z = torch.randn(2, 6, 2)
    out, idx = m(z)
    assert set(out[..., 0].unique().tolist()) <= {-1.0, 0.0}
    assert torch.equal(m.indices_to_codes(idx), out)


def test_fsq_roundtrip_bf16_state_dict():
    _seed(4)
    m = FSQ(levels=[8, 6, 5], dim=16)
    z = torch.randn(2, 5, 16)
    out, idx = m(z)
    assert idx.dtype == torch.int64 and int(idx.max()) < m.codebook_size == 240
    torch.testing.assert_close(m.indices_to_codes(idx), out)
    out16, idx16 = m.to(torch.bfloat16)(z.bfloat16())
    assert out16.dtype == torch.bfloat16 and (idx16 == idx).float().mean() > 0.9
    m2 = FSQ(levels=[8, 6, 5], dim=16)
    m2.load_state_dict(m.float().state_dict())
    assert torch.equal(m2(z)[1], idx)
    assert m.codebook is None


def test_fsq_bad_input():
    with pytest.raises(ValueError, match="levels"):
        FSQ(levels=[1, 4])
    with pytest.raises(TypeError, match="levels"):
        FSQ(levels=[2.5, 4])
    with pytest.raises(ValueError, match="keep_num_codebooks_dim"):
        FSQ(levels=[4, 4], num_codebooks=2, keep_num_codebooks_dim=False)
    with pytest.raises(ValueError, match="noise_dropout"):
        FSQ(levels=[4, 4], noise_dropout=0.5)
    m = FSQ(levels=[4, 4])
    with pytest.raises(ValueError, match="feature dimension must be 2"):
        m(torch.randn(2, 3, 3))
    with pytest.raises(TypeError, match="float"):
        m(torch.ones(2, 3, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="integer"):
        m.indices_to_codes(torch.zeros(2, 3))


# --- LFQ / BSQ ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        (dict(codebook_size=16, dim=4, commitment_loss_weight=0.3), (2, 6, 4)),
        (dict(codebook_size=32, dim=12, num_codebooks=2), (2, 5, 12)),
        (dict(dim=3, codebook_scale=0.5, soft_clamp_input_value=2.0), (3, 4, 3)),
        (dict(codebook_size=16, dim=8, channel_first=True), (2, 8, 3, 2)),
        (dict(codebook_size=16, spherical=True, codebook_scale=0.7), (2, 6, 4)),
        (dict(codebook_size=8, orthogonal_rotation=True, diversity_gamma=0.5), (2, 6, 3)),
        (dict(codebook_size=8, experimental_softplus_entropy_loss=True), (2, 6, 3)),
    ],
)
def test_lfq_matches_peer(kwargs, shape):
    vq = _peer()
    _seed(5)
    peer = vq.LFQ(**kwargs)
    mine = LFQ(**kwargs)
    _copy(peer, mine)
    x = torch.randn(shape)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    (out_p, idx_p, aux_p), (ps_p, be_p, cm_p) = peer(x1, return_loss_breakdown=True)
    (out_m, idx_m, aux_m), (ps_m, be_m, cm_m) = mine(x2, return_loss_breakdown=True)
    assert torch.equal(idx_m, idx_p)
    torch.testing.assert_close(out_m, out_p, atol=1e-6, rtol=1e-5)
    # exact entropy vs the peer's log(max(p, 1e-5))
    torch.testing.assert_close(ps_m, ps_p, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(cm_m, cm_p)
    # factorized batch entropy >= the peer's joint one (subadditivity)
    assert be_m >= be_p - 1e-4
    g = torch.randn_like(out_p)
    out_p.backward(g)
    out_m.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mine.indices_to_codes(idx_m), peer.indices_to_codes(idx_p))


@pytest.mark.parametrize("spherical", [False, True])
def test_lfq_single_token_aux_loss_and_grad_match_peer(spherical):
    # One token: the batch-averaged distribution is a product, so both entropies agree exactly.
    vq = _peer()
    _seed(6)
    kw = dict(codebook_size=16, entropy_loss_weight=0.2, spherical=spherical, codebook_scale=0.8)
    peer, mine = vq.LFQ(**kw), LFQ(**kw)
    x = torch.randn(1, 1, 4) * 0.05  # soft probabilities at inv_temperature 10
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    _, _, aux_p = peer(x1, inv_temperature=10.0)
    _, _, aux_m = mine(x2, inv_temperature=10.0)
    torch.testing.assert_close(aux_m, aux_p, atol=1e-5, rtol=1e-4)
    aux_p.backward()
    aux_m.backward()
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-5, rtol=1e-3)


def test_lfq_mask_matches_peer():
    vq = _peer()
    _seed(7)
    kw = dict(codebook_size=8, commitment_loss_weight=1.0)
    peer, mine = vq.LFQ(**kw), LFQ(**kw)
    x = torch.randn(2, 5, 3)
    mask = torch.rand(2, 5) > 0.4
    (_, _, _), (ps_p, _, cm_p) = peer(x, mask=mask, return_loss_breakdown=True)
    (_, _, _), (ps_m, _, cm_m) = mine(x, mask=mask, return_loss_breakdown=True)
    torch.testing.assert_close(ps_m, ps_p, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(cm_m, cm_p)


def test_lfq_eval_zero_loss_and_zero_input():
    m = LFQ(codebook_size=4).eval()
    out, idx, aux = m(torch.zeros(1, 2, 2))
    # fastvq: x == 0 quantizes to +scale (peer: -scale); all bits set in the peer's order
    assert torch.equal(out, torch.ones(1, 2, 2)) and torch.equal(idx, torch.full((1, 2), 3))
    assert aux.item() == 0.0


def test_bsq_codes_unit_norm_and_roundtrip():
    _seed(8)
    m = BSQ(codebook_size=64, dim=10)
    assert m.spherical
    x = torch.randn(2, 7, 10, dtype=torch.bfloat16)
    out, idx, aux = m.to(torch.bfloat16)(x)
    assert out.dtype == torch.bfloat16 and aux.ndim == 0 and torch.isfinite(aux)
    m = m.float()
    out, idx, _ = m(x.float())
    codes = m.indices_to_codes(idx, project_out=False)
    torch.testing.assert_close(codes.norm(dim=-1), torch.ones(2, 7))
    torch.testing.assert_close(m.indices_to_codes(idx), out)
    m2 = BSQ(codebook_size=64, dim=10)
    m2.load_state_dict(m.state_dict())
    torch.testing.assert_close(m2(x.float())[0], out)
    assert m.codebook is None and m.codebook_size == 64


def test_lfq_bad_input():
    with pytest.raises(ValueError, match="power of 2"):
        LFQ(codebook_size=12)
    with pytest.raises(ValueError, match="dim or codebook_size"):
        LFQ()
    with pytest.raises(ValueError, match="2\\^62"):
        LFQ(codebook_size=2**63)
    with pytest.raises(ValueError, match="soft_clamp"):
        LFQ(codebook_size=4, soft_clamp_input_value=0.5)
    m = LFQ(codebook_size=8)
    with pytest.raises(ValueError, match="feature dimension must be 3"):
        m(torch.randn(2, 4, 5))
    with pytest.raises(TypeError, match="float"):
        m(torch.ones(2, 4, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="mask"):
        m(torch.randn(2, 4, 3), mask=torch.ones(2, 3, dtype=torch.bool))


# --- LatentQuantize ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        (dict(levels=[5, 4, 3], dim=3), (2, 3, 7)),
        (dict(levels=[5, 6], dim=8), (2, 8, 3, 3)),
        (dict(levels=3, dim=4, codebook_dim=2, num_codebooks=2), (2, 4, 5)),
    ],
)
def test_latent_quantize_matches_peer(kwargs, shape):
    vq = _peer()
    _seed(9)
    peer = vq.LatentQuantize(**kwargs)
    mine = LatentQuantize(**kwargs)
    _copy(peer, mine)
    z = torch.randn(shape) * 0.4
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    out_p, idx_p, loss_p = peer(z1)
    out_m, idx_m, loss_m = mine(z2)
    assert torch.equal(idx_m, idx_p.long())
    torch.testing.assert_close(out_m, out_p)
    if not mine.has_projections:  # the peer measures its loss in the input space
        torch.testing.assert_close(loss_m, loss_p)
    # The straight-through output's gradient is the peer's (the losses' are not: see below).
    out_p.square().sum().backward()
    out_m.square().sum().backward()
    torch.testing.assert_close(z2.grad, z1.grad)


def test_latent_quantize_losses_train_the_latents_and_the_values():
    # commitment: d/dz = w_c 2 (z - q) / n, toward the codes; quantization: d/dv = w_q 2 (v - z)
    # / n summed over the latents that chose v, toward them (the peer's values get no gradient,
    # and with equal weights its two terms cancel on z).
    _seed(11)
    m = LatentQuantize(levels=[5, 4], dim=2, commitment_loss_weight=0.25)
    z = (torch.randn(3, 2, 7) * 0.4).requires_grad_()
    out, idx, loss = m(z)
    zl, q = z.detach().movedim(1, -1), out.detach().movedim(1, -1)
    n = zl.numel()
    torch.testing.assert_close(loss, (0.25 + 0.1) * (zl - q).square().sum() / n)
    loss.backward()
    torch.testing.assert_close(z.grad.movedim(1, -1), 0.25 * 2 * (zl - q) / n)
    digits = torch.stack([idx % 5, idx // 5], -1)
    for i, values in enumerate(m.values_per_latent):
        want = torch.zeros_like(values).index_add_(
            0, digits[..., i].flatten(), (0.1 * 2 * (q - zl)[..., i] / n).flatten()
        )
        torch.testing.assert_close(values.grad, want)
    # A step on the values alone brings them closer to the latents that chose them.
    with torch.no_grad():
        for values in m.values_per_latent:
            values -= 10.0 * values.grad
    assert (m(z)[2] < loss).item()


def test_latent_quantize_learned_values_indices():
    # fastvq's indices stay the argmin after the values move (the peer's would not).
    _seed(10)
    m = LatentQuantize(levels=[4, 3], dim=2)
    with torch.no_grad():
        m.values_per_latent[0].copy_(torch.tensor([-0.9, -0.1, 0.2, 0.8]))
    z = torch.randn(2, 2, 6)
    out, idx, _ = m(z)
    zl = z.movedim(1, -1)
    d0 = (zl[..., 0, None] - m.values_per_latent[0]).abs().argmin(-1)
    d1 = (zl[..., 1, None] - m.values_per_latent[1]).abs().argmin(-1)
    assert torch.equal(idx, d0 + 4 * d1)
    torch.testing.assert_close(m.indices_to_codes(idx), out)
    m2 = LatentQuantize(levels=[4, 3], dim=2, optimize_values=False)
    assert not list(m2.parameters()) and len(m2.state_dict()) == 2
    assert m2.eval()(z)[2].item() == 0.0 and m2.codebook_size == 12


def test_latent_quantize_bad_input():
    with pytest.raises(ValueError, match="in_place_codebook_optimizer"):
        LatentQuantize(levels=[3], dim=1, in_place_codebook_optimizer=torch.optim.SGD)
    with pytest.raises(ValueError, match="codebook_dim"):
        LatentQuantize(levels=3, dim=2)
    with pytest.raises(ValueError, match="levels"):
        LatentQuantize(levels=[1, 3], dim=2)
    m = LatentQuantize(levels=[3, 3], dim=2)
    with pytest.raises(ValueError, match="feature dimension must be 2"):
        m(torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="float"):
        m(torch.ones(2, 2, 4, dtype=torch.int64))
    assert math.prod([3, 3]) == m.codebook_size
