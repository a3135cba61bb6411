"""fastvq.nn.projected: SimVQ, RandomProjectionQuantizer, against vector-quantize-pytorch with
the same frozen codebooks and weights (tie-aware nearest-code checks in float64)."""

import pytest
import torch
from torch import nn

from fastvq.nn.projected import RandomProjectionQuantizer, SimVQ
from fastvq.testing import check_nearest


def _peer():
    return pytest.importorskip("vector_quantize_pytorch")


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        (dict(dim=8, codebook_size=37), (2, 9, 8)),
        (dict(dim=6, codebook_size=20, rotation_trick=False, frozen_codebook_dim=4), (2, 7, 6)),
        (dict(dim=5, codebook_size=16, channel_first=True, commitment_weight=0.5), (2, 5, 3, 2)),
    ],
)
def test_simvq_matches_peer(kwargs, shape):
    vq = _peer()
    torch.manual_seed(0)
    peer = vq.SimVQ(**kwargs)
    mine = SimVQ(**kwargs)
    mine.load_state_dict(peer.state_dict())
    x = torch.randn(shape)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_p, idx_p, loss_p = peer(x1)
    out_m, idx_m, loss_m = mine(x2)
    assert idx_m.shape == idx_p.shape and out_m.shape == out_p.shape == x.shape
    xl = x.movedim(1, -1) if mine.channel_first else x
    check_nearest(xl.reshape(-1, mine.dim), mine.codebook.detach(), idx_m.reshape(-1))
    assert torch.equal(idx_m, idx_p)  # random inputs: no near ties
    torch.testing.assert_close(out_m, out_p, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss_m, loss_p)
    g = torch.randn_like(out_p)
    ((out_p * g).sum() + loss_p).backward()
    ((out_m * g).sum() + loss_m).backward()
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-5, rtol=1e-4)
    w_m, w_p = mine.code_transform.weight.grad, peer.code_transform.weight.grad
    torch.testing.assert_close(w_m, w_p, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mine.indices_to_codes(idx_m), peer.indices_to_codes(idx_p))


def test_simvq_mlp_transform_bf16_and_bad_input():
    torch.manual_seed(1)
    mlp = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 6))
    m = SimVQ(dim=6, codebook_size=24, codebook_transform=mlp)
    x = torch.randn(3, 5, 6)
    out, idx, loss = m(x)
    loss.backward()
    assert mlp[0].weight.grad.abs().sum() > 0
    out16, idx16, _ = m(x.bfloat16())
    assert out16.dtype == torch.bfloat16
    check_nearest(x.bfloat16().float().reshape(-1, 6), m.codebook.detach(), idx16.reshape(-1))
    # Under bf16 autocast the codebook, the search and the loss stay float32, as the README says.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ac, idx_ac, loss_ac = m(x)
        assert m.codebook.dtype == torch.float32 and loss_ac.dtype == torch.float32
    assert torch.equal(idx_ac, idx) and torch.equal(out_ac, out)
    m2 = SimVQ(dim=6, codebook_size=24, codebook_transform=nn.Sequential(
        nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 6)))  # fmt: skip
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2(x)[1], idx) and m.codebook.shape == (24, 6)
    with pytest.raises(ValueError, match="feature dimension must be 6"):
        m(torch.randn(2, 3, 5))
    with pytest.raises(TypeError, match="float"):
        m(torch.ones(2, 3, 6, dtype=torch.int64))
    with pytest.raises(ValueError, match="codebook_size"):
        SimVQ(dim=4, codebook_size=0)
    with pytest.raises(ValueError, match="codebook_transform"):
        SimVQ(dim=4, codebook_size=5, codebook_transform=nn.Linear(4, 3))(torch.randn(1, 2, 4))
    with pytest.raises(TypeError, match="codebook_transform must be an nn.Module"):
        SimVQ(dim=4, codebook_size=5, codebook_transform="lin")
    with pytest.raises(TypeError, match="init_fn must be callable"):
        SimVQ(dim=4, codebook_size=5, init_fn="uniform")
    with pytest.raises(TypeError, match="init_fn's result must be a torch.Tensor"):
        SimVQ(dim=4, codebook_size=5, init_fn=lambda t: None)
    with pytest.raises(ValueError, match=r"init_fn must return a codebook of shape \(5, 4\)"):
        SimVQ(dim=4, codebook_size=5, init_fn=lambda t: t[:2])
    for name in ("commitment_weight", "input_to_quantize_commit_loss_weight"):
        for bad in (float("nan"), -1.0):
            with pytest.raises(ValueError, match=f"^{name} must be finite and >= 0"):
                SimVQ(dim=4, codebook_size=5, **{name: bad})
        with pytest.raises(TypeError, match=f"^{name} must be a real number"):
            SimVQ(dim=4, codebook_size=5, **{name: "x"})
    for bad in (24, -1):
        with pytest.raises(ValueError, match=r"indices must lie in \[0, 24\)"):
            m.indices_to_codes(torch.tensor([[0, bad]]))


