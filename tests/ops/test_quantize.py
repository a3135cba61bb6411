"""fastvq.quantize: search + gather + gradient estimators (STE, rotation trick, Householder).

Oracles: fastvq.reference.quantize (explicit D x D matrices, autograd) in float64, run with the
op's own indices so that near-ties in the search cannot make a gradient test flaky; the indices
themselves are checked tie-aware with fastvq.testing.check_nearest. Floating parity:
max|out - ref64| <= 2 max|ref_in_dtype - ref64| + atol[dtype] * max(1, max|ref64|).
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastvq
from fastvq.ops.quantize import quantize
from fastvq.reference import METRICS
from fastvq.reference.quantize import GRADS, estimator_matrix
from fastvq.reference.quantize import quantize as quantize_ref
from fastvq.testing import backend_cases, check_nearest, cpp_op_error

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ATOL = {torch.float32: 2.0**-20, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _cases():
    return [
        pytest.param(c, id=f"{c[0]}-{c[1]}", marks=[pytest.mark.gpu] * (c[0] == "cuda"))
        for c in backend_cases()
    ]


CASES = _cases()
# (N, K, D): N = 1, 97, 1025; K off every tile; D = 1, 3, 24, 33, 256.
SHAPES = [(1, 1, 1), (97, 13, 3), (97, 300, 24), (1025, 257, 33), (33, 70, 256)]
# The interpreter runs Triton programs one at a time in numpy: fewer, smaller shapes.
INTERPRETER_SHAPES = [(1, 1, 1), (97, 13, 3), (130, 129, 33), (5, 70, 256)]


def _shapes(backend):
    return INTERPRETER_SHAPES if backend == "triton" and INTERPRET else SHAPES


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These tests run many small ops; with the 2 cores shared (load ~3), two intra-op threads
    # made a parity test 13x slower than one (1.8 s vs 0.14 s). Threaded kernels are covered by
    # tests/ops/test_nearest_code.py and by the memory test's subprocess, which keeps both.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _inputs(n, k, d, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g).to(dtype).to(device)
    codebook = torch.randn(k, d, generator=g).to(dtype).to(device)
    upstream = torch.randn(n, d, generator=g).to(dtype).to(device)
    return z.requires_grad_(), codebook.requires_grad_(), upstream


def _run(case, z, codebook, **kwargs):
    return quantize(z, codebook, backend=case[1], **kwargs)


def _grads(out, inputs, upstream, retain_graph=False):
    return torch.autograd.grad(out, inputs, upstream, retain_graph=retain_graph)


def _assert_parity(out, ref_dtype, ref64, dtype, what):
    assert out.shape == ref64.shape, (what, out.shape, ref64.shape)
    assert out.dtype == dtype, (what, out.dtype)
    if ref64.numel() == 0:
        return
    assert bool(out.isfinite().all()), f"{what}: non-finite values"
    err = (out.double().cpu() - ref64).abs().max().item()
    ref_err = (ref_dtype.double().cpu() - ref64).abs().max().item()
    bound = 2 * ref_err + ATOL[dtype] * max(1.0, ref64.abs().max().item())
    assert err <= bound, (
        f"{what}: max error {err:.3g} > {bound:.3g} (reference in dtype {ref_err:.3g})"
    )


def _reference_grads(z, codebook, idx, upstream, grad, dtype):
    """(z_q, dz, dc) of the reference in `dtype` on the CPU, with the op's indices."""
    zr = z.detach().cpu().to(dtype).requires_grad_()
    cr = codebook.detach().cpu().to(dtype).requires_grad_()
    z_q, _ = quantize_ref(zr, cr, idx.cpu(), grad=grad)
    return (z_q.detach(), *_grads(z_q, (zr, cr), upstream.cpu().to(dtype)))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("grad", GRADS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_with_reference(case, grad, dtype, poison):
    device, backend = case
    for seed, (n, k, d) in enumerate(_shapes(backend)):
        z, codebook, upstream = _inputs(n, k, d, dtype, device, seed)
        z_q, idx = _run(case, z, codebook, grad=grad)
        agree = check_nearest(z, codebook, idx)
        assert agree >= 0.97, (n, k, d, agree)
        # The value is the code itself, bit for bit, whatever the estimator.
        assert torch.equal(z_q, codebook.detach()[idx]), (n, k, d)
        dz, dc = _grads(z_q, (z, codebook), upstream)
        ref64 = _reference_grads(z, codebook, idx, upstream, grad, torch.float64)
        ref_dt = _reference_grads(z, codebook, idx, upstream, grad, dtype)
        _assert_parity(dz, ref_dt[1], ref64[1], dtype, f"dz {grad} {(n, k, d)}")
        _assert_parity(dc, ref_dt[2], ref64[2], dtype, f"dcodebook {grad} {(n, k, d)}")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("metric", METRICS)
def test_metrics(case, metric, poison):
    device, backend = case
    z, codebook, upstream = _inputs(61, 45, 24, torch.float32, device, 11)
    for grad in GRADS:
        z_q, idx = _run(case, z, codebook, metric=metric, grad=grad)
        assert check_nearest(z, codebook, idx, metric) >= 0.97
        assert torch.equal(idx, fastvq.nearest_code(z, codebook, metric=metric, backend="torch"))
        assert torch.equal(z_q, codebook.detach()[idx])
        dz, dc = _grads(z_q, (z, codebook), upstream)
        ref64 = _reference_grads(z, codebook, idx, upstream, grad, torch.float64)
        ref32 = _reference_grads(z, codebook, idx, upstream, grad, torch.float32)
        _assert_parity(dz, ref32[1], ref64[1], torch.float32, f"dz {metric} {grad}")
        _assert_parity(dc, ref32[2], ref64[2], torch.float32, f"dc {metric} {grad}")


def test_reference_search_follows_the_metric():
    # The reference's own search (indices=None, as in its gradcheck) under each metric.
    z, codebook, _ = _inputs(61, 45, 24, torch.float64, "cpu", 12)
    found = []
    for metric in METRICS:
        _, idx = quantize_ref(z, codebook, metric=metric)
        assert torch.equal(idx, fastvq.nearest_code(z, codebook, metric=metric, backend="torch"))
        found.append(idx)
    assert not torch.equal(found[0], found[1]) and not torch.equal(found[1], found[2])


def _degenerate_inputs(device, dtype):
    """One code c (K = 1, so every row picks it) and rows z = 0, -c, -2c, c, 2c, 0.5c, random;
    and a zero code. Scalings by powers of two keep z^ == +-q^ exact in floating point."""
    g = torch.Generator().manual_seed(7)
    c = torch.randn(1, 6, generator=g)
    rows = torch.cat(
        [torch.zeros(1, 6), -c, -2 * c, c, 2 * c, 0.5 * c, torch.randn(2, 6, generator=g)]
    )
    upstream = torch.randn(8, 6, generator=g)
    cast = lambda t: t.to(dtype).to(device)  # noqa: E731
    return cast(rows), cast(c), cast(torch.zeros(1, 6)), cast(upstream)


# The interpreter's numpy reports the intended float32 overflow of s.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize(
    "case, dtype",
    [pytest.param(c.values[0], torch.float32, id=f"{c.id}-float32", marks=c.marks) for c in CASES]
    + [pytest.param(("cpu", "torch"), torch.float64, id="cpu-torch-float64")],
)
@pytest.mark.parametrize("grad", GRADS)
def test_degenerate_rows(case, grad, dtype):
    device, backend = case
    rows, code, zero_code, g = _degenerate_inputs(device, dtype)
    z = rows.clone().requires_grad_()
    c = code.clone().requires_grad_()
    z_q, idx = _run(case, z, c, grad=grad)
    dz, dc = _grads(z_q, (z, c), g)
    assert bool(dz.isfinite().all()) and bool(dc.isfinite().all())
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    # Documented fallbacks: z = 0 -> STE; rotation z^ = -q^ -> STE; householder z^ = q^ -> s g.
    torch.testing.assert_close(dz[0], g[0], rtol=0, atol=0)
    if grad in ("ste", "rotation"):
        torch.testing.assert_close(dz[1:3], g[1:3], rtol=0, atol=0)
    if grad == "householder":
        torch.testing.assert_close(dz[3], g[3], rtol=0, atol=0)
        torch.testing.assert_close(dz[4], 0.5 * g[4], rtol=0, atol=0)
        torch.testing.assert_close(dz[5], 2 * g[5], rtol=0, atol=0)
    if grad == "rotation":  # z^ = q^: R = I exactly in exact arithmetic
        torch.testing.assert_close(
            dz[3:6], torch.tensor([1, 0.5, 2], dtype=dtype)[:, None].to(device) * g[3:6], **tol
        )
    torch.testing.assert_close(dc, g.sum(0, keepdim=True), **tol)
    # The reference implements the same fallbacks: the whole gradient matches it.
    ref = _reference_grads(z, c, idx, g, grad, torch.float64)
    torch.testing.assert_close(dz.double().cpu(), ref[1], **tol)
    # q = 0: every row falls back to STE, whatever z (z = 0 included).
    z = rows.clone().requires_grad_()
    z_q, idx = _run(case, z, zero_code, grad=grad)
    assert bool((z_q == 0).all())
    (dz,) = _grads(z_q, (z,), g)
    torch.testing.assert_close(dz, g, rtol=0, atol=0)
    if dtype == torch.float32:
        # s = |q|/|z| = 5e38 overflows float32 (|z| = 2.4e-20 stays > 0, or flushes to 0 on
        # hardware without subnormals): STE either way.
        z = torch.full((1, 6), 1e-20, device=device, requires_grad=True)
        big = torch.full((1, 6), 5e18, device=device)
        (dz,) = _grads(_run(case, z, big, grad=grad)[0], (z,), g[:1])
        torch.testing.assert_close(dz, g[:1], rtol=0, atol=0)
        # |z|^2 and |q|^2 overflow float32 (|z| = 1.7e20): STE, where the same geometry at unit
        # scale rotates (the documented limit of summing squares in float32).
        z = torch.tensor([[0.9, -0.4, 1.3, 0.2, 0.1, 0.3]], device=device)
        code = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0, 0.0]], device=device)
        for scale, moved in ((1.0, grad != "ste"), (1e20, False)):
            x = (scale * z).requires_grad_()
            (dz,) = _grads(_run(case, x, scale * code, grad=grad)[0], (x,), g[:1])
            assert bool(dz.isfinite().all()) and (not torch.equal(dz, g[:1])) == moved
        # ... also where q . g overflows (the torch body's rotation term was inf * 0 = NaN)
        x = torch.full((1, 6), 3e38, device=device, requires_grad=True)
        ones = torch.ones_like(x)
        (dz,) = _grads(_run(case, x, torch.full_like(x, 2e38), grad=grad)[0], (x,), ones)
        torch.testing.assert_close(dz, ones, rtol=0, atol=0)


