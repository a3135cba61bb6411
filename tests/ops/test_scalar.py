"""fastvq.ops.scalar: FSQ, LFQ, BSQ and the factorized binary entropy regularizer.

Oracles: fastvq.reference.scalar (autograd through the detach trick) in float64 on the op's own
input values, and, for the entropies, the explicit sum over all 2^d codes at small d. Rounding
decisions of FSQ are compared tie-aware: where the float64 bounded value lies within float32
rounding of a half-integer, either neighbour is right; everywhere else the level must be exact.
Floating parity: max|out - ref64| <= 2 max|ref_in_dtype - ref64| + atol[dtype] * max(1, max|ref64|).
"""

import math
import os
import subprocess
import sys

import pytest
import torch

import fastvq
import fastvq.ops.scalar as scalar_ops
from fastvq.ops.scalar import (
    binary_entropy_loss,
    bsq,
    bsq_codes,
    fsq,
    fsq_codes,
    lfq,
    lfq_codes,
)
from fastvq.reference import scalar as ref
from fastvq.testing import backend_cases, cpp_op_error, run_isa_builds

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ATOL = {
    torch.float64: 2.0**-40,
    torch.float32: 2.0**-20,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}
CASES = [
    pytest.param(c, id=f"{c[0]}-{c[1]}", marks=[pytest.mark.gpu] * (c[0] == "cuda"))
    for c in backend_cases()
    if c[1] in ("torch", "triton", "cpu")
]
# Every (case, dtype) pair, float64 on the torch backend only (Triton takes 16/32-bit floats).
CASE_DTYPES = [
    pytest.param(c.values[0], dt, id=f"{c.id}-{str(dt)[6:]}", marks=c.marks)
    for c in CASES
    for dt in DTYPES + [torch.float64] * (c.values[0][1] == "torch")
]
FSQ_SHAPES = [
    (1, [3]),
    (600, [8, 5, 5, 5]),  # several programs of 256 rows
    (130, [8, 8, 8, 5, 5, 5]),
    (33, [2, 3, 4, 7, 16, 1000, 1001, 65536]),  # the last two clamp
    (50, [3] * 17),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Many tiny ops on 2 shared cores: one intra-op thread is faster (as in test_quantize.py).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randn(shape, dtype, device, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype).to(device)


def _assert_parity(out, ref_dtype, ref64, dtype, what):
    assert out.shape == ref64.shape, (what, out.shape, ref64.shape)
    assert out.dtype == dtype, (what, out.dtype)
    if ref64.numel() == 0:
        return
    assert bool(out.isfinite().all()), f"{what}: non-finite values"
    err = (out.double().cpu() - ref64).abs().max().item()
    ref_err = (ref_dtype.double().cpu() - ref64).abs().max().item()
    bound = 2 * ref_err + ATOL[dtype] * max(1.0, ref64.abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g} (ref in dtype {ref_err:.3g})"


def _ref_grad(fn, z, upstream, dtype):
    """(value, dL/dz) of the reference fn on z's values in `dtype` on the CPU."""
    zr = z.detach().cpu().to(dtype).requires_grad_()
    out = fn(zr)
    (dz,) = torch.autograd.grad(out, zr, upstream.cpu().to(dtype))
    return out.detach(), dz


def _fsq_levels64(levels):
    half_l = torch.tensor([(v - 1) * (1 + ref.FSQ_EPS) / 2 for v in levels], dtype=torch.float64)
    half_width = torch.tensor([v // 2 for v in levels], dtype=torch.float64)
    top = torch.tensor([v - 1 - v // 2 for v in levels], dtype=torch.float64)
    return half_l, half_width, top


def _check_fsq_levels(z, levels, codes, idx):
    """Tie-aware: the level behind idx is round(b64) except within float32 rounding of a tie."""
    z64 = z.detach().cpu().double()
    b64 = ref.fsq_bound(z64, levels)
    half_l, half_width, top = _fsq_levels64(levels)
    clamp = lambda r: torch.minimum(torch.maximum(r, -half_width), top)  # noqa: E731
    # float32 rounding of z + shift (2^-24 |z|), tanh (the kernel's exp form: <= 16 ulps) and the
    # product with h, all scaled by h.
    slack = 2.0**-22 * half_l * (z64.abs().nan_to_num(posinf=0, neginf=0) + 4)
    tie = ((b64 - b64.floor()) - 0.5).abs() <= slack
    r_op = (ref.fsq_codes(idx.cpu(), levels, torch.float64) * half_width).round()
    exact = r_op == clamp(torch.round(b64))
    either = (r_op == clamp(b64.floor())) | (r_op == clamp(b64.ceil()))
    bad = ~(exact | (tie & either))
    assert not bool(bad.any()), f"{int(bad.sum())} levels wrong, e.g. z={z64[bad][:3].tolist()}"
    assert tie.double().mean().item() < 0.05  # the exact comparison covers nearly everything
    # codes and indices tell the same story, bit for bit in the codes' dtype.
    assert torch.equal(codes.cpu(), ref.fsq_codes(idx.cpu(), levels, codes.dtype))


def _special_rows(d):
    """+inf, -inf, +0, -0 and +-1e4 rows: extreme levels, b(0) = 0, saturated gradients."""
    vals = [float("inf"), float("-inf"), 0.0, -0.0, 1e4, -1e4]
    return torch.tensor(vals, dtype=torch.float64)[:, None].expand(len(vals), d)


# --- FSQ ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case, dtype", CASE_DTYPES)
def test_fsq_parity(case, dtype, poison):
    device, backend = case
    for seed, (n, levels) in enumerate(FSQ_SHAPES):
        d = len(levels)
        z = torch.cat([_randn((n, d), torch.float64, "cpu", seed, 1.5), _special_rows(d)])
        z = z.to(dtype).to(device).requires_grad_()
        codes, idx = fsq(z, levels, backend=backend)
        assert codes.dtype == dtype and idx.dtype == torch.int64 and idx.shape == (n + 6,)
        _check_fsq_levels(z, levels, codes, idx)
        # The special rows, exactly: +inf -> top level, -inf -> bottom level, +-0 -> level 0.
        _, half_width, top = _fsq_levels64(levels)
        expect = torch.stack([top / half_width, -torch.ones(d), torch.zeros(d), torch.zeros(d)])
        assert torch.equal(codes[n : n + 4].cpu(), expect.to(dtype))
        upstream = _randn((n + 6, d), dtype, device, 100 + seed)
        (dz,) = torch.autograd.grad(codes, z, upstream)
        fn = lambda x, levels=levels: ref.fsq(x, levels)[0]  # noqa: E731
        _, dz64 = _ref_grad(fn, z, upstream, torch.float64)
        _, dz_dt = _ref_grad(fn, z, upstream, dtype)
        _assert_parity(dz, dz_dt, dz64, dtype, f"fsq dz {levels}")
        assert bool((dz[n : n + 2] == 0).all())  # tanh is flat at +-inf


FSQ_ROUND_TRIP = [[2], [3], [4], [2, 3], [8, 5, 5, 5], [4, 4, 3, 2, 7], [7, 6, 5]]


@pytest.mark.parametrize("case", CASES)
def test_fsq_round_trip_on_every_index(case):
    device, backend = case
    for levels in FSQ_ROUND_TRIP:
        size = math.prod(levels)
        every = torch.arange(size, device=device)
        codebook = ref.fsq_codebook(levels)  # enumeration, independent of the index arithmetic
        codes = fsq_codes(every, levels)
        assert torch.equal(codes.cpu(), codebook.float())
        assert torch.equal(fsq_codes(every, levels, dtype=torch.float64).cpu(), codebook)
        assert torch.equal(ref.fsq_codes(every.cpu(), levels, torch.float64), codebook)
        # Indices are taken modulo the codebook size, in any integer dtype.
        assert torch.equal(fsq_codes(every - size, levels), codes)
        assert torch.equal(fsq_codes((every + 3 * size).int(), levels), codes)
        # The centre of every bin quantizes back to its own index.
        half_l, half_width, _ = _fsq_levels64(levels)
        offset = torch.tensor([0.5 * (v % 2 == 0) for v in levels], dtype=torch.float64)
        r = codebook * half_width
        z = torch.atanh((r + offset) / half_l) - torch.atanh(offset / half_l)
        z = z.float().to(device)
        out, idx = fsq(z, levels, backend=backend)
        assert torch.equal(idx, every), levels
        assert torch.equal(out, codes), levels
        # The reference's index map agrees with the enumeration.
        ref_codes, ref_idx = ref.fsq(z.cpu().double(), levels)
        assert torch.equal(ref_idx, every.cpu()) and torch.equal(ref_codes, codebook), levels


@pytest.mark.parametrize("case", CASES)
def test_fsq_level_grids_and_edges(case):
    device, backend = case
    z = torch.linspace(-4, 4, 801, device=device)[:, None]
    for level, grid in [(2, [-1, 0]), (3, [-1, 0, 1]), (4, [-1, -0.5, 0, 0.5])]:
        codes, idx = fsq(z, [level], backend=backend)
        assert codes.unique().tolist() == grid, level
        assert torch.equal(idx, (codes[:, 0] * (level // 2) + level // 2).long())
        # Monotone in z, and b(0) = 0 exactly for odd and even L.
        assert bool((idx.diff() >= 0).all())
        assert fsq(torch.zeros(1, 1, device=device), [level], backend=backend)[0].item() == 0
        # The level 0 is +0 from either side, as fsq_codes gives it (torch.equal hides -0).
        assert not bool(codes[codes == 0].signbit().any()), level
    # A NaN component gets level 0 on every backend; the other dimensions are unaffected.
    zn = torch.tensor([[float("nan"), 3.0], [0.2, float("nan")]], device=device)
    codes, idx = fsq(zn, [5, 4], backend=backend)
    assert codes.tolist() == [[0.0, 0.5], [0.0, 0.0]]
    assert idx.tolist() == [2 + 5 * 3, 2 + 5 * 2]
    # L = 2^16: large |z| reaches both extreme levels (through the clamp), indices 0 and L - 1.
    codes, idx = fsq(torch.tensor([[-1e9], [1e9]], device=device), [2**16], backend=backend)
    assert idx.tolist() == [0, 2**16 - 1] and codes[0].item() == -1.0
    ref_codes, ref_idx = ref.fsq(torch.tensor([[-1e9], [1e9]], dtype=torch.float64), [2**16])
    assert ref_idx.tolist() == [0, 2**16 - 1] and ref_codes[:, 0].tolist() == [-1.0, 32767 / 32768]
    # Near the int64 limit: 3 * 2^61 codes, the top index is 3 * 2^61 - 1 (L = 2: codes -1, 0).
    levels = [3] + [2] * 61
    z = torch.full((2, 62), 5.0, device=device)
    z[1] = -5
    assert fsq(z, levels, backend=backend)[1].tolist() == [3 * 2**61 - 1, 0]


def test_fsq_torch_body_rounds_exact_ties_half_to_even():
    # The parity tests accept either neighbour of a near-tie, so they cannot tell half-even from
    # half-up (test_scalar_rounding.py pins the Triton helper). Here: float32 z, found by a search
    # around each bin edge, where the torch body's float32 b = tanh(z + shift) * h - offset is
    # exactly k + 1/2; the level must be the even one of k, k + 1.
    from fastvq.ops.scalar import _fsq_tables

    deciding = 0
    for level in (4, 5, 8):
        params, _ = _fsq_tables((level,), torch.device("cpu"), torch.float32)
        shift, half_l, offset = params[0], params[1], params[2]
        edges = torch.arange(-(level // 2), level - 1 - level // 2, dtype=torch.float64) + 0.5
        z0 = torch.atanh((edges + offset.double()) / half_l.double()) - shift.double()
        steps = torch.arange(-300, 301, dtype=torch.float64) * 2.0**-24
        z = (z0[:, None] + steps * z0.abs().clamp(min=2.0**-20)[:, None]).float().reshape(-1, 1)
        b = (torch.tanh(z + shift) * half_l - offset)[:, 0]
        tie = b - b.floor() == 0.5
        _, idx = fsq(z[tie], [level], backend="torch")
        r, low = (idx - level // 2).double(), b[tie].floor().double()
        assert bool(((r == low) | (r == low + 1)).all()), level
        assert bool((r.remainder(2) == 0).all()), (level, z[tie][r.remainder(2) != 0].tolist())
        deciding += int((low.remainder(2) == 0).sum())  # half-up would take the odd k + 1
    assert deciding >= 10, deciding


def test_fsq_codes_in_half_precision():
    # Digits up to 65535 are not exact in bfloat16 / float16: fsq_codes computes in float32 and
    # rounds once, as fsq's codes do (bfloat16 999 - 500 would give 1.0 for 499 / 500).
    for levels in ([1001, 3], [2**16]):
        every = torch.arange(math.prod(levels))
        codebook = ref.fsq_codebook(levels).float()
        for dtype in (torch.bfloat16, torch.float16):
            assert torch.equal(fsq_codes(every, levels, dtype=dtype), codebook.to(dtype)), dtype


# --- LFQ and BSQ -------------------------------------------------------------------------------

SIGN_SHAPES = [(1, 1), (97, 3), (70, 18), (33, 33), (9, 62)]


@pytest.mark.parametrize("case, dtype", CASE_DTYPES)
def test_lfq_parity(case, dtype, poison):
    device, backend = case
    for seed, (n, d) in enumerate(SIGN_SHAPES):
        z = _randn((n, d), dtype, device, seed)
        z[0, : (d + 1) // 2] = 0.0  # zeros quantize to +1
        z = z.requires_grad_()
        codes, idx = lfq(z, backend=backend)
        ref_codes, ref_idx = ref.lfq(z.detach().cpu())
        assert torch.equal(codes.cpu(), ref_codes) and torch.equal(idx.cpu(), ref_idx)
        assert bool((codes[0, : (d + 1) // 2] == 1).all())
        assert torch.equal(lfq_codes(idx, d, dtype=dtype), codes)
        assert torch.equal(ref.lfq_codes(idx.cpu(), d, dtype), codes.cpu())
        upstream = _randn((n, d), dtype, device, 50 + seed)
        (dz,) = torch.autograd.grad(codes, z, upstream)
        assert torch.equal(dz, upstream)  # straight through, bit for bit


@pytest.mark.parametrize("case, dtype", CASE_DTYPES)
def test_bsq_parity(case, dtype, poison):
    device, backend = case
    for seed, (n, d) in enumerate(SIGN_SHAPES):
        z = _randn((n, d), dtype, device, seed, 3.0)
        z[0] = 0.0  # a zero row: codes +1/sqrt(d), gradient 0
        z = z.requires_grad_()
        codes, idx = bsq(z, backend=backend)
        ref_codes, ref_idx = ref.bsq(z.detach().cpu())
        assert torch.equal(codes.cpu(), ref_codes) and torch.equal(idx.cpu(), ref_idx)
        assert torch.equal(idx, lfq(z, backend=backend)[1])
        assert torch.equal(bsq_codes(idx, d, dtype=dtype), codes)
        s = 1 / math.sqrt(d)
        assert (codes.double().abs() - s).abs().max().item() <= ATOL[dtype] * 4
        assert bool((codes[0] > 0).all())
        upstream = _randn((n, d), dtype, device, 50 + seed)
        (dz,) = torch.autograd.grad(codes, z, upstream)
        fn = lambda x: ref.bsq(x)[0]  # noqa: E731
        _, dz64 = _ref_grad(fn, z, upstream, torch.float64)
        _, dz_dt = _ref_grad(fn, z, upstream, dtype)
        _assert_parity(dz, dz_dt, dz64, dtype, f"bsq dz {(n, d)}")
        assert bool((dz[0] == 0).all())
        # The gradient is tangent to the sphere: dz . z = 0 (cosine up to dz's rounding).
        zd, dzd = z.detach().double(), dz.double()
        cos = (dzd * zd).sum(-1).abs() / (dzd.norm(dim=-1) * zd.norm(dim=-1) + 1e-30)
        assert cos.max().item() < 0.02


@pytest.mark.parametrize("case", CASES)
def test_bsq_is_scale_invariant_over_float32s_range(case):
    # z / |z| for rows from 2^-70 (float32 squares subnormal, or flushed) to 2^70 (squares
    # overflow): the codes, indices and entropies of the unscaled rows, the gradient / scale.
    device, backend = case
    z = _randn((5, 8), torch.float32, device, 61, 1.0)
    g = _randn((5, 8), torch.float32, device, 62, 1.0)

    def run(x):
        x = x.clone().requires_grad_()
        codes, idx = bsq(x, backend=backend)
        ps, cb = binary_entropy_loss(x, inv_temperature=10.0, quantizer="bsq", backend=backend)
        (dz,) = torch.autograd.grad((codes * g).sum() + ps - cb, x)
        return codes, idx, torch.stack([ps, cb]), dz

    codes, idx, entropies, dz = run(z)
    for scale in (2.0**-70, 2.0**70):
        s_codes, s_idx, s_entropies, s_dz = run(z * scale)
        assert torch.equal(s_codes, codes) and torch.equal(s_idx, idx), scale
        torch.testing.assert_close(s_entropies, entropies, rtol=1e-5, atol=0)
        torch.testing.assert_close(s_dz * scale, dz, rtol=1e-5, atol=1e-6)
    # Subnormal rows (2^-140: 1/|z| overflows float32) count as zero rows, as in torch: finite.
    tiny = run(z * 2.0**-140)
    assert all(bool(t.isfinite().all()) for t in tiny)
    if backend != "torch":
        backend, expected = "torch", run(z * 2.0**-140)
        for a, b in zip(tiny, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_sign_edge_values(case):
    device, backend = case
    inf, nan = float("inf"), float("nan")
    z = torch.tensor([[0.0, -0.0, nan, inf, -inf, -1e-30, 1e-30]], device=device)
    codes, idx = lfq(z, backend=backend)
    assert codes.tolist() == [[1, 1, -1, 1, -1, -1, 1]]
    assert idx.item() == 1 + 2 + 8 + 64
    assert bsq(z, backend=backend)[1].item() == idx.item()
    # d = 62: every bit, the sign bit never.
    z = torch.ones(3, 62, device=device)
    z[1] = -1
    z[2, :61] = -1
    _, idx = lfq(z, backend=backend)
    assert idx.tolist() == [2**62 - 1, 0, 2**61]
    assert torch.equal(lfq_codes(idx, 62), z.sign())
    # Bits at positions >= d are ignored by the inverse maps.
    assert lfq_codes(torch.tensor([5 + 64]), 3).tolist() == [[1, -1, 1]]
    want = torch.tensor([[-1, 1.0]]) / 2**0.5
    torch.testing.assert_close(bsq_codes(torch.tensor([2**40 + 2]), 2), want)


@pytest.mark.parametrize("case", CASES)
def test_sign_round_trip_on_every_index(case):
    device, backend = case
    for d in (1, 2, 5, 10):
        every = torch.arange(2**d, device=device)
        codes = lfq_codes(every, d)
        assert codes.unique(dim=0).shape == (2**d, d)
        assert torch.equal(lfq(codes, backend=backend)[1], every)
        assert torch.equal(bsq(codes, backend=backend)[1], every)
        assert torch.equal(bsq(bsq_codes(every, d), backend=backend)[0], bsq_codes(every, d))
        assert torch.equal(ref.lfq_codes(every.cpu(), d), codes.cpu())
        assert torch.equal(ref.bsq_codes(every.cpu(), d), bsq_codes(every, d).cpu())


# --- entropy regularizer -----------------------------------------------------------------------


def _temperature(quantizer, d):
    # Logits of order 1-2: neither uniform nor saturated, so every term is exercised.
    return 0.3 if quantizer == "lfq" else d / 3


@pytest.mark.parametrize("quantizer", ["lfq", "bsq"])
@pytest.mark.parametrize("d", range(4, 11))
def test_entropy_matches_explicit_sum_over_all_codes(quantizer, d):
    tau = _temperature(quantizer, d)
    z = _randn((48, d), torch.float64, "cpu", d).requires_grad_()
    per_sample, codebook = binary_entropy_loss(
        z, inv_temperature=tau, quantizer=quantizer, backend="torch"
    )
    ex_per_sample, ex_codebook = ref.binary_entropy_loss_explicit(z, tau, quantizer)
    fac_per_sample, fac_codebook = ref.binary_entropy_loss(z, tau, quantizer)
    # Per-sample entropy: the factorized form is exact, to float64 rounding; gradients too.
    torch.testing.assert_close(per_sample, ex_per_sample, rtol=1e-12, atol=1e-12)
    g_op = torch.autograd.grad(per_sample, z, retain_graph=True)[0]
    g_ex = torch.autograd.grad(ex_per_sample, z, retain_graph=True)[0]
    torch.testing.assert_close(g_op, g_ex, rtol=1e-10, atol=1e-12)
    # Codebook entropy: the sum of per-bit entropies of the batch average, as the factorized
    # reference computes it, and an upper bound of the explicit joint entropy (strict here).
    torch.testing.assert_close(codebook, fac_codebook, rtol=1e-12, atol=1e-12)
    g_op = torch.autograd.grad(codebook, z)[0]
    g_fac = torch.autograd.grad(fac_codebook, z)[0]
    torch.testing.assert_close(g_op, g_fac, rtol=1e-10, atol=1e-12)
    assert codebook.item() > ex_codebook.item() + 1e-6
    assert codebook.item() <= d * math.log(2) + 1e-12
    torch.testing.assert_close(fac_per_sample, per_sample, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("quantizer", ["lfq", "bsq"])
def test_codebook_entropy_equality_and_gap(quantizer):
    d = 6
    tau = _temperature(quantizer, d)

    def both(z, t=tau):
        op = binary_entropy_loss(z, inv_temperature=t, quantizer=quantizer, backend="torch")[1]
        return op.item(), ref.binary_entropy_loss_explicit(z, t, quantizer)[1].item()

    # Equality where the batch average is a product distribution: one row, repeated rows, and
    # every sign pattern once (the average is then uniform: d log 2 exactly).
    one = _randn((1, d), torch.float64, "cpu", 1)
    for z in (one, one.expand(5, d), 0.7 * lfq_codes(torch.arange(2**d), d, dtype=torch.float64)):
        fac, joint = both(z)
        assert fac == pytest.approx(joint, rel=1e-12, abs=1e-12)
    assert both(0.7 * lfq_codes(torch.arange(2**d), d, dtype=torch.float64))[0] == pytest.approx(
        d * math.log(2), rel=1e-12
    )
    # The widest gap: z and -z, nearly hard assignments. Joint: log 2 (two codes, half each);
    # factorized: every bit is a fair coin, d log 2.
    z = torch.cat([one, -one]).abs() + 1
    z[1] = -z[0]
    fac, joint = both(z, 40 * tau)
    assert joint == pytest.approx(math.log(2), abs=1e-6)
    assert fac == pytest.approx(d * math.log(2), abs=1e-6)


@pytest.mark.parametrize("case, dtype", CASE_DTYPES)
@pytest.mark.parametrize("quantizer", ["lfq", "bsq"])
def test_entropy_parity(case, dtype, quantizer, poison):
    device, backend = case
    for seed, (n, d) in enumerate([(1, 1), (97, 18), (130, 5), (33, 64)]):
        tau = _temperature(quantizer, d)
        z = _randn((n, d), dtype, device, seed).requires_grad_()
        ps, cb = binary_entropy_loss(z, inv_temperature=tau, quantizer=quantizer, backend=backend)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        assert ps.dtype == acc and cb.dtype == acc and ps.shape == () and cb.shape == ()
        # Values: computed in float32 from z's values; the float64 reference on the same values.
        ref64 = ref.binary_entropy_loss(z.detach().cpu().double(), tau, quantizer)
        tol = 2.0**-18 if acc == torch.float32 else 1e-12
        for what, out, want in [("per-sample", ps, ref64[0]), ("codebook", cb, ref64[1])]:
            err = abs(out.item() - want.item())
            assert err <= tol * max(1, want.item()), (what, n, d, out.item(), want.item())
        weights = _randn(2, torch.float64, "cpu", 70 + seed)
        (dz,) = torch.autograd.grad(weights[0] * ps + weights[1] * cb, z)

        w = weights.to(dtype)

        def loss(x, w=w, tau=tau):
            out = ref.binary_entropy_loss(x, tau, quantizer)
            return w[0] * out[0] + w[1] * out[1]

        _, dz64 = _ref_grad(loss, z, torch.tensor(1.0), torch.float64)
        _, dz_dt = _ref_grad(loss, z, torch.tensor(1.0), dtype)
        _assert_parity(dz, dz_dt, dz64, dtype, f"entropy dz {quantizer} {(n, d)}")


@pytest.mark.parametrize("case", CASES)
def test_entropy_takes_the_widest_rows(case):
    # d = 1024, the most the kernels hold in one program, is accepted (1025 is not, see BAD).
    device, backend = case
    z = _randn((3, 1024), torch.float32, device, 81)
    for quantizer in ("lfq", "bsq"):
        tau = _temperature(quantizer, 1024)
        out = binary_entropy_loss(z, inv_temperature=tau, quantizer=quantizer, backend=backend)
        want = ref.binary_entropy_loss(z.cpu().double(), tau, quantizer)
        for got, w in zip(out, want, strict=True):
            assert abs(got.item() - w.item()) <= 2.0**-18 * max(1, w.item()), (quantizer, got, w)


@pytest.mark.parametrize("case", CASES)
def test_entropy_saturated_and_empty(case):
    device, backend = case
    # tau = 100 and |z| >= 10: p is exactly 0 or 1 in float32, and half the columns have the same
    # sign in every row (batch mean exactly 0 or 1): zero entropy, finite zero gradients.
    z = torch.rand(40, 8, device=device) + 10
    z[::2, 4:] *= -1
    z = z.requires_grad_()
    for quantizer, tau in [("lfq", 100.0), ("bsq", 1e4)]:
        ps, cb = binary_entropy_loss(z, inv_temperature=tau, quantizer=quantizer, backend=backend)
        assert ps.item() == pytest.approx(0, abs=1e-6)
        assert cb.item() == pytest.approx(4 * math.log(2), rel=1e-5)
        (dz,) = torch.autograd.grad(ps - cb, z)
        assert bool(dz.isfinite().all()) and dz.abs().max().item() < 1e-6
    # The uniform point: z = 0 gives p = 1/2 everywhere, both entropies d log 2.
    zero = torch.zeros(3, 5, device=device)
    for quantizer in ("lfq", "bsq"):
        ps, cb = binary_entropy_loss(
            zero, inv_temperature=1.0, quantizer=quantizer, backend=backend
        )
        assert ps.item() == pytest.approx(5 * math.log(2), rel=1e-6)
        assert cb.item() == pytest.approx(5 * math.log(2), rel=1e-6)
    # An empty batch: both 0, and an empty gradient.
    empty = torch.zeros(2, 0, 7, device=device, requires_grad=True)
    ps, cb = binary_entropy_loss(empty, inv_temperature=1.0, quantizer="bsq", backend=backend)
    assert ps.item() == 0 and cb.item() == 0
    (dz,) = torch.autograd.grad(ps + cb, empty)
    assert dz.shape == empty.shape


def _entropy_limit(z: torch.Tensor) -> tuple[float, float]:
    """Both entropies where every logit is +-inf, or 0 on a zero coordinate: p = 1, 0 or 1/2."""
    p = (z.sign().double() + 1) / 2

    def h(q):
        return -(q * q.clamp_min(1e-300).log() + (1 - q) * (1 - q).clamp_min(1e-300).log())

    return h(p).sum(1).mean().item(), h(p.mean(0)).sum().item()


@pytest.mark.parametrize("case", CASES)
def test_entropy_at_infinite_logits(case):
    # Logits a = 4 tau x past float32 (tau up to 1e38, or |z| near float32's limit) are +-inf,
    # where |a| e^-|a| and the gradient's a p (1 - p) were inf * 0 = NaN on every backend. The
    # limit: H = 0 per saturated bit and a zero gradient. A zero row (bsq: x = 0) keeps a = 0.
    device, backend = case
    g = torch.Generator().manual_seed(90)
    signs = torch.randint(0, 2, (7, 5), generator=g) * 2.0 - 1
    mags = 0.5 + 0.5 * torch.rand(7, 5, generator=g)
    for quantizer, tau, scale in [
        ("lfq", 1e30, 1.0),
        ("lfq", 1e38, 1.0),
        ("lfq", 100.0, 3e38),
        ("bsq", 1e38, 1.0),
        ("bsq", 1e38, 1e30),
        ("bsq", 1e38, 1e38),  # past 2^126: 1 / |z| is a float subnormal
    ]:
        z = signs * mags * scale
        if quantizer == "bsq":
            z[3] = 0.0
        z = z.to(device).requires_grad_()
        ps, cb = binary_entropy_loss(z, inv_temperature=tau, quantizer=quantizer, backend=backend)
        want_ps, want_cb = _entropy_limit(z.detach().cpu())
        what = (quantizer, tau, scale)
        assert ps.item() == pytest.approx(want_ps, rel=1e-6, abs=1e-6), what
        assert cb.item() == pytest.approx(want_cb, rel=1e-6), what
        (dz,) = torch.autograd.grad(ps - 0.3 * cb, z)
        assert torch.equal(dz, torch.zeros_like(dz)), what


@pytest.mark.parametrize("case", CASES)
def test_bsq_entropy_of_rows_past_2_to_the_126(case):
    # BSQ normalizes each row: rows scaled up to 1e38 (norms past 2^126, whose inverse is a
    # float subnormal) give the entropies of the unscaled rows. The C++ kernels flushed that
    # inverse to 0 and took the rows for zero rows.
    device, backend = case
    z = torch.randn(9, 6, generator=torch.Generator().manual_seed(91)).to(device)
    want = binary_entropy_loss(z, inv_temperature=2.0, quantizer="bsq", backend=backend)
    got = binary_entropy_loss(z * 1e38, inv_temperature=2.0, quantizer="bsq", backend=backend)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --- layouts, gradcheck, registration, compile -------------------------------------------------


def _all_ops(backend):
    """name -> fn(z) returning a tuple whose first entry is differentiable, for d = 6 inputs."""
    return {
        "fsq": lambda z: fsq(z, [8, 5, 5, 4, 3, 2], backend=backend),
        "lfq": lambda z: lfq(z, backend=backend),
        "bsq": lambda z: bsq(z, backend=backend),
        "entropy": lambda z: binary_entropy_loss(
            z, inv_temperature=0.5, quantizer="bsq", backend=backend
        ),
    }


@pytest.mark.parametrize("case", CASES)
def test_leading_dims_non_contiguous_and_empty(case, poison):
    device, backend = case
    base = _randn((7, 5, 12), torch.float32, device, 3)
    views = {
        "transposed": base[..., :6].transpose(0, 1),  # (5, 7, 6), neither dim contiguous
        "strided": base[..., ::2],  # last-dimension stride 2
        "leading": base[..., 6:].unsqueeze(0).expand(2, 7, 5, 6),  # stride 0 too
        "vector": base[0, 0, :6],  # a single vector: indices are 0-d
    }
    for name, fn in _all_ops(backend).items():
        for view_name, z in views.items():
            z = z.clone().requires_grad_() if view_name == "vector" else z.requires_grad_()
            zc = z.detach().contiguous().reshape(-1, 6).requires_grad_()
            out, flat = fn(z), fn(zc)
            if name != "entropy":
                assert out[0].shape == z.shape and out[1].shape == z.shape[:-1], (name, view_name)
                assert torch.equal(out[1].reshape(-1), flat[1])
            assert torch.equal(out[0].reshape(flat[0].shape), flat[0]), (name, view_name)
            g = _randn(out[0].shape, torch.float32, device, 9)
            (dz,) = torch.autograd.grad(out[0], z, g)
            (dzc,) = torch.autograd.grad(flat[0], zc, g.reshape(flat[0].shape))
            assert dz.shape == z.shape
            torch.testing.assert_close(dz.reshape(-1, 6), dzc, rtol=0, atol=0)
        # An empty batch, with leading dimensions.
        z = torch.zeros(2, 0, 6, device=device, requires_grad=True)
        out = fn(z)
        if name != "entropy":
            assert out[0].shape == (2, 0, 6) and out[1].shape == (2, 0)
            assert out[1].dtype == torch.int64
        (dz,) = torch.autograd.grad(out[0], z, torch.ones_like(out[0]))
        assert dz.shape == z.shape


class _Surrogate(torch.autograd.Function):
    """Value: a smooth map f(z); gradient: an op's closed-form backward. gradcheck then compares
    the op's backward with finite differences of the map its straight-through gradient claims."""

    @staticmethod
    def forward(ctx, z, smooth, backward):
        ctx.save_for_backward(z)
        ctx.backward_fn = backward
        return smooth(z)

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        return ctx.backward_fn(g, z), None, None


def test_gradcheck_float64():
    levels = [8, 5, 4, 3, 1001]
    z = _randn((6, 5), torch.float64, "cpu", 5).requires_grad_()
    half_width = _fsq_levels64(levels)[1]
    smooth = lambda x: ref.fsq_bound(x, levels) / half_width  # noqa: E731
    bwd = lambda g, x: torch.ops.fastvq.fsq_bwd(g, x, levels, "torch")  # noqa: E731
    assert torch.autograd.gradcheck(lambda x: _Surrogate.apply(x, smooth, bwd), (z,))
    normalize = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
    bwd = lambda g, x: torch.ops.fastvq.bsq_bwd(g, x, "torch")  # noqa: E731
    assert torch.autograd.gradcheck(lambda x: _Surrogate.apply(x, normalize, bwd), (z,))
    # The entropies are smooth: gradcheck the ops themselves (both outputs).
    for quantizer in ("lfq", "bsq"):
        fn = lambda x, q=quantizer: binary_entropy_loss(  # noqa: E731
            x, inv_temperature=0.7, quantizer=q, backend="torch"
        )
        assert torch.autograd.gradcheck(fn, (z,))
    # ... and the op's STE gradients equal those of the smooth maps.
    g = _randn((6, 5), torch.float64, "cpu", 6)
    (dz,) = torch.autograd.grad(fsq(z, levels, backend="torch")[0], z, g)
    torch.testing.assert_close(dz, torch.autograd.grad(smooth(z), z, g)[0])
    (dz,) = torch.autograd.grad(bsq(z, backend="torch")[0], z, g)
    torch.testing.assert_close(dz, torch.autograd.grad(normalize(z), z, g)[0])


def _impls():
    """(device, impl) of every body this machine can run: the custom ops' `impl` argument."""
    return sorted({(c.values[0][0], c.values[0][1]) for c in CASES})


@pytest.mark.parametrize("device, impl", _impls(), ids=lambda v: v)
def test_opcheck(device, impl):
    ops = torch.ops.fastvq
    z = _randn((9, 5), torch.float32, device, 8).requires_grad_()
    g = _randn((9, 5), torch.float32, device, 9)
    levels = [8, 5, 4, 3, 2]
    # Transposed (column-major) z and g too: every body returns contiguous outputs, and the fakes
    # must say so (empty_like kept z's strides: opcheck's "Stride mismatch").
    zt = z.detach().t().contiguous().t().requires_grad_()
    pairs = [(z, g), (z.detach().half().requires_grad_(), g.half()), (zt, g.t().contiguous().t())]
    for zz, gg in pairs:
        assert zz.is_contiguous() != (zz is zt)
        torch.library.opcheck(ops.fsq_fwd, (zz, levels, impl))
        torch.library.opcheck(ops.fsq_bwd, (gg, zz.detach(), levels, impl))
        torch.library.opcheck(ops.lfq_fwd, (zz, impl))
        torch.library.opcheck(ops.bsq_fwd, (zz, impl))
        torch.library.opcheck(ops.bsq_bwd, (gg, zz.detach(), impl))
        for spherical in (False, True):
            torch.library.opcheck(ops.binary_entropy_fwd, (zz, 1.3, spherical, impl))
            g_row, g_col = g[:, 0].contiguous(), g[:2].contiguous()
            args = (g_row, g_col, zz.detach(), 1.3, spherical, impl)
            torch.library.opcheck(ops.binary_entropy_bwd, args)


@pytest.mark.skipif(not scalar_ops._HAS_CPP, reason="fastvq._C without the C++ scalar kernels")
def test_cpp_opcheck():
    """The C++ ops on their own (the custom ops above call them): fake shapes, schemas."""
    ops = torch.ops.fastvq
    params, basis = scalar_ops._fsq_tables((8, 5, 4, 3, 2), torch.device("cpu"), torch.float32)
    g_row, g_col = _randn((9,), torch.float32, "cpu", 10), _randn((2, 5), torch.float32, "cpu", 11)
    for dtype in (torch.float32, torch.float16):
        z, g = _randn((9, 5), dtype, "cpu", 8), _randn((9, 5), dtype, "cpu", 9)
        torch.library.opcheck(ops.fsq_fwd_cpp, (z, params, basis))
        torch.library.opcheck(ops.fsq_bwd_cpp, (g, z, params))
        torch.library.opcheck(ops.sign_fwd_cpp, (z, 0.5))
        torch.library.opcheck(ops.bsq_bwd_cpp, (g, z))
        for spherical in (False, True):
            torch.library.opcheck(ops.binary_entropy_fwd_cpp, (z, 1.3, spherical))
            torch.library.opcheck(ops.binary_entropy_bwd_cpp, (g_row, g_col, z, 1.3, spherical))


@pytest.mark.parametrize("case", CASES)
def test_compiles_without_graph_breaks(case):
    device, backend = case

    def step(z, w):
        c1, i1 = fsq(z[..., :4], [8, 5, 5, 3], backend=backend)
        c2, i2 = lfq(z, backend=backend)
        c3, i3 = bsq(z, backend=backend)
        ps, cb = binary_entropy_loss(z, inv_temperature=0.5, quantizer="lfq", backend=backend)
        loss = (c1 * w[..., :4]).sum() + (c2 * w).sum() + (c3 * w).sum() + ps - 0.5 * cb
        return loss, i1, i2, i3

    z = _randn((3, 11, 6), torch.float32, device, 12).requires_grad_()
    w = _randn((3, 11, 6), torch.float32, device, 13)
    eager = step(z, w)
    (dz_eager,) = torch.autograd.grad(eager[0], z)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(z, w)
    (dz,) = torch.autograd.grad(compiled[0], z)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(dz, dz_eager)


def test_auto_picks_cpp_on_cpu_and_triton_only_when_asked(monkeypatch):
    from fastvq.kernels import scalar as triton_scalar

    from fastvq.ops import scalar as module

    cpu = torch.device("cpu")
    assert module._impl("auto", cpu, torch.float32) == ("cpu" if module._HAS_CPP else "torch")
    assert module._impl("auto", cpu, torch.float64) == "torch"

    def boom(*args):
        raise AssertionError("the Triton kernel ran")

    monkeypatch.setattr(triton_scalar, "fsq_fwd", boom)
    z = torch.randn(4, 2)
    assert fsq(z, [3, 3])[1].shape == (4,)  # "auto" on a CPU tensor: never Triton
    if INTERPRET and not torch.cuda.is_available():
        with pytest.raises(AssertionError, match="the Triton kernel ran"):
            fsq(z, [3, 3], backend="triton")


def test_build_without_the_cpp_kernels(monkeypatch):
    # A fastvq._C from before the scalar kernels: "auto" runs torch, "cpu" says what is missing.
    from fastvq.ops import scalar as module

    monkeypatch.setattr(module, "_HAS_CPP", False)
    z = _randn((40, 6), torch.float32, "cpu", 31)
    assert torch.equal(lfq(z)[1], lfq(z, backend="torch")[1])
    if fastvq.backends()["cpu"].available:
        with pytest.raises(ValueError, match="built without the scalar quantizer kernels"):
            lfq(z, backend="cpu")


# --- the C++ ops called directly (torch.ops.fastvq.*_cpp) --------------------------------------

_CPP = hasattr(torch.ops.fastvq, "fsq_fwd_cpp") and fastvq.backends()["cpu"].available
needs_cpp = pytest.mark.skipif(not _CPP, reason="fastvq._C without the scalar C++ kernels")


def _cpp_params(levels):
    from fastvq.ops.scalar import _fsq_tables

    return _fsq_tables(tuple(levels), torch.device("cpu"), torch.float32)


@needs_cpp
def test_cpp_ops_bit_identical_across_thread_counts():
    # Rows split among threads; the entropy's column sums are per-tile partials reduced in tile
    # order, so 1 and 2 threads must give the same bits.
    ops, levels = torch.ops.fastvq, [8, 8, 8, 5, 5, 5, 4, 3, 2]
    params, basis = _cpp_params(levels)
    z = _randn((20_003, 9), torch.float32, "cpu", 32)
    g = _randn((20_003, 9), torch.float32, "cpu", 33)
    g_row, g_col = g[:, 0].contiguous(), g[:2].contiguous()
    threads = torch.get_num_threads()
    runs = []
    try:
        for t in (1, 2, 1, 2):
            torch.set_num_threads(t)
            runs.append(
                (
                    *ops.fsq_fwd_cpp(z, params, basis),
                    ops.fsq_bwd_cpp(g, z, params),
                    *ops.sign_fwd_cpp(z, 1 / 3),
                    ops.bsq_bwd_cpp(g, z),
                    *ops.binary_entropy_fwd_cpp(z, 2.5, True),
                    ops.binary_entropy_bwd_cpp(g_row, g_col, z, 2.5, True),
                )
            )
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for x, y in zip(run, runs[0], strict=True):
            assert torch.equal(x, y)
    rows, cols = runs[0][6:8]  # ... and they computed something: p(+) + p(-) = 1 per element.
    torch.testing.assert_close(cols.sum(0), torch.full((9,), 20_003.0))
    assert bool((rows > 0).all())


# The C++ scalar kernels are compiled twice, for SSE2 and for AVX2, and picked at run time
# (csrc/cpu/isa.h); FASTVQ_CPU_BASELINE=1 forces SSE2. Both builds must return the same bits.
_ISA_SCRIPT = """
import sys, torch
from fastvq.ops.scalar import _fsq_tables
ops, g = torch.ops.fastvq, torch.Generator().manual_seed(0)
params, basis = _fsq_tables((8, 8, 8, 5, 5, 5, 4, 3, 2), torch.device("cpu"), torch.float32)
out = []
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    z = 3 * torch.randn(20_003, 9, generator=g)
    z[0], z[1], z[2], z[3] = 0.0, -0.0, 1e-40, -50.0  # zeros, a subnormal, saturation
    z, grad = z.to(dtype), torch.randn(20_003, 9, generator=g).to(dtype)
    g_row, g_col = torch.randn(20_003, generator=g), torch.randn(2, 9, generator=g)
    out += [*ops.fsq_fwd_cpp(z, params, basis), ops.fsq_bwd_cpp(grad, z, params)]
    out += [*ops.sign_fwd_cpp(z, 1 / 3), ops.bsq_bwd_cpp(grad, z)]
    for spherical in (False, True):
        out += [*ops.binary_entropy_fwd_cpp(z, 2.5, spherical)]
        out += [ops.binary_entropy_bwd_cpp(g_row, g_col, z, 2.5, spherical)]
torch.save(out, sys.argv[1])
"""


@needs_cpp
def test_cpp_ops_bit_identical_across_isa_builds(tmp_path):
    """Vacuous on a CPU without AVX2 (both runs take the SSE2 build), exact everywhere else."""
    runs = run_isa_builds(_ISA_SCRIPT, tmp_path)
    assert len(runs[0]) == 3 * 12
    for x, y in zip(*runs, strict=True):
        assert torch.equal(x, y)


Z9 = torch.randn(4, 3)
BAD_CPP = [
    (lambda o: o.fsq_fwd_cpp(Z9.double(), *_cpp_params([3] * 3)), "z must be float32, bfloat16"),
    (lambda o: o.fsq_fwd_cpp(Z9, *_cpp_params([3] * 2)), r"params must have shape \(6, 3\)"),
    (
        lambda o: o.fsq_fwd_cpp(Z9, _cpp_params([3] * 3)[0], torch.ones(3, dtype=torch.int32)),
        "basis must be Long",
    ),
    (lambda o: o.fsq_bwd_cpp(Z9[:, :2], Z9, _cpp_params([3] * 3)[0]), "grad_codes must have"),
    (lambda o: o.fsq_bwd_cpp(Z9, torch.randn(4, 0), Z9), r"with 1 <= D <= 1024"),
    (lambda o: o.sign_fwd_cpp(torch.randn(2, 63), 1.0), r"with 1 <= D <= 62"),
    (lambda o: o.sign_fwd_cpp(torch.randn(3, 4).T, 1.0), "z must be contiguous"),
    (lambda o: o.sign_fwd_cpp(torch.randn(3, 4), float("nan")), "scale must be finite and > 0"),
    (lambda o: o.sign_fwd_cpp(torch.randn(3, 4), -0.5), "scale must be finite and > 0"),
    (lambda o: o.bsq_bwd_cpp(Z9.half(), Z9), "grad_codes and z must have the same dtype"),
    (
        lambda o: o.binary_entropy_fwd_cpp(torch.randn(2, 1025), 1.0, False),
        r"with 1 <= D <= 1024",
    ),
    (
        lambda o: o.binary_entropy_bwd_cpp(torch.ones(3), torch.ones(2, 3), Z9, 1.0, False),
        r"grad_rows must have shape \(4,\)",
    ),
    (
        lambda o: o.binary_entropy_bwd_cpp(torch.ones(4), torch.ones(2, 3).double(), Z9, 1.0, True),
        "grad_cols must be Float",
    ),
]


@needs_cpp
@pytest.mark.parametrize("call, match", BAD_CPP)
def test_cpp_op_bad_input_is_a_clear_error(call, match):
    with pytest.raises(cpp_op_error(match), match=match):
        call(torch.ops.fastvq)


# Each C++ op on inputs that require grad, called directly: the output's first tensor.
GRADLESS_CPP = {
    "fsq_fwd_cpp": lambda o, z: o.fsq_fwd_cpp(z, *_cpp_params([3] * 3))[0],
    "sign_fwd_cpp": lambda o, z: o.sign_fwd_cpp(z, 1.0)[0],
    "binary_entropy_fwd_cpp": lambda o, z: o.binary_entropy_fwd_cpp(z, 1.0, False)[0],
    "fsq_bwd_cpp": lambda o, z: o.fsq_bwd_cpp(z, z.detach(), _cpp_params([3] * 3)[0]),
    "bsq_bwd_cpp": lambda o, z: o.bsq_bwd_cpp(z, z.detach()),
    "binary_entropy_bwd_cpp": lambda o, z: o.binary_entropy_bwd_cpp(
        z[:, 0].contiguous(), torch.ones(2, 3), z.detach(), 1.0, False
    ),
    "squared_norms": lambda o, z: o.squared_norms(z),
}


@needs_cpp
@pytest.mark.parametrize("call", GRADLESS_CPP.values(), ids=GRADLESS_CPP.keys())
def test_cpp_op_gradient_is_refused_not_dropped(call):
    # Without an autograd kernel the dispatcher ran the op with a warning and the gradient
    # through its output was silently 0 (the public ops, custom ops around them, own it).
    z = torch.randn(4, 3, requires_grad=True)
    out = call(torch.ops.fastvq, z)
    with pytest.raises(NotImplementedError, match="has no gradient of its own"):
        (out.sum() + z.sum()).backward()


# The Triton launchers, reachable as torch.ops.fastvq.*(impl="triton") past the public ops'
# checks, read params, basis and gradients by raw pointer: a levels list shorter than D read past
# params, a short gradient past its end, a D = 70 LFQ wrapped its int64 index bits.
BAD_TRITON = [
    (lambda k: k.fsq_fwd(Z9.double(), *_cpp_params([3] * 3)), "z must .* of float32, bfloat16"),
    (lambda k: k.fsq_fwd(Z9, *_cpp_params([3] * 2)), r"params must be a contiguous \(6, 3\)"),
    (
        lambda k: k.fsq_fwd(Z9, _cpp_params([3] * 3)[0], torch.ones(3, dtype=torch.int32)),
        "basis must .* of int64",
    ),
    (lambda k: k.fsq_fwd(Z9.T, *_cpp_params([3] * 4)), "z must be a contiguous"),
    (lambda k: k.fsq_bwd(Z9[:, :2], Z9, _cpp_params([3] * 3)[0]), r"g must .* \(4, 3\)"),
    (lambda k: k.fsq_bwd(Z9, Z9, _cpp_params([3] * 4)[0]), r"params must .* \(6, 3\)"),
    (lambda k: k.sign_fwd(torch.randn(2, 63), False), r"1 <= D <= 62"),
    (lambda k: k.sign_fwd(torch.randn(2, 0), True), r"1 <= D <= 62"),
    (lambda k: k.sign_fwd(torch.randint(0, 3, (2, 4)), True), "z must .* got torch.int64"),
    (lambda k: k.bsq_bwd(Z9.half(), Z9), "g must .* of float32"),
    (lambda k: k.binary_entropy_fwd(torch.randn(2, 1025), 1.0, False), r"1 <= D <= 1024"),
    (lambda k: k.binary_entropy_fwd(torch.randn(2, 4, 3), 1.0, False), r"\(\*, \*\) tensor"),
    (
        lambda k: k.binary_entropy_bwd(torch.ones(3), torch.ones(2, 3), Z9, 1.0, False),
        r"g_row must be a contiguous \(4,\)",
    ),
    (
        lambda k: k.binary_entropy_bwd(torch.ones(4), torch.ones(2, 3).double(), Z9, 1.0, True),
        "g_col must .* of float32",
    ),
    (
        lambda k: k.binary_entropy_bwd(torch.ones(4), torch.ones(2, 2), Z9, 1.0, False),
        r"g_col must be a contiguous \(2, 3\)",
    ),
    (
        lambda k: k.binary_entropy_bwd(torch.ones(3), torch.ones(2, 4), Z9.T, 1.0, False),
        "z must be a contiguous",
    ),
]


@pytest.mark.skipif(not fastvq.backends()["triton"].available, reason="Triton unavailable")
@pytest.mark.parametrize("call, match", BAD_TRITON)
def test_triton_launcher_bad_input_is_a_clear_error(call, match):
    from fastvq.kernels import scalar

    with pytest.raises(ValueError, match=match):
        call(scalar)


# --- bad input ---------------------------------------------------------------------------------


Z = torch.randn(4, 3)
IDX = torch.arange(4)
BAD = [
    (lambda: fsq(Z.int(), [3, 3, 3]), TypeError, "z must be float32"),
    (lambda: fsq("z", [3, 3, 3]), TypeError, "z must be a torch.Tensor"),
    (lambda: fsq(Z, [3, 3]), ValueError, r"z's last dimension \(3\) must equal len\(levels\)"),
    (lambda: fsq(torch.tensor(1.0), [3]), ValueError, "z must have shape"),
    (lambda: fsq(Z, [1, 3, 3]), ValueError, "levels must each be between 2"),
    (lambda: fsq(Z, [3, 3, 2**16 + 1]), ValueError, "levels must each be between 2"),
    (lambda: fsq(Z, []), ValueError, "levels must hold at least one level"),
    (lambda: fsq(Z, [3.0, 3, 3]), TypeError, "levels must be a sequence of ints"),
    (lambda: fsq(Z, 3), TypeError, "levels must be a sequence of ints"),
    (lambda: fsq(torch.randn(2, 64), [2] * 64), ValueError, "levels: .* overflows int64"),
    (lambda: fsq(torch.randn(2, 4), [2**16] * 4), ValueError, "levels: .* overflows int64"),
    (lambda: fsq(Z, [3, 3, 3], backend="cuda"), ValueError, r"no CUDA C\+\+ kernels"),
    (lambda: lfq(Z.double(), backend="cpu"), ValueError, "backend 'cpu' takes float32"),
    (lambda: fsq(Z.double(), [3, 3, 3], backend="triton"), ValueError, "backend 'triton'"),
    (lambda: fsq_codes(IDX.float(), [3]), TypeError, "indices must be an int64, .* tensor"),
    (lambda: fsq_codes(IDX, [3], dtype=torch.int32), TypeError, "dtype must be float32"),
    (lambda: fsq_codes(IDX, [2] * 64), ValueError, "levels: .* overflows int64"),
    (lambda: lfq(Z.long()), TypeError, "z must be float32"),
    (lambda: lfq(torch.randn(2, 63)), ValueError, "z's last dimension d must be between 1 and 62"),
    (lambda: bsq(torch.randn(2, 0)), ValueError, "z's last dimension d must be between 1 and 62"),
    (lambda: bsq(Z, backend="numpy"), ValueError, "backend must be one of"),
    (lambda: lfq_codes(IDX, 0), ValueError, "d must be between 1 and 62"),
    (lambda: lfq_codes(IDX, 63), ValueError, "d must be between 1 and 62"),
    (lambda: bsq_codes(IDX, 2.0), TypeError, "d must be an int"),
    (lambda: bsq_codes(IDX.bool(), 2), TypeError, "indices must be an int64, .* tensor"),
    (lambda: binary_entropy_loss(Z, inv_temperature=0.0), ValueError, "inv_temperature must be"),
    (lambda: binary_entropy_loss(Z, inv_temperature=-1), ValueError, "inv_temperature must be"),
    (lambda: binary_entropy_loss(Z, inv_temperature=math.inf), ValueError, "inv_temperature"),
    (lambda: binary_entropy_loss(Z, inv_temperature=math.nan), ValueError, "inv_temperature"),
    (lambda: binary_entropy_loss(Z, inv_temperature=torch.tensor(1.0)), TypeError, "inv_temp"),
    (lambda: binary_entropy_loss(Z, inv_temperature=1, quantizer="fsq"), ValueError, "quantizer"),
    (lambda: binary_entropy_loss(Z.int(), inv_temperature=1.0), TypeError, "z must be float32"),
    (lambda: binary_entropy_loss(torch.randn(2, 1025), inv_temperature=1.0), ValueError, "1024"),
    (lambda: fsq(Z, [3, 3, 3, 3]), ValueError, r"z's last dimension \(3\) must equal len"),
    (lambda: lfq_codes(IDX, True), TypeError, "d must be an int, got bool"),
    (lambda: binary_entropy_loss(Z, inv_temperature=True), TypeError, "inv_temperature must be a"),
]


@pytest.mark.parametrize("call, error, match", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_levels_accept_tuples_and_tensors():
    z = torch.randn(5, 3)
    want = fsq(z, [8, 5, 3], backend="torch")
    for levels in [(8, 5, 3), torch.tensor([8, 5, 3])]:
        got = fsq(z, levels, backend="torch")
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_import_does_not_load_triton():
    code = "import sys, fastvq.ops.scalar; assert 'triton' not in sys.modules, 'triton imported'"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("quantizer", ["lfq", "bsq"])
def test_entropy_with_the_largest_inv_temperature_stays_finite(backend, quantizer):
    """S20: coef past float32's range would be inf, and inf * 0 (a zero coordinate) NaN."""
    z = torch.tensor([[0.0, 1.0, -2.0], [0.5, 0.0, 3.0]], requires_grad=True)
    ps, cb = binary_entropy_loss(z, inv_temperature=1e308, quantizer=quantizer, backend=backend)
    (ps + cb).backward()
    assert ps.isfinite() and cb.isfinite() and z.grad.isfinite().all()


def test_zero_d_input_is_a_value_error():
    """S30."""
    with pytest.raises(ValueError, match="0-d"):
        lfq(torch.tensor(1.0))
