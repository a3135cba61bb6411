"""fastvq.nn.VectorQuantize, HouseholderVQ, HyperCodebook: layouts, codebook learning against
plain-PyTorch references, eval freezing, state, autocast, options and bad input (torch.compile:
test_compile.py)."""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fastvq
from fastvq.nn import vector_quantize as vqmod
from fastvq.nn.residual import GroupedResidualVQ, ResidualVQ
from fastvq.nn.vector_quantize import (
    CodebookMLP,
    HouseholderVQ,
    HyperCodebook,
    VectorQuantize,
    defer_codebook_updates,
)
from fastvq.testing import check_nearest

DIM, K = 12, 48


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _ref_ema_step(codebook, cluster_size, embed_avg, z, decay, eps, mask=None):
    """Plain float64 EMA step with one-hot matrices (small shapes only)."""
    z = z.double()
    idx = torch.cdist(z, codebook.double()).argmin(1)
    onehot = F.one_hot(idx, codebook.shape[0]).double()
    if mask is not None:
        onehot = onehot * mask.double()[:, None]
    cs = decay * cluster_size.double() + (1 - decay) * onehot.sum(0)
    ea = decay * embed_avg.double() + (1 - decay) * onehot.T @ z
    n = cs.sum()
    smoothed = (cs + eps) / (n + cs.numel() * eps) * n
    return idx, cs, ea, ea / smoothed[:, None]


# --- layouts --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, shape, idx_shape",
    [
        ({}, (2, 7, DIM), (2, 7)),
        ({"channel_last": False}, (2, DIM, 7), (2, 7)),
        ({}, (3, DIM), (3,)),
        ({"accept_image_fmap": True}, (2, DIM, 3, 5), (2, 3, 5)),
        ({"accept_3d_fmap": True}, (1, DIM, 2, 3, 4), (1, 2, 3, 4)),
        ({"heads": 3, "codebook_dim": 4}, (2, 7, DIM), (2, 7, 3)),
        (
            {"heads": 2, "separate_codebook_per_head": True, "accept_image_fmap": True},
            (2, DIM, 3, 2),
            (2, 3, 2, 2),
        ),
    ],
)
def test_layouts_and_lookup_round_trip(config, shape, idx_shape):
    vq = VectorQuantize(DIM, K, **config).eval()
    x = _randn(*shape)
    q, idx, loss = vq(x)
    assert q.shape == x.shape and idx.shape == idx_shape and idx.dtype == torch.int64
    assert loss.shape == () and loss.item() == 0.0  # eval: no loss, as the peer
    torch.testing.assert_close(vq.get_output_from_indices(idx), q)
    codes = vq.get_codes_from_indices(idx)
    assert codes.shape[0] == x.shape[0]


def test_quantized_is_nearest_code_and_tie_aware():
    vq = VectorQuantize(DIM, K, codebook_dim=5, use_cosine_sim=True).eval()
    x = _randn(4, 9, DIM)
    q, idx, _ = vq(x)
    z = F.normalize(vq.project_in(x), dim=-1).reshape(-1, 5)
    check_nearest(z, vq.codebook, idx.reshape(-1), metric="cosine")
    torch.testing.assert_close(q, vq.project_out(vq.codebook[idx]))


def test_cosine_codebook_starts_on_the_unit_sphere():
    # The peer l2-normalizes its kaiming-uniform init under use_cosine_sim (norms ~0.25 without).
    torch.manual_seed(0)
    vq = VectorQuantize(DIM, K, codebook_dim=6, use_cosine_sim=True, heads=2,
                        separate_codebook_per_head=True)  # fmt: skip
    torch.testing.assert_close(vq.embed.norm(dim=-1), torch.ones(2, K))
    assert torch.equal(vq.embed_avg, vq.embed)


def test_masked_indices_give_zero_codes():
    vq = VectorQuantize(DIM, K, codebook_dim=5).eval()
    x = _randn(2, 6, DIM)
    mask = torch.arange(6) < torch.tensor([6, 3])[:, None]
    q, idx, _ = vq(x, mask=mask)
    assert bool((idx[~mask] == -1).all())
    codes = vq.get_codes_from_indices(idx)
    assert codes.shape == (2, 6, 5) and not codes[~mask].any()
    torch.testing.assert_close(codes[mask], vq.codebook[idx[mask]])
    out = vq.get_output_from_indices(idx)
    torch.testing.assert_close(out[mask], q[mask])
    torch.testing.assert_close(out[~mask], vq.project_out.bias.detach().expand(3, DIM))


# --- codebook learning against references ------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True])
def test_ema_step_matches_reference(masked):
    vq = VectorQuantize(DIM, K, decay=0.7, eps=1e-3, rotation_trick=False)
    with torch.no_grad():
        vq.embed.copy_(_randn(1, K, DIM, seed=1) * 2)
        vq.embed_avg.copy_(vq.embed * 1.5)
        vq.cluster_size.fill_(1.5)
    before = [t.detach().clone() for t in (vq.embed[0], vq.cluster_size[0], vq.embed_avg[0])]
    x = _randn(3, 20, DIM, seed=2) * 2
    mask = torch.arange(20) < torch.tensor([20, 5, 11])[:, None] if masked else None
    q, idx, loss = vq(x, mask=mask)
    rows_mask = None if mask is None else mask.reshape(-1)
    ref_idx, cs, ea, cb = _ref_ema_step(*before, x.reshape(-1, DIM), 0.7, 1e-3, rows_mask)
    valid = idx.reshape(-1) >= 0
    assert torch.equal(valid, torch.ones_like(valid) if mask is None else rows_mask)
    assert torch.equal(idx.reshape(-1)[valid], ref_idx[valid])
    tol = {"rtol": 1e-5, "atol": 1e-5}  # float32 state against the float64 reference
    torch.testing.assert_close(vq.cluster_size[0].double(), cs, **tol)
    torch.testing.assert_close(vq.embed_avg[0].double(), ea, **tol)
    torch.testing.assert_close(vq.embed[0].double(), cb, **tol)
    # commitment over valid rows only, against the codes before the update
    diff = (before[0][ref_idx] - x.reshape(-1, DIM)).square().sum(1)
    want = diff[valid].sum() / (valid.sum() * DIM)
    torch.testing.assert_close(loss, want)
    if mask is not None:
        assert not q[~mask].any() and bool((idx[~mask] == -1).all())


def test_masked_cosine_commitment_uses_normalized_inputs():
    # Documented difference: the peer compares with the raw input under a mask.
    vq = VectorQuantize(DIM, K, use_cosine_sim=True, codebook_dim=6)
    x = _randn(2, 10, DIM) * 3
    mask = torch.arange(10) < torch.tensor([10, 4])[:, None]
    codebook = vq.codebook.detach().clone()
    _, idx, loss = vq(x, mask=mask)
    z = F.normalize(vq.project_in(x), dim=-1)[mask]
    want = (codebook[idx[mask]] - z).square().mean()
    torch.testing.assert_close(loss, want)