def test_simvq_frozen_codebook_is_scaled_by_its_dimension():
    # The peer's init: randn(K, frozen_codebook_dim) * frozen_codebook_dim^-1/2 (the state dict
    # parity tests load the peer's buffer, so they never see fastvq's own init).
    torch.manual_seed(0)
    m = SimVQ(dim=16, codebook_size=2048, frozen_codebook_dim=64)
    assert m.frozen_codebook.shape == (2048, 64)
    assert abs(m.frozen_codebook.std().item() * 64**0.5 - 1) < 0.02
    assert abs(m.frozen_codebook.mean().item()) < 0.01


def test_random_projection_quantizer_matches_peer():
    vq = _peer()
    torch.manual_seed(2)
    kw = dict(dim=10, codebook_size=33, codebook_dim=6)
    peer = vq.RandomProjectionQuantizer(**kw)
    mine = RandomProjectionQuantizer(**kw)
    mine.load_state_dict(peer.state_dict())  # its vq._codebook.embed is the codebook
    assert torch.equal(mine.codebook, peer.vq._codebook.embed)
    x = torch.randn(2, 11, 10)
    idx_p, idx_m = peer(x), mine(x)
    assert idx_m.shape == idx_p.shape == (2, 11) and idx_m.dtype == torch.int64
    z = mine._project(x)[:, :, 0].reshape(-1, 6)
    check_nearest(z, mine.codebook[0], idx_m.reshape(-1), metric="cosine")
    assert torch.equal(idx_m, idx_p)
    target = torch.randint(0, 33, idx_p.shape)
    target[0, 0] = -1  # ignored, as the peer's ignore_index
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ce_p, ce_m = peer(x1, indices=target), mine(x2, indices=target)
    torch.testing.assert_close(ce_m, ce_p)
    ce_p.backward()
    ce_m.backward()
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-6, rtol=1e-4)


