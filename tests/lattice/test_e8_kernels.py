"""e8_shell_quantize on every backend: indices equal the torch decoder's (_decode) bit for bit, and
the torch decoder agrees with brute force (float64 scores over the 240 codes), tie-aware; so every
backend agrees with brute force. Special rows, gradient, bad inputs, opcheck and torch.compile.

e8_nearest likewise (below the shell's tests): every backend's points equal the torch path's
(_nearest) bit for bit, -0 included, and the torch path agrees with brute force over the 2 x 256
lattice points around each row."""

import itertools
import math

import pytest
import torch

import fastvq
from fastvq.lattice import (
    E8_SHELL_SIZE,
    e8_nearest,
    e8_shell_codebook,
    e8_shell_codes,
    e8_shell_quantize,
)
from fastvq.lattice._common import compute_dtype
from fastvq.lattice.e8 import _HAS_KERNEL, _decode, _nearest, _pick
from fastvq.testing import backend_cases, check_nearest, on_one_thread, run_isa_builds

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
    one = on_one_thread(lambda: e8_shell_quantize(z, backend="cpu")[0])
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


@pytest.mark.parametrize(
    "dtype, big", [(torch.float32, 2.0**126), (torch.float64, 2.0**1022)], ids=["f32", "f64"]
)
@pytest.mark.parametrize("case", CASES)
def test_huge_rows_with_zero_coordinates(case, dtype, big):
    """The overflow rescaling goes by a row's largest |z|: rows of +-2^126 (2^1022 in float64),
    whose unscaled scores overflow, with some zero coordinates decode as their signs do."""
    device, backend = case
    g = _gen(20)
    signs = torch.randint(0, 2, (64, 8), generator=g) * 2 - 1
    zeros = torch.rand(64, 8, generator=g).argsort(-1) < torch.randint(1, 4, (64, 1), generator=g)
    small = (signs * ~zeros).double()  # exact scores against the doubled codes
    want = (small @ e8_shell_codebook(torch.float64).T).argmax(-1)
    assert (want >= 112).any()  # not only pair codes: the overflow would pick those
    index = e8_shell_quantize((small * big).to(dtype).to(device), backend=backend)[0]
    assert torch.equal(index.cpu(), want)


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
        with pytest.raises(ValueError, match="8"):
            torch.ops.fastvq.e8_shell_decode(torch.randn(3, 7))
        with pytest.raises(ValueError, match="contiguous"):
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


# --- e8_nearest -------------------------------------------------------------------------------


def _nearest_family(name: str, dtype: torch.dtype, n: int, seed: int = 0) -> torch.Tensor:
    """(n, 8) inputs of `dtype` for e8_nearest; NEAREST_EXACT names hold quarter-integers, where
    distances are exact and ties (rounding, D8 against D8 + 1/2, the largest error) are common."""
    g = _gen(seed + 7 * len(name))
    gauss = torch.randn(n, 8, generator=g, dtype=torch.float64)
    if name == "gaussian":
        x = 3 * gauss
    elif name == "halves":  # integers and half-integers: rounding ties, points of either coset
        x = torch.randint(-8, 9, (n, 8), generator=g) / 2
    elif name == "quarters":  # D8 and D8 + 1/2 at equal distance, equal rounding errors
        x = torch.randint(-12, 13, (n, 8), generator=g) / 4
    elif name == "signed_zeros":  # -0 and (-0.5, 0): rounded to -0, which must survive
        pick = torch.randint(0, 7, (n, 8), generator=g)
        x = torch.tensor([-0.0, 0.0, -0.25, 0.25, -0.5, 0.5, -0.375], dtype=torch.float64)[pick]
    elif name == "lattice_noise":  # E8 points and small noise: well inside the Voronoi cells
        points = _nearest(4 * gauss)
        x = points + 0.01 * torch.randn(n, 8, generator=g, dtype=torch.float64)
    elif name == "near_ties":  # quarter-integers nudged by one float32 ulp: rounding decides
        x = torch.randint(-12, 13, (n, 8), generator=g) / 4
        x = x * (1 + 2.0**-23 * torch.randint(-1, 2, (n, 8), generator=g))
    elif name == "scales":  # one magnitude per row, 2^-120 .. 2^120: tiny, exact, huge
        x = gauss * 2.0 ** torch.randint(-120, 121, (n, 1), generator=g)
    elif name == "huge":  # past 2^20 in float32 (and 2^52 in float64), up to the largest finite
        top = {torch.float64: 1e300, torch.float32: 3e38, torch.bfloat16: 3e38}.get(dtype, 6e4)
        exp = torch.randint(20, 60, (n, 1), generator=g)
        x = torch.where(torch.arange(n)[:, None] % 4 == 0, gauss * top / 5, gauss * 2.0**exp)
    else:
        raise AssertionError(name)
    return x.to(dtype)