def test_codebook_gets_no_decoder_gradient_and_estimators():
    vq = VectorQuantize(DIM, K, orthogonal_reg_weight=0.0, rotation_trick=False)
    x = _randn(2, 6, DIM).requires_grad_()
    q, _, _ = vq(x)
    g = _randn(*q.shape, seed=5)
    (q * g).sum().backward()
    torch.testing.assert_close(x.grad, g)  # straight-through
    assert not vq.embed.requires_grad
    # With the orthogonal regulariser the codebook is a Parameter, still without decoder gradient.
    vq = VectorQuantize(DIM, K, orthogonal_reg_weight=1.0).eval()
    q, _, _ = vq(_randn(2, 6, DIM).requires_grad_())
    q.sum().backward()
    assert vq.embed.grad is None


def test_rotation_gradient_is_fastvq_quantize():
    vq = VectorQuantize(DIM, K, use_cosine_sim=False).eval()  # rotation trick by default (dim > 1)
    assert vq.grad == "rotation"
    x = _randn(5, DIM, seed=3).requires_grad_()
    q, _, _ = vq(x)
    g = _randn(5, DIM, seed=4)
    (q * g).sum().backward()
    z = x.detach().clone().requires_grad_()
    q2, _ = fastvq.quantize(z, vq.codebook.detach(), grad="rotation")
    (q2 * g).sum().backward()
    torch.testing.assert_close(x.grad, z.grad)


def test_eval_freezes_codebook():
    vq = VectorQuantize(DIM, K, threshold_ema_dead_code=5.0, kmeans_init=True).eval()
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    vq(_randn(2, 30, DIM))
    assert not bool(vq.initted)
    for k, v in vq.state_dict().items():
        assert torch.equal(v, state[k]), k
    vq.train()
    vq(_randn(2, 30, DIM), freeze_codebook=True)  # k-means init still runs, nothing else
    assert bool(vq.initted)
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    vq(_randn(2, 30, DIM), freeze_codebook=True)
    for k, v in vq.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_kmeans_init_first_training_forward_and_init_from():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(6, DIM, generator=g) * 8
    x = centres[torch.arange(6).repeat(20)] + 0.05 * torch.randn(120, DIM, generator=g)
    vq = VectorQuantize(DIM, 6, kmeans_init=True, decay=1.0)
    mask = torch.ones(1, 120, dtype=torch.bool)
    vq(x[None], mask=mask)
    assert bool(vq.initted)
    assert bool((torch.cdist(centres, vq.codebook).min(1).values < 0.1).all())
    torch.testing.assert_close(vq.cluster_size[0], torch.full((6,), 20.0))
    torch.testing.assert_close(
        fastvq.ema_codebook(vq.cluster_size[0], vq.embed_avg[0]), vq.codebook
    )
    # init_from on a fresh module: same properties, heads and projection included.
    vq2 = VectorQuantize(DIM, 6, heads=2, codebook_dim=DIM, separate_codebook_per_head=True)
    with torch.no_grad():
        vq2.project_in.weight.copy_(torch.cat([torch.eye(DIM)] * 2))
        vq2.project_in.bias.zero_()
    vq2.init_from(x, iters=5)
    assert bool(vq2.initted)
    for h in range(2):
        assert bool((torch.cdist(centres, vq2.codebook[h]).min(1).values < 0.1).all())
    # x as 4 training batches' rows: the EMA counts are per batch (5 rows of each centre), and
    # the EMA codebook is still the centroids.
    vq3 = VectorQuantize(DIM, 6)
    vq3.init_from(x, iters=5, batches=4)
    torch.testing.assert_close(vq3.cluster_size[0], torch.full((6,), 5.0))
    torch.testing.assert_close(
        fastvq.ema_codebook(vq3.cluster_size[0], vq3.embed_avg[0]), vq3.codebook
    )
    with pytest.raises(ValueError, match="batches"):
        vq3.init_from(x, batches=0)


def test_kmeans_init_with_few_rows_warns():
    vq = VectorQuantize(DIM, K, kmeans_init=True)
    with pytest.warns(UserWarning, match="repeated"):
        vq(_randn(1, 10, DIM))
    assert bool(vq.initted) and torch.isfinite(vq.embed).all()


def test_kmeans_init_needs_a_row_and_waits_for_one():
    vq = VectorQuantize(DIM, K, kmeans_init=True)
    for empty, mask in [(_randn(2, 0, DIM), None), (_randn(1, 5, DIM), torch.zeros(1, 5) > 0)]:
        with pytest.raises(ValueError, match="^x: k-means init needs at least one .unmasked. row"):
            vq(empty, mask=mask)
        assert not bool(vq.initted)
    vq(_randn(1, 60, DIM))
    assert bool(vq.initted)


def test_dead_codes_come_from_unmasked_rows():
    vq = VectorQuantize(DIM, K, threshold_ema_dead_code=2.0, rotation_trick=False)
    x = _randn(2, 16, DIM)
    x[1] = 1000.0  # padding: must never become a code
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0] = True
    for _ in range(3):
        vq(x, mask=mask)
        assert vq.embed.abs().max() < 100
        assert bool((vq.cluster_size >= 0).all())
    # every code that was reset in the last step is one of the valid rows
    reset = vq.cluster_size[0] == 2.0
    assert reset.any()
    dist = torch.cdist(vq.embed[0, reset].double(), x[0].double()).min(1).values
    assert bool((dist < 1e-6).all())


def test_ortho_loss_matches_pairwise_formula():
    vq = VectorQuantize(DIM, K, orthogonal_reg_weight=2.0, commitment_weight=0.0)
    _, idx, loss = vq(_randn(2, 8, DIM))
    c = F.normalize(vq.embed[0].detach(), dim=-1)
    want = (c @ c.T).square().sum() / K**2 - 1 / K
    torch.testing.assert_close(loss, 2.0 * want)
    # active codes only + max codes: a subset of the used codes enters
    vq = VectorQuantize(
        DIM,
        K,
        orthogonal_reg_weight=1.0,
        orthogonal_reg_active_codes_only=True,
        orthogonal_reg_max_codes=4,
        commitment_weight=0.0,
    )
    _, idx, loss, parts = vq(_randn(2, 8, DIM), return_loss_breakdown=True)
    torch.testing.assert_close(loss, parts.orthogonal_reg)
    loss.backward()
    rows_with_grad = vq.embed.grad[0].abs().sum(1) > 0
    assert 0 < int(rows_with_grad.sum()) <= 4
    assert bool(torch.isin(rows_with_grad.nonzero().flatten(), idx.unique()).all())


def test_learnable_codebook_separate_codebook_loss():
    vq = VectorQuantize(
        DIM,
        K,
        learnable_codebook=True,
        commitment_weight=0.25,
        codebook_loss_weight=1.0,
        rotation_trick=False,
    )
    assert isinstance(vq.embed, torch.nn.Parameter) and not vq.ema_update
    x = _randn(2, 8, DIM).requires_grad_()
    codebook = vq.codebook.detach().clone()
    _, idx, loss = vq(x)
    q = codebook[idx]
    torch.testing.assert_close(loss, 1.25 * (q - x).square().mean())
    loss.backward()
    n = x.numel()
    torch.testing.assert_close(x.grad, 0.25 * 2 * (x - q).detach() / n)
    want = torch.zeros(K, DIM).index_add_(0, idx.reshape(-1), (2 * (q - x) / n).reshape(-1, DIM))
    torch.testing.assert_close(vq.embed.grad[0], want.detach())
    assert torch.equal(vq.codebook, codebook)  # no EMA


