"""fastvq.nn.lattice: LeechQuantize, E8Quantize.

Oracle: brute force over the full shell (fastvq.lattice.*_codebook, metric "dot" on unit
vectors, tie-aware), autograd through an explicit straight-through / rotation formula.
"""

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from fastvq.lattice import LEECH_SIZE, e8_shell_codebook, leech_codebook
from fastvq.nn.lattice import E8Quantize, LeechQuantize
from fastvq.testing import check_nearest

CASES = [
    (LeechQuantize, dict(dim=32), (2, 5, 32)),
    (LeechQuantize, dict(commitment_weight=0.3), (1, 7, 24)),
    (E8Quantize, dict(dim=8, accept_image_fmap=True, commitment_weight=2.5), (2, 8, 3, 3)),
    (E8Quantize, dict(dim=5, channel_last=False), (2, 5, 6)),
]


@functools.cache
def _shell(cls):
    if cls is LeechQuantize:
        return leech_codebook()
    return e8_shell_codebook() / math.sqrt(2)


def _unit_inputs(m, x):
    """u = normalize(project_in(x)) in (N, D) for the module's layout."""
    if m.accept_image_fmap:
        x = x.flatten(2).transpose(1, 2)
    elif not m.channel_last:
        x = x.transpose(1, 2)
    return F.normalize(m.project_in(x), dim=-1).reshape(-1, m.codebook_dim)


@pytest.mark.parametrize("cls, kwargs, shape", CASES)
def test_indices_match_brute_force(cls, kwargs, shape):
    torch.manual_seed(0)
    m = cls(**kwargs)
    x = torch.randn(shape)
    out, idx, loss = m(x)
    assert out.shape == x.shape and idx.dtype == torch.int64
    assert (
        idx.shape == (shape[0], *shape[2:])
        if m.accept_image_fmap or not m.channel_last
        else (idx.shape == shape[:2])
    )
    u = _unit_inputs(m, x).detach()
    agree = check_nearest(u, _shell(cls), idx.reshape(-1), metric="dot")
    assert agree == 1.0  # random inputs: no near ties
    q = _shell(cls)[idx.reshape(-1)]
    torch.testing.assert_close(loss, m.commitment_weight * F.mse_loss(u, q))
    m.eval()
    torch.testing.assert_close(m.get_output_from_indices(idx), m(x)[0])
    assert m(x)[2].item() == 0.0


@pytest.mark.parametrize("cls", [LeechQuantize, E8Quantize])
@pytest.mark.parametrize("rotation", [False, True])
def test_gradient_reaches_input_projection(cls, rotation):
    torch.manual_seed(1)
    m = cls(dim=12, rotation_trick=rotation, commitment_weight=0.0)
    x = torch.randn(2, 4, 12)
    g = torch.randn(2, 4, 12)
    out, idx, _ = m(x)
    (out * g).sum().backward()
    got = m.project_in.weight.grad.clone()
    assert got.abs().sum() > 0
    # reference by autograd through an explicit estimator
    m.zero_grad()
    u = F.normalize(m.project_in(x), dim=-1)
    q = _shell(cls)[idx]
    if rotation:
        ud, qd = u.detach(), q
        r = F.normalize(ud + qd, dim=-1)
        eye = torch.eye(u.shape[-1])
        rot = eye - 2 * r[..., :, None] * r[..., None, :] + 2 * qd[..., :, None] * ud[..., None, :]
        ref = (rot @ u[..., None]).squeeze(-1)
    else:
        ref = u + (q - u).detach()
    torch.testing.assert_close(ref.detach(), q, atol=1e-5, rtol=1e-5)
    (m.project_out(ref) * g).sum().backward()
    torch.testing.assert_close(got, m.project_in.weight.grad, atol=1e-5, rtol=1e-4)