NEAREST_FAMILIES = ["gaussian", "halves", "quarters", "signed_zeros", "lattice_noise"]
NEAREST_FAMILIES += ["near_ties", "scales", "huge"]
NEAREST_EXACT = ["halves", "quarters", "signed_zeros"]
CORNERS = torch.tensor(list(itertools.product((0.0, 1.0), repeat=8)), dtype=torch.float64)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of t (-0 differs from +0), every NaN as one pattern."""
    kind = {torch.float64: torch.int64, torch.float32: torch.int32}.get(t.dtype, torch.int16)
    return torch.where(torch.isnan(t), -1, t.contiguous().view(kind))


def _nearest_reference(x: torch.Tensor) -> torch.Tensor:
    """The torch path of e8_nearest on the rows of x (..., 8), as every backend must return it."""
    y = x.reshape(-1, 8).cpu().to(compute_dtype(x.dtype))
    return _nearest(y).to(x.dtype).view(x.shape)


def _coset_distances(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distances (float64) from each row of x (N, 8) float64 to D8 and to D8 + 1/2, by brute
    force: the nearest point of each rounds every coordinate down or up (2 x 256 candidates)."""
    best = []
    for shift in (0.0, 0.5):
        p = torch.floor(x - shift)[:, None, :] + CORNERS + shift  # (N, 256, 8)
        d = (p - x[:, None, :]).square().sum(-1)
        d = d.masked_fill(torch.remainder((p - shift).sum(-1), 2.0) != 0, float("inf"))
        best.append(d.amin(-1))
    return best[0], best[1]


@pytest.mark.parametrize("family", [f for f in NEAREST_FAMILIES if f not in ("scales", "huge")])
def test_nearest_torch_path_matches_brute_force(family):
    for dtype in DTYPES:
        x = _nearest_family(family, dtype, n=400)
        p = e8_nearest(x, backend="torch")
        assert p.dtype == dtype and torch.equal(_bits(p), _bits(_nearest_reference(x)))
        x64, p64 = x.double(), p.double()
        d0, d1 = _coset_distances(x64)
        d = (p64 - x64).square().sum(-1)
        integer = (p64 == p64.round()).all(-1)
        half = (p64 - 0.5 == (p64 - 0.5).round()).all(-1)
        assert ((integer | half) & (p64.sum(-1) % 2 == 0)).all()  # in E8
        if family in NEAREST_EXACT:
            # Exact distances: the nearest point, and the D8 one on equal distance.
            assert torch.equal(d, torch.minimum(d0, d1))
            assert torch.equal(integer, d0 <= d1)
        else:
            tol = 1e-9 if dtype == torch.float64 else 1e-4
            assert (d - torch.minimum(d0, d1) <= tol).all()


def test_nearest_rules_by_hand():
    """Ties to even, the first largest error moved, -0 kept, the D8 point on equal distance."""
    x = torch.tensor(
        [
            [0.4, 0.4, 1, 0, 0, 0, 0, 0],  # odd sum: the first of two largest errors moves up
            [-0.4, -0.4, 1, 0, 0, 0, 0, 0],  # ... and down for a negative error
            [-0.2, -0.0, 0.0, 0, 0, 0, 0, 0.5],  # even sum: -0 stays -0; 0.5 rounds to 0
            [2.5, 1.5, 0, 0, 0, 0, 0, 0],  # ties to even: (2, 2), even
            [0.25] * 8,  # D8 (0) and D8 + 1/2 (1/2)^8 at distance 0.5 both: D8
            [0.75] * 8,  # 1^8 and (1/2)^8 at distance 0.5 both: D8 again
            [0.5] * 7 + [0.6],  # (1/2)^8 at 0.01, the nearest D8 point at 1.91: the coset
        ],
        dtype=torch.float64,
    )
    expect = torch.tensor(
        [
            [1.0, 0, 1, 0, 0, 0, 0, 0],
            [-1.0, -0.0, 1, 0, 0, 0, 0, 0],
            [-0.0, -0.0, 0, 0, 0, 0, 0, 0],
            [2.0, 2, 0, 0, 0, 0, 0, 0],
            [0.0] * 8,
            [1.0] * 8,
            [0.5] * 8,
        ],
        dtype=torch.float64,
    )
    for device, backend in [c.values[0] for c in CASES]:
        for dtype in DTYPES:
            got = e8_nearest(x.to(dtype).to(device), backend=backend).cpu()
            assert torch.equal(_bits(got), _bits(expect.to(dtype))), (backend, dtype)