def test_forward_ema_update_argument_overrides_the_module():
    x = _randn(2, 10, DIM, seed=1)
    vq = VectorQuantize(DIM, K, rotation_trick=False)
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    vq(x, ema_update=False)  # no EMA, no dead codes: nothing moves
    for k, v in vq.state_dict().items():
        assert torch.equal(v, state[k]), k
    off = VectorQuantize(DIM, K, rotation_trick=False, ema_update=False)
    off.load_state_dict(state)
    off(x, ema_update=True)
    vq(x)
    for k, v in vq.state_dict().items():  # the forward's True does what the default does
        torch.testing.assert_close(off.state_dict()[k], v, msg=k)
    assert not torch.equal(vq.embed, state["embed"])


def test_dead_codes_are_replaced_without_ema_update():
    # As the peer: with ema_update=False the statistics still track usage and dead codes are
    # replaced by batch rows; live codes keep their values.
    vq = VectorQuantize(DIM, K, ema_update=False, threshold_ema_dead_code=0.9, rotation_trick=False)
    before = vq.embed.detach().clone()
    x = _randn(2, 10, DIM, seed=2) * 2  # 20 rows for 48 codes: some codes go unused
    _, idx, _ = vq(x)
    used = torch.isin(torch.arange(K), idx)
    assert 0 < int((~used).sum())
    assert bool((vq.cluster_size[0, ~used] == 0.9).all())  # reset to the threshold
    assert torch.equal(vq.embed[0, used], before[0, used])
    dist = torch.cdist(vq.embed[0, ~used].double(), x.reshape(-1, DIM).double()).min(1).values
    assert bool((dist < 1e-6).all())


def test_kmeans_state_reads_back_the_centroids_with_a_large_eps():
    # embed_avg = centroid * smoothed(count): the EMA-free read-back is the centroid for any eps
    # (unequal cluster sizes, so that smoothed(count) != count).
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, DIM, generator=g) * 8
    sizes = torch.tensor([5, 10, 20, 45])
    x = centres.repeat_interleave(sizes, 0) + 0.05 * torch.randn(80, DIM, generator=g)
    vq = VectorQuantize(DIM, 4, eps=0.5)
    vq.init_from(x, generator=torch.Generator().manual_seed(1))
    order = torch.cdist(centres, vq.codebook).argmin(1)
    assert torch.equal(order.sort().values, torch.arange(4))
    torch.testing.assert_close(vq.cluster_size[0, order], sizes.float())
    back = fastvq.ema_codebook(vq.cluster_size[0], vq.embed_avg[0], 0.5)
    torch.testing.assert_close(back, vq.codebook)


def test_kmeans_init_leaves_out_masked_rows():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 30, DIM, generator=g)
    x[1, 10:] = 1000.0 + torch.randn(20, DIM, generator=g)  # padding: never a centroid
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 10:] = False
    vq = VectorQuantize(DIM, 8, kmeans_init=True, ema_update=False)
    vq(x, mask=mask)
    assert bool(vq.initted) and vq.embed.abs().max() < 10
    assert vq.cluster_size.sum().item() == 40  # the 40 valid rows


def test_ortho_active_codes_only_counts_unmasked_rows():
    vq = VectorQuantize(DIM, K, orthogonal_reg_weight=1.0, orthogonal_reg_active_codes_only=True,
                        commitment_weight=0.0, ema_update=False)  # fmt: skip
    x = _randn(2, 10, DIM, seed=3)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, :3] = True  # 3 valid rows, 17 padding rows whose codes must not count
    with torch.no_grad():
        all_idx = vq.eval()(x)[1]
    _, idx, loss = vq.train()(x, mask=mask)
    used = idx[mask].unique()
    assert not bool(torch.isin(all_idx[~mask], used).all())  # padding picks other codes
    c = F.normalize(vq.embed[0].detach()[used].double(), dim=-1)
    n = len(used)
    want = (c @ c.T).square().sum() / n**2 - 1 / n
    torch.testing.assert_close(loss.item(), want.item(), rtol=1e-5, atol=1e-6)


def test_ortho_loss_averages_over_separate_head_codebooks():
    # Shin et al. / the peer: sum over heads of ||C_h C_h^T||_F^2 / (H n^2) - 1/n.
    vq = VectorQuantize(
        DIM,
        K,
        codebook_dim=6,
        heads=2,
        separate_codebook_per_head=True,
        orthogonal_reg_weight=0.5,
        commitment_weight=0.0,
        ema_update=False,
    )
    _, _, loss = vq(_randn(2, 8, DIM, seed=4))
    c = F.normalize(vq.embed.detach().double(), dim=-1)
    want = (c @ c.transpose(1, 2)).square().sum() / (2 * K**2) - 1 / K
    torch.testing.assert_close(loss.item(), 0.5 * want.item(), rtol=1e-5, atol=1e-7)


def test_ortho_max_codes_samples_exactly_that_many_codes():
    vq = VectorQuantize(DIM, K, orthogonal_reg_weight=1.0, orthogonal_reg_max_codes=5,
                        commitment_weight=0.0, ema_update=False)  # fmt: skip
    torch.manual_seed(0)
    _, _, loss = vq(_randn(2, 8, DIM, seed=5))
    loss.backward()
    rows = (vq.embed.grad[0].abs().sum(1) > 0).nonzero().flatten()
    assert len(rows) == 5
    c = F.normalize(vq.embed[0].detach()[rows].double(), dim=-1)
    want = (c @ c.T).square().sum() / 25 - 1 / 5
    torch.testing.assert_close(loss.item(), want.item(), rtol=1e-5, atol=1e-7)


def test_frozen_learnable_codebook_gets_no_loss_gradient():
    # As the peer: freeze_codebook detaches the commitment target of a learnable codebook.
    vq = VectorQuantize(DIM, K, learnable_codebook=True, commitment_weight=0.5,
                        rotation_trick=False)  # fmt: skip
    x = _randn(2, 8, DIM, seed=7).requires_grad_()
    q, idx, loss = vq(x, freeze_codebook=True)
    loss.backward()
    assert vq.embed.grad is None or not vq.embed.grad.any()
    codes = vq.codebook.detach()[idx]
    torch.testing.assert_close(x.grad, 0.5 * 2 * (x - codes).detach() / x.numel())


def test_rotation_gradient_uses_the_codes_before_the_parameter_update():
    # With the orthogonal regulariser the codebook is a Parameter written in place by the EMA
    # step after the search: the estimator's backward must see the codes it quantized with.
    vq = VectorQuantize(DIM, K, orthogonal_reg_weight=1.0, decay=0.5)
    assert vq.grad == "rotation"
    codebook = vq.codebook.detach().clone()
    x = _randn(3, 6, DIM, seed=8).requires_grad_()
    q, idx, _ = vq(x)
    assert not torch.equal(vq.codebook.detach(), codebook)  # the update ran
    g = _randn(*q.shape, seed=9)
    (q * g).sum().backward()
    z = x.detach().clone().requires_grad_()
    q2, idx2 = fastvq.quantize(z, codebook, grad="rotation")
    assert torch.equal(idx2, idx)
    (q2 * g).sum().backward()
    torch.testing.assert_close(x.grad, z.grad)


