"""e8_shell_quantize on every backend: indices equal the torch decoder's (_decode) bit for bit, and
the torch decoder agrees with brute force (float64 scores over the 240 codes), tie-aware; so every
backend agrees with brute force. Special rows, gradient, bad inputs, opcheck and torch.compile."""

import math

import pytest
import torch

import fastvq
from fastvq.lattice import E8_SHELL_SIZE, e8_shell_codebook, e8_shell_codes, e8_shell_quantize
from fastvq.lattice._common import compute_dtype
from fastvq.lattice.e8 import _decode
from fastvq.testing import backend_cases, check_nearest

CASES = [
    pytest.param(c, id=f"{c[0]}-{c[1]}", marks=[pytest.mark.gpu] * (c[0] == "cuda"))
    for c in backend_cases()
    if c[1] != "cuda"  # no CUDA C++ kernel: Triton covers CUDA tensors
]
KERNEL_CASES = [c for c in CASES if c.values[0][1] != "torch"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DTYPE_IDS = ["f32", "f64", "bf16", "f16"]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _family(name: str, dtype: torch.dtype, n: int, seed: int = 0) -> torch.Tensor:
    """(n, 8) inputs of `dtype`; the names in EXACT give exact scores in every dtype."""
    g = _gen(seed + len(name))
    gauss = torch.randn(n, 8, generator=g, dtype=torch.float64)
    if name == "gaussian":
        z = gauss
    elif name == "codes_plus_noise":
        z = e8_shell_codes(torch.randint(0, E8_SHELL_SIZE, (n,), generator=g), torch.float64)
        z = z + 0.05 * gauss
    elif name == "codes_and_sums":  # exact codes and sums of two: ties between the shapes
        c = e8_shell_codes(torch.randint(0, E8_SHELL_SIZE, (2, n), generator=g), torch.float64)
        z = torch.where(torch.arange(n)[:, None] % 2 == 0, 2 * c[0], c[0] + c[1])
    elif name == "ternary":  # many zeros and equal magnitudes: ties everywhere
        z = torch.randint(-1, 2, (n, 8), generator=g)
    elif name == "sparse_int":
        z = torch.randint(-2, 3, (n, 8), generator=g) * (torch.rand(n, 8, generator=g) < 0.3)
    elif name == "cauchy":  # heavy tails: a few coordinates dominate
        z = torch.tan(math.pi * (torch.rand(n, 8, generator=g, dtype=torch.float64) - 0.5))
    elif name == "shape_boundary":  # sum |z| = 2 (|z_i| + |z_j|) before rounding: the two shapes
        # tie up to rounding, so the order of the additions decides, and must be the same everywhere
        top = 1.5 + 0.5 * torch.rand(n, 2, generator=g, dtype=torch.float64)
        rest = torch.rand(n, 6, generator=g, dtype=torch.float64)
        rest = rest / rest.sum(-1, keepdim=True) * top.sum(-1, keepdim=True)
        u = torch.cat((top, rest), -1).gather(-1, torch.rand(n, 8, generator=g).argsort(-1))
        neg = torch.rand(n, 8, generator=g) < 0.5
        neg[:, 7] ^= neg.sum(-1) % 2 == 1  # an even minus count: no sign flip in the score
        z = torch.where(neg, -u, u)
    elif name == "huge":  # past 2^64: the overflow scaling (largest finite magnitude per dtype)
        top = {torch.float64: 1e300, torch.float32: 3e38, torch.bfloat16: 3e38}.get(dtype, 6e4)
        z = gauss * (top / gauss.abs().amax(-1, keepdim=True))
    else:
        raise AssertionError(name)
    return z.to(dtype)


FAMILIES = ["gaussian", "codes_plus_noise", "codes_and_sums", "ternary", "sparse_int", "cauchy"]
FAMILIES += ["shape_boundary", "huge"]
EXACT = ["codes_and_sums", "ternary", "sparse_int"]


def _reference(z: torch.Tensor) -> torch.Tensor:
    """The torch decoder on the rows of z (..., 8), as e8_shell_quantize feeds it."""
    return _decode(z.reshape(-1, 8).cpu().to(compute_dtype(z.dtype))).view(z.shape[:-1])


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_matches_brute_force(family):
    c64 = e8_shell_codebook(torch.float64)
    for dtype in DTYPES:
        z = _family(family, dtype, n=300)
        index, codes = e8_shell_quantize(z, backend="torch")
        assert torch.equal(index, _reference(z))
        assert codes.dtype == dtype and torch.equal(codes, e8_shell_codes(index, dtype))
        z64 = z.double()
        rate = check_nearest(z64, c64, index, metric="dot")
        if family in EXACT:
            # Exact scores: brute force's first maximum is the lowest tied index (the rule).
            assert torch.equal(index, (z64 @ c64.T).argmax(-1))
        elif family != "shape_boundary" and dtype in (torch.float32, torch.float64):
            assert rate == 1.0  # near ties within float32 rounding have probability ~0 here


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", KERNEL_CASES)
def test_kernels_equal_decoder(case, dtype, poison):
    device, backend = case
    z = torch.cat([_family(f, dtype, n=500 if device == "cpu" else 20000) for f in FAMILIES])
    index, codes = e8_shell_quantize(z.to(device), backend=backend)
    assert index.device.type == device and index.dtype == torch.int64
    assert torch.equal(index.cpu(), _reference(z))
    assert torch.equal(codes.cpu(), e8_shell_codes(index.cpu(), dtype))


@pytest.mark.skipif(not fastvq.backends()["cpu"].available, reason="fastvq._C is not built")
def test_cpu_kernel_does_not_depend_on_the_thread_count():
    z = torch.cat([_family(f, torch.float32, n=20000, seed=1) for f in FAMILIES])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = e8_shell_quantize(z, backend="cpu")[0]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, e8_shell_quantize(z, backend="cpu")[0])
    assert torch.equal(one, _reference(z))


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # NaN rows in the interpreter
@pytest.mark.parametrize("case", CASES)
def test_shapes_strides_and_special_rows(case, poison):
    device, backend = case
    z = torch.randn(3, 8, 5, generator=_gen(1)).to(device).transpose(1, 2)  # (3, 5, 8) strided
    index, codes = e8_shell_quantize(z, backend=backend)
    assert index.shape == (3, 5) and codes.shape == (3, 5, 8) and codes.dtype == z.dtype
    assert torch.equal(index.cpu(), _reference(z))
    assert torch.equal(e8_shell_quantize(z[1, 2], backend=backend)[0].cpu(), index[1, 2].cpu())
    empty = torch.zeros(2, 0, 8, device=device)
    empty_index, empty_codes = e8_shell_quantize(empty, backend=backend)
    assert empty_index.shape == (2, 0) and empty_codes.shape == (2, 0, 8)
    # Zero rows tie every code: index 0. NaN / Inf anywhere: index 0. A single -1 at position 3:
    # the lowest pair (0, 3) with signs +-. Positive scales change nothing, 2^80 included.
    special = torch.randn(7, 8, generator=_gen(2))
    special[1] = 0.0
    special[2, 3] = float("nan")
    special[3, 7] = float("inf")
    special[4, 0] = -float("inf")
    special[5] = torch.tensor([0.0, 0, 0, -1, 0, 0, 0, 0])
    index, codes = e8_shell_quantize(special.to(device), backend=backend)
    assert index[1:6].tolist() == [0, 0, 0, 0, 4 * 2 + 1]
    assert torch.equal(index.cpu(), _reference(special))
    assert torch.isfinite(codes).all()
    scaled = e8_shell_quantize(special[[0, 6]].to(device) * 2.0**80, backend=backend)[0]
    assert torch.equal(scaled, index[[0, 6]])