@pytest.mark.skipif(not fastvq.backends()["triton"].available, reason="Triton unavailable")
def test_triton_keeps_minus_zero_where_unary_minus_is_a_subtraction(monkeypatch):
    """Triton up to 3.6 (the GPU machine's) lowers -x on floats as 0 - x, which is +0 for x = +0;
    later versions negate. The -0 of rounding [-0.5, -0] must not depend on which."""
    from triton.language import semantic

    def minus(self, x):  # Triton 3.6's TritonSemantic.minus, in this version's builder API
        scalar = x.type.scalar
        zero = self.make_tensor(self.builder.get_null_value(scalar.to_ir(self.builder)), scalar)
        return self.sub(zero, x, True)

    if hasattr(semantic.TritonSemantic, "make_tensor"):  # else this Triton subtracts already
        monkeypatch.setattr(semantic.TritonSemantic, "minus", minus)
    x = torch.tensor([[-0.2, -0.0, 0.0, -0.4, 0.3, -0.5, 0.0, 0.0]])
    expect = torch.tensor([[-0.0, -0.0, 0.0, -0.0, 0.0, -0.0, 0.0, 0.0]])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for dtype in DTYPES:
        got = e8_nearest(x.to(dtype).to(device), backend="triton").cpu()
        assert torch.equal(_bits(got), _bits(expect.to(dtype))), dtype


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # NaN rows in the interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", KERNEL_CASES)
def test_nearest_kernels_equal_torch_path(case, dtype, poison):
    device, backend = case
    n = 300 if device == "cpu" else 20000
    x = torch.cat([_nearest_family(f, dtype, n=n) for f in NEAREST_FAMILIES])
    x[::97, 3] = float("nan")  # and a few rows with NaN / Inf: rounded coordinate by coordinate
    x[::89, 5] = -float("inf")
    p = e8_nearest(x.to(device), backend=backend)
    assert p.device.type == device and p.dtype == dtype and p.shape == x.shape
    assert torch.equal(_bits(p.cpu()), _bits(_nearest_reference(x)))


@pytest.mark.skipif(not fastvq.backends()["cpu"].available, reason="fastvq._C is not built")
def test_nearest_cpu_kernel_does_not_depend_on_the_thread_count():
    x = torch.cat([_nearest_family(f, torch.float32, n=20000, seed=1) for f in NEAREST_FAMILIES])
    one = on_one_thread(lambda: e8_nearest(x, backend="cpu"))
    assert torch.equal(_bits(one), _bits(e8_nearest(x, backend="cpu")))
    assert torch.equal(_bits(one), _bits(_nearest_reference(x)))


# The C++ kernels are compiled twice, for SSE2 and for AVX2, and picked at run time
# (csrc/cpu/isa.h); FASTVQ_CPU_BASELINE=1 forces SSE2. Both builds must return the torch path's
# bits: the lattice points of e8_nearest, the shell decoder's indices.
_ISA_SCRIPT = """
import sys, torch
from fastvq.lattice import e8_nearest, e8_shell_quantize
xs, zs = torch.load(sys.argv[1])
points = [e8_nearest(x, backend="cpu") for x in xs]
torch.save((points, [e8_shell_quantize(z, backend="cpu")[0] for z in zs]), sys.argv[2])
"""


@pytest.mark.skipif(not fastvq.backends()["cpu"].available, reason="fastvq._C is not built")
def test_cpu_kernels_bit_identical_across_isa_builds(tmp_path):
    """Vacuous on a CPU without AVX2 (both runs take the SSE2 build), exact everywhere else."""
    xs = [torch.cat([_nearest_family(f, d, n=1001) for f in NEAREST_FAMILIES]) for d in DTYPES]
    zs = [torch.cat([_family(f, d, n=1001) for f in FAMILIES]) for d in DTYPES]
    torch.save((xs, zs), tmp_path / "x.pt")
    runs = run_isa_builds(_ISA_SCRIPT, tmp_path, tmp_path / "x.pt")
    for baseline, (points, indices) in zip("10", runs, strict=True):
        for x, p in zip(xs, points, strict=True):
            assert torch.equal(_bits(p), _bits(_nearest_reference(x))), (baseline, x.dtype)
        for z, index in zip(zs, indices, strict=True):
            assert torch.equal(index, _reference(z)), (baseline, z.dtype)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # NaN rows in the interpreter