def test_bf16_state_dict_and_codebook():
    torch.manual_seed(2)
    m = LeechQuantize(dim=16)
    x = torch.randn(2, 3, 16)
    out, idx, _ = m(x)
    m2 = LeechQuantize(dim=16)
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2(x)[1], idx)
    out16, idx16, loss16 = m.to(torch.bfloat16)(x.bfloat16())
    assert out16.dtype == torch.bfloat16 and idx16.shape == idx.shape
    u = _unit_inputs(m, x.bfloat16()).float()
    check_nearest(u, _shell(LeechQuantize), idx16.reshape(-1), metric="dot")
    # From indices, in the module's dtype (the codes follow project_out's weights).
    out16 = m.get_output_from_indices(idx16)
    assert out16.dtype == torch.bfloat16
    # (forward's u + sg(q - u) rounds in bfloat16)
    torch.testing.assert_close(out16, m.eval()(x.bfloat16())[0], atol=1e-2, rtol=2e-2)
    # float64 codes for a float64 projection (float32 ones were 1e-8 off forward's output).
    m64 = m.double()
    out64 = m64.get_output_from_indices(m64(x.double())[1])
    torch.testing.assert_close(out64, m64(x.double())[0], atol=1e-15, rtol=1e-15)
    assert m.codebook_size == LEECH_SIZE and E8Quantize().codebook.shape == (240, 8)
    # The codebook follows .to(device) through a buffer the state dict does not hold.
    assert "_anchor" not in E8Quantize().state_dict() and "_anchor" in dict(m.named_buffers())
    # Rounded once from the exact shell vectors / sqrt(2) (1.41421 passed the norm check above).
    want = (e8_shell_codebook().double() / math.sqrt(2)).float()
    assert torch.equal(E8Quantize().codebook, want)


@pytest.mark.parametrize("cls", [LeechQuantize, E8Quantize])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_zero_rows_stay_finite(cls, dtype):
    # A zero row (padding) has no direction: u = 0, a finite loss and a zero gradient, in every
    # dtype (normalize's 1e-12 guard rounds to 0 in float16 and made it NaN).
    m = cls()
    x = torch.randn(1, 4, m.dim).to(dtype)
    x[0, 0] = 0
    x.requires_grad_()
    out, _, loss = m(x)
    assert bool(out.isfinite().all()) and bool(loss.isfinite())
    (out.float().square().sum() + loss).backward()
    assert bool(x.grad.isfinite().all()) and bool((x.grad[0, 0] == 0).all())