@pytest.mark.parametrize("layer", ["vq", "rvq"])
def test_a_training_forward_under_inference_mode_leaves_the_layer_trainable(layer):
    # The EMA step replaced the codebook buffer by a tensor made under inference_mode: an
    # inference tensor, which every later training step failed to save for its backward (and
    # load_state_dict could not write). Under inference_mode it is now written in place.
    def build():
        torch.manual_seed(0)
        if layer == "vq":
            return VectorQuantize(DIM, K, decay=0.5, threshold_ema_dead_code=1, grad="rotation")
        return ResidualVQ(dim=DIM, codebook_size=K, num_quantizers=2, decay=0.5)

    vq, twin = build(), build()
    x = _randn(3, 6, DIM, seed=10)
    with torch.inference_mode():
        torch.manual_seed(1)  # the dead-code rows
        vq(x)
    with torch.no_grad():
        torch.manual_seed(1)
        twin(x)
    for a, b in zip(vq.buffers(), twin.buffers(), strict=True):
        assert not a.is_inference() and torch.equal(a, b)  # the same step, as a normal tensor
    vq.load_state_dict(twin.state_dict())
    xg = x.clone().requires_grad_()
    q, _, loss = vq(xg)
    (q.square().mean() + loss.sum()).backward()
    assert xg.grad is not None and bool(xg.grad.isfinite().all())


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_a_training_update_is_refused(use_reentrant):
    # The recomputation in backward ran the EMA update a second time and quantized with the
    # updated codebook, so the gradient was not the forward's (silently). A frozen or eval()
    # layer has nothing to update: checkpointed, it gives the plain gradient.
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    vq = VectorQuantize(DIM, K, decay=0.5, grad="rotation")
    before = copy.deepcopy(vq.state_dict())
    x = _randn(3, 6, DIM, seed=11).requires_grad_()
    q = checkpoint(vq, x, use_reentrant=use_reentrant)[0]
    with pytest.raises(RuntimeError, match="checkpoint"):
        q.square().sum().backward()
    updated = vq.state_dict()
    assert not torch.equal(updated["embed"], before["embed"])  # the forward's one update
    for train in (True, False):
        vq.train(train)
        x.grad = None
        step = functools.partial(vq, freeze_codebook=train)
        q = checkpoint(step, x, use_reentrant=use_reentrant)[0]
        q.square().sum().backward()
        want = x.detach().clone().requires_grad_()
        vq(want, freeze_codebook=True)[0].square().sum().backward()
        torch.testing.assert_close(x.grad, want.grad)
    for key, value in vq.state_dict().items():
        assert torch.equal(value, updated[key]), key


BEAM = {
    "ResidualVQ": lambda: ResidualVQ(dim=DIM, num_quantizers=2, codebook_size=K, beam_size=2),
    "GroupedResidualVQ": lambda: GroupedResidualVQ(
        dim=DIM, groups=2, num_quantizers=2, codebook_size=K, beam_size=2
    ),
    "forward(beam_size=2)": lambda: functools.partial(
        ResidualVQ(dim=DIM, num_quantizers=2, codebook_size=K), beam_size=2
    ),
}


@pytest.mark.parametrize("make", BEAM.values(), ids=BEAM.keys())
def test_activation_checkpointing_a_beam_search_update_is_refused(make):
    # Beam search updated the layers by itself, past VectorQuantize.forward's refusal: the
    # recomputation searched the updated codebooks (another gradient), or updated them twice.
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    step = make()
    x = _randn(3, 6, DIM, seed=12).requires_grad_()
    q = checkpoint(step, x, use_reentrant=False)[0]
    with pytest.raises(RuntimeError, match="checkpoint"):
        q.square().sum().backward()


class _Broadcast(torch.autograd.Function):
    """comm.broadcast_coalesced's output on the source device: the inputs themselves."""

    @staticmethod
    def forward(ctx, *tensors):
        return tensors

    @staticmethod
    def backward(ctx, *grads):
        return grads


def _device0_replica(network: torch.nn.Module) -> torch.nn.Module:
    """torch.nn.parallel.replicate's replica on the source device, on the CPU: the module's
    buffers, its Parameters as plain tensors through the broadcast (listed in
    _former_parameters), each submodule from _replicate_for_data_parallel."""
    modules = list(network.modules())
    params = list(network.parameters())
    copies = dict(zip(params, _Broadcast.apply(*params), strict=True)) if params else {}
    replicas = {m: m._replicate_for_data_parallel() for m in modules}
    for m, r in replicas.items():
        r._former_parameters = {}
        r._modules = {k: None if c is None else replicas[c] for k, c in m._modules.items()}
        for k, p in m._parameters.items():
            if p is not None:
                setattr(r, k, copies[p])
                r._former_parameters[k] = copies[p]
        r._buffers = dict(m._buffers)
    return replicas[network]


DATAPARALLEL = {
    "buffer": lambda: VectorQuantize(DIM, K, decay=0.5, grad="rotation"),
    "parameter": lambda: VectorQuantize(
        DIM, K, decay=0.5, grad="rotation", orthogonal_reg_weight=1
    ),
    "learnable": lambda: VectorQuantize(
        DIM,
        K,
        grad="rotation",
        learnable_codebook=True,
        ema_update=False,
        threshold_ema_dead_code=9,
    ),
    "rvq_beam": lambda: ResidualVQ(
        dim=DIM, codebook_size=K, num_quantizers=2, decay=0.5, beam_size=2, rotation_trick=True
    ),
    "rvq_shared": lambda: ResidualVQ(
        dim=DIM, codebook_size=K, num_quantizers=2, decay=0.5, shared_codebook=True
    ),
}


@pytest.mark.parametrize("name", list(DATAPARALLEL))
def test_a_dataparallel_replica_updates_the_modules_codebook(name):
    # nn.DataParallel's device-0 replica shares the module's tensors: its EMA step advanced the
    # module's statistics but set the new codebook on the replica, discarded after the step. Its
    # codebook is now written in place, after the estimator took a copy, and training through
    # the replica is training the module (same indices, state and input gradients).
    def build():
        torch.manual_seed(0)
        return DATAPARALLEL[name]().train()

    vq, twin = build(), build()
    x = _randn(3, 6, DIM, seed=11)
    xr, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(1)  # the dead-code rows
    q, idx, loss = _device0_replica(vq)(xr)
    torch.manual_seed(1)
    qt, idx_t, loss_t = twin(xt)
    assert torch.equal(idx, idx_t)
    for (key, a), (_, b) in zip(vq.state_dict().items(), twin.state_dict().items(), strict=True):
        assert torch.equal(a, b), key
    g = _randn(*q.shape, seed=12)
    ((q * g).sum() + loss.sum()).backward()
    ((qt * g).sum() + loss_t.sum()).backward()
    torch.testing.assert_close(xr.grad, xt.grad)


