"""leech_quantize on every backend: indices equal the torch decoder's (_decode) bit for bit, and the
torch decoder agrees with brute force (fastvq.nearest_code, metric "dot", float64) over the whole
codebook, tie-aware; so every backend agrees with brute force. Bad inputs, special rows, gradient,
opcheck and torch.compile."""

import math

import pytest
import torch

import fastvq
from fastvq.lattice import LEECH_SIZE, leech_codebook, leech_codes, leech_quantize
from fastvq.lattice._common import compute_dtype
from fastvq.lattice.leech import _decode
from fastvq.ops._backends import triton_interpreting
from fastvq.testing import backend_cases, check_nearest, on_one_thread, run_isa_builds

CUDA = torch.cuda.is_available()
CASES = [
    pytest.param(c, id=f"{c[0]}-{c[1]}", marks=[pytest.mark.gpu] * (c[0] == "cuda"))
    for c in backend_cases()
]
KERNEL_CASES = [c for c in CASES if c.values[0] != ("cpu", "torch")]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DTYPE_IDS = ["f32", "f64", "bf16", "f16"]
SQRT32 = math.sqrt(32)


@pytest.fixture(scope="module")
def ints():
    """(196560, 24) float64 integer codes (unit codes times sqrt(32)): float64 scores of integer
    inputs against them are exact, so brute force's first maximum is the true lowest index."""
    return (leech_codebook(torch.float64) * SQRT32).round()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _family(name: str, dtype: torch.dtype, n: int, seed: int = 0) -> torch.Tensor:
    """(n, 24) inputs of `dtype`; the names in EXACT give exact float32 scores."""
    g = _gen(seed + len(name))
    gauss = torch.randn(n, 24, generator=g, dtype=torch.float64)
    pick = torch.randint(0, LEECH_SIZE, (n,), generator=g)
    if name == "gaussian":
        z = gauss
    elif name == "unit_norm":
        z = gauss / torch.linalg.vector_norm(gauss, dim=-1, keepdim=True)
    elif name == "codes":  # exact codebook points, integer and unit scale
        z = (
            leech_codes(pick, torch.float64)
            * torch.where(torch.arange(n) % 2 == 0, SQRT32, 1.0)[:, None]
        )
    elif name == "codes_plus_noise":
        z = leech_codes(pick, torch.float64) + 0.02 * gauss
    elif name == "sparse":  # one to four non-zeros per row: many tied codes
        keep = torch.rand(n, 24, generator=g).argsort(-1) < torch.randint(1, 5, (n, 1), generator=g)
        z = gauss * keep
    elif name == "sparse_int":
        z = torch.randint(-3, 4, (n, 24), generator=g) * (torch.rand(n, 24, generator=g) < 0.12)
    elif name == "small_int":
        z = torch.randint(-2, 3, (n, 24), generator=g)
    elif name == "cauchy":  # heavy tails: a few coordinates dominate
        z = torch.tan(math.pi * (torch.rand(n, 24, generator=g, dtype=torch.float64) - 0.5))
    elif name == "huge":  # past 2^64: the overflow scaling (largest finite magnitude per dtype)
        top = {torch.float64: 1e300, torch.float32: 1e37, torch.bfloat16: 1e37}.get(dtype, 3e4)
        z = gauss * (top / gauss.abs().amax(-1, keepdim=True))
    else:
        raise AssertionError(name)
    return z.to(dtype)


FAMILIES = ["gaussian", "unit_norm", "codes", "codes_plus_noise", "sparse", "sparse_int"]
FAMILIES += ["small_int", "cauchy", "huge"]
EXACT = ["small_int", "sparse_int", "codes"]
CONTINUOUS = ["gaussian", "unit_norm", "codes_plus_noise", "cauchy", "huge"]