@pytest.mark.parametrize("cls", [LeechQuantize, E8Quantize])
def test_small_float16_rows_keep_their_code(cls):
    # 1 / |z| overflows float16 below |z| = 1.5e-5: such rows decoded as zero rows (index 0, no
    # gradient). A row's direction does not depend on its scale: x and 1024 x (exact in float16)
    # have the same codes, and gradients 1024 times apart.
    torch.manual_seed(15)
    m = cls()
    x = (torch.randn(1, 64, m.dim) * 1e-6).half().requires_grad_()
    big = (x.detach() * 1024).requires_grad_()
    out, idx, _ = m(x)
    out_big, idx_big, _ = m(big)
    assert torch.equal(idx, idx_big) and len(idx.unique()) > 32
    assert torch.equal(out, out_big)
    w = torch.randn(out.shape) * 1e-3
    (out.float() * w).sum().backward()
    (out_big.float() * w).sum().backward()
    assert bool(x.grad.isfinite().all())
    torch.testing.assert_close(x.grad.float(), 1024 * big.grad.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("cls", [LeechQuantize, E8Quantize])
@pytest.mark.parametrize(
    "dtype, scale",
    [
        (torch.float32, 1e-40),
        (torch.float32, 1e38),
        (torch.float64, 1e160),
        (torch.float64, 1e-310),
    ],
    ids=str,
)
def test_rows_of_extreme_magnitude_keep_their_code(cls, dtype, scale):
    # Only a row's direction is decoded: float32 rows below 3e-39 (where 1 / |z| overflows) and
    # float64 rows beyond 1e154 (where |z| does) decoded as zero rows, index 0.
    torch.manual_seed(16)
    m = cls().to(dtype)
    x = torch.randn(1, 64, m.dim, dtype=dtype)
    _, want, _ = m(x)
    x = (x * scale).requires_grad_()
    out, idx, loss = m(x)
    assert torch.equal(idx, want) and len(idx.unique()) > 32
    assert bool(loss.isfinite())
    out.sum().backward()
    # |d u / d z| ~ 1 / |z|: beyond the dtype for the tiny rows (inf, not the zero row's 0).
    assert bool(x.grad.isfinite().all()) == (scale > 1)


def test_bad_input():
    with pytest.raises(ValueError, match="codebook_dim"):
        LeechQuantize(dim=32, codebook_dim=16)
    with pytest.raises(ValueError, match="codebook_size"):
        E8Quantize(codebook_size=256)
    with pytest.raises(TypeError, match="dim"):
        LeechQuantize(dim=2.0)
    m = LeechQuantize()
    with pytest.raises(ValueError, match="feature dimension must be 24"):
        m(torch.randn(2, 3, 23))
    with pytest.raises(TypeError, match="float"):
        m(torch.ones(2, 3, 24, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\[0, 196560\)"):
        m.get_codes_from_indices(torch.tensor([LEECH_SIZE]))
    with pytest.raises(ValueError, match="accept_image_fmap"):
        E8Quantize(accept_image_fmap=True)(torch.randn(2, 8, 3))
    with pytest.raises(ValueError, match=r"channel_last=False needs x \(b, dim, n\)"):
        E8Quantize(channel_last=False)(torch.randn(4, 8))
    for cls in (E8Quantize, LeechQuantize):
        for bad in (float("nan"), -1.0, float("inf")):
            with pytest.raises(ValueError, match="^commitment_weight must be finite and >= 0"):
                cls(commitment_weight=bad)
        with pytest.raises(TypeError, match="^commitment_weight must be a real number"):
            cls(commitment_weight="x")


@pytest.mark.parametrize("cls", [LeechQuantize, E8Quantize])
def test_straight_through_output_is_its_indices_codes_bit_for_bit(cls):
    # z + (q - z).detach() is q only up to a rounding (4 % of Leech's elements were 1 ulp off),
    # so a tokenizer's decode_indices(indices) was not its reconstruction.
    torch.manual_seed(0)
    m = cls().eval()
    x = torch.randn(8, 256, m.dim, requires_grad=True)
    out, idx, _ = m(x)
    assert torch.equal(out, m.get_codes_from_indices(idx))
    g = torch.randn_like(out)
    out.mul_(1.0)  # a new tensor: in-place ops after the quantizer work
    out.backward(g)
    x2 = x.detach().requires_grad_()
    F.normalize(x2, dim=-1).backward(g)  # straight-through: the normalization's gradient alone
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("cls", [E8Quantize, LeechQuantize])
def test_commitment_loss_gradient_pulls_u_towards_its_code(cls):
    """N03 / N13: the commitment loss's gradient w.r.t. x is that of mse(u, sg(code)), u = z/|z|."""
    torch.manual_seed(0)
    m = cls(dim=16, commitment_weight=0.5).train()
    x = torch.randn(2, 5, 16, requires_grad=True)
    _, idx, loss = m(x)
    (gx,) = torch.autograd.grad(loss, x)
    z = m.project_in(x)
    u = z / z.norm(dim=-1, keepdim=True)
    want = 0.5 * (u - m.get_codes_from_indices(idx)).square().mean()
    (gw,) = torch.autograd.grad(want, x)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(gx, gw)
    assert gx.abs().sum() > 0


def test_projection_has_bias_false_builds_no_bias():
    """N15 / N16."""
    m = E8Quantize(dim=16, projection_has_bias=False)
    assert m.project_in.bias is None and m.project_out.bias is None
    assert sorted(m.state_dict()) == ["project_in.weight", "project_out.weight"]


def test_eval_loss_dtype_matches_training():
    """N11: the zero loss of eval() has the dtype of the training loss (float32 for bf16 x)."""
    m = E8Quantize()
    x = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    train_dtype = m.train()(x)[2].dtype
    assert m.eval()(x)[2].dtype == train_dtype == torch.float32