def test_stochastic_sampling_follows_gumbel_softmax(monkeypatch):
    monkeypatch.setattr(vqmod, "_SAMPLE_CHUNK_ELEMENTS", 2 * 3 * 7)  # many chunks of 7 rows
    vq = VectorQuantize(2, 3, stochastic_sample_codes=True, sample_codebook_temp=0.5)
    vq.codebook = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    vq.ema_update = False
    x = torch.zeros(1, 6000, 2)
    torch.manual_seed(0)
    _, idx, _ = vq(x)
    freq = torch.bincount(idx.reshape(-1), minlength=3).double() / 6000
    want = torch.softmax(-torch.tensor([0.0, 1.0, 2.0]) / 0.5, 0).double()
    torch.testing.assert_close(freq, want, atol=0.02, rtol=0)
    # eval, or temperature 0: the nearest code
    _, idx, _ = vq(x, sample_codebook_temp=0.0)
    assert bool((idx == 0).all())
    _, idx, _ = vq.eval()(x)
    assert bool((idx == 0).all())


@pytest.mark.parametrize(
    "config",
    [{}, {"kmeans_init": True}, {"heads": 2, "separate_codebook_per_head": True}],
    ids=["ema", "kmeans_init", "heads"],
)
def test_assigned_codebook_survives_a_training_step(config):
    # The EMA statistics follow an assigned codebook and a pending k-means init does not replace
    # it: at decay 1 a training step keeps it; at decay 0.9 the step is one EMA step from it.
    new = None
    for decay in (1.0, 0.9):
        vq = VectorQuantize(DIM, K, decay=decay, **config).train()
        new = _randn(*vq.codebook.shape, seed=3) * 4 if new is None else new
        with torch.no_grad():  # counts of a layer in training (a fresh one's are all 1)
            vq.cluster_size.copy_(torch.rand(vq.cluster_size.shape) * 10 + 0.5)
        vq.codebook = new
        cs, es = vq.cluster_size.clone(), vq.embed_avg.clone()
        x = _randn(2, 30, DIM, seed=4)
        _, idx, _ = vq(x)
        if decay == 1.0:
            torch.testing.assert_close(vq.codebook, new)
        elif vq.heads == 1:  # no projection: the rows are x's
            fastvq.ema_update_(cs[0], es[0], x.reshape(-1, DIM), idx.reshape(-1), decay)
            torch.testing.assert_close(vq.codebook, fastvq.ema_codebook(cs[0], es[0]))


# --- gradient accumulation: deferred updates ---------------------------------------------------

DEFERRED = {
    "heads-dead-codes": lambda: VectorQuantize(
        DIM, K, heads=2, separate_codebook_per_head=True, codebook_dim=6, decay=0.7,
        threshold_ema_dead_code=1.5,
    ),
    "cosine": lambda: VectorQuantize(DIM, K, use_cosine_sim=True, decay=0.7),
    "residual-dead-codes": lambda: ResidualVQ(
        dim=DIM, num_quantizers=3, codebook_size=K, decay=0.7, threshold_ema_dead_code=1.5
    ),
    "grouped-dead-codes": lambda: GroupedResidualVQ(
        dim=DIM, groups=2, num_quantizers=2, codebook_size=K, decay=0.7,
        threshold_ema_dead_code=1.5,
    ),
    "residual-shared": lambda: ResidualVQ(
        dim=DIM, num_quantizers=3, codebook_size=K, decay=0.7, shared_codebook=True
    ),
    "residual-beam": lambda: ResidualVQ(
        dim=DIM, num_quantizers=3, codebook_size=K, decay=0.7, beam_size=2
    ),
}  # fmt: skip


@pytest.mark.parametrize("make", DEFERRED.values(), ids=DEFERRED.keys())
def test_deferred_micro_batches_update_as_one_batch(make):
    """defer_codebook_updates: three micro-batches (masked) give the outputs and the codebook
    state of one batch of all their rows, dead-code resets included; updated one by one, the EMA
    decayed three times and later micro-batches searched codes the earlier ones had moved."""
    torch.manual_seed(0)
    one = make().train()
    parts = copy.deepcopy(one)
    eager = copy.deepcopy(one)
    before = copy.deepcopy(one.state_dict())
    x = _randn(6, 5, DIM, seed=3)
    mask = _randn(6, 5, seed=4) > -0.5
    torch.manual_seed(1)
    full = one(x, mask=mask)
    torch.manual_seed(1)
    sizes = [2, 3, 1]
    buf, mask_buf, outs = torch.empty_like(x[:3]), torch.empty_like(mask[:3]), []
    with defer_codebook_updates(parts):
        for xp, m in zip(x.split(sizes), mask.split(sizes), strict=True):
            # One input buffer refilled for each micro-batch, returned indices changed: the
            # update read the last micro-batch's rows for every one, and the changed codes.
            n = len(xp)
            buf[:n], mask_buf[:n] = xp, m
            q, idx = parts(buf[:n], mask=mask_buf[:n])[:2]
            outs.append((q.clone(), idx.clone()))
            buf.fill_(7.0), mask_buf.fill_(True), idx.fill_(0)
        for k, v in parts.state_dict().items():
            assert torch.equal(v, before[k]), k  # nothing moves inside the block
    assert torch.equal(torch.cat([o[0] for o in outs]), full[0])
    batch_dim = 1 if isinstance(one, GroupedResidualVQ) else 0  # its indices: (groups, b, ...)
    assert torch.equal(torch.cat([o[1] for o in outs], batch_dim), full[1])
    counts = {k: v for k, v in one.state_dict().items() if k.endswith("cluster_size")}
    for k, v in one.state_dict().items():
        # (a shared codebook sums its rows in another order: micro-batch, then layer)
        torch.testing.assert_close(parts.state_dict()[k], v, rtol=1e-6, atol=1e-7, msg=k)
    assert all(not torch.equal(v, before[k]) for k, v in counts.items())
    for xp, m in zip(x.split(sizes), mask.split(sizes), strict=True):
        eager(xp, mask=m)
    assert any(not torch.allclose(eager.state_dict()[k], v, rtol=0.01) for k, v in counts.items())


def test_deferred_updates_refuse_mixed_ema_flags():
    # The block's one update took the first forward's flag for every forward's rows.
    vq = VectorQuantize(DIM, K, decay=0.5, threshold_ema_dead_code=0.5).train()
    with pytest.raises(ValueError, match="ema_update must be the same"):
        with defer_codebook_updates(vq):
            vq(_randn(2, 5, DIM), ema_update=False)
            vq(_randn(2, 5, DIM, seed=1))


def test_deferred_updates_are_discarded_on_error():
    vq = VectorQuantize(DIM, K, decay=0.5).train()
    before = copy.deepcopy(vq.state_dict())
    with pytest.raises(ZeroDivisionError), defer_codebook_updates(vq):
        vq(_randn(2, 5, DIM))
        _ = 1 / 0
    for k, v in vq.state_dict().items():
        assert torch.equal(v, before[k]), k
    vq(_randn(2, 5, DIM))  # outside the block, forwards update again
    assert not torch.equal(vq.cluster_size, before["cluster_size"])
    with pytest.raises(TypeError, match="module must be a torch.nn.Module, got generator"):
        with defer_codebook_updates(vq.parameters()):
            pass