def _reference(z: torch.Tensor) -> torch.Tensor:
    """The torch decoder on the rows of z (..., 24), as leech_quantize feeds it."""
    return _decode(z.reshape(-1, 24).cpu().to(compute_dtype(z.dtype))).view(z.shape[:-1])


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_matches_brute_force(ints, family):
    # Brute force costs ~30 ms per row here: 12 rows per dtype, all four dtypes in one search.
    rows, index = [], []
    for dtype in DTYPES:
        z = _family(family, dtype, n=12)
        i, codes = leech_quantize(z, backend="torch")
        assert torch.equal(i, _reference(z))
        assert codes.dtype == dtype and torch.equal(codes, leech_codes(i, dtype))
        rows.append(z.double())
        index.append(i)
    z64, index = torch.cat(rows), torch.cat(index)
    # Tie-aware against float64 scores; rows 0..23 are the float32 and float64 inputs.
    rate = check_nearest(z64[:24], ints, index[:24], metric="dot")
    check_nearest(z64[24:], ints, index[24:], metric="dot")
    if family in EXACT:
        # Exact scores: brute force's first maximum is the lowest tied index, the decoder's rule.
        assert torch.equal(index, fastvq.nearest_code(z64, ints, metric="dot"))
    elif family in CONTINUOUS:
        assert rate == 1.0  # ties and near ties (float32 rounding) have probability ~0 here


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", KERNEL_CASES)
def test_kernels_equal_decoder(case, dtype, poison):
    device, backend = case
    # 9 x 7 = 63 rows: one program of the Triton interpreter.
    z = torch.cat([_family(f, dtype, n=7 if device == "cpu" else 1024) for f in FAMILIES])
    index, codes = leech_quantize(z.to(device), backend=backend)
    assert index.device.type == device and index.dtype == torch.int64
    assert torch.equal(index.cpu(), _reference(z))
    assert torch.equal(codes.cpu(), leech_codes(index.cpu(), dtype))


@pytest.mark.parametrize("case", KERNEL_CASES)
def test_kernels_equal_decoder_on_ties(case):
    """Rows of -1, 0, 1 and of +-1, where many codewords of each shape tie (shape 3, the
    (+-3, +-1^23) words, wins 453 of these rows): the lowest index, as the decoder."""
    device, backend = case
    g = _gen(9)
    z = torch.cat([
        torch.randint(-1, 2, (256, 24), generator=g).float(),
        torch.randint(0, 2, (256, 24), generator=g).float() * 2 - 1,
        torch.ones(2, 24),
        -torch.ones(2, 24),
    ])  # fmt: skip
    assert torch.equal(leech_quantize(z.to(device), backend=backend)[0].cpu(), _reference(z))


@pytest.mark.skipif(not triton_interpreting(), reason="checks the GPU tiles in the interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_triton_gpu_row_tiles(dtype, monkeypatch, poison):
    """The GPU's rows per program (the interpreter's own are 64) on 45 rows, which neither divides:
    every program, the last one's masked rows included, matches the decoder."""
    import fastvq.kernels.leech as kernel

    block = kernel.BLOCK_M_F64 if dtype == torch.float64 else kernel.BLOCK_M
    monkeypatch.setattr(kernel, "INTERPRETER_BLOCK_M", block)
    z = torch.cat([_family(f, dtype, n=5) for f in FAMILIES])
    assert torch.equal(leech_quantize(z, backend="triton")[0], _reference(z))


def _many_rows(dtype):
    """More rows than the interpreter can afford, ternary rows among them (ties everywhere); 3,319
    rows, so the C++ kernel's last tile of rows is partial."""
    ternary = torch.randint(-1, 2, (1024, 24), generator=_gen(8)).to(dtype)
    return torch.cat([_family(f, dtype, n=255, seed=1) for f in FAMILIES] + [ternary])


@pytest.mark.skipif(not fastvq.backends()["cpu"].available, reason="fastvq._C is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_cpu_kernel_equals_decoder_many_rows(dtype):
    """Rows share SIMD tiles in the C++ kernel, tiles cut where a thread's rows start: one thread
    and several tile the rows differently and must return the same indices."""
    z = _many_rows(dtype)
    one = on_one_thread(lambda: leech_quantize(z, backend="cpu")[0])
    assert torch.equal(one, _reference(z))
    assert torch.equal(leech_quantize(z, backend="cpu")[0], one)


# The C++ kernel's tiles are compiled twice, for SSE2 and for AVX2, and picked at run time
# (csrc/cpu/isa.h); FASTVQ_CPU_BASELINE=1 forces SSE2. Both builds must return the torch path's
# bits.
_ISA_SCRIPT = """
import sys, torch
from fastvq.lattice import leech_quantize
zs = torch.load(sys.argv[1])
torch.save([leech_quantize(z, backend="cpu")[0] for z in zs], sys.argv[2])
"""


@pytest.mark.skipif(not fastvq.backends()["cpu"].available, reason="fastvq._C is not built")
def test_cpu_kernel_bit_identical_across_isa_builds(tmp_path):
    """Vacuous on a CPU without AVX2 (both runs take the SSE2 build), exact everywhere else."""
    zs = [_many_rows(dtype) for dtype in DTYPES]
    torch.save(zs, tmp_path / "z.pt")
    runs = run_isa_builds(_ISA_SCRIPT, tmp_path, tmp_path / "z.pt")
    for baseline, run in zip("10", runs, strict=True):
        for z, index in zip(zs, run, strict=True):
            assert torch.equal(index, _reference(z)), (baseline, z.dtype)


_SMALL_STACK_SCRIPT = """
import sys, threading, torch
from fastvq.lattice import leech_quantize
torch.set_num_threads(1)  # the kernel runs on the calling thread
zs = [torch.randn(64, 24, dtype=dtype) for dtype in (torch.float32, torch.float64)]
want = [leech_quantize(z, backend="torch")[0] for z in zs]
threading.stack_size(64 * 1024)
got = []
decode = lambda: got.extend(leech_quantize(z, backend="cpu")[0] for z in zs)
thread = threading.Thread(target=decode)
thread.start()
thread.join()
assert len(got) == 2 and all(torch.equal(a, b) for a, b in zip(got, want)), got
"""


@pytest.mark.skipif(not fastvq.backends()["cpu"].available, reason="fastvq._C is not built")
def test_cpu_kernel_runs_on_a_small_thread_stack():
    # The tile (82 KiB in float32, 164 in float64) lived on the decoding thread's stack: a segfault
    # under musl's 128 KiB default, Python's threading.stack_size or a small OMP_STACKSIZE.
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _SMALL_STACK_SCRIPT], capture_output=True)
    assert done.returncode == 0, (done.returncode, done.stderr.decode()[-2000:])


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # NaN rows in the interpreter
@pytest.mark.parametrize("case", CASES)
def test_shapes_strides_and_special_rows(case, poison):
    device, backend = case
    base = torch.randn(3, 24, 5, generator=_gen(1)).to(device)
    z = base.transpose(1, 2)  # (3, 5, 24), not contiguous
    index, codes = leech_quantize(z, backend=backend)
    assert index.shape == (3, 5) and codes.shape == (3, 5, 24) and codes.dtype == z.dtype
    assert torch.equal(index.cpu(), _reference(z))
    assert torch.equal(leech_quantize(z[1, 2], backend=backend)[0].cpu(), index[1, 2].cpu())
    empty_index, empty_codes = leech_quantize(torch.zeros(2, 0, 24, device=device), backend=backend)
    assert empty_index.shape == (2, 0) and empty_codes.shape == (2, 0, 24)
    # Zero rows tie every code: index 0. NaN / Inf anywhere in a row: index 0. Other rows keep
    # their index. The direction is quantized: positive scales change nothing.
    special = torch.randn(6, 24, generator=_gen(2))
    special[1] = 0.0
    special[2, 3] = float("nan")
    special[3, 23] = float("inf")
    special[4, 0] = -float("inf")
    index, codes = leech_quantize(special.to(device), backend=backend)
    assert index[1:5].tolist() == [0, 0, 0, 0]
    assert torch.equal(index.cpu(), _reference(special))
    assert torch.isfinite(codes).all()
    scaled = leech_quantize(special[[0, 5]].to(device) * 2.0**80, backend=backend)[0]
    assert torch.equal(scaled, index[[0, 5]])