@pytest.mark.parametrize("case", CASES)
def test_straight_through_gradient(case):
    device, backend = case
    z = torch.randn(4, 7, 8, generator=_gen(3)).to(device).requires_grad_()
    index, codes = e8_shell_quantize(z, backend=backend)
    assert codes.requires_grad and not index.requires_grad
    assert torch.equal(codes.detach(), e8_shell_codes(index, z.dtype))
    grad = torch.randn(4, 7, 8, generator=_gen(4)).to(device)
    codes.backward(grad)
    assert torch.equal(z.grad, grad)
    assert not e8_shell_quantize(z.detach(), backend=backend)[1].requires_grad


def test_bad_backend():
    z = torch.randn(5, 8)
    with pytest.raises(ValueError, match="backend"):
        e8_shell_quantize(z, backend="gpu")
    with pytest.raises(ValueError, match="backend"):
        e8_shell_quantize(z, backend="cuda")  # no CUDA C++ kernel for E8
    with pytest.raises(TypeError):
        e8_shell_quantize(z, "cpu")  # backend is keyword-only


@pytest.mark.gpu
def test_cuda_tensor_on_cpu_backend_is_refused():
    with pytest.raises(ValueError, match="backend 'cpu'"):
        e8_shell_quantize(torch.randn(3, 8, device="cuda"), backend="cpu")


def test_meta_tensors():
    index, codes = e8_shell_quantize(torch.empty(3, 5, 8, device="meta", dtype=torch.float16))
    assert index.shape == (3, 5) and index.dtype == torch.int64 and index.device.type == "meta"
    assert codes.shape == (3, 5, 8) and codes.dtype == torch.float16


def test_opcheck():
    z = torch.randn(7, 8, generator=_gen(5))
    ops = [torch.ops.fastvq.e8_shell_decode_torch]
    if fastvq.backends()["cpu"].available:
        ops.append(torch.ops.fastvq.e8_shell_decode)
        with pytest.raises(RuntimeError, match="8"):
            torch.ops.fastvq.e8_shell_decode(torch.randn(3, 7))
        with pytest.raises(RuntimeError, match="contiguous"):
            torch.ops.fastvq.e8_shell_decode(torch.randn(8, 3).T)
    for op in ops:
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            torch.library.opcheck(op, (z.to(dtype),))
        torch.library.opcheck(op, (z[:0],))
    index = torch.randint(0, E8_SHELL_SIZE, (3, 5), generator=_gen(6))
    torch.library.opcheck(torch.ops.fastvq.e8_shell_lookup, (index, torch.float16))


def test_compiles_without_graph_breaks():
    z = torch.randn(37, 8, generator=_gen(6)).requires_grad_()

    def step(z):
        index, codes = e8_shell_quantize(z)
        return index, (codes * z).sum()

    eager = step(z)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(z)
    assert torch.equal(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1])


def test_stale_build_without_the_kernel(monkeypatch):
    """An extension built before fastvq::e8_shell_decode: "auto" falls back, "cpu" says why."""
    import fastvq.lattice.e8 as e8

    monkeypatch.setattr(e8, "_HAS_KERNEL", False)
    z = torch.randn(5, 8, generator=_gen(7))
    assert torch.equal(e8_shell_quantize(z)[0], _reference(z))
    if fastvq.backends()["cpu"].available:
        with pytest.raises(ValueError, match="rebuild"):
            e8_shell_quantize(z, backend="cpu")