@pytest.mark.parametrize(
    "case, dtype",
    [pytest.param(c.values[0], torch.float32, id=f"{c.id}-float32", marks=c.marks) for c in CASES]
    + [pytest.param(("cpu", "torch"), torch.float64, id="cpu-torch-float64")],
)
@pytest.mark.parametrize("grad", ["rotation", "householder"])
def test_nearly_degenerate_rows_fall_back(case, grad, dtype):
    # z^ -+ q^ nonzero but with a squared norm below the smallest normal (2 / |e|^2 would overflow,
    # and a GPU flushes it to 0): the row takes its degenerate fallback, g for rotation (STE) and
    # s g for householder (H = I), as the reference does; rows of a normal |e|^2 keep the formula.
    device, backend = case
    t = torch.finfo(dtype).tiny ** 0.5 / 4  # |e| = 2t / 3: |e|^2 about tiny / 36
    sign = 1.0 if grad == "householder" else -1.0
    z = torch.tensor([[1.0, t], [1.0, 1e3 * t]], dtype=dtype, device=device, requires_grad=True)
    code = torch.tensor([[sign, sign * t / 3]], dtype=dtype, device=device)
    g = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=dtype, device=device)
    z_q, idx = _run(case, z, code, grad=grad)
    (dz,) = _grads(z_q, (z,), g)
    torch.testing.assert_close(dz[0], g[0], rtol=0, atol=0)
    ref = _reference_grads(z, code, idx, g, grad, dtype)
    torch.testing.assert_close(dz.to(ref[1].dtype).cpu(), ref[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(dz[1], g[1]), "a row of normal |e|^2 keeps its reflection"


def test_reference_in_float16_keeps_float32s_degeneracy_bound():
    # The reference in float16 takes z^ -+ q^ as 0 only below float32's smallest normal, as the
    # kernels do; float16's own bound (|e| < 2^-7) would turn these rows, |e| = 2^-8, into plain
    # STE / H = I. Same matrices as the float32 reference, to float16 rounding.
    z, q = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 2.0**-8]])
    for grad, zz in [("householder", z), ("rotation", -z)]:
        m32 = estimator_matrix(zz, q, grad)
        m16 = estimator_matrix(zz.half(), q.half(), grad)
        torch.testing.assert_close(m16.float(), m32, rtol=0, atol=2.0**-6)
        assert m32[0, 1, 1].item() == -1.0, grad  # a reflection, not the identity