def test_random_projection_quantizer_heads(monkeypatch):
    # The peer's num_codebooks > 1 inserts an untrained Linear(h e, h h e) inside its
    # VectorQuantize; fastvq keeps one projection and one codebook per head (BEST-RQ).
    import fastvq.nn.projected as projected

    torch.manual_seed(4)
    m = RandomProjectionQuantizer(dim=10, codebook_size=33, codebook_dim=6, num_codebooks=3)
    x = torch.randn(3, 7, 10)
    idx = m(x)
    assert idx.shape == (3, 7, 3)
    z = torch.nn.functional.layer_norm(x, (10,))
    for h in range(3):
        zh = (z @ m.rand_projs[h]).reshape(-1, 6)
        assert check_nearest(zh, m.codebook[h], idx[..., h].reshape(-1), metric="cosine") == 1.0
    target = torch.randint(0, 33, (3, 7, 3))
    target[1, 2, 0] = -1
    monkeypatch.setattr(projected, "_CE_ELEMENTS", 33 * 4)  # chunks of 4 rows: 21 = 5 x 4 + 1
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ce = m(x1, indices=target)
    u = torch.nn.functional.normalize(m._project(x2), dim=-1)
    logits = torch.einsum("bnhe,hke->bknh", u, m.codebook)
    ref = torch.nn.functional.cross_entropy(logits, target, ignore_index=-1)
    torch.testing.assert_close(ce, ref)
    ce.backward()
    ref.backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_random_projection_quantizer_state_and_bad_input():
    torch.manual_seed(3)
    m = RandomProjectionQuantizer(dim=8, codebook_size=16, codebook_dim=4)
    x = torch.randn(2, 5, 8)
    m2 = RandomProjectionQuantizer(dim=8, codebook_size=16, codebook_dim=4)
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2(x), m(x)) and m.codebook_size == 16
    torch.testing.assert_close(m.codebook.norm(dim=-1), torch.ones(1, 16))
    assert m(x.bfloat16()).shape == (2, 5)
    with pytest.raises(ValueError, match="feature dimension must be 8"):
        m(torch.randn(2, 5, 7))
    with pytest.raises(TypeError, match="float"):
        m(torch.ones(2, 5, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="indices must have shape"):
        m(x, indices=torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"x must be \(b, n, dim\), got shape \(2, 3, 5, 8\)"):
        m(torch.randn(2, 3, 5, 8))
    for bad in (16, -2):
        with pytest.raises(ValueError, match=r"indices must lie in \[-1, 16\) \(-1: ignored\)"):
            m(x, torch.full((2, 5), bad))
    assert m(x, torch.full((2, 5), -1)).item() == 0.0  # all ignored
    # The peer's pass-through VectorQuantize arguments, named as the README says.
    with pytest.raises(ValueError, match=r"\['decay'\] not supported"):
        RandomProjectionQuantizer(dim=8, codebook_size=16, codebook_dim=4, decay=0.9)


def test_random_projection_peer_keys_load_nested_and_never_override_its_own():
    def peer_state():
        state = RandomProjectionQuantizer(dim=10, codebook_size=33, codebook_dim=6).state_dict()
        state["vq._codebook.embed"] = state.pop("codebook") + 1
        return state

    parent = torch.nn.Sequential(
        RandomProjectionQuantizer(dim=10, codebook_size=33, codebook_dim=6)
    )
    state = peer_state()
    parent.load_state_dict({"0." + k: v for k, v in state.items()})  # under a prefix
    assert torch.equal(parent[0].codebook, state["vq._codebook.embed"])
    mine = RandomProjectionQuantizer(dim=10, codebook_size=33, codebook_dim=6)
    both = peer_state() | {"codebook": mine.codebook.clone()}
    mine.load_state_dict(both, strict=False)  # its own key wins
    assert torch.equal(mine.codebook, both["codebook"])
    assert "codebook" in mine.load_state_dict({}, strict=False).missing_keys


def test_simvq_gradients_repeat_bit_for_bit_and_meta_eval():
    # The transform's gradient came through codebook[indices], whose CPU backward adds rows with
    # unordered atomics across threads: two identical steps differed by ~1e-9 on 2 threads.
    torch.manual_seed(0)
    m = SimVQ(16, 512)
    x = torch.randn(16, 1024, 16)

    def grad():
        m.zero_grad()
        out, _, loss = m(x)
        (out.square().sum() + loss).backward()
        return m.code_transform.weight.grad.clone()

    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, 2))
    try:
        first = grad()
        for _ in range(3):
            assert torch.equal(grad(), first)
    finally:
        torch.set_num_threads(threads)
    with torch.device("meta"):  # torch.autocast("meta") raised
        out, idx, _ = SimVQ(16, 64).eval()(torch.randn(2, 8, 16))
    assert out.shape == (2, 8, 16) and idx.shape == (2, 8)


def test_simvq_loss_in_eval_as_the_peer():
    torch.manual_seed(0)
    m = SimVQ(8, 16).eval()
    x = torch.randn(2, 5, 8)
    out, _, loss = m(x)
    codes = m.codebook.detach()
    want = 1.25 * (out - x).square().mean()  # commitment_weight * (1 + 0.25) * mse
    torch.testing.assert_close(loss.detach(), want)
    assert torch.equal(out, codes[m(x)[1]])


def test_simvq_indices_to_codes_takes_uint8_indices():
    """P08: token files store K <= 256 indices as uint8 (train/tokens.index_dtype)."""
    torch.manual_seed(0)
    m = SimVQ(dim=4, codebook_size=16)
    idx = torch.tensor([[3, 5, 1], [0, 15, 2]])
    torch.testing.assert_close(m.indices_to_codes(idx.to(torch.uint8)), m.indices_to_codes(idx))
