"""Forward-mode AD and torch.func.vmap through fastvq: a correct tangent or gradient, or a clear
error, never a silently zero one. torch passes no tangent through a custom op that registers only
its backward, so the ops built on one refuse forward mode; the lattice quantizers' straight-through
estimator is an autograd.Function with its own jvp and vmap rule, and supports both."""

import functools

import pytest
import torch
from torch.autograd import forward_ad
from torch.func import jvp, vmap

import fastvq
from fastvq.lattice import e8_shell_quantize, leech_quantize
from fastvq.nn import BSQ, FSQ, LFQ, E8Quantize, VectorQuantize

CODEBOOK = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))

CUSTOM_OP_CALLS = {
    "quantize": lambda z: fastvq.quantize(z, CODEBOOK)[0],
    "quantize-rotation": lambda z: fastvq.quantize(z, CODEBOOK, grad="rotation")[0],
    "quantize-codebook": lambda c: fastvq.quantize(CODEBOOK, c)[0],
    "quantize-torch-float64": lambda z: fastvq.quantize(z.double(), CODEBOOK.double())[0],
    "fsq": lambda z: fastvq.fsq(z, [5] * 8)[0],
    "lfq": lambda z: fastvq.lfq(z)[0],
    "bsq": lambda z: fastvq.bsq(z)[0],
    "binary_entropy_loss": lambda z: fastvq.binary_entropy_loss(z, inv_temperature=1.0)[0],
    "VectorQuantize": lambda z: VectorQuantize(8, 16).eval()(z[None])[0],
    "VectorQuantize-train": lambda z: VectorQuantize(8, 16, rotation_trick=False)(z[None])[0],
    "FSQ": lambda z: FSQ([5] * 8)(z[None])[0],
    "LFQ": lambda z: LFQ(dim=8, codebook_size=256)(z[None])[0],
    "BSQ": lambda z: BSQ(dim=8, codebook_size=256)(z[None])[0],
    "E8Quantize-rotation": lambda z: E8Quantize(dim=8, rotation_trick=True)(z[None])[0],
}


@pytest.mark.parametrize("call", CUSTOM_OP_CALLS.values(), ids=CUSTOM_OP_CALLS.keys())
def test_forward_mode_through_custom_ops_is_a_clear_error(call):
    z = torch.randn(4, 8)
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        jvp(call, (z,), (torch.ones_like(z),))
    with forward_ad.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
        call(forward_ad.make_dual(z, torch.ones_like(z)))
    call(z)  # and nothing changes without a tangent


@pytest.mark.parametrize("quantize, n", [(e8_shell_quantize, 8), (leech_quantize, 24)])
def test_lattice_straight_through_under_forward_mode_and_vmap(quantize, n):
    z = torch.randn(3, 5, n, requires_grad=True)
    tangent = torch.randn(3, 5, n)
    codes, codes_tangent = jvp(lambda a: quantize(a)[1], (z,), (tangent,))
    assert torch.equal(codes, quantize(z)[1]) and torch.equal(codes_tangent, tangent)
    with forward_ad.dual_level():
        out = quantize(forward_ad.make_dual(z.detach(), tangent))[1]
        assert torch.equal(forward_ad.unpack_dual(out).tangent, tangent)
    # d/dz sum(codes + z) = 2 everywhere: the codes' straight-through 1 was lost under vmap.
    (grad,) = torch.autograd.grad(vmap(lambda a: quantize(a)[1] + a)(z).sum(), z)
    assert bool((grad == 2).all())
    # torch.func.grad per example, against the loop.
    per_example = torch.func.vmap(torch.func.grad(lambda a: (quantize(a)[1] * a).sum()))(z)
    for i in range(3):
        (want,) = torch.autograd.grad((quantize(z[i])[1] * z[i]).sum(), z)
        torch.testing.assert_close(per_example[i], want[i])


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_vmap_over_searches_with_the_default_finite_check(backend):
    # The finite check reads a value (.tolist()), which vmap's batched tensors do not have: it is
    # skipped there, as under torch.compile, instead of failing inside torch. The plain-PyTorch
    # backend wrote its chunks into a buffer made outside vmap, which vmap refuses.
    z, codebooks = torch.randn(3, 5, 4), torch.randn(3, 7, 4)
    want = torch.stack([fastvq.nearest_code(z[i], codebooks[i]) for i in range(3)])
    search = functools.partial(fastvq.nearest_code, backend=backend)
    assert torch.equal(vmap(search)(z, codebooks), want)
    assert torch.equal(
        vmap(lambda a, c: fastvq.quantize(a, c, backend=backend)[1])(z, codebooks), want
    )
    assert torch.equal(vmap(lambda a: search(a, codebooks[0]))(z), search(z, codebooks[0]))
    z[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):  # outside vmap, still checked
        fastvq.nearest_code(z, codebooks[0])