@pytest.mark.parametrize("grad", ["rotation", "householder"])
def test_estimators_rotate_onto_the_code(grad):
    # Properties of the estimators that do not go through the reference: R and H are orthogonal
    # and map z^ to q^, so s M^T q^ = s z^ and |dL/dz| = s |g|.
    z, codebook, upstream = _inputs(200, 30, 16, torch.float64, "cpu", 21)
    z_q, idx = quantize(z, codebook, grad=grad, backend="torch")
    q = codebook.detach()[idx]
    s = (q.norm(dim=1) / z.detach().norm(dim=1))[:, None]
    (dz,) = _grads(z_q, (z,), q / q.norm(dim=1, keepdim=True), retain_graph=True)
    torch.testing.assert_close(dz, s * z.detach() / z.detach().norm(dim=1, keepdim=True))
    (dz,) = _grads(z_q, (z,), upstream)
    torch.testing.assert_close(dz.norm(dim=1), s[:, 0] * upstream.norm(dim=1))
    # ... and they are not the identity: the STE gradient differs.
    (dz_ste,) = _grads(quantize(z, codebook, grad="ste", backend="torch")[0], (z,), upstream)
    assert (dz - dz_ste).abs().max() > 0.1


def _surrogate(fn, z0, c0, grad):
    """gradcheck target: value f(z, C) = M0 z + C[idx0] with the estimator frozen at (z0, C0),
    gradient fn's backward. f's true Jacobian at z0 is what the estimator claims, so gradcheck
    compares fn's closed-form backward with finite differences of f."""
    idx0 = fn(z0, c0)[1]
    m0 = estimator_matrix(z0, c0[idx0], grad)

    def wrapped(z, c):
        out = fn(z, c)[0]
        frozen = (m0 @ z[:, :, None]).squeeze(-1) + c[idx0]
        return out - out.detach() + frozen.detach()

    return wrapped