@pytest.mark.parametrize("case", CASES)
def test_nearest_shapes_strides_and_special_rows(case, poison):
    device, backend = case
    x = (3 * torch.randn(3, 8, 5, generator=_gen(11))).to(device).transpose(1, 2)  # strided
    p = e8_nearest(x, backend=backend)
    assert p.shape == (3, 5, 8) and p.dtype == x.dtype and p.is_contiguous()
    assert torch.equal(_bits(p.cpu()), _bits(_nearest_reference(x)))
    assert torch.equal(e8_nearest(x[1, 2], backend=backend), p[1, 2])
    for dtype in DTYPES:
        empty = torch.zeros(2, 0, 8, device=device, dtype=dtype)
        assert e8_nearest(empty, backend=backend).shape == (2, 0, 8)
    # NaN / Inf anywhere in a row: torch.round of every coordinate, NaN and Inf kept, no parity fix.
    special = 3 * torch.randn(6, 8, generator=_gen(12), dtype=torch.float64)
    special[0, 2] = float("nan")
    special[1, 7] = float("inf")
    special[2, 0] = -float("inf")
    special[3] = float("nan")
    special[4, 1], special[4, 6] = float("inf"), float("nan")
    special[5] = torch.tensor([0.4, -0.3, 1.5, 3.4, -0.5, 0, 0, float("inf")])
    for dtype in DTYPES:
        s = special.to(dtype)
        p = e8_nearest(s.to(device), backend=backend).cpu()
        expect = torch.round(s.to(compute_dtype(dtype))).to(dtype)
        assert torch.equal(_bits(p), _bits(expect))
        # Ties to even and -0 as torch.round; an odd sum of the finite ones, yet nothing moves.
        row5 = torch.tensor([0.0, -0.0, 2, 3, -0.0, 0, 0, float("inf")]).to(dtype)
        assert torch.equal(_bits(p[5]), _bits(row5))


@pytest.mark.parametrize("case", CASES)
def test_nearest_gradient_is_zero(case):
    """The output is piecewise constant in x: zero gradient (what autograd through torch.round
    gave before the kernels), every backend, the float64 check by gradcheck."""
    device, backend = case
    x = (3 * torch.randn(4, 7, 8, generator=_gen(13))).to(device).transpose(0, 1).requires_grad_()
    p = e8_nearest(x, backend=backend)
    assert p.requires_grad
    p.backward(torch.randn(7, 4, 8, generator=_gen(14)).to(device))
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert not e8_nearest(x.detach(), backend=backend).requires_grad
    x64 = (3 * torch.randn(5, 8, generator=_gen(15), dtype=torch.float64)).to(device)
    assert torch.autograd.gradcheck(
        lambda v: e8_nearest(v, backend=backend), (x64.requires_grad_(),), eps=1e-7
    )


def test_nearest_bad_backend_and_inputs():
    x = torch.randn(5, 8)
    with pytest.raises(ValueError, match="backend"):
        e8_nearest(x, backend="gpu")
    with pytest.raises(ValueError, match="backend"):
        e8_nearest(x, backend="cuda")  # no CUDA C++ kernel for E8
    with pytest.raises(TypeError):
        e8_nearest(x, "cpu")  # backend is keyword-only
    for backend in ("torch", "cpu", "auto"):
        with pytest.raises(ValueError, match="x"):
            e8_nearest(torch.zeros(3, 7), backend=backend)
        with pytest.raises(TypeError, match="x"):
            e8_nearest(torch.zeros(3, 8, dtype=torch.int64), backend=backend)
    if fastvq.backends()["cpu"].available:
        op = torch.ops.fastvq.e8_nearest
        with pytest.raises(ValueError, match=r"shape \(N, 8\)"):
            op(torch.randn(3, 7))
        with pytest.raises(ValueError, match="contiguous"):
            op(torch.randn(8, 3).T)
        with pytest.raises(TypeError, match="float32, float64"):
            op(torch.zeros(3, 8, dtype=torch.int32))