@pytest.mark.parametrize(
    "dtype, big", [(torch.float32, 2.0**126), (torch.float64, 2.0**1022)], ids=["f32", "f64"]
)
@pytest.mark.parametrize("case", CASES)
def test_huge_rows_with_zero_coordinates(ints, case, dtype, big):
    """The overflow rescaling goes by a row's largest |z|: rows of +-2^126 (2^1022 in float64),
    whose unscaled scores overflow, with some zero coordinates decode as their signs do."""
    device, backend = case
    g = _gen(20)
    signs = torch.randint(0, 2, (32, 24), generator=g) * 2 - 1
    zeros = torch.rand(32, 24, generator=g).argsort(-1) < torch.randint(1, 4, (32, 1), generator=g)
    small = (signs * ~zeros).double()  # exact scores against the integer codes
    want = (small @ ints.T).argmax(-1)
    assert (want >= 1104).all()  # the overflow would tie every shape and pick shape 1
    index = leech_quantize((small * big).to(dtype).to(device), backend=backend)[0]
    assert torch.equal(index.cpu(), want)


@pytest.mark.parametrize("case", CASES)
def test_straight_through_gradient(case):
    device, backend = case
    z = torch.randn(4, 7, 24, generator=_gen(3)).to(device).requires_grad_()
    index, codes = leech_quantize(z, backend=backend)
    assert codes.requires_grad and not index.requires_grad
    assert torch.equal(codes.detach(), leech_codes(index, z.dtype))
    grad = torch.randn(4, 7, 24, generator=_gen(4)).to(device)
    codes.backward(grad)
    assert torch.equal(z.grad, grad)
    assert not leech_quantize(z.detach(), backend=backend)[1].requires_grad