# --- forward(topk=k) (peer parity: test_peer_parity.py) -----------------------------------------


def test_topk_candidates_losses_and_layout():
    vq = VectorQuantize(DIM, K, codebook_dim=5, commitment_weight=0.3).eval()
    x = _randn(2, 7, DIM, seed=6)
    q, idx, loss, breakdown = vq(x, topk=4, return_loss_breakdown=True)
    assert q.shape == (2, 7, 4, DIM) and idx.shape == loss.shape == (2, 7, 4)
    z = vq.project_in(x).detach().reshape(-1, 5)
    d = torch.cdist(z.double(), vq.codebook.double())
    flat = idx.reshape(-1, 4)
    # the 4 nearest codes, nearest first (tie-aware: distances, not indices)
    best = d.sort(1).values[:, :4]
    torch.testing.assert_close(d.gather(1, flat), best, rtol=1e-6, atol=1e-6)
    codes = vq.codebook.detach()[flat]
    torch.testing.assert_close(q, vq.project_out(codes).reshape(2, 7, 4, DIM))
    mse = (codes - z[:, None]).square().mean(-1).reshape(2, 7, 4)
    torch.testing.assert_close(loss, 0.3 * mse)  # eval too: the per-candidate commitment
    torch.testing.assert_close(breakdown.commitment, mse)
    # column 0 is the plain forward's code
    q1, idx1, _ = vq(x)
    assert torch.equal(idx[..., 0], idx1)
    torch.testing.assert_close(q[:, :, 0], q1)
    # k beyond the codebook is clamped to it (as the peer): every code, nearest first
    small = VectorQuantize(DIM, 6).eval()
    _, idx, loss = small(x, topk=50)
    assert idx.shape == loss.shape == (2, 7, 6)
    assert torch.equal(idx.sort(-1).values, torch.arange(6).expand(2, 7, 6))
    assert bool((loss[..., 1:] >= loss[..., :-1]).all())


def test_topk_commitment_weight_zero():
    # The peer's eval loss is the unweighted MSE at commitment_weight 0; in training fastvq
    # returns zeros of shape (..., k) (the peer: a scalar 0).
    vq = VectorQuantize(DIM, K, commitment_weight=0.0)
    x = _randn(2, 5, DIM, seed=7)
    _, idx, loss = vq(x, topk=3)
    assert loss.shape == (2, 5, 3) and not loss.any()
    _, idx, loss = vq.eval()(x, topk=3)
    codes = vq.codebook[idx]
    torch.testing.assert_close(loss, (codes - x[:, :, None]).square().mean(-1))


@pytest.mark.parametrize("grad", ["ste", "rotation", "householder"])
def test_topk_estimator_per_candidate(grad):
    # Each candidate's output is fastvq's estimator between the row and that code: the gradient
    # of candidate j equals fastvq.quantize's on the same row when j's code is the nearest one,
    # and in general that of the estimator with the given indices.
    vq = VectorQuantize(DIM, K, grad=grad, rotation_trick=grad == "rotation")
    vq.ema_update = False
    x = _randn(3, 4, DIM, seed=8).requires_grad_()
    q, idx, loss = vq(x, topk=3)
    g = _randn(*q.shape, seed=9)
    (q * g).sum().backward()
    codebook = vq.codebook.detach()
    want = torch.zeros_like(x)
    for j in range(3):
        z = x.detach().clone().requires_grad_()
        qj = vqmod._gather(z.reshape(-1, DIM), codebook, idx[..., j].reshape(-1), grad, "torch")
        torch.testing.assert_close(qj.reshape(3, 4, DIM), q[:, :, j].detach())
        (qj.reshape(3, 4, DIM) * g[:, :, j]).sum().backward()
        want += z.grad
    # (only q was backpropagated: the loss adds nothing to x.grad here)
    torch.testing.assert_close(x.grad, want, rtol=1e-5, atol=1e-6)
    z = x.detach().clone().requires_grad_()
    q0, idx0 = fastvq.quantize(z, codebook, grad=grad)
    assert torch.equal(idx0, idx[..., 0])
    (q0 * g[:, :, 0]).sum().backward()
    x.grad = None
    (vq(x, topk=3)[0][:, :, 0] * g[:, :, 0]).sum().backward()
    torch.testing.assert_close(x.grad, z.grad)
    if grad != "ste":  # the estimator is not the identity: a wrong pairing would show
        assert not torch.allclose(x.grad, g[:, :, 0])


def test_topk_training_with_stochastic_codes_at_temperature_zero_is_nearest():
    vq = VectorQuantize(DIM, K, stochastic_sample_codes=True, sample_codebook_temp=0.0)
    x = _randn(2, 7, DIM, seed=6)
    _, idx, _ = vq(x, topk=3)
    _, want, _ = vq.eval()(x, topk=3)
    assert torch.equal(idx, want)


def test_topk_trains_no_statistics_but_kmeans_inits():
    vq = VectorQuantize(DIM, 8, kmeans_init=True, threshold_ema_dead_code=5.0)
    x = _randn(2, 40, DIM, seed=10)
    mask = torch.arange(40) < torch.tensor([40, 25])[:, None]
    q, idx, loss = vq(x, topk=2, mask=mask)
    assert bool(vq.initted)  # the peer's k-means init runs in top-k mode too
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    q, idx, loss = vq(x, topk=2, mask=mask)
    for k, v in vq.state_dict().items():  # no EMA, no dead-code reset
        assert torch.equal(v, state[k]), k
    assert bool((idx[~mask] == -1).all()) and bool((idx[mask] >= 0).all())
    assert not q[~mask].any() and not loss[~mask].any() and bool((loss[mask][:, 1] > 0).all())


def test_topk_stochastic_sampling_follows_gumbel_top_k(monkeypatch):
    # The peer's topk of Gumbel-perturbed logits: column 0 is a Gumbel-max sample, the k
    # columns are distinct (sampling without replacement); chunks of 7 rows.
    monkeypatch.setattr(vqmod, "_SAMPLE_CHUNK_ELEMENTS", 2 * 3 * 7)
    vq = VectorQuantize(2, 3, stochastic_sample_codes=True, sample_codebook_temp=0.5)
    vq.codebook = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    x = torch.zeros(1, 6000, 2)
    torch.manual_seed(0)
    _, idx, _ = vq(x, topk=2)
    assert idx.shape == (1, 6000, 2) and bool((idx[..., 0] != idx[..., 1]).all())
    logits = -torch.tensor([0.0, 1.0, 2.0]) / 0.5
    p = torch.softmax(logits, 0).double()
    freq = torch.bincount(idx[..., 0].reshape(-1), minlength=3).double() / 6000
    torch.testing.assert_close(freq, p, atol=0.02, rtol=0)
    # second draw without replacement: P(second = j) = sum_i p_i p_j / (1 - p_i)
    second = torch.stack([sum(p[i] * p[j] / (1 - p[i]) for i in range(3) if i != j)
                          for j in range(3)])  # fmt: skip
    freq = torch.bincount(idx[..., 1].reshape(-1), minlength=3).double() / 6000
    torch.testing.assert_close(freq, second, atol=0.02, rtol=0)
    assert torch.equal(vq.cluster_size, torch.ones(1, 3))  # no statistics in top-k mode
    # eval: the nearest codes
    _, idx, _ = vq.eval()(x, topk=2)
    assert bool((idx == torch.tensor([0, 1])).all())