@pytest.mark.skipif(not fastvq.backends()["triton"].available, reason="Triton unavailable")
@pytest.mark.parametrize("op", ["e8_nearest_triton", "e8_shell_decode_triton"])
def test_triton_op_refuses_what_its_kernel_cannot_read(op):
    # The kernel reads contiguous (N, 8) rows by raw pointer, and torch.ops.fastvq.* reaches it
    # past the public op's checks: short rows overran the heap, strided rows gave wrong answers,
    # integers were read as floats.
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: under TRITON_INTERPRET=1
    kernel = getattr(torch.ops.fastvq, op)
    for bad, match in [
        (torch.randn(4, 4), r"must be a contiguous \(\*, 8\) tensor"),
        (torch.randn(8), r"must be a contiguous \(\*, 8\) tensor"),
        (torch.randn(16, 16)[:, ::2], r"strides \(16, 2\)"),
        (torch.randint(0, 3, (4, 8), dtype=torch.int32), "got torch.int32"),
    ]:
        with pytest.raises(ValueError, match=f"{op}: .* {match}"):
            kernel(bad.to(device))


@pytest.mark.gpu
def test_nearest_cuda_tensor_on_cpu_backend_is_refused():
    with pytest.raises(ValueError, match="backend 'cpu'"):
        e8_nearest(torch.randn(3, 8, device="cuda"), backend="cpu")


def test_nearest_meta_tensors():
    p = e8_nearest(torch.empty(3, 5, 8, device="meta", dtype=torch.bfloat16))
    assert p.shape == (3, 5, 8) and p.dtype == torch.bfloat16 and p.device.type == "meta"


def test_nearest_opcheck():
    x = 3 * torch.randn(7, 8, generator=_gen(16))
    ops = [torch.ops.fastvq.e8_nearest_torch]
    if fastvq.backends()["cpu"].available:
        ops.append(torch.ops.fastvq.e8_nearest)
    if ("cpu", "triton") in [c.values[0] for c in CASES]:
        ops.append(torch.ops.fastvq.e8_nearest_triton)
    for op in ops:
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            torch.library.opcheck(op, (x.to(dtype),))
            torch.library.opcheck(op, (x.to(dtype).requires_grad_(),))
        torch.library.opcheck(op, (x[:0],))
    # The torch op takes any layout and returns a contiguous (N, 8), as its fake must (the fake's
    # empty_like kept a transposed x's strides: opcheck's "Stride mismatch"); the C++ and Triton
    # ops take contiguous x only (e8_nearest passes a contiguous copy).
    torch.library.opcheck(torch.ops.fastvq.e8_nearest_torch, (x.t().contiguous().t(),))


def test_nearest_compiles_without_graph_breaks():
    x = (3 * torch.randn(37, 8, generator=_gen(17))).requires_grad_()

    def step(x):
        p = e8_nearest(x)
        return p, ((p - x) ** 2).sum()

    eager = step(x)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(_bits(compiled[0]), _bits(eager[0]))
    torch.testing.assert_close(compiled[1], eager[1])
    (grad,) = torch.autograd.grad(compiled[1], x)
    torch.testing.assert_close(grad, 2 * (x - eager[0]).detach())  # through x only


def test_nearest_stale_build_without_the_kernel(monkeypatch):
    """An extension built before fastvq::e8_nearest: "auto" falls back, "cpu" says why."""
    import fastvq.lattice.e8 as e8

    monkeypatch.setattr(e8, "_HAS_NEAREST_KERNEL", False)
    x = 3 * torch.randn(5, 8, generator=_gen(18))
    assert torch.equal(_bits(e8_nearest(x)), _bits(_nearest_reference(x)))
    if fastvq.backends()["cpu"].available:
        with pytest.raises(ValueError, match="rebuild"):
            e8_nearest(x, backend="cpu")


def test_torch_backend_computes_float64_in_float64():
    """E17: 2^25 + 1 is no float32; the torch path must agree with the C++ kernel in float64."""
    x = torch.tensor([[2.0**25 + 1, 1.0, 0, 0, 0, 0, 0, 0.2]], dtype=torch.float64)
    want = torch.tensor([[2.0**25 + 1, 1.0, 0, 0, 0, 0, 0, 0]], dtype=torch.float64)
    assert torch.equal(e8_nearest(x, backend="torch"), want)
    if _HAS_KERNEL:
        assert torch.equal(e8_nearest(x, backend="cpu"), want)


@pytest.mark.skipif(not _HAS_KERNEL, reason="no C++ kernel")
def test_auto_picks_the_cpp_kernel_on_cpu():
    """E19 (performance only: the torch path is ~2.5x slower)."""
    assert _pick("auto", torch.device("cpu"), "e8_shell_decode", True) == "cpu"