@pytest.mark.parametrize("grad", GRADS)
@pytest.mark.parametrize("which", ["reference", "op"])
def test_gradcheck_float64(grad, which):
    z, codebook, _ = _inputs(7, 5, 4, torch.float64, "cpu", 31)
    if which == "reference":
        fn = lambda z, c: quantize_ref(z, c, grad=grad)  # noqa: E731
    else:
        fn = lambda z, c: quantize(z, c, grad=grad, backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(_surrogate(fn, z, codebook, grad), (z, codebook))


@pytest.mark.parametrize("case", CASES)
def test_leading_dims_empty_and_promotion(case, poison):
    device, backend = case
    z, codebook, upstream = _inputs(30, 37, 24, torch.float32, device, 41)
    for grad in GRADS:
        flat_q, flat_idx = _run(case, z, codebook, grad=grad)
        flat_dz, flat_dc = _grads(flat_q, (z, codebook), upstream)
        z5 = z.detach().reshape(2, 3, 5, 24).requires_grad_()
        z_q, idx = _run(case, z5, codebook, grad=grad)
        assert z_q.shape == (2, 3, 5, 24) and idx.shape == (2, 3, 5)
        assert torch.equal(idx.reshape(-1), flat_idx)
        dz, dc = _grads(z_q, (z5, codebook), upstream.view(2, 3, 5, 24))
        torch.testing.assert_close(dz.reshape(30, 24), flat_dz, rtol=0, atol=0)
        torch.testing.assert_close(dc, flat_dc, rtol=1e-6, atol=1e-6)
        # N = 0.
        z0 = z5[:, :0].detach().requires_grad_()
        z_q, idx = _run(case, z0, codebook, grad=grad)
        assert z_q.shape == (2, 0, 5, 24) and idx.shape == (2, 0, 5)
        dz, dc = _grads(z_q, (z0, codebook), torch.ones_like(z_q))
        assert dz.shape == z0.shape and bool((dc == 0).all())
    # bf16 z with a float32 codebook: quantized in float32, z's gradient returns in bf16.
    zb = z.detach().bfloat16().requires_grad_()
    z_q, idx = quantize(zb, codebook, grad="rotation", backend=backend)
    assert z_q.dtype == torch.float32 and torch.equal(z_q, codebook.detach()[idx])
    dz, dc = _grads(z_q, (zb, codebook), upstream)
    assert dz.dtype == torch.bfloat16 and dc.dtype == torch.float32


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("grad", GRADS)
def test_codebook_gradient_semantics(case, grad):
    device, _ = case
    z, codebook, upstream = _inputs(50, 20, 8, torch.float32, device, 51)
    z_q, idx = _run(case, z, codebook, grad=grad)
    (dc,) = _grads(z_q, (codebook,), upstream)
    expected = torch.zeros(20, 8, dtype=torch.float64, device=device)
    expected.index_add_(0, idx, upstream.double())
    torch.testing.assert_close(dc.double(), expected, rtol=1e-6, atol=1e-6)
    unused = torch.ones(20, dtype=torch.bool, device=device)
    unused[idx] = False
    assert bool(unused.any()) and bool((dc[unused] == 0).all())
    # A codebook without requires_grad (vector-quantize-pytorch's behaviour) gets nothing and z
    # gets the same gradient as before; a z without requires_grad still lets the codebook learn.
    dz_ref = _grads(_run(case, z, codebook, grad=grad)[0], (z,), upstream)[0]
    z_q, _ = _run(case, z, codebook.detach(), grad=grad)
    torch.testing.assert_close(_grads(z_q, (z,), upstream)[0], dz_ref, rtol=0, atol=0)
    z_q, _ = _run(case, z.detach(), codebook, grad=grad)
    torch.testing.assert_close(_grads(z_q, (codebook,), upstream)[0], dc, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("grad", GRADS)
def test_double_backward(case, grad):
    """A second derivative through STE's dL/dz and every estimator's dL/dC is autograd's through
    the reference (the loss |z_q|^2 makes both depend on the codebook); one through rotation's or
    householder's dL/dz is a clear error, never a silent 0."""
    device, _ = case
    z, codebook, _ = _inputs(50, 20, 8, torch.float32, device, 52)
    inputs = (z, codebook) if grad == "ste" else (codebook,)
    second = []
    for run in (
        lambda: _run(case, z, codebook, grad=grad),
        lambda: quantize_ref(z, codebook, grad=grad),
    ):
        first = torch.autograd.grad(run()[0].square().sum(), inputs, create_graph=True)
        second.append(torch.autograd.grad(sum(g.square().sum() for g in first), inputs))
    for got, want in zip(*second, strict=True):
        assert bool(want.abs().sum() > 0)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # z_q: code vs R z
    if grad != "ste":
        (dz,) = torch.autograd.grad(
            _run(case, z, codebook, grad=grad)[0].sum(), z, create_graph=True
        )
        with pytest.raises(NotImplementedError, match="no double backward through the rotation"):
            torch.autograd.grad(dz.sum(), codebook)


@pytest.mark.parametrize("case", [c for c in CASES if c.values[0][1] in ("triton", "cuda")])
def test_codebook_gradient_under_deterministic_algorithms(
    case, monkeypatch, deterministic_algorithms
):
    # The kernels' atomics round differently run to run: under torch.use_deterministic_algorithms,
    # dL/dC comes from index_add_ (deterministic on CUDA there), equal bit for bit to the torch
    # backend's, while dL/dz still comes from the kernel.
    from fastvq.ops import quantize as ops_quantize

    device, backend = case
    z, codebook, upstream = _inputs(300, 7, 33, torch.float32, device, 52)  # hot codes
    asked = []  # (use_triton, need_codebook) of each backward through the Python op
    kernel = ops_quantize._quantize_bwd
    monkeypatch.setattr(
        ops_quantize, "_quantize_bwd", lambda *args: asked.append(args[8:6:-1]) or kernel(*args)
    )
    want = _grads(_run((device, "torch"), z, codebook, grad="rotation")[0], (z, codebook), upstream)
    got = _grads(_run(case, z, codebook, grad="rotation")[0], (z, codebook), upstream)
    # the torch backend's backward, then the Triton kernel's, asked for dz only
    assert asked == [(False, True)] + [(True, False)] * (backend == "triton")
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(grad="straight-through"), ValueError, "grad must be one of"),
        (dict(grad=None), ValueError, "grad must be one of"),
        (dict(z=torch.randn(4, 8).int()), TypeError, "z must be float32"),
        (dict(codebook=torch.randint(0, 3, (5, 8))), TypeError, "codebook must be float32"),
        (dict(z="z"), TypeError, "z must be a torch.Tensor"),
        (dict(codebook=torch.randn(5, 8, 1)), ValueError, r"codebook must have shape \(K, D\)"),
        (dict(codebook=torch.randn(8)), ValueError, r"codebook must have shape \(K, D\)"),
        (dict(z=torch.randn(4, 7)), ValueError, "z's last dimension"),
        (dict(z=torch.tensor(1.0)), ValueError, "0-d"),
        (dict(metric="hamming"), ValueError, "metric must be one of"),
        (dict(precision="tf32"), ValueError, "precision must be one of"),
        (dict(backend="numpy"), ValueError, "backend must be one of"),
        (dict(backend="cpu", z=torch.randn(4, 8).double()), ValueError, "float64 inputs run"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = dict(z=torch.randn(4, 8), codebook=torch.randn(5, 8)) | kwargs
    with pytest.raises(error, match=match):
        quantize(args.pop("z"), args.pop("codebook"), **args)


def test_non_finite_input_is_a_clear_error():
    z, codebook = torch.randn(4, 8), torch.randn(5, 8)
    z[1, 2] = float("inf")
    with pytest.raises(ValueError, match="z contains NaN or Inf"):
        quantize(z, codebook, grad="rotation")


def _op_cases():
    cases = [False]
    if fastvq.backends()["triton"].available:
        cases.append(True)
    return cases


@pytest.mark.parametrize("use_triton", _op_cases(), ids=lambda t: "triton" if t else "torch")
@pytest.mark.parametrize("grad", GRADS)
def test_opcheck(use_triton, grad):
    device = "cuda" if CUDA else "cpu"
    z, codebook, upstream = _inputs(9, 4, 5, torch.float32, device, 61)
    idx = torch.tensor([0, 3, 3, 1, 0, 2, 3, 3, 1], device=device)
    fwd, bwd = torch.ops.fastvq.quantize_fwd.default, torch.ops.fastvq.quantize_bwd.default
    torch.library.opcheck(fwd, (z, codebook, idx, grad, use_triton))
    torch.library.opcheck(fwd, (z.detach().half(), codebook.detach().half(), idx, grad, use_triton))
    _, stats = fwd(z, codebook, idx, grad, use_triton)
    need_z = grad != "ste"
    args = (upstream, z.detach(), codebook.detach(), idx, stats.detach(), grad)
    torch.library.opcheck(bwd, (*args, need_z, True, use_triton))
    torch.library.opcheck(bwd, (*args, False, True, use_triton))
    # bfloat16: dL/dC in the codebook's dtype, as the fake says (float32 once; opcheck caught it).
    half = (z.detach().bfloat16(), codebook.detach().bfloat16())
    _, stats16 = fwd(*half, idx, grad, use_triton)
    args16 = (upstream.bfloat16(), *half, idx, stats16, grad)
    torch.library.opcheck(bwd, (*args16, need_z, True, use_triton))
    if not use_triton:  # a strided grad_out gave a strided dz (the Triton launcher refuses it)
        strided = upstream.T.contiguous().T
        torch.library.opcheck(bwd, (strided, *args[1:], need_z, True, use_triton))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("grad", GRADS)
def test_ste_keeps_nothing_of_z_for_backward(case, grad):
    # STE's backward never reads z: saving it kept every batch's z alive until backward.
    z, codebook, _ = _inputs(40, 13, 24, torch.float32, case[0], 72)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        _run(case, z, codebook, grad=grad)
    kept_z = any(t.data_ptr() == z.data_ptr() for t in saved)
    assert saved and kept_z == (grad != "ste")


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("grad", GRADS)
def test_compiles_without_graph_breaks(backend, grad):
    z, codebook, upstream = _inputs(40, 13, 24, torch.float32, "cpu", 71)

    def step(z, codebook):
        z_q, idx = quantize(z, codebook, grad=grad, backend=backend)
        return (z_q * upstream).sum(), idx

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss, idx = compiled(z, codebook)
    got = torch.autograd.grad(loss, (z, codebook))
    loss_e, idx_e = step(z, codebook)
    expected = torch.autograd.grad(loss_e, (z, codebook))
    assert torch.equal(idx, idx_e)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM (Linux)")
def test_memory_does_not_scale_with_n_times_k():
    # K = 2^20, N = 4096: an N x K float32 matrix is 16 GiB (a one-hot in int64 32 GiB). In a fresh
    # process the peak resident memory must stay O(N D + K D): well under 1.5 GiB. The peak is the
    # child's VmHWM, which starts afresh at exec; ru_maxrss would carry over the forking pytest
    # process's size.
    script = textwrap.dedent(
        """
        import re, torch
        from fastvq.ops.quantize import quantize
        from fastvq.testing import check_nearest
        torch.manual_seed(0)
        codebook = torch.randn(1 << 20, 4, requires_grad=True)
        z = torch.randn(4096, 4, requires_grad=True)
        z_q, idx = quantize(z, codebook, grad="rotation")
        z_q.square().sum().backward()
        assert torch.equal(z_q, codebook.detach()[idx])
        check_nearest(z[:8], codebook, idx[:8])
        assert codebook.grad.shape == (1 << 20, 4) and z.grad.shape == (4096, 4)
        assert int((codebook.grad != 0).any(1).sum()) == int(idx.unique().numel())
        print(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    peak_mib = int(out.stdout.split()[-1]) / 1024
    assert peak_mib < 1536, f"peak RSS {peak_mib:.0f} MiB"


# --- the C++ ops called directly (torch.ops.fastvq.quantize_{fwd,bwd}_cpp) ----------------------

_CPP = fastvq.backends()["cpu"].available and hasattr(torch.ops.fastvq, "quantize_fwd_cpp")
CPP_DEVICES = [
    pytest.param(
        device,
        marks=[pytest.mark.gpu] * (device == "cuda")
        + [pytest.mark.skipif(not _CPP, reason="fastvq._C without the C++ quantize ops")],
    )
    for device in ("cpu", "cuda")
]


@pytest.mark.parametrize("device", CPP_DEVICES)
@pytest.mark.parametrize("grad", GRADS)
def test_cpp_opcheck(device, grad):
    fwd, bwd = torch.ops.fastvq.quantize_fwd_cpp.default, torch.ops.fastvq.quantize_bwd_cpp.default
    z, codebook, upstream = _inputs(9, 4, 5, torch.float32, device, 62)
    idx = torch.tensor([0, 3, 3, 1, 0, 2, 3, 3, 1], device=device)
    torch.library.opcheck(fwd, (z, codebook, idx, grad))
    torch.library.opcheck(fwd, (z.detach().bfloat16(), codebook.detach().bfloat16(), idx, grad))
    _, stats = fwd(z, codebook, idx, grad)
    args = (upstream, z.detach(), codebook.detach(), idx, stats.detach(), grad)
    torch.library.opcheck(bwd, (*args, grad != "ste", True))
    torch.library.opcheck(bwd, (*args, False, True))
    torch.library.opcheck(bwd, (*args, False, False))


@pytest.mark.parametrize("device", CPP_DEVICES)
@pytest.mark.parametrize("grad", ["rotation", "householder"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_ops_match_torch_bodies(device, grad, dtype, poison):
    # Every (need_z, need_codebook) combination, against the float64 torch bodies of the Python
    # op; D = 37 leaves a partial lane group on CUDA and a tail of the 8-way sums on the CPU.
    from fastvq.ops.quantize import _bwd_torch, _fwd_torch

    z, codebook, g = (t.detach() for t in _inputs(301, 29, 37, dtype, device, 63))
    # Skewed codes: code 0 takes about half the rows (contended atomics on CUDA).
    gen = torch.Generator().manual_seed(64)
    idx = (torch.randint(0, 29, (301,), generator=gen) * (torch.rand(301, generator=gen) > 0.5)).to(
        device
    )
    z_q, stats = torch.ops.fastvq.quantize_fwd_cpp(z, codebook, idx, grad)
    assert torch.equal(z_q, codebook[idx])
    f64 = [t.double().cpu() for t in (z, codebook, g)]
    _, stats64 = _fwd_torch(f64[0], f64[1], idx.cpu(), grad)
    torch.testing.assert_close(stats.double().cpu(), stats64, rtol=1e-5, atol=1e-6)
    dz64, dc64 = _bwd_torch(f64[2], f64[0], f64[1], idx.cpu(), stats64, grad, True, True)
    dz_d, dc_d = _bwd_torch(g, z, codebook, idx, stats, grad, True, True)
    for need_z, need_c in ((True, True), (True, False), (False, True), (False, False)):
        dz, dc = torch.ops.fastvq.quantize_bwd_cpp(g, z, codebook, idx, stats, grad, need_z, need_c)
        assert dz.shape == (301 if need_z else 0, 37) and dc.shape == (29 if need_c else 0, 37)
        assert dz.dtype == dtype and dc.dtype == dtype
        if need_z:
            _assert_parity(dz, dz_d, dz64, dtype, "dz")
        if need_c:
            _assert_parity(dc, dc_d.to(dtype), dc64, dtype, "dcodebook")


def _raw_call(device, op, triton=False, **changes):
    """The raw pair (fwd or bwd) on valid rotation arguments with `changes`: the C++ ops, or the
    Triton ones (quantize_fwd / quantize_bwd with use_triton=True)."""
    ops = torch.ops.fastvq
    fwd, bwd = (
        (ops.quantize_fwd, ops.quantize_bwd)
        if triton
        else (ops.quantize_fwd_cpp, ops.quantize_bwd_cpp)
    )
    more = (True,) if triton else ()
    z, codebook, g = (t.detach() for t in _inputs(6, 4, 5, torch.float32, device, 65))
    idx = torch.tensor([0, 3, 1, 1, 2, 0], device=device)
    stats = fwd(z, codebook, idx, "rotation", *more)[1]
    args = dict(grad_out=g, z=z, codebook=codebook, indices=idx, stats=stats, grad="rotation")
    args |= dict(need_z=True, need_codebook=True) | changes
    if op == "fwd":
        return fwd(args["z"], args["codebook"], args["indices"], args["grad"], *more)
    return bwd(*args.values(), *more)


_T = torch.randn
BAD_CPP_INPUTS = [
    ("fwd", dict(grad="identity"), "grad must be 'ste', 'rotation' or 'householder'"),
    ("fwd", dict(z=_T(6, 4)), r"z's D \(4\) must equal codebook's D \(5\)"),
    ("fwd", dict(z=_T(6)), r"z must have shape \(N, D\)"),
    ("fwd", dict(codebook=_T(0, 5)), r"at least one code \(K >= 1\)"),
    ("fwd", dict(z=_T(6, 5).double(), codebook=_T(4, 5).double()), "z must be float32, bfloat"),
    ("fwd", dict(z=_T(6, 5).half()), "z and codebook must have the same dtype"),
    ("fwd", dict(z=_T(5, 6).T), "z must be contiguous"),
    ("fwd", dict(codebook=_T(5, 4).T), "codebook must be contiguous"),
    ("fwd", dict(indices=torch.zeros(5, dtype=torch.long)), r"indices must have shape \(6,\)"),
    ("fwd", dict(indices=torch.zeros(6, dtype=torch.int32)), "indices must be Long"),
    ("fwd", dict(indices=torch.zeros(12, dtype=torch.long)[::2]), "indices must be contiguous"),
    ("bwd", dict(grad_out=_T(6, 4)), r"grad_out must have shape \(6, 5\)"),
    ("bwd", dict(grad_out=_T(6, 5).half()), "grad_out and z must have the same dtype"),
    ("bwd", dict(grad_out=_T(5, 6).T), "grad_out must be contiguous"),
    ("bwd", dict(stats=torch.ones(6, 3)), r"stats must have shape \(6, 4\)"),
    ("bwd", dict(stats=torch.ones(6, 4).double()), "stats must be Float"),
    ("bwd", dict(grad="ste"), "need_z is for rotation / householder"),
    ("bwd", dict(codebook=_T(4, 5).bfloat16()), "z and codebook must have the same dtype"),
]


@pytest.mark.parametrize("op, changes, match", BAD_CPP_INPUTS)
def test_cpp_ops_bad_input_is_a_clear_error(op, changes, match):
    if not _CPP:
        pytest.skip("fastvq._C without the C++ quantize ops")
    with pytest.raises(cpp_op_error(match), match=match):
        _raw_call("cpu", op, **changes)


@pytest.mark.parametrize("op", ["fwd", "bwd"])
@pytest.mark.parametrize("bad", [4, -1, 1 << 40])
def test_cpp_ops_out_of_range_indices_raise_on_cpu(op, bad):
    if not _CPP:
        pytest.skip("fastvq._C without the C++ quantize ops")
    idx = torch.tensor([0, 3, 1, bad, 2, 0])
    match = rf"indices must lie in \[0, 4\), got indices\[3\] = {bad}"
    with pytest.raises(ValueError, match=match):
        _raw_call("cpu", op, indices=idx)
    if op == "bwd":  # the row-parallel path (no codebook gradient) checks too
        with pytest.raises(ValueError, match=r"indices must lie in \[0, 4\)"):
            _raw_call("cpu", op, indices=idx, need_codebook=False)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_ops_out_of_range_indices_touch_nothing_outside():
    # The CUDA glue does not sync to check the range: the row gets NaN, the rest is exact.
    z, codebook, g = (t.detach() for t in _inputs(6, 4, 5, torch.float32, "cuda", 66))
    good = torch.tensor([0, 3, 1, 1, 2, 0], device="cuda")
    for bad in (4, -1, 1 << 40):
        idx = good.clone()
        idx[3] = bad
        z_q, stats = torch.ops.fastvq.quantize_fwd_cpp(z, codebook, idx, "rotation")
        keep = torch.arange(6, device="cuda") != 3
        assert bool(z_q[3].isnan().all()) and torch.equal(z_q[keep], codebook[idx[keep]])
        args = (g, z, codebook, idx, stats, "rotation", True, True)
        dz, dc = torch.ops.fastvq.quantize_bwd_cpp(*args)
        torch.cuda.synchronize()
        ref = torch.zeros_like(dc).index_add_(0, idx[keep], g[keep])
        torch.testing.assert_close(dc, ref)
        assert bool(dz[keep].isfinite().all())


_TRITON = fastvq.backends()["triton"].available
_TRITON_DEVICE = "cuda" if CUDA else "cpu"  # CPU tensors run under TRITON_INTERPRET=1


# The Triton launchers behind torch.ops.fastvq.quantize_fwd / quantize_bwd (use_triton=True):
# past fastvq.quantize's checks, a wrong shape or stride read other memory or the wrong elements.
BAD_TRITON_INPUTS = [
    ("fwd", dict(grad="identity"), "grad must be one of"),
    ("fwd", dict(z=_T(6, 4)), r"z must be a contiguous \(\*, 5\) tensor"),
    ("fwd", dict(z=_T(6)), r"z must be a contiguous \(\*, 5\) tensor"),
    ("fwd", dict(codebook=_T(0, 5)), "K >= 1"),
    ("fwd", dict(codebook=_T(4, 1025), z=_T(6, 1025)), "D <= 1024"),
    ("fwd", dict(codebook=_T(4, 0), z=_T(6, 0)), "1 <= D"),
    ("fwd", dict(z=_T(6, 5).double(), codebook=_T(4, 5).double()), "codebook must .* of float32"),
    ("fwd", dict(z=_T(6, 5).half()), "z must .* tensor of float32;"),
    ("fwd", dict(z=_T(5, 6).T), "z must be a contiguous"),
    ("fwd", dict(codebook=_T(5, 4).T), "codebook must be a contiguous"),
    ("fwd", dict(indices=torch.zeros(5, dtype=torch.long)), r"indices must be a contiguous \(6,\)"),
    ("fwd", dict(indices=torch.zeros(6, dtype=torch.int32)), "indices must .* of int64"),
    ("fwd", dict(indices=torch.zeros(12, dtype=torch.long)[::2]), "indices must be a contiguous"),
    ("bwd", dict(grad_out=_T(6, 4)), r"grad_out must be a contiguous \(6, 5\)"),
    ("bwd", dict(grad_out=_T(6, 5).half()), "grad_out must .* of float32"),
    ("bwd", dict(grad_out=_T(5, 6).T), "grad_out must be a contiguous"),
    ("bwd", dict(stats=torch.ones(6, 3)), r"stats must be a contiguous \(6, 4\)"),
    ("bwd", dict(stats=torch.ones(6, 4).double()), "stats must .* of float32"),
    ("bwd", dict(stats=torch.ones(12, 4)[::2]), "stats must be a contiguous"),
    ("bwd", dict(grad="ste"), "need_z is for rotation / householder"),
    ("bwd", dict(codebook=_T(4, 5).bfloat16()), "z must .* tensor of bfloat16"),
]


@pytest.mark.skipif(not _TRITON, reason="Triton unavailable")
@pytest.mark.parametrize("op, changes, match", BAD_TRITON_INPUTS)
def test_triton_ops_bad_input_is_a_clear_error(op, changes, match):
    changes = {k: v.to(_TRITON_DEVICE) if torch.is_tensor(v) else v for k, v in changes.items()}
    with pytest.raises(ValueError, match=match):
        _raw_call(_TRITON_DEVICE, op, triton=True, **changes)


@pytest.mark.skipif(not _TRITON, reason="Triton unavailable")
@pytest.mark.parametrize("grad", ["rotation", "householder"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_triton_gradient_rounds_to_nearest(grad, dtype):
    # dz is formed in float32 and stored in z's dtype rounded to nearest even, as the other
    # backends do: the plain cast truncates bfloat16 in the interpreter (half the elements came
    # out one ulp toward zero). Only float32 sums taken in another order may differ.
    from fastvq.kernels.quantize import quantize_bwd, quantize_fwd

    from fastvq.ops.quantize import _bwd_torch

    z, codebook, g = (t.detach() for t in _inputs(256, 64, 32, dtype, _TRITON_DEVICE, 72))
    idx = torch.randint(0, 64, (256,), generator=torch.Generator().manual_seed(73))
    idx = idx.to(_TRITON_DEVICE)
    stats = quantize_fwd(z, codebook, idx, grad)[1]
    dz = quantize_bwd(g, z, codebook, idx, stats, grad, True, False)[0]
    f32 = (t.float() for t in (g, z, codebook))
    want = _bwd_torch(*f32, idx, stats, grad, True, False)[0]
    assert dz.dtype == dtype
    assert (dz != want.to(dtype)).float().mean() < 0.01


@pytest.mark.skipif(not _TRITON, reason="Triton unavailable")
def test_triton_launchers_refuse_an_operand_on_another_device():
    # A pointer of another device in a launch: an illegal address, or another GPU's memory.
    # (Through torch.ops a meta operand goes to the fake; the launchers are called directly.)
    from fastvq.kernels.quantize import quantize_bwd, quantize_fwd

    z, codebook, g = (t.detach() for t in _inputs(6, 4, 5, torch.float32, _TRITON_DEVICE, 70))
    idx = torch.tensor([0, 3, 1, 1, 2, 0], device=_TRITON_DEVICE)
    stats = quantize_fwd(z, codebook, idx, "rotation")[1]
    on = f"on {z.device}"
    for name, call in [
        ("codebook", lambda m: quantize_fwd(z, m(codebook), idx, "ste")),
        ("indices", lambda m: quantize_fwd(z, codebook, m(idx), "ste")),
        ("grad_out", lambda m: quantize_bwd(m(g), z, codebook, idx, stats, "rotation", 1, 1)),
        ("stats", lambda m: quantize_bwd(g, z, codebook, idx, m(stats), "rotation", 1, 1)),
    ]:
        with pytest.raises(ValueError, match=f"{name} must .* {on}; got .* on meta"):
            call(lambda t: t.to("meta"))


@pytest.mark.skipif(not _TRITON, reason="Triton unavailable")
@pytest.mark.parametrize("grad", GRADS)
def test_triton_ops_out_of_range_indices_touch_nothing_outside(grad):
    # As the CUDA glue, no sync to check the range: such a row gets NaN and no codebook term, and
    # every other row is what in-range indices give.
    z, codebook, g = (t.detach() for t in _inputs(6, 4, 5, torch.float32, _TRITON_DEVICE, 69))
    good = torch.tensor([0, 3, 1, 1, 2, 0], device=_TRITON_DEVICE)
    keep = torch.arange(6, device=_TRITON_DEVICE) != 3
    z_ok, stats_ok = torch.ops.fastvq.quantize_fwd(z, codebook, good, grad, True)
    need_z = grad != "ste"
    dz_ok, _ = torch.ops.fastvq.quantize_bwd(
        g, z, codebook, good, stats_ok, grad, need_z, True, True
    )
    for bad in (4, -1, 1 << 40):
        idx = good.clone()
        idx[3] = bad
        z_q, stats = torch.ops.fastvq.quantize_fwd(z, codebook, idx, grad, True)
        assert bool(z_q[3].isnan().all()) and torch.equal(z_q[keep], z_ok[keep])
        if need_z:
            assert stats[3].tolist() == [1.0, 0.0, 0.0, 0.0]
            assert torch.equal(stats[keep], stats_ok[keep])
        dz, dc = torch.ops.fastvq.quantize_bwd(g, z, codebook, idx, stats, grad, need_z, True, True)
        torch.testing.assert_close(dc, torch.zeros_like(dc).index_add_(0, idx[keep], g[keep]))
        if need_z:
            assert bool(dz[3].isnan().all()) and torch.equal(dz[keep], dz_ok[keep])


def test_partial_build_without_the_cpp_pair_gathers_on_torch(monkeypatch):
    # An extension whose search has kernels on a device but whose quantize pair does not (a
    # partial or stale build) must run the torch gather there, not fail in the dispatcher.
    from fastvq.ops import quantize as module

    z, codebook, upstream = _inputs(40, 13, 6, torch.float32, "cpu", 67)
    expected = quantize(z, codebook, grad="rotation", backend="torch")
    monkeypatch.setitem(module._CPP_ON, "cpu", False)
    monkeypatch.setattr(torch.ops.fastvq, "quantize_fwd_cpp", None, raising=False)
    z_q, idx = quantize(z, codebook, grad="rotation", backend="cpu")
    assert torch.equal(idx, expected[1]) and torch.equal(z_q, expected[0])
    dz, dc = _grads(z_q, (z, codebook), upstream)
    dz_e, dc_e = _grads(expected[0], (z, codebook), upstream)
    torch.testing.assert_close(dz, dz_e, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dc, dc_e, rtol=1e-6, atol=1e-6)


def test_straight_through_checks_its_codes():
    # Codes of another shape failed at backward, integer codes left the output without a
    # gradient, float64 codes for float32 z changed the output's dtype.
    from fastvq.ops.quantize import straight_through

    z = torch.randn(4, 3, requires_grad=True)
    codes = torch.randn(4, 3).round()
    out = straight_through(z, codes)
    assert torch.equal(out, codes)
    out.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))
    for bad in (codes[:2], codes.long(), codes.double(), codes.to("meta")):
        with pytest.raises((ValueError, TypeError), match="codes"):
            straight_through(z, bad)
    with pytest.raises(TypeError, match="codes must be a torch.Tensor"):
        straight_through(z, 1.0)