# --- state, dtype, compile -------------------------------------------------------------------


def test_state_dict_round_trip():
    vq = VectorQuantize(DIM, K, codebook_dim=6, heads=2, separate_codebook_per_head=True)
    vq(_randn(2, 9, DIM))
    sd = vq.state_dict()
    assert {"embed", "cluster_size", "embed_avg", "initted"} <= set(sd)
    assert sd["embed"].shape == (2, K, 6) and sd["cluster_size"].shape == (2, K)
    vq2 = VectorQuantize(DIM, K, codebook_dim=6, heads=2, separate_codebook_per_head=True)
    vq2.load_state_dict(sd)
    vq.eval(), vq2.eval()
    x = _randn(2, 9, DIM, seed=7)
    for a, b in zip(vq(x), vq2(x), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize(
    "config",
    [
        {},
        {"use_cosine_sim": True, "eps": 0.5},
        {"heads": 2, "separate_codebook_per_head": True, "codebook_dim": DIM // 2},
        {"orthogonal_reg_weight": 0.5},  # a Parameter codebook, written in place
        {"threshold_ema_dead_code": 1e-9},  # no code that dead
        {"ema_update": False, "threshold_ema_dead_code": 1e-9},  # statistics only, codes kept
    ],
)
def test_ema_step_equals_the_public_ops(config, deterministic, backend):
    """A training step's EMA state and codebook are, bit for bit, fastvq.ema_update_ and
    fastvq.ema_codebook on the step's rows and indices (the module calls their unchecked core,
    resolving the backend, the deterministic mode and the group once per step)."""
    vq = VectorQuantize(DIM, K, decay=0.7, backend=backend, **config)
    heads = vq.num_codebooks
    x = _randn(2, 9, DIM, seed=4)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    cluster_size, embed_avg = vq.cluster_size.clone(), vq.embed_avg.clone()
    codes = vq.embed.detach().clone()
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        _, idx, _ = vq(x, mask=mask)
        rows = x.reshape(2, 9, heads, DIM // heads)
        rows = vqmod._l2norm(rows) if vq.use_cosine_sim else rows
        for h in range(heads):
            idx_h = idx if heads == 1 else idx[..., h]
            r_h = rows[:, :, h][mask]
            fastvq.ema_update_(
                cluster_size[h], embed_avg[h], r_h, idx_h[mask], 0.7, backend=backend
            )
    finally:
        torch.use_deterministic_algorithms(before)
    assert torch.equal(vq.cluster_size, cluster_size) and torch.equal(vq.embed_avg, embed_avg)
    for h in range(heads):
        code = fastvq.ema_codebook(cluster_size[h], embed_avg[h], vq.eps)
        code = vqmod._l2norm(code) if vq.use_cosine_sim else code
        assert torch.equal(vq.embed[h], code if vq.ema_update else codes[h])


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_backend_names_every_kernel_of_a_training_step(backend):
    """backend="torch" keeps k-means init, search, EMA scatter and dead-code reset in plain
    PyTorch: the only fastvq op a step dispatches is quantize_fwd, a Python custom op running
    the torch gather. "auto" on a C++ build reaches the C++ search and scatter (so the log
    sees them)."""
    vq = VectorQuantize(DIM, K, kmeans_init=True, threshold_ema_dead_code=2.0, backend=backend)
    x = _randn(2, 30, DIM, seed=6)
    with _OpLog() as log:
        for _ in range(2):  # the init, then a step
            vq(x)
    ours = {name for name in log.names if name.startswith("fastvq::")}
    if backend == "torch":
        assert ours == {"fastvq::quantize_fwd"}
    elif fastvq.backends()["cpu"].available:
        assert {"fastvq::nearest_code", "fastvq::ema_scatter_cpp"} <= ours


def test_autocast_off_turns_an_enabled_autocast_off():
    """The layers' float32 region: under autocast, autocast_off disables it (a matmul stays
    float32: the orthogonal loss is the same as without autocast); without autocast there is
    nothing to disable."""
    for enabled in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            with vqmod.autocast_off("cpu"):
                assert not torch.is_autocast_enabled("cpu")
                assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
            assert torch.is_autocast_enabled("cpu") == enabled
    vq = VectorQuantize(DIM, K, orthogonal_reg_weight=1.0, commitment_weight=0.0)
    x = _randn(2, 9, DIM, seed=5)
    with torch.no_grad():
        _, _, plain = vq(x, freeze_codebook=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, _, mixed = vq(x, freeze_codebook=True)
    assert plain.dtype == mixed.dtype == torch.float32 and torch.equal(plain, mixed)


def test_bf16_autocast_keeps_float32_state():
    vq = VectorQuantize(DIM, K, codebook_dim=8, rotation_trick=False)
    x = _randn(2, 10, DIM)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, idx, loss = vq(x)  # a training step: EMA in float32
    assert q.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert vq.embed.dtype == vq.cluster_size.dtype == vq.embed_avg.dtype == torch.float32
    assert torch.isfinite(vq.embed).all()
    vq.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, idx, _ = vq(x)
        z = vq.project_in(x)
    assert z.dtype == torch.bfloat16
    # the search ran in float32 on the bf16 projections
    check_nearest(z.float().reshape(-1, 8), vq.codebook, idx.reshape(-1))


# --- presets --------------------------------------------------------------------------------


def test_householder_preset():
    vq = HouseholderVQ(DIM, K)
    assert (vq.decay, vq.commitment_weight, vq.grad, vq.ema_update) == (
        0.99,
        0.25,
        "householder",
        True,
    )
    vq.eval()
    x = _randn(4, DIM).requires_grad_()
    q, _, _ = vq(x)
    g = _randn(4, DIM, seed=1)
    (q * g).sum().backward()
    z = x.detach().clone().requires_grad_()
    q2, _ = fastvq.quantize(z, vq.codebook.detach(), grad="householder")
    (q2 * g).sum().backward()
    torch.testing.assert_close(x.grad, z.grad)
    with pytest.raises(ValueError, match="rotation_trick"):
        HouseholderVQ(DIM, K, rotation_trick=True)


def test_hyper_codebook():
    torch.manual_seed(0)
    vq = HyperCodebook(DIM, 64, codebook_dim=32)
    gen = vq.codebook_generator
    assert isinstance(gen, CodebookMLP)
    assert [type(m).__name__ for m in gen.mlp] == ["Linear", "Tanh", "Linear"]
    assert gen.mlp[0].in_features == 32 and gen.mlp[0].out_features == 256
    assert not hasattr(vq, "cluster_size") and "embed" not in dict(vq.named_parameters())
    x = _randn(2, 10, DIM).requires_grad_()
    _, idx, loss = vq(x)
    z = vq.project_in(x).detach()
    q = gen().detach()[idx]
    torch.testing.assert_close(loss, 1.25 * (q - z).square().mean())
    loss.backward()
    assert gen.embedding.grad is not None and gen.mlp[0].weight.grad.abs().sum() > 0
    # regenerated on every forward: changing the hyper-net changes the codes used
    exported = vq.export_codebook()
    assert isinstance(exported, torch.Tensor) and not exported.requires_grad
    with torch.no_grad():
        gen.mlp[2].bias.add_(1.0)
    vq.eval()
    torch.testing.assert_close(vq.export_codebook(), exported + 1.0)
    qo, idx2, _ = vq(x)
    torch.testing.assert_close(vq.get_output_from_indices(idx2), qo)


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"codebook_size": 0}, ValueError, "codebook_size"),
        ({"codebook_size": 2.5}, TypeError, "codebook_size"),
        ({"dim": 0}, ValueError, "dim"),
        ({"decay": 1.5}, ValueError, "decay"),
        ({"threshold_ema_dead_code": -1}, ValueError, "threshold_ema_dead_code"),
        ({"learnable_codebook": True, "ema_update": True}, ValueError, "ema_update"),
        ({"learnable_codebook": True, "use_cosine_sim": True}, ValueError, "cosine"),
        ({"accept_image_fmap": True, "accept_3d_fmap": True}, ValueError, "exclusive"),
        ({"straight_through": True}, ValueError, "not supported"),
        ({"affine_param": True}, ValueError, "not supported"),
        ({"no_such_option": 1}, TypeError, "no_such_option"),
        ({"grad": "bogus"}, ValueError, "grad"),
        ({"rotation_trick": True, "grad": "ste"}, ValueError, "rotation_trick"),
        ({"codebook_loss_weight": 1.0}, ValueError, "learnable"),
        (
            {
                "heads": 2,
                "separate_codebook_per_head": True,
                "orthogonal_reg_weight": 1.0,
                "orthogonal_reg_active_codes_only": True,
            },
            ValueError,
            "separate",
        ),
        ({"codebook_generator": CodebookMLP(K, DIM), "kmeans_init": True}, ValueError, "kmeans"),
        ({"codebook_generator": lambda: None}, TypeError, "codebook_generator"),
    ],
)
def test_bad_construction(kwargs, error, match):
    args = {"dim": DIM, "codebook_size": K, **kwargs}
    with pytest.raises(error, match=match):
        VectorQuantize(**args)


