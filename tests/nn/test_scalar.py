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


def _assert_same_as_peer(mine, peer, z) -> torch.Tensor:
    """Both modules on z: the same indices, outputs within float32's tolerance; returns mine."""
    out_p, idx_p = peer(z)
    out_m, idx_m = mine(z)
    assert torch.equal(idx_m, idx_p.long())
    torch.testing.assert_close(out_m, out_p)
    return out_m


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
        (dict(levels=[5, 4], keep_num_codebooks_dim=True), (2, 6, 2)),  # indices (b, n, 1)
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


def test_fsq_num_codebooks_without_dim_matches_peer():
    # dim defaults to len(levels) * num_codebooks: no projections.
    vq = _peer()
    _seed(12)
    peer = vq.FSQ(levels=[4, 5, 3], num_codebooks=2)
    mine = FSQ(levels=[4, 5, 3], num_codebooks=2)
    assert mine.dim == peer.dim == 6 and not mine.has_projections
    z = torch.randn(2, 7, 6) * 2
    _assert_same_as_peer(mine, peer, z)


def test_fsq_hard_clamp_rounds_grid_midpoints_as_peer():
    # z at the midpoints between levels of the eps-free grid, z = (k + 1/2) / ((L - 1) / 2): the
    # bound's (1 + 1e-3) stretch decides which way they round (away from 0), as in the peer.
    vq = _peer()
    levels = [5, 4, 3]
    peer = vq.FSQ(levels=levels, bound_hard_clamp=True)
    mine = FSQ(levels=levels, bound_hard_clamp=True)
    g = torch.Generator().manual_seed(13)
    cols = []
    for n in levels:
        half = (n - 1) / 2
        mids = torch.tensor([k + 0.5 for k in range(-n, n) if abs(k + 0.5) < half]) / half
        cols.append(mids[torch.randint(0, len(mids), (40,), generator=g)])
    z = torch.stack(cols, -1).view(2, 20, 3)
    out_m = _assert_same_as_peer(mine, peer, z)
    # Away from 0: the grid integer is the midpoint k + 1/2 moved out by 1/2.
    half_width = torch.tensor([n // 2 for n in levels], dtype=torch.float32)
    half = torch.tensor([(n - 1) / 2 for n in levels])
    assert torch.equal((out_m * half_width).abs(), (z * half).abs() + 0.5)


def test_fsq_noise_dropout_matches_peer():
    # The same random stream as the peer: a Bernoulli mask, then uniform offsets in [-1/2, 1/2),
    # clamped to [-1, 1]; training only.
    vq = _peer()
    kw = dict(levels=[5, 4, 3], preserve_symmetry=True, noise_dropout=0.5)
    peer, mine = vq.FSQ(**kw), FSQ(**kw)
    _seed(14)
    z = torch.randn(2, 30, 3) * 2
    clean, idx_clean = mine.eval()(z)
    out_p, idx_p = peer.eval()(z)
    assert torch.equal(idx_clean, idx_p.long())
    torch.testing.assert_close(clean, out_p)
    _seed(15)
    out_p, idx_p = peer.train()(z)
    _seed(15)
    out_m, idx_m = mine.train()(z)
    assert torch.equal(idx_m, idx_p.long()) and torch.equal(idx_m, idx_clean)
    torch.testing.assert_close(out_m, out_p)
    noisy = out_m != clean
    assert 0.3 < noisy.float().mean() < 0.7  # about noise_dropout of the entries moved
    assert (out_m.abs() <= 1).all() and ((out_m - clean).abs() <= 0.5).all()


@pytest.mark.parametrize(
    "kwargs", [{}, {"preserve_symmetry": True}, {"bound_hard_clamp": True}], ids=str
)
def test_fsq_nan_components_quantize_as_zero(kwargs):
    # The symmetric and hard-clamp grids cast NaN to int64: an index near -2^63, a NaN code.
    m = FSQ(levels=[3, 4, 5], **kwargs)
    z = torch.randn(6, 3)
    z[::2, 0] = float("nan")
    q, idx = m(z)
    q0, idx0 = m(torch.where(z.isnan(), 0.0, z))
    assert torch.equal(q, q0) and torch.equal(idx, idx0)
    assert bool(((idx >= 0) & (idx < m.codebook_size)).all())


def test_fsq_symmetric_bf16_is_quantized_in_float32():
    # force_quantization_f32 (default): a dtype outside allowed_dtypes is quantized in float32,
    # on the same path as the peer (the symmetric grid runs as plain torch ops).
    vq = _peer()
    kw = dict(levels=[7, 5, 6], preserve_symmetry=True)
    peer, mine = vq.FSQ(**kw), FSQ(**kw)
    _seed(16)
    z = (torch.randn(2, 50, 3) * 2).bfloat16()
    out_m, idx_m = mine(z)
    out_f, idx_f = mine(z.float())
    out_p, idx_p = peer(z)
    assert out_m.dtype == torch.bfloat16
    assert torch.equal(idx_m, idx_f) and torch.equal(idx_m, idx_p.long())
    assert torch.equal(out_m, out_f.bfloat16())


@pytest.mark.parametrize("scale", [1 - 5e-3, 1 - 2e-4])
def test_fsq_hard_clamp_rounds_near_midpoints_as_peer(scale):
    # Just inside the midpoints, where the bound's (1 + 1e-3) stretch decides the rounding (on
    # them, a stretch of 1e-2 rounds the same way and no test noticed it).
    vq = _peer()
    levels = [5, 4, 3]
    peer = vq.FSQ(levels=levels, bound_hard_clamp=True)
    mine = FSQ(levels=levels, bound_hard_clamp=True)
    cols = []
    for n in levels:
        half = (n - 1) / 2
        mids = torch.tensor([k + 0.5 for k in range(-n, n) if abs(k + 0.5) < half]) / half
        cols.append(mids.repeat(8)[:8] * scale)
    _assert_same_as_peer(mine, peer, torch.stack(cols, -1).view(2, 4, 3))


def test_fsq_hard_clamp_matches_peer():
    vq = _peer()
    peer = vq.FSQ(levels=[5, 4, 3], bound_hard_clamp=True)
    mine = FSQ(levels=[5, 4, 3], bound_hard_clamp=True)
    _seed(2)
    z = torch.randn(2, 11, 3) * 1.5
    _assert_same_as_peer(mine, peer, z)


@pytest.mark.parametrize("level", [1001, 1003, 2000])
def test_fsq_hard_clamp_large_levels_stay_on_the_grid(level):
    # Past L = 1000 the bound's (1 + 1e-3) stretch rounds its ends one level beyond the grid (the
    # peer's codes leave [-1, 1] and their digits spill into the next dimension). Saturated
    # inputs must give the outer levels, indices in range that decode to the same codes.
    m = FSQ(levels=[level, 3], bound_hard_clamp=True)
    z = torch.tensor([[[50.0, 0.0], [-50.0, 0.0], [0.3, -50.0]]])
    out, idx = m(z)
    half_width = level // 2
    top = (level - 1 - half_width) / half_width
    assert out[0, 0, 0] == top and out[0, 1, 0] == -1.0 and (out.abs() <= 1).all()
    assert (idx >= 0).all() and (idx < level * 3).all()
    assert torch.equal(m.indices_to_level_indices(idx)[..., 1], torch.tensor([[1, 1, 0]]))
    assert torch.equal(m.indices_to_codes(idx), out)


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize(
    "make",
    [
        lambda: FSQ(levels=[5, 4, 3], dim=8),
        lambda: FSQ(levels=[5, 4, 3], orthogonal_rotation=True),
        lambda: LFQ(dim=8, codebook_size=16),
        lambda: LFQ(dim=4, codebook_size=16, orthogonal_rotation=True),
        lambda: BSQ(dim=8, codebook_size=16),
    ],
    ids=["fsq-project", "fsq-rotation", "lfq-project", "lfq-rotation", "bsq-project"],
)
def test_indices_to_codes_after_a_module_cast(make, dtype):
    # Decoding builds float32 codes, which met the cast projection / rotation (a dtype error).
    torch.manual_seed(0)
    m = make().to(dtype).eval()
    dim = m.project_in.in_features if hasattr(m.project_in, "in_features") else m.codebook_dim
    out, idx = m(torch.randn(2, 6, dim, dtype=dtype))[:2]
    decoded = m.indices_to_codes(idx)
    assert decoded.dtype == out.dtype and torch.equal(decoded, out)


@pytest.mark.parametrize("bad", [-1, 60])
def test_indices_to_codes_refuses_out_of_range_indices(bad):
    # The mixed-radix digits and the bits would wrap: -1 decoded as the last code.
    for m, k in ((FSQ(levels=[5, 4, 3]), 60), (LFQ(dim=4, codebook_size=16), 16)):
        idx = torch.tensor([[0, min(bad, k) if bad > 0 else bad]])
        with pytest.raises(ValueError, match=rf"indices must lie in \[0, {k}\)"):
            m.indices_to_codes(idx)


def test_fsq_bad_input():
    with pytest.raises(ValueError, match="levels"):
        FSQ(levels=[1, 4])
    with pytest.raises(TypeError, match="levels"):
        FSQ(levels=[2.5, 4])
    with pytest.raises(ValueError, match="keep_num_codebooks_dim"):
        FSQ(levels=[4, 4], num_codebooks=2, keep_num_codebooks_dim=False)
    with pytest.raises(ValueError, match="noise_dropout"):
        FSQ(levels=[4, 4], noise_dropout=0.5)
    with pytest.raises(TypeError, match="noise_dropout must be a real number"):
        FSQ(levels=[4, 4], noise_dropout="a", preserve_symmetry=True)
    with pytest.raises(ValueError, match="noise_dropout"):
        FSQ(levels=[4, 4], noise_dropout=float("nan"), preserve_symmetry=True)
    with pytest.raises(TypeError, match="allowed_dtypes must be a tuple of torch.dtype"):
        FSQ(levels=[4, 4], allowed_dtypes=None)
    with pytest.raises(TypeError, match="levels must be a sequence of ints"):
        FSQ(levels=4)
    m = FSQ(levels=[4, 4])
    with pytest.raises(ValueError, match="feature dimension must be 2"):
        m(torch.randn(2, 3, 3))
    with pytest.raises(TypeError, match="float"):
        m(torch.ones(2, 3, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="int64, int32, int16, int8 or uint8"):
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
        (dict(codebook_size=16, dim=6, cosine_sim_project_in=True, codebook_scale=0.5), (2, 5, 6)),
        (
            dict(codebook_size=16, spherical=True, codebook_scale=0.7, commitment_loss_weight=0.5),
            (2, 6, 4),
        ),
        (dict(codebook_size=16, dim=4, channel_first=True), (2, 4, 5)),  # channel-first, 3-D
        (dict(codebook_size=8, keep_num_codebooks_dim=True), (2, 5, 3)),
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
    (_, _, _), (ps_m, be_m, cm_m) = mine(x, mask=mask, return_loss_breakdown=True)
    torch.testing.assert_close(ps_m, ps_p, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(cm_m, cm_p)
    # The batch entropy is that of the unmasked rows alone (the peer's is its per-sample one).
    _, (ps_kept, be_kept, _) = mine(x[mask][None], return_loss_breakdown=True)
    torch.testing.assert_close(be_m, be_kept)
    torch.testing.assert_close(ps_m, ps_kept)


@pytest.mark.parametrize("softplus", [False, True])
def test_lfq_aux_loss_combines_the_breakdown(softplus):
    # aux = w_e * (per_sample - gamma * batch) [softplus(. + offset)] + w_c * commitment.
    _seed(17)
    m = LFQ(
        codebook_size=16,
        entropy_loss_weight=0.3,
        commitment_loss_weight=0.7,
        diversity_gamma=0.6,
        experimental_softplus_entropy_loss=softplus,
        entropy_loss_offset=2.0,
    )
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    (_, _, aux), (ps, be, cm) = m(x, inv_temperature=2.0, return_loss_breakdown=True)
    ps, be, cm = float(ps), float(be), float(cm)
    assert ps > 0 and be > 0 and cm > 0
    entropy = ps - 0.6 * be
    if softplus:
        entropy = math.log1p(math.exp(entropy + 2.0))
    assert math.isclose(float(aux), 0.3 * entropy + 0.7 * cm, rel_tol=1e-6)


def test_lfq_commitment_gradient_pulls_toward_the_codes():
    # commitment = mse(x, sg(codes)): d/dx = 2 (x - codes) / n (the codes carry no gradient).
    _seed(18)
    m = LFQ(codebook_size=8, entropy_loss_weight=0.0, commitment_loss_weight=1.0)
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    _, _, aux = m(x)
    aux.backward()
    codes = torch.where(x.detach() > 0, 1.0, -1.0).double()
    torch.testing.assert_close(x.grad, 2 * (x.detach() - codes) / x.numel())


def test_lfq_frac_per_sample_entropy_uses_a_subset():
    # frac 1/4 of 4 tokens: both entropies are those of one token, so they are equal and
    # per_sample is one token's entropy (with all tokens, batch > per_sample).
    _seed(19)
    x = torch.randn(1, 4, 3)
    full = LFQ(codebook_size=8)
    (_, _, _), (ps_all, be_all, _) = full(x, inv_temperature=1.0, return_loss_breakdown=True)
    assert float(be_all) > float(ps_all) + 1e-3
    one = [
        float(full(x[:, i : i + 1], inv_temperature=1.0, return_loss_breakdown=True)[1][0])
        for i in range(4)
    ]
    m = LFQ(codebook_size=8, frac_per_sample_entropy=0.25)
    for seed in range(3):
        _seed(seed)
        (_, _, _), (ps, be, _) = m(x, inv_temperature=1.0, return_loss_breakdown=True)
        assert math.isclose(float(ps), float(be), rel_tol=1e-5)  # computed in float32
        assert min(abs(float(ps) - e) for e in one) < 1e-6


def test_lfq_mask_excludes_tokens_from_the_losses():
    # Masked-out tokens count in neither entropy nor the commitment: the breakdown is that of the
    # kept tokens alone (soft probabilities, so the entropies see every token).
    _seed(20)
    m = LFQ(codebook_size=8, commitment_loss_weight=1.0)
    x = torch.randn(2, 6, 3)
    mask = torch.tensor([[1, 0, 1, 1, 0, 1], [0, 1, 1, 0, 1, 1]], dtype=torch.bool)
    x[~mask] *= 0.05  # near-uniform probabilities where masked out
    got = m(x, inv_temperature=2.0, mask=mask, return_loss_breakdown=True)[1]
    want = m(x[mask][None], inv_temperature=2.0, return_loss_breakdown=True)[1]
    every = m(x, inv_temperature=2.0, return_loss_breakdown=True)[1]
    for a, b, c in zip(got, want, every, strict=True):
        assert math.isclose(float(a), float(b), rel_tol=1e-5)
        assert abs(float(a) - float(c)) > 1e-2


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
    nan, inf = float("nan"), float("inf")
    for cls in (LFQ, BSQ):
        for name, bad in [
            ("entropy_loss_weight", [nan, -1.0, inf]),
            ("diversity_gamma", [nan, -1.0]),
            ("commitment_loss_weight", [nan, -0.5]),
            ("soft_clamp_input_value", [nan, 0.0, -2.0, inf]),
            ("cosine_sim_project_in_scale", [nan, 0.0, -1.0, inf]),
            ("codebook_scale", [nan, 0.0, -1.0, inf]),
            ("frac_per_sample_entropy", [nan, 0.0, 1.5]),
            ("entropy_loss_offset", [nan, inf]),
        ]:
            kwargs = dict(dim=6, codebook_size=4, cosine_sim_project_in=True)
            for value in bad:
                with pytest.raises(ValueError, match=f"^{name} must"):
                    cls(**kwargs, **{name: value})
            with pytest.raises(TypeError, match=f"^{name} must be a real number"):
                cls(**kwargs, **{name: "x"})
    m = LFQ(codebook_size=8)
    with pytest.raises(ValueError, match="feature dimension must be 3"):
        m(torch.randn(2, 4, 5))
    with pytest.raises(TypeError, match="float"):
        m(torch.ones(2, 4, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="mask"):
        m(torch.randn(2, 4, 3), mask=torch.ones(2, 3, dtype=torch.bool))
    for mode in (m.train(), m.eval()):  # eval never reaches the entropies
        with pytest.raises(TypeError, match="inv_temperature must be a real number"):
            mode(torch.randn(2, 4, 3), inv_temperature="x")
        for bad in (0.0, -1.0, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="inv_temperature must be finite and > 0"):
                mode(torch.randn(2, 4, 3), inv_temperature=bad)


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


def test_latent_quantize_initial_values_match_peer():
    # Odd L: linspace(-0.5, 0.5, L); even L: arange(L) / L - 0.5 (0 included), as the peer.
    vq = _peer()
    peer = vq.LatentQuantize(levels=[4, 5, 6, 3], dim=4)
    mine = LatentQuantize(levels=[4, 5, 6, 3], dim=4)
    assert len(peer.values_per_latent) == len(mine.values_per_latent) == 4
    for p, m in zip(peer.values_per_latent, mine.values_per_latent, strict=True):
        assert torch.equal(m.detach(), p.detach())


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
    assert torch.equal(m.indices_to_codes(idx), out)  # bit for bit (z + (q - z).detach() was not)
    m2 = LatentQuantize(levels=[4, 3], dim=2, optimize_values=False)
    assert not list(m2.parameters()) and not m2.state_dict()  # fixed values: the peer saves none
    assert m2.eval()(z)[2].item() == 0.0 and m2.codebook_size == 12


def test_latent_quantize_fixed_values_load_peer_and_older_state_dicts():
    # The fixed values were persistent buffers: a peer state dict failed strict loading
    # ("Missing key(s): _values_0, _values_1").
    vq = _peer()
    kwargs = dict(levels=[5, 4], dim=3, optimize_values=False)
    _seed(15)
    peer, mine = vq.LatentQuantize(**kwargs), LatentQuantize(**kwargs)
    mine.load_state_dict(peer.state_dict())
    z = torch.randn(2, 3, 7)  # channel-first, the peer's default
    torch.testing.assert_close(mine.eval()(z)[0], peer.eval()(z)[0])
    older = {**mine.state_dict(), "_values_0": torch.zeros(5), "_values_1": torch.zeros(4)}
    mine.load_state_dict(older)  # dropped: the levels fix them
    assert torch.equal(mine._values(0), torch.linspace(-0.5, 0.5, 5))


@pytest.mark.parametrize("offset", [0.0, 300.0, 1e5])
def test_latent_quantize_nearest_value_is_exact_away_from_zero(offset):
    # Values that drifted far from 0 for their spacing (0.25 at an offset of 300): the nearest
    # value of each latent, |z - v| in float64, as the peer's argmin. Through nearest_code's
    # |z|^2 - 2 z v + |v|^2 about 1 in 8 was wrong at 300 and most at 1e5. Equal values tie to
    # the lower index; bf16 latents are compared with the float32 values, not rounded ones.
    _seed(14)
    m = LatentQuantize(levels=[9, 6], dim=2)
    with torch.no_grad():
        m.values_per_latent[0].add_(offset)
        m.values_per_latent[1].copy_(torch.tensor([0.5, -0.25, 0.5, 0.0, -0.25, 0.75]) + offset)
    z = offset + torch.randn(2, 2, 4096)
    z[0, :, :4] = torch.tensor(
        [[offset + 0.5] * 4, [offset - 0.25, offset + 0.5, offset + 1e3, offset - 1e3]]
    )
    for x in (z, z.bfloat16()):
        idx = m(x)[1]
        zl = x.movedim(1, -1).double()
        want = [
            (zl[..., i, None] - v.double()).abs().argmin(-1)
            for i, v in enumerate(m.values_per_latent)
        ]
        assert torch.equal(idx, want[0] + 9 * want[1])
    assert m(z)[1][0, :4].div(9, rounding_mode="floor").tolist() == [1, 0, 5, 1]


def test_latent_quantize_bad_input():
    with pytest.raises(ValueError, match="in_place_codebook_optimizer"):
        LatentQuantize(levels=[3], dim=1, in_place_codebook_optimizer=torch.optim.SGD)
    with pytest.raises(ValueError, match="codebook_dim"):
        LatentQuantize(levels=3, dim=2)
    with pytest.raises(ValueError, match="levels"):
        LatentQuantize(levels=[1, 3], dim=2)
    for name in ("commitment_loss_weight", "quantization_loss_weight"):
        for bad in (float("nan"), -1.0, float("inf")):
            with pytest.raises(ValueError, match=f"^{name} must be finite and >= 0"):
                LatentQuantize(levels=[3, 3], dim=2, **{name: bad})
        with pytest.raises(TypeError, match=f"^{name} must be a real number"):
            LatentQuantize(levels=[3, 3], dim=2, **{name: "x"})
        assert getattr(LatentQuantize(levels=[3, 3], dim=2, **{name: None}), name) == 0.0
    with pytest.raises(TypeError, match="codebook_dim must be an int"):
        LatentQuantize(levels=[3, 3], dim=2, codebook_dim=None)
    with pytest.raises(ValueError, match="keep_num_codebooks_dim must be True"):
        LatentQuantize(levels=[5, 5], dim=16, num_codebooks=2, keep_num_codebooks_dim=False)
    m2 = LatentQuantize(levels=[5, 5], dim=16, num_codebooks=2)
    with pytest.raises(
        ValueError, match=r"indices must be \(b, \*spatial, 2\), got shape \(1, 1, 3\)"
    ):
        m2.indices_to_codes(torch.tensor([[[1, 2, 3]]]))
    with pytest.raises(ValueError, match=r"indices must be \(b, \*spatial, 2\)"):
        m2.indices_to_codes(torch.tensor([[1, 2, 3]]))  # no codebook axis
    m1 = LatentQuantize(levels=[5, 5], dim=2)
    with pytest.raises(ValueError, match=r"indices must be \(b, \*spatial\)"):
        m1.indices_to_codes(torch.tensor(3))
    for bad in (25, -1):  # the peer wraps these modulo the levels
        with pytest.raises(ValueError, match=r"indices must lie in \[0, 25\)"):
            m1.indices_to_codes(torch.tensor([[0, bad]]))
    assert m1.indices_to_codes(torch.tensor([[0, 24]])).shape == (1, 2, 2)
    m = LatentQuantize(levels=[3, 3], dim=2)
    with pytest.raises(ValueError, match="feature dimension must be 2"):
        m(torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="float"):
        m(torch.ones(2, 2, 4, dtype=torch.int64))
    assert math.prod([3, 3]) == m.codebook_size


def test_lfq_straight_through_activation_values_are_the_codes():
    # Value from the codes bit for bit, gradient through the activation (the peer's STE).
    # Spherical codes +-1/sqrt(8): a + (codes - a).detach() missed them by an ulp.
    _seed(11)
    for spherical in (True, False):
        m = LFQ(
            dim=8,
            codebook_size=256,
            spherical=spherical,
            straight_through_activation=torch.nn.Tanh(),
        )
        x = (3 * torch.randn(64, 256, 8)).requires_grad_()
        out, idx, _ = m(x)
        assert torch.equal(out, m.indices_to_codes(idx))
    out.sum().backward()
    torch.testing.assert_close(x.grad, 1 - torch.tanh(x.detach()).square())


def test_straight_through_outputs_are_their_codes_and_take_in_place_ops():
    # LatentQuantize's learned values: z + (q - z).detach() missed them by an ulp. The output
    # is a new tensor, so in-place ops after the quantizer work (as the peer's).
    _seed(13)
    m = LatentQuantize(levels=[5, 7], dim=2)
    with torch.no_grad():
        m.values_per_latent[0].add_(0.037)
    z = (10 * torch.randn(4, 2, 4096)).requires_grad_()
    out, idx, loss = m(z)
    assert torch.equal(m.indices_to_codes(idx), out)
    out.mul_(2)
    (out.sum() + loss).backward()
    assert z.grad is not None and bool(z.grad.isfinite().all())
    lfq = LFQ(dim=8, codebook_size=256, straight_through_activation=torch.nn.Tanh())
    x = torch.randn(2, 6, 8, requires_grad=True)
    q = lfq(x)[0]
    q += 1
    q.sum().backward()


@pytest.mark.parametrize(
    "kwargs",
    [{"levels": [8, 5, 5, 5]}, {"levels": [7, 6, 4], "preserve_symmetry": True}],
    ids=["peer-grid", "symmetric"],
)
def test_fsq_codes_to_indices_inverts_the_codebook(kwargs):
    m = FSQ(**kwargs)
    codes = m.implicit_codebook
    assert torch.equal(m.codes_to_indices(codes), torch.arange(m.codebook_size))
    # Off the grid: the nearest level (the peer's rounding), beyond it the outer one.
    g = torch.Generator().manual_seed(0)
    step = 1 / (torch.tensor(kwargs["levels"]) - 1)
    noisy = codes + (torch.rand(codes.shape, generator=g) - 0.5) * 0.9 * step
    assert torch.equal(m.codes_to_indices(noisy), m.codes_to_indices(codes))
    far = torch.tensor([[5.0], [-5.0]]).expand(2, codes.shape[1])
    assert m.codes_to_indices(far).tolist() == [m.codebook_size - 1, 0]
    if not kwargs.get("preserve_symmetry"):
        peer = _peer().FSQ(**kwargs)
        assert torch.equal(m.codes_to_indices(codes), peer.codes_to_indices(codes).long())
    with pytest.raises(ValueError, match="codebook_dim"):
        m.codes_to_indices(codes[:, :2])
    with pytest.raises(ValueError, match="NaN"):
        m.codes_to_indices(torch.full((1, len(kwargs["levels"])), float("nan")))


def test_latent_quantize_codes_to_indices_inverts_indices_to_codes():
    _seed(12)
    m = LatentQuantize(levels=[4, 3], dim=2)
    with torch.no_grad():
        m.values_per_latent[0].add_(0.05 * torch.randn(4))
    codes = m.indices_to_codes(torch.arange(12)[None], project_out=False).movedim(1, -1)
    assert torch.equal(m.codes_to_indices(codes), torch.arange(12)[None])