def test_bad_inputs():
    z = torch.randn(5, 24)
    for bad, error in [
        (torch.zeros(5, 23), ValueError),
        (torch.zeros(5, 25), ValueError),
        (torch.tensor(1.0), ValueError),
        (torch.zeros(5, 24, dtype=torch.int32), TypeError),
        (torch.zeros(5, 24, dtype=torch.complex64), TypeError),
        ([0.0] * 24, TypeError),
    ]:
        with pytest.raises(error, match="z"):
            leech_quantize(bad)
    with pytest.raises(ValueError, match="backend"):
        leech_quantize(z, backend="gpu")
    if not CUDA:
        with pytest.raises(ValueError, match="backend 'cuda'"):
            leech_quantize(z, backend="cuda")
    with pytest.raises(TypeError):
        leech_quantize(z, "cpu")  # backend is keyword-only


@pytest.mark.skipif(not fastvq.backends()["triton"].available, reason="Triton unavailable")
@pytest.mark.parametrize("op", ["leech_decode_triton"])
def test_triton_op_refuses_what_its_kernel_cannot_read(op):
    # The kernel reads contiguous (N, 24) rows by raw pointer, and torch.ops.fastvq.* reaches it
    # past the public op's checks: short rows overran the heap, strided rows gave wrong answers,
    # integers were read as floats.
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: under TRITON_INTERPRET=1
    kernel = getattr(torch.ops.fastvq, op)
    for bad, match in [
        (torch.randn(4, 12), r"must be a contiguous \(\*, 24\) tensor"),
        (torch.randn(24), r"must be a contiguous \(\*, 24\) tensor"),
        (torch.randn(16, 48)[:, ::2], r"strides \(48, 2\)"),
        (torch.randint(0, 3, (4, 24), dtype=torch.int32), "got torch.int32"),
    ]:
        with pytest.raises(ValueError, match=f"{op}: .* {match}"):
            kernel(bad.to(device))


def test_meta_tensors():
    index, codes = leech_quantize(torch.empty(3, 5, 24, device="meta", dtype=torch.float16))
    assert index.shape == (3, 5) and index.dtype == torch.int64 and index.device.type == "meta"
    assert codes.shape == (3, 5, 24) and codes.dtype == torch.float16


@pytest.mark.gpu
def test_cuda_tensor_on_cpu_backend_is_refused():
    with pytest.raises(ValueError, match="backend 'cpu'"):
        leech_quantize(torch.randn(3, 24, device="cuda"), backend="cpu")


def test_opcheck():
    z = torch.randn(7, 24, generator=_gen(5))
    ops = [torch.ops.fastvq.leech_decode_torch]
    if fastvq.backends()["cpu"].available:
        ops.append(torch.ops.fastvq.leech_decode)
        with pytest.raises(ValueError, match="24"):
            torch.ops.fastvq.leech_decode(torch.randn(3, 23))
        with pytest.raises(ValueError, match="contiguous"):
            torch.ops.fastvq.leech_decode(torch.randn(24, 3).T)
    for op in ops:
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            torch.library.opcheck(op, (z.to(dtype),))
        torch.library.opcheck(op, (z[:0],))
    index = torch.randint(0, LEECH_SIZE, (3, 5), generator=_gen(6))
    torch.library.opcheck(torch.ops.fastvq.leech_unit_codes, (index, torch.float16))


def test_compiles_without_graph_breaks():
    z = torch.randn(37, 24, generator=_gen(6)).requires_grad_()

    def step(z):
        index, codes = leech_quantize(z)
        return index, (codes * z).sum()

    eager = step(z)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(z)
    assert torch.equal(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1])


@pytest.mark.gpu
def test_cuda_many_rows():
    """Past 2^20 CTAs of 4 rows the CUDA kernel loops over rows; Triton's grid is larger."""
    n = (1 << 22) + 37
    z = torch.randn(n, 24, device="cuda")
    sample = torch.cat((torch.randint(0, n, (2000,)), torch.arange(n - 100, n)))
    want = _reference(z[sample.cuda()])
    for backend in ("cuda", "triton"):
        if fastvq.backends()[backend].available:
            index = leech_quantize(z, backend=backend)[0]
            assert torch.equal(index[sample.cuda()].cpu(), want)


def test_stale_build_without_the_kernel(monkeypatch):
    """An extension built before fastvq::leech_decode: "auto" falls back, "cpu" says why."""
    import fastvq.lattice.leech as leech

    monkeypatch.setitem(leech._HAS_KERNEL, "cpu", False)
    z = torch.randn(5, 24, generator=_gen(7))
    assert torch.equal(leech_quantize(z)[0], _reference(z))
    if fastvq.backends()["cpu"].available:
        with pytest.raises(ValueError, match="rebuild"):
            leech_quantize(z, backend="cpu")