def test_bad_calls():
    vq = VectorQuantize(DIM, K)
    with pytest.raises(ValueError, match="dim"):
        vq(torch.randn(2, 5, DIM + 1))
    with pytest.raises(ValueError, match="dimensions"):
        vq(torch.randn(2, 3, 4, DIM))
    with pytest.raises(TypeError, match="x must be"):
        vq(torch.randint(0, 3, (2, 5, DIM)))
    with pytest.raises(ValueError, match="mask"):
        vq(torch.randn(2, 5, DIM), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask or lens"):
        vq(torch.randn(2, 5, DIM), mask=torch.ones(2, 5, dtype=torch.bool), lens=torch.ones(2))
    for lens in (torch.tensor([True, False]), torch.ones(2), torch.ones(3, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"lens must be an integer tensor of shape \(2,\)"):
            vq(torch.randn(2, 5, DIM), lens=lens)
    for topk, error in ((0, ValueError), (-2, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="topk"):
            vq(torch.randn(2, 5, DIM), topk=topk)
    with pytest.raises(ValueError, match="heads=1"):  # the peer asserts single-head codebooks
        VectorQuantize(DIM, K, heads=2, codebook_dim=6)(torch.randn(2, 5, DIM), topk=2)
    big = VectorQuantize(DIM, 200)
    with pytest.raises(ValueError, match="at most 128"):
        big(torch.randn(2, 5, DIM), topk=129)
    assert big(torch.randn(2, 5, DIM), topk=128)[1].shape == (2, 5, 128)
    with pytest.raises(ValueError, match="indices"):
        vq(torch.randn(2, 5, DIM), torch.zeros(2, 5, dtype=torch.long))
    img = VectorQuantize(DIM, K, accept_image_fmap=True)
    with pytest.raises(ValueError, match=r"\(B, dim, H, W\)"):
        img(torch.randn(2, 5, DIM))
    with pytest.raises(ValueError, match="mask"):
        img(torch.randn(2, DIM, 2, 2), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="indices"):
        vq.get_codes_from_indices(torch.zeros(3))
    with pytest.raises(ValueError, match="encoder_outputs"):
        vq.init_from(torch.randn(10, DIM + 1))
    sampler = VectorQuantize(DIM, K, stochastic_sample_codes=True)
    for temp, error in ((-1.0, ValueError), (float("nan"), ValueError), ("hot", TypeError)):
        with pytest.raises(error, match="sample_codebook_temp"):
            sampler(torch.randn(2, 5, DIM), sample_codebook_temp=temp)
    # The setter checks the shape: a (D, K) transpose has as many elements, scrambled codes.
    for bad in (vq.codebook.detach().T.contiguous(), torch.randn(K - 1, DIM)):
        with pytest.raises(ValueError, match=rf"codebook must have shape \({K}, {DIM}\)"):
            vq.codebook = bad
    with pytest.raises(TypeError, match="codebook must be a torch.Tensor"):
        vq.codebook = [[0.0] * DIM] * K

    class Text(torch.nn.Module):
        def forward(self):
            return "codes"

    generated = VectorQuantize(
        DIM, K, codebook_generator=Text(), learnable_codebook=True, ema_update=False
    )
    with pytest.raises(TypeError, match="codebook_generator's output must be a torch.Tensor"):
        generated(torch.randn(2, 5, DIM))


def test_orthogonal_loss_of_active_codes_without_rows_is_zero():
    # No valid row, no active code: 0 (the peer divides by zero codes), in a step that still
    # trains (greedy, top-k and empty batches alike).
    vq = VectorQuantize(
        DIM, K, orthogonal_reg_weight=0.1, orthogonal_reg_active_codes_only=True
    ).train()
    masked = torch.zeros(2, 5, dtype=torch.bool)
    for x, kwargs in [(torch.randn(2, 5, DIM), dict(mask=masked)), (torch.randn(0, 5, DIM), {})]:
        for topk in (None, 2):
            loss = vq(x, topk=topk, **kwargs)[2]
            assert bool((loss == 0).all()), (kwargs, topk)


def test_get_codes_from_indices_rejects_out_of_range():
    # -1 is masked padding (a zero code); anything else outside [0, K) is a clear ValueError,
    # not torch's IndexError (>= K) or a silent zero code (-2).
    vq = VectorQuantize(dim=8, codebook_size=16)
    assert torch.equal(vq.get_codes_from_indices(torch.tensor([[-1]])), torch.zeros(1, 1, 8))
    for bad in (16, -2):
        with pytest.raises(ValueError, match=r"indices must lie in \[-1, 16\)"):
            vq.get_codes_from_indices(torch.tensor([[0, bad]]))
        with pytest.raises(ValueError, match=r"indices must lie in \[-1, 16\)"):
            vq.get_output_from_indices(torch.tensor([[bad]]))
