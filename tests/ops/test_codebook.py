"""Codebook learning ops: EMA statistics, smoothed codebook, dead-code reset, k-means, code usage.

Oracles are the plain-PyTorch references in fastvq.reference.codebook, run in float64 (the one-hot
EMA, brute-force Lloyd). Floating parity: max|out - ref64| <= 2 max|ref32 - ref64| + atol, the
reference in float32 setting the scale of float32 rounding.
"""

import importlib.util
import itertools
import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastvq
from fastvq.ops.codebook import (
    code_counts,
    ema_codebook,
    ema_update_,
    kmeans,
    perplexity,
    reset_dead_codes_,
    usage,
)
from fastvq.reference import codebook as ref
from fastvq.testing import cpp_op_error

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _kernels_importable() -> bool:
    try:
        return importlib.util.find_spec("fastvq.kernels.ema") is not None
    except ModuleNotFoundError:  # fastvq.kernels itself is missing
        return False


def _cases():
    """(device, backend) pairs with a statistics kernel on this machine."""
    report = fastvq.backends()
    cases = [("cpu", "torch")]
    if report["cpu"].available:
        cases.append(("cpu", "cpu"))
    if report["triton"].available and INTERPRET and not CUDA:
        cases.append(("cpu", "triton"))
    if CUDA:
        cases += [("cuda", b) for b in ("torch", "triton", "cuda") if report[b].available]
    # A packaging fault, reported as a skip with its reason rather than a crash of every test.
    no_kernels = pytest.mark.skip(reason="fastvq.kernels does not import (kernels/__init__.py?)")
    return [
        pytest.param(
            c,
            id=f"{c[0]}-{c[1]}",
            marks=[pytest.mark.gpu] * (c[0] == "cuda")
            + [no_kernels] * (c[1] == "triton" and not _kernels_importable()),
        )
        for c in cases
    ]


CASES = _cases()
TRITON_CASES = [c for c in CASES if c.values[0][1] == "triton"]
CPP_CASES = [c for c in CASES if c.values[0][1] in ("cpu", "cuda")]
# (N, K, D): N = 1, odd N, K off every tile, odd D, D above one 128-column block.
SHAPES = [(1, 1, 1), (97, 13, 3), (300, 70, 33), (1025, 257, 24), (64, 5, 256)]
# The interpreter runs one program at a time in numpy, and the deterministic kernel launches K of
# them: fewer, smaller shapes.
INTERPRETER_SHAPES = [(1, 1, 1), (97, 13, 3), (130, 29, 33), (20, 4, 200)]


def _shapes(backend):
    return INTERPRETER_SHAPES if backend == "triton" and INTERPRET else SHAPES


def _ema_inputs(n, k, d, dtype, device, seed, weighting=None):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g).to(dtype)
    indices = torch.randint(0, k, (n,), generator=g)
    cluster_size = torch.rand(k, generator=g) * 5
    embed_sum = torch.randn(k, d, generator=g)
    weight = {
        None: None,
        "mask": torch.rand(n, generator=g) > 0.3,
        "float": torch.rand(n, generator=g),
    }[weighting]
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(cluster_size), to(embed_sum), to(z), to(indices), to(weight)


def _assert_parity(out, ref64, ref32, what):
    err = (out.double() - ref64).abs().max().item()
    bound = 2 * (ref32.double() - ref64).abs().max().item() + 1e-6 * (1 + ref64.abs().max().item())
    assert err <= bound, f"{what}: error {err:.3g} > bound {bound:.3g}"


# --- ema_update_ -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize(
    "dtype, weighting",
    [
        (torch.float32, None),
        (torch.bfloat16, "mask"),
        (torch.float16, "float"),
        (torch.float32, "float"),
    ],
    ids=["f32", "bf16-mask", "f16-weight", "f32-weight"],
)
def test_ema_update_matches_onehot_reference(case, deterministic, dtype, weighting, poison):
    device, backend = case
    for seed, (n, k, d) in enumerate(_shapes(backend)):
        cs, es, z, idx, w = _ema_inputs(n, k, d, dtype, device, seed, weighting)
        decay = 0.8
        w64 = None if w is None else w.double()
        ref64 = ref.ema_update_onehot(cs.double(), es.double(), z.double(), idx, decay, w64)
        ref32 = ref.ema_update_onehot(cs, es, z.float(), idx, decay, w)
        out_cs, out_es = cs.clone(), es.clone()
        result = ema_update_(
            out_cs, out_es, z, idx, decay, weight=w, deterministic=deterministic, backend=backend
        )
        assert result[0] is out_cs and result[1] is out_es  # in place
        assert out_cs.dtype == out_es.dtype == torch.float32
        _assert_parity(out_cs, ref64[0], ref32[0], f"cluster_size {(n, k, d)}")
        _assert_parity(out_es, ref64[1], ref32[1], f"embed_sum {(n, k, d)}")


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 80), k=st.integers(1, 40), d=st.integers(1, 40), deterministic=st.booleans(),
    weighting=st.sampled_from([None, "mask", "float"]), decay=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31),
)  # fmt: skip
def test_fuzz_ema_update_torch(n, k, d, deterministic, weighting, decay, seed):
    cs, es, z, idx, w = _ema_inputs(n, k, d, torch.float32, "cpu", seed, weighting)
    w64 = None if w is None else w.double()
    ref64 = ref.ema_update_onehot(cs.double(), es.double(), z.double(), idx, decay, w64)
    ref32 = ref.ema_update_onehot(cs, es, z, idx, decay, w)
    ema_update_(cs, es, z, idx, decay, weight=w, deterministic=deterministic, backend="torch")
    _assert_parity(cs, ref64[0], ref32[0], "cluster_size")
    _assert_parity(es, ref64[1], ref32[1], "embed_sum")


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_ema_update_float64_on_torch(deterministic):
    cs, es, z, idx, w = _ema_inputs(500, 40, 9, torch.float64, "cpu", 11, "float")
    cs, es = cs.double(), es.double()
    expected = ref.ema_update_onehot(cs, es, z, idx, 0.37, w)
    ema_update_(cs, es, z, idx, 0.37, weight=w, deterministic=deterministic)
    torch.testing.assert_close(cs, expected[0], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(es, expected[1], rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="float64 inputs run on backend='torch'"):
        ema_update_(cs, es, z, idx, 0.37, backend="triton")


@pytest.mark.parametrize("mode", [False, True], ids=["default", "deterministic_algorithms"])
def test_ema_update_follows_torch_deterministic_mode(mode, monkeypatch, request):
    # deterministic=None (the default) follows torch.use_deterministic_algorithms; an explicit
    # value wins. Seen through the flag the torch backend's statistics receive.
    from fastvq.ops import codebook as ops_codebook

    if mode:
        request.getfixturevalue("deterministic_algorithms")
    seen = []
    stats = ops_codebook._batch_stats
    monkeypatch.setattr(
        ops_codebook, "_batch_stats", lambda *args: seen.append(args[-1]) or stats(*args)
    )
    cs, es, z, idx, _ = _ema_inputs(40, 5, 3, torch.float32, "cpu", 9, None)
    ema_update_(cs, es, z, idx, 0.9, backend="torch")
    ema_update_(cs, es, z, idx, 0.9, backend="torch", deterministic=not mode)
    assert seen == [mode, not mode]


@pytest.mark.parametrize("case", TRITON_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic_triton_cuts_long_runs_into_pieces(case, dtype, poison):
    # The deterministic Triton kernels cut a code's run into pieces of piece_rows rows, summed
    # apart and then added in order. Pieces of 4 rows make every kind show at interpreter sizes:
    # a hot code of most rows, runs of exactly 4 and 5 rows, single rows, empty codes.
    from fastvq.kernels.ema import ema_segment

    device, _ = case
    n, k, d = 70, 9, 33
    cs, es, z, _, w = _ema_inputs(n, k, d, dtype, device, 5, "float")
    runs = {2: 4, 3: 5, 4: 1, 6: 1, 7: 1}  # code 0 takes the other rows; codes 1, 5, 8 none
    idx = torch.cat([torch.full((r,), c) for c, r in runs.items()])
    idx = torch.cat([idx, torch.zeros(n - len(idx), dtype=torch.int64)])
    idx = idx[torch.randperm(n, generator=torch.Generator().manual_seed(6))].to(device)
    ref64 = ref.ema_update_onehot(cs.double(), es.double(), z.double(), idx, 0.8, w.double())
    ref32 = ref.ema_update_onehot(cs, es, z.float(), idx, 0.8, w)
    outs = []
    for piece_rows in (4, 512):
        a, b = cs.clone(), es.clone()
        ema_segment(a, b, z, idx, w, 0.8, 0.2, piece_rows=piece_rows)
        _assert_parity(a, ref64[0], ref32[0], f"cluster_size, pieces of {piece_rows}")
        _assert_parity(b, ref64[1], ref32[1], f"embed_sum, pieces of {piece_rows}")
        outs.append(b)
    # The hot code's sum ran in another order: the pieces did cut it.
    assert not torch.equal(outs[0][0], outs[1][0])


@pytest.mark.parametrize("case", CASES)
def test_ema_update_deterministic_is_bit_identical(case):
    device, backend = case
    n, k, d = (600, 11, 33) if backend == "triton" and INTERPRET else (20_000, 300, 33)
    cs, es, z, _, w = _ema_inputs(n, k, d, torch.bfloat16, device, 3, "float")
    # Skewed codes: code 0 takes about half the rows, where atomics would contend the most.
    g = torch.Generator().manual_seed(4)
    idx = (torch.randint(0, k, (n,), generator=g) * (torch.rand(n, generator=g) > 0.5)).to(device)
    runs = []
    threads = torch.get_num_threads()
    try:
        for run in range(3):
            # The CPU's thread count changes the split of a parallel reduction: it must not matter.
            torch.set_num_threads(1 if run == 2 else threads)
            a, b = cs.clone(), es.clone()
            ema_update_(a, b, z, idx, 0.9, weight=w, deterministic=True, backend=backend)
            runs.append((a, b))
    finally:
        torch.set_num_threads(threads)
    for a, b in runs[1:]:
        assert torch.equal(a, runs[0][0]) and torch.equal(b, runs[0][1])
    a, b = cs.clone(), es.clone()
    ema_update_(a, b, z, idx, 0.9, weight=w, deterministic=False, backend=backend)
    torch.testing.assert_close(a, runs[0][0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(b, runs[0][1], rtol=1e-5, atol=1e-4)
    # ... and the statistics did move: a no-op would pass the checks above.
    assert not torch.allclose(b, 0.9 * es, atol=1e-2)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_ema_update_mask_equals_dropping_rows(case, deterministic):
    device, backend = case
    cs, es, z, idx, mask = _ema_inputs(150, 9, 17, torch.float32, device, 5, "mask")
    idx[~mask] = 0  # padding rows often carry an arbitrary code: it must not matter
    z[~mask] = torch.tensor([math.nan, math.inf], device=device).repeat(9)[:17]  # nor their values
    a, b = cs.clone(), es.clone()
    ema_update_(a, b, z, idx, 0.5, weight=mask, deterministic=deterministic, backend=backend)
    a2, b2 = cs.clone(), es.clone()
    ema_update_(a2, b2, z[mask], idx[mask], 0.5, deterministic=deterministic, backend=backend)
    torch.testing.assert_close(a, a2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b, b2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_ema_update_decay_edges_empty_batch_and_layouts(case, poison):
    device, backend = case
    cs, es, z, idx, _ = _ema_inputs(2 * 3 * 5, 7, 6, torch.float32, device, 6)
    # decay = 1 keeps the statistics exactly; decay = 0 replaces them by the batch's.
    a, b = cs.clone(), es.clone()
    ema_update_(a, b, z, idx, 1.0, backend=backend)
    assert torch.equal(a, cs) and torch.equal(b, es)
    ema_update_(a, b, z, idx, 0.0, backend=backend)
    counts = torch.zeros(7, device=device).index_add_(0, idx, torch.ones_like(z[:, 0]))
    sums = torch.zeros(7, 6, device=device).index_add_(0, idx, z)
    torch.testing.assert_close(a, counts, rtol=0, atol=0)
    torch.testing.assert_close(b, sums, rtol=1e-6, atol=1e-6)
    # An empty batch only decays (also one whose columns are strided: .contiguous() keeps them).
    empty = torch.randn(0, 12, device=device)[:, ::2]
    for det, rows in itertools.product((False, True), (z[:0], empty)):
        a, b = cs.clone(), es.clone()
        ema_update_(a, b, rows, idx[:0], 0.25, deterministic=det, backend=backend)
        torch.testing.assert_close(a, 0.25 * cs, rtol=0, atol=0)
        torch.testing.assert_close(b, 0.25 * es, rtol=0, atol=0)
    # D = 1 from transposes: column stride K or N, which .contiguous() keeps too.
    for det in (False, True):
        want = cs.clone(), es[:, :1].clone()
        ema_update_(*want, z[:, :1].clone(), idx, 0.6, deterministic=det, backend=backend)
        got = cs.clone(), torch.empty(1, 7, device=device).copy_(es[:, :1].T).T
        rows = torch.empty(1, len(z), device=device).copy_(z[:, :1].T).T
        ema_update_(*got, rows, idx, 0.6, deterministic=det, backend=backend)
        assert got[1].stride(1) == 7 and rows.stride(1) == len(z)
        assert torch.equal(got[0], want[0])
        if det or device == "cpu":  # GPU float atomics land in any order: the last bit may differ
            assert torch.equal(got[1], want[1])
        else:
            torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-6)
    # Leading dimensions, int32 indices, and accumulators that are strided views.
    expected = cs.clone(), es.clone()
    ema_update_(*expected, z, idx, 0.7, backend=backend)
    cs_view = torch.zeros(14, device=device)[::2].copy_(cs)
    es_view = torch.zeros(6, 7, device=device).T.copy_(es)
    assert not cs_view.is_contiguous() and not es_view.is_contiguous()
    ema_update_(cs_view, es_view, z.view(2, 3, 5, 6), idx.view(2, 3, 5).int(), 0.7, backend=backend)
    torch.testing.assert_close(cs_view, expected[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(es_view, expected[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_ema_update_takes_accumulators_that_require_grad(case, deterministic):
    # Parameters as accumulators: every backend updates them in place (under no_grad), as the
    # C++ op did, rather than some raising torch's in-place-on-a-leaf error.
    device, backend = case
    cs, es, z, idx, _ = _ema_inputs(20, 5, 3, torch.float32, device, 7)
    expected = cs.clone(), es.clone()
    ema_update_(*expected, z, idx, 0.9, deterministic=deterministic, backend=backend)
    a, b = torch.nn.Parameter(cs.clone()), torch.nn.Parameter(es.clone())
    ema_update_(a, b, z, idx, 0.9, deterministic=deterministic, backend=backend)
    assert torch.equal(a.detach(), expected[0]) and torch.equal(b.detach(), expected[1])
    assert a.grad_fn is None and b.grad_fn is None


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_ema_update_keeps_a_hot_codes_batch(case, deterministic):
    """A code at the steady state of large batches (count 300,000 at decay 0.99) that takes all
    of another 300,000 rows keeps its count and mean. Float atomics added straight into the
    decayed accumulators lose each row's 0.01, below half the count's ulp (2^-5), and with it the
    whole batch (297,000)."""
    device, backend = case
    n = 300_000
    cs = torch.tensor([float(n), 1.0], device=device)
    es = torch.tensor([[0.5 * n], [0.0]], device=device)
    z = torch.full((n, 1), 0.5, device=device)
    idx = torch.zeros(n, dtype=torch.int64, device=device)
    ema_update_(cs, es, z, idx, 0.99, deterministic=deterministic, backend=backend)
    assert abs(cs[0].item() - n) <= 1 and abs(es[0, 0].item() - 0.5 * n) <= 0.5
    assert cs[1].item() == pytest.approx(0.99)


@pytest.mark.parametrize("case", [c for c in CASES if c.values[0][1] in ("torch", "cpu")])
@pytest.mark.parametrize("deterministic", [False, True])
def test_ema_update_counts_past_float32_integers(case, deterministic):
    """2^24 + 2^12 rows of one code in one batch: every row counts (a float32 running count stops
    at 2^24, where adding 1 rounds back down), on the backends fast enough for 17M rows here."""
    device, backend = case
    n = (1 << 24) + (1 << 12)
    cs, es = torch.ones(2, device=device), torch.zeros(2, 1, device=device)
    z = torch.full((n, 1), 0.25, device=device)
    idx = torch.zeros(n, dtype=torch.int64, device=device)
    ema_update_(cs, es, z, idx, 0.0, deterministic=deterministic, backend=backend)
    assert cs.tolist() == [n, 0.0] and es[0, 0].item() == n / 4


@pytest.mark.parametrize("case", [c for c in CASES if c.values[0][1] in ("torch", "cpu")])
def test_ema_update_and_kmeans_sum_a_hot_code_accurately(case):
    """2^21 rows of 10 + U(0, 1) in one code: the mean is the float64 mean to 2^-20. Summed one
    by one in float32, the sum's ulp (2 past 2^24) exceeds the rows' spread and every row rounds
    the same way (about 1e-2 off). k-means on two such clusters too."""
    device, backend = case
    g = torch.Generator().manual_seed(12)
    n = 1 << 21
    z = (10 + torch.rand(n, 1, generator=g)).to(device)
    cs, es = torch.ones(2, device=device), torch.zeros(2, 1, device=device)
    ema_update_(cs, es, z, torch.zeros(n, dtype=torch.int64, device=device), 0.0, backend=backend)
    mean = z.double().mean().item()
    assert cs[0].item() == n and abs(es[0, 0].item() / n - mean) < 2.0**-20 * mean
    x = torch.cat([z, -z])
    centroids = kmeans(x, 2, iters=1, init=torch.tensor([[9.0], [-9.0]]), backend=backend)
    expected = torch.full((2,), mean, dtype=torch.float64)
    assert torch.allclose(centroids.double().flatten().abs(), expected, rtol=2.0**-20, atol=0)


@pytest.mark.parametrize("case", [c for c in CASES if c.values[0][1] in ("torch", "cpu")])
@pytest.mark.parametrize("w", [1e-3, -0.1])
def test_ema_update_sums_a_hot_code_of_small_or_negative_weights_accurately(case, w):
    """2^20 rows of weight w in one code: the weighted count and sum are the float64 ones to
    2^-14 (float32 partials of 256 rows err by up to 256 2^-24 = 2^-16). The C++ kernel moved its
    partials into double by their weight, not rows: small weights piled 256,000 rows into one
    partial and negative ones never flushed (3e-3 to 1e-2 off)."""
    device, backend = case
    n = 1 << 20
    z = torch.full((n, 1), 3.0, device=device)
    weight = torch.full((n,), w, device=device)
    cs, es = torch.ones(2, device=device), torch.zeros(2, 1, device=device)
    idx = torch.zeros(n, dtype=torch.int64, device=device)
    ema_update_(cs, es, z, idx, 0.0, weight=weight, backend=backend)
    want = n * float(torch.tensor(w, dtype=torch.float32))
    assert cs[0].item() == pytest.approx(want, rel=2.0**-14)
    assert es[0, 0].item() == pytest.approx(3 * want, rel=2.0**-14)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_ema_update_in_row_chunks_equals_one_pass(case, deterministic, monkeypatch):
    """Batches longer than fastvq.ops.codebook._STATS_CHUNK_ROWS are scattered chunk by chunk and
    added in float64 (here chunks of 64 rows): the same statistics, weights and all."""
    from fastvq.ops import codebook

    device, backend = case
    cs, es, z, idx, w = _ema_inputs(300, 7, 5, torch.float32, device, 8, "float")
    expected = cs.clone(), es.clone()
    ema_update_(*expected, z, idx, 0.9, weight=w, deterministic=deterministic, backend=backend)
    monkeypatch.setattr(codebook, "_STATS_CHUNK_ROWS", 64)
    got = cs.clone(), es.clone()
    ema_update_(*got, z, idx, 0.9, weight=w, deterministic=deterministic, backend=backend)
    centroids = kmeans(z, 3, iters=3, generator=torch.Generator(device).manual_seed(0))
    monkeypatch.setattr(codebook, "_STATS_CHUNK_ROWS", 1 << 22)
    unchunked = kmeans(z, 3, iters=3, generator=torch.Generator(device).manual_seed(0))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(centroids, unchunked, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", [c for c in CASES if c.values[0][1] == "torch"])
def test_ema_update_never_builds_n_by_k(case):
    # N = K = 2^17: a one-hot would take 64 GiB; the scatter needs O(K * D + N).
    device, _ = case
    n = k = 1 << 17
    cs, es, z, idx, _ = _ema_inputs(n, k, 2, torch.float32, device, 7)
    expected = ref.ema_update_index_add(cs.double(), es.double(), z.double(), idx, 0.5)
    ema_update_(cs, es, z, idx, 0.5, check_indices=False)
    torch.testing.assert_close(cs.double(), expected[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(es.double(), expected[1], rtol=1e-6, atol=1e-6)


def test_reference_scatter_equals_onehot_with_weights():
    # The scatter reference (the oracle of the test above) against the one-hot one, in float64,
    # with weights: a float weight scales both a row's count and its sum.
    for weighting in ("float", "mask"):
        cs, es, z, idx, w = _ema_inputs(300, 17, 5, torch.float64, "cpu", 24, weighting)
        cs, es = cs.double(), es.double()
        want = ref.ema_update_onehot(cs, es, z, idx, 0.7, w)
        got = ref.ema_update_index_add(cs, es, z, idx, 0.7, w)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        unweighted = ref.ema_update_index_add(cs, es, z, idx, 0.7)
        assert (unweighted[0] - got[0]).abs().max().item() > 0.1, weighting


def _bad(**changes):
    cs, es, z, idx, _ = _ema_inputs(10, 6, 4, torch.float32, "cpu", 8)
    args = dict(cluster_size=cs, embed_sum=es, z=z, indices=idx, decay=0.9) | changes
    return args


LONG, BF16, F64 = torch.int64, torch.bfloat16, torch.float64
BAD_EMA_INPUTS = [
    (dict(cluster_size=torch.ones(6, dtype=LONG)), TypeError, "cluster_size must be a float32"),
    (dict(embed_sum=torch.ones(6, 4, dtype=BF16)), TypeError, "embed_sum must be a float32"),
    (dict(embed_sum=torch.ones(6, 4, dtype=F64)), TypeError, "share one dtype"),
    (dict(cluster_size=[1.0] * 6), TypeError, "cluster_size must be a torch.Tensor"),
    (dict(cluster_size=torch.ones(5)), ValueError, r"shape \(K, D\) with K = 5"),
    (dict(cluster_size=torch.ones(6, 1)), ValueError, r"cluster_size must have shape \(K,\)"),
    (dict(z=torch.randn(10, 5)), ValueError, r"z must have shape \(..., D\) with D = 4"),
    (dict(z=torch.randn(10, 4).long()), TypeError, "z must be float32"),
    (dict(indices=torch.zeros(9, dtype=LONG)), ValueError, "indices must have z's leading shape"),
    (
        dict(indices=torch.zeros(10)),
        TypeError,
        "indices must be an int64, int32, int16, int8 or uint8 tensor",
    ),
    (dict(indices=torch.full((10,), 6)), ValueError, r"in \[0, 6\), got values from 6 to 6"),
    (dict(indices=torch.full((10,), -1)), ValueError, r"indices must lie in \[0, 6\)"),
    (dict(decay=1.5), ValueError, r"decay must be in \[0, 1\], got 1.5"),
    (dict(decay=-0.1), ValueError, r"decay must be in \[0, 1\]"),
    (dict(decay=float("nan")), ValueError, r"decay must be in \[0, 1\]"),
    (dict(decay=torch.tensor(0.5)), TypeError, "decay must be a real number"),
    (dict(weight=torch.ones(9)), ValueError, "weight must have z's leading shape"),
    (dict(weight=torch.ones(10, dtype=LONG)), TypeError, "weight must be a floating or bool"),
    (dict(cluster_size=torch.ones(1).expand(6)), ValueError, "cluster_size is written in place"),
    (dict(embed_sum=torch.ones(6, 1).expand(6, 4)), ValueError, "embed_sum is written in place"),
    (dict(deterministic="yes"), TypeError, "deterministic must be a bool or None, got str"),
    (dict(backend="numpy"), ValueError, "backend must be one of"),
    (dict(backend="cuda"), ValueError, "backend 'cuda' (is unavailable|runs on cuda tensors)"),
    (dict(all_reduce=True), ValueError, "all_reduce needs torch.distributed to be initialized"),
    (dict(all_reduce="world"), TypeError, "all_reduce must be a bool or a torch.distributed"),
    (dict(z=torch.randn(10, 4, device="meta")), ValueError, "z is on meta"),
]


def test_written_in_place_tensors_must_not_repeat_elements():
    # check_writable's boundary: a stride-0 dimension of size 2 repeats an element; one of size
    # 1 holds one element, written once.
    z, idx = torch.randn(5, 3), torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match="embed_sum is written in place"):
        ema_update_(torch.ones(2), torch.zeros(1, 3).expand(2, 3), z, idx, 0.9)
    cs, es = torch.zeros(()).expand(1), torch.zeros(1, 3)
    ema_update_(cs, es, z, idx, 0.5)
    assert cs.item() == 2.5  # 0.5 * 0 + 0.5 * 5 rows
    torch.testing.assert_close(es[0], 0.5 * z.sum(0))


@pytest.mark.parametrize("changes, error, match", BAD_EMA_INPUTS)
def test_ema_update_bad_input(changes, error, match):
    args = _bad(**changes)
    with pytest.raises(error, match=match):
        ema_update_(
            args.pop("cluster_size"),
            args.pop("embed_sum"),
            args.pop("z"),
            args.pop("indices"),
            args.pop("decay"),
            **args,
        )


@pytest.mark.parametrize("case", TRITON_CASES)
def test_opcheck(case):
    device, _ = case
    cs, es, z, idx, w = _ema_inputs(37, 5, 24, torch.float32, device, 9, "float")
    torch.library.opcheck(torch.ops.fastvq.ema_scatter_triton, (cs, es, z, idx, w, 0.3))
    torch.library.opcheck(torch.ops.fastvq.ema_scatter_triton, (cs, es, z.half(), idx, None, 1.0))
    torch.library.opcheck(torch.ops.fastvq.ema_segment_triton, (cs, es, z, idx, w, 0.9, 0.1))
    torch.library.opcheck(
        torch.ops.fastvq.ema_segment_triton, (cs, es, z.bfloat16(), idx.int(), None, 0.0, 1.0)
    )


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_ema_step_compiles_without_graph_breaks(case, deterministic):
    device, backend = case

    def step(cs, es, z, idx):
        ema_update_(cs, es, z, idx, 0.9, deterministic=deterministic, backend=backend)
        return ema_codebook(cs, es)

    cs, es, z, idx, _ = _ema_inputs(64, 10, 8, torch.float32, device, 10)
    a, b = cs.clone(), es.clone()
    eager = step(a, b, z, idx)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a2, b2 = cs.clone(), es.clone()
    torch.testing.assert_close(compiled(a2, b2, z, idx), eager)
    torch.testing.assert_close((a2, b2), (a, b))  # the in-place update survives compilation


# --- ema_codebook ------------------------------------------------------------------------------


def test_ema_codebook():
    g = torch.Generator().manual_seed(12)
    cs, es = torch.rand(50, generator=g, dtype=torch.float64) * 3, torch.randn(50, 7, generator=g)
    es = es.double()
    for eps in (1e-5, 0.1, 0.0):
        torch.testing.assert_close(ema_codebook(cs, es, eps), ref.ema_codebook(cs, es, eps))
    # Hand-computed: n = 4, K = 2, eps = 2: smoothed = (cs + 2) / 8 * 4 = [1.5, 2.5].
    out = ema_codebook(torch.tensor([1.0, 3.0]), torch.tensor([[3.0], [-5.0]]), eps=2.0)
    assert out.tolist() == [[2.0], [-2.0]]
    # Statistics started at cluster_size = 1, embed_sum = codebook give the codebook back.
    codebook = torch.randn(300, 5, generator=g)
    torch.testing.assert_close(ema_codebook(torch.ones(300), codebook.clone()), codebook)
    target = torch.empty(300, 5, dtype=torch.bfloat16)
    assert ema_codebook(torch.ones(300), codebook, out=target) is target
    torch.testing.assert_close(target, codebook.bfloat16())
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        ema_codebook(torch.ones(3), torch.ones(3, 2), eps=-1.0)
    with pytest.raises(ValueError, match="out must have embed_sum's shape"):
        ema_codebook(torch.ones(3), torch.ones(3, 2), out=torch.empty(2, 3))
    with pytest.raises(ValueError, match="out is written in place, so it must not be an expanded"):
        ema_codebook(torch.ones(3), torch.ones(3, 2), out=torch.empty(1, 2).expand(3, 2))
    # Expanded statistics are only read: fine.
    torch.testing.assert_close(
        ema_codebook(torch.ones(1).expand(3), es[:3].float()), es[:3].float()
    )
    with pytest.raises(ValueError, match=r"embed_sum must have shape \(K, D\) with K = 3"):
        ema_codebook(torch.ones(3), torch.ones(4, 2))
    # out= a Parameter (the module's codebook): written in place, no autograd error.
    param = torch.nn.Parameter(torch.empty(300, 5))
    assert ema_codebook(torch.ones(300), codebook, out=param) is param
    assert torch.equal(param.detach(), codebook) and param.grad_fn is None
    # n = 0: not finite, inf where embed_sum is not 0 (the docstring's promise).
    empty = ema_codebook(torch.zeros(2), torch.tensor([[1.0], [0.0]]))
    assert empty[0].isinf().all() and empty[1].isnan().all()


# --- reset_dead_codes_ -------------------------------------------------------------------------


def _dead_setup(n=200, k=50, d=7, seed=13, codebook_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    cs = torch.rand(k, generator=g) * 4  # about a quarter below threshold 1
    es = torch.randn(k, d, generator=g)
    codebook = torch.randn(k, d, generator=g).to(codebook_dtype)
    z = torch.randn(n, d, generator=g)
    return codebook, cs, es, z


def test_reset_dead_codes_replaces_exactly_the_dead_ones():
    codebook, cs, es, z = _dead_setup()
    cs[:3] = 1.0  # at the threshold: alive (a reset code starts there, and must stay alive)
    c0, cs0, es0 = codebook.clone(), cs.clone(), es.clone()
    replaced = reset_dead_codes_(codebook, cs, es, z, 1.0, torch.Generator().manual_seed(0))
    dead = (cs0 < 1.0).nonzero().flatten()
    assert replaced.dtype == torch.int64 and torch.equal(replaced, dead) and 5 < len(dead) < 25
    live = cs0 >= 1.0
    assert torch.equal(codebook[live], c0[live])
    assert torch.equal(cs[live], cs0[live]) and torch.equal(es[live], es0[live])
    # Each new code is a row of z, and no row is used twice (z has more rows than dead codes).
    match = (codebook[dead][:, None, :] == z[None]).all(-1)
    assert bool((match.sum(1) == 1).all())
    assert len(set(match.int().argmax(1).tolist())) == len(dead)
    # Statistics restart at the threshold, consistent with the new codes.
    assert bool((cs[dead] == 1.0).all())
    torch.testing.assert_close(ema_codebook(cs, es)[dead], codebook[dead], rtol=1e-6, atol=1e-6)


def test_reset_dead_codes_is_reproducible_under_a_generator():
    results = []
    for seed in (0, 0, 1):
        codebook, cs, es, z = _dead_setup()
        reset_dead_codes_(codebook, cs, es, z, 1.0, torch.Generator().manual_seed(seed))
        results.append(codebook)
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], results[2])


def test_reset_dead_codes_small_batch_low_precision_codebook_and_nothing_dead():
    # 3 rows for 13 dead codes: every row is used, none more than ceil(13 / 3) = 5 times.
    codebook, cs, es, z = _dead_setup(n=3, codebook_dtype=torch.bfloat16)
    codebook = torch.nn.Parameter(codebook)  # a module's codebook: updated under no_grad
    replaced = reset_dead_codes_(codebook, cs, es, z, 1.0, torch.Generator().manual_seed(2))
    assert len(replaced) > 3
    match = (codebook.detach()[replaced].float()[:, None, :] == z.bfloat16().float()[None]).all(-1)
    assert bool((match.sum(1) == 1).all())
    uses = match.sum(0)
    assert bool((uses >= 1).all()) and int(uses.max()) <= -(-len(replaced) // 3)
    torch.testing.assert_close(ema_codebook(cs, es)[replaced], z[match.int().argmax(1)])
    # Nothing below the threshold: nothing changes.
    codebook, cs, es, z = _dead_setup()
    before = codebook.clone(), cs.clone(), es.clone()
    replaced = reset_dead_codes_(codebook, cs, es, z, 0.0)
    assert replaced.shape == (0,) and replaced.dtype == torch.int64
    assert all(torch.equal(a, b) for a, b in zip(before, (codebook, cs, es), strict=True))


def test_reset_dead_codes_bad_input():
    codebook, cs, es, z = _dead_setup()
    with pytest.raises(ValueError, match="threshold must be finite and >= 0"):
        reset_dead_codes_(codebook, cs, es, z, -1.0)
    with pytest.raises(ValueError, match="codebook must have embed_sum's shape"):
        reset_dead_codes_(codebook[:-1], cs, es, z, 1.0)
    with pytest.raises(ValueError, match="z must hold at least one row"):
        reset_dead_codes_(codebook, cs, es, z[:0], 1.0)
    # No dead code: an empty batch (every row masked out) is fine.
    assert reset_dead_codes_(codebook, cs + 10, es, z[:0], 1.0).numel() == 0
    with pytest.raises(ValueError, match=r"z must have shape \(..., D\) with D = 7"):
        reset_dead_codes_(codebook, cs, es, z[:, :3], 1.0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        reset_dead_codes_(codebook, cs, es, z, 1.0, generator=0)
    expanded = {"codebook": codebook[:1].expand(50, 7), "cluster_size": cs[:1].expand(50)}
    expanded["embed_sum"] = es[:, :1].expand(50, 7)
    for name, value in expanded.items():
        args = {"codebook": codebook, "cluster_size": cs, "embed_sum": es} | {name: value}
        with pytest.raises(ValueError, match=f"{name} is written in place"):
            reset_dead_codes_(z=z, threshold=1.0, **args)


# --- kmeans ------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_kmeans_matches_brute_force_lloyd(metric, poison):
    g = torch.Generator().manual_seed(14)
    x = torch.randn(300, 5, generator=g, dtype=torch.float64)
    init = x[torch.randperm(300, generator=g)[:17]].clone()
    init[3] = 100.0  # far from every row: its cluster empties and is re-seeded
    init[9] = -100.0
    got, inertia = kmeans(x, 17, iters=6, metric=metric, init=init, return_inertia=True)
    expected = ref.lloyd(x, init, 6, metric)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(inertia[-1], ref.inertia(x, expected, metric))
    assert bool((got.abs() < 10).all())  # the far centroids did move
    assert bool((inertia[1:] <= inertia[:-1] * (1 + 1e-12)).all()), inertia


def test_kmeans_plus_plus_finds_separated_blobs_where_random_init_does_not():
    # 12 tight blobs far apart: k-means++ (exact for <= 64 codes) puts one centre in each; 12
    # uniform picks almost surely miss one (all 12 distinct has probability 12!/12^12 = 5e-5).
    g = torch.Generator().manual_seed(15)
    blobs = torch.randn(12, 6, generator=g) * 100
    labels = torch.arange(12).repeat_interleave(50)
    x = blobs[labels] + torch.randn(600, 6, generator=g)

    def blobs_hit(init):
        centres = kmeans(x, 12, iters=0, init=init, generator=torch.Generator().manual_seed(1))
        return len(set(torch.cdist(centres, blobs).argmin(1).tolist()))

    assert blobs_hit("kmeans++") == 12
    assert blobs_hit("random") < 12


def test_kmeans_large_codebook_decreases_inertia_and_beats_random_init():
    # 4096 codes from 50k rows: the batched k-means++ path (64 codes per round after doubling).
    g = torch.Generator().manual_seed(16)
    centers = torch.randn(2000, 16, generator=g) * 3
    noise = torch.randn(50_000, 16, generator=g)
    x = centers[torch.randint(0, 2000, (50_000,), generator=g)] + noise
    gen = torch.Generator().manual_seed(0)
    centroids, inertia = kmeans(x, 4096, iters=3, generator=gen, return_inertia=True)
    assert centroids.shape == (4096, 16) and bool(centroids.isfinite().all())
    assert bool((inertia[1:] <= inertia[:-1] * (1 + 1e-6)).all()), inertia
    assert inertia[-1] < 0.7 * inertia[0]
    _, random_init = kmeans(x, 4096, iters=0, init="random", generator=gen, return_inertia=True)
    # Measured here: k-means++ 1.30e6, random 1.49e6 (about 13 % apart).
    assert inertia[0] < 0.95 * random_init[0], (inertia[0], random_init[0])


def test_kmeans_reproducible_low_precision_and_distinct_random_init():
    g = torch.Generator().manual_seed(17)
    x = torch.randn(2000, 8, generator=g).bfloat16()
    runs = [kmeans(x, 100, iters=2, generator=torch.Generator().manual_seed(s)) for s in (3, 3, 4)]
    assert runs[0].dtype == torch.float32
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    init = kmeans(x, 100, iters=0, init="random", generator=torch.Generator().manual_seed(5))
    assert len(torch.unique(init, dim=0)) == 100
    assert bool((init[:, None, :] == x.float()[None]).all(-1).any(1).all())  # rows of x


def test_kmeanspp_draws_in_proportion_to_squared_distance():
    # After a first centre at the origin, the second is drawn with probability D^2 / sum D^2:
    # 50 rows at D^2 = 1 and one at D^2 = 20 give the far row 20 / 70. Keys D^2 * Exp(1) (not
    # D^2 / Exp(1)) drew it 79 % of the time, and clean blobs did not show it.
    from fastvq.ops.codebook import _kmeanspp

    x = torch.zeros(251, 52)
    x[200:250, :50] = torch.eye(50)
    x[250, 51] = 20**0.5
    hits = trials = 0
    for seed in range(1500):
        first, second = _kmeanspp(x, 2, torch.Generator().manual_seed(seed), "cpu").tolist()
        if first < 200:
            trials += 1
            hits += second == 250
    assert trials > 1000 and abs(hits / trials - 20 / 70) < 0.05


def test_kmeans_reseeds_a_lone_empty_cluster():
    # One centroid far from every row: the farthest row takes it (test_distributed checks the
    # same over ranks).
    g = torch.Generator().manual_seed(0)
    blobs = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 8.0]])
    x = (blobs[:, None, :] + torch.randn(3, 300, 2, generator=g)).reshape(-1, 2)
    init = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [100.0, 100.0]])
    centroids = kmeans(x, 3, iters=10, init=init)
    assert torch.cdist(centroids, blobs).min(0).values.max() < 0.3


def test_kmeans_more_empty_clusters_than_rows():
    # An init of 8 centroids for 5 rows, 7 of them far from every row: the rows reseed the 5
    # emptiest clusters' slots (farthest rows first) and the other 2 keep their centroid.
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(19))
    init = torch.full((8, 3), 100.0)
    init[0] = 0
    out = kmeans(x, 8, iters=1, init=init)
    assert bool((out[:1] != 100).all())
    reseeded = (out[1:, None, :] == x[None]).all(-1).any(1)
    assert int(reseeded.sum()) == 5 and bool((out[1:][~reseeded] == 100).all())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(num_codes=2001), ValueError, "x has 2000 rows, fewer than num_codes = 2001"),
        (dict(num_codes=0), ValueError, "num_codes must be >= 1"),
        (dict(num_codes=2.0), TypeError, "num_codes must be an int"),
        (dict(iters=-1), ValueError, "iters must be >= 0"),
        (dict(metric="dot"), ValueError, "metric must be one of"),
        (dict(init="forgy"), ValueError, "init must be one of"),
        (dict(init=torch.randn(4, 8)), ValueError, r"init must have shape \(10, 8\)"),
        (dict(x=torch.randn(8)), ValueError, "x must have shape"),
        (dict(x=torch.ones(20, 8, dtype=torch.int64)), TypeError, "x must be float32"),
        (dict(backend="jax"), ValueError, "backend must be one of"),
        (dict(x=torch.full((20, 8), math.nan)), ValueError, "x contains NaN or Inf$"),
        (dict(x=torch.randn(20, 0)), ValueError, "x's last dimension D must be between 1"),
        (dict(x=torch.randn(20, 1025)), ValueError, "x's last dimension D must be between 1"),
    ],
)
def test_kmeans_bad_input(kwargs, error, match):
    args = dict(x=torch.randn(2000, 8), num_codes=10) | kwargs
    with pytest.raises(error, match=match):
        kmeans(args.pop("x"), args.pop("num_codes"), **args)


# --- code usage --------------------------------------------------------------------------------


def test_code_counts_accumulate_across_batches():
    g = torch.Generator().manual_seed(18)
    batches = [torch.randint(0, 37, shape, generator=g) for shape in [(5, 40), (0,), (97,)]]
    total = torch.zeros(37, dtype=torch.int64)
    for b in batches:
        assert code_counts(b, 37, out=total) is total
        assert torch.equal(code_counts(b, 37), ref.code_counts_onehot(b, 37))
    everything = torch.cat([b.reshape(-1) for b in batches])
    assert torch.equal(total, ref.code_counts_onehot(everything, 37))
    assert int(total.sum()) == everything.numel()
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 37\), got values from 0 to 37"):
        code_counts(torch.tensor([0, 37]), 37)
    with pytest.raises(TypeError, match="indices must be an int64, int32, int16, int8 or uint8"):
        code_counts(torch.zeros(3), 37)
    with pytest.raises(ValueError, match=r"out must have shape \(37,\)"):
        code_counts(batches[0], 37, out=torch.zeros(36, dtype=torch.int64))
    # bool cannot hold counts; uint8 wrapped (300 counts read 44), float16 rounds from 2048
    for dtype in (torch.bool, torch.uint8, torch.int8, torch.float16, torch.bfloat16):
        with pytest.raises(TypeError, match="out must be int64 .exact., int32, float32 or float64"):
            code_counts(batches[0], 37, out=torch.zeros(37, dtype=dtype))
    with pytest.raises(ValueError, match="out is written in place, so it must not be an expanded"):
        code_counts(batches[0], 37, out=torch.zeros(1, dtype=torch.int64).expand(37))


def test_code_counts_accumulate_into_a_parameter():
    # As ema_update_ and ema_codebook(out=) do: a Parameter (requires grad) is written as data.
    total = torch.nn.Parameter(torch.zeros(3))
    assert code_counts(torch.tensor([0, 2, 2]), 3, out=total) is total
    assert torch.equal(total.detach(), torch.tensor([1.0, 0.0, 2.0])) and total.grad_fn is None


def test_kmeans_far_from_the_origin_is_lloyd_about_the_mean():
    # Tight clusters at an offset of 3000: the search's rounding (relative to |x| |c|) lost the
    # nearest centroid, and the objective went up and down (24149, 22530, 23405, ..., 21420,
    # against 1855 for float64 Lloyd).
    g = torch.Generator().manual_seed(20)
    centres = torch.randn(32, 8, generator=g)
    x = centres[torch.randint(32, (4000,), generator=g)] + 0.1 * torch.randn(4000, 8, generator=g)
    init = x[torch.randperm(4000, generator=g)[:32]]
    want = ref.lloyd(x.double(), init.double(), 10, "l2")
    for backend in ("cpu", "torch"):
        got, inertia = kmeans(
            x + 3000, 32, 10, init=init + 3000, backend=backend, return_inertia=True
        )
        assert bool((inertia[1:] <= inertia[:-1] * (1 + 1e-5)).all()), inertia
        # Rows at 3000 hold x to 2^-12: the sums, not the search, set the last digits.
        assert inertia[-1].item() == pytest.approx(
            ref.inertia(x.double(), want, "l2").item(), rel=1e-2
        )
        torch.testing.assert_close(got.double() - 3000, want, rtol=0, atol=0.02)


def test_kmeans_never_seeds_two_centroids_with_copies_of_a_row():
    # Repeated rows (the trainer repeats latents when it has fewer than codes): batched k-means++
    # drew copies of one row in a round, and empty clusters took copies of the farthest row.
    x = torch.randn(1024, 8, generator=torch.Generator().manual_seed(21)).repeat(4, 1)
    seeded = kmeans(x, 1024, 0, generator=torch.Generator().manual_seed(0))
    assert len(torch.unique(seeded, dim=0)) == 1024  # was 998
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(22)).repeat(40, 1)
    out = kmeans(x, 50, 10, init="random", generator=torch.Generator().manual_seed(1))
    assert len(torch.unique(out, dim=0)) == 50  # was 39 to 42
    line = torch.tensor([0.0, 10.0, 20.0, 30.0]).repeat_interleave(10)[:, None]
    out = kmeans(line, 4, 1, init=torch.zeros(4, 1))  # 3 empty clusters, 1 reseed pass
    assert sorted(out.flatten().tolist()) == [10.0, 15.0, 20.0, 30.0]  # was [15, 30, 30, 30]


def test_perplexity_and_usage():
    k = 64
    assert perplexity(torch.full((k,), 5)).item() == pytest.approx(k)
    assert perplexity(torch.zeros(k).index_fill_(0, torch.tensor([9]), 7.0)).item() == 1.0
    assert perplexity(torch.zeros(k, dtype=torch.int64)).item() == 0.0
    g = torch.Generator().manual_seed(19)
    counts = torch.randint(0, 50, (3, k), generator=g) * (torch.rand(3, k, generator=g) > 0.5)
    torch.testing.assert_close(perplexity(counts).double(), ref.perplexity(counts))
    counts[1] = 0  # a row without any count: perplexity 0 in both
    torch.testing.assert_close(perplexity(counts).double(), ref.perplexity(counts))
    assert ref.perplexity(counts)[1].item() == 0.0
    torch.testing.assert_close(usage(counts).double(), ref.usage(counts))
    assert perplexity(counts).shape == (3,) and perplexity(counts).dtype == torch.float32
    assert usage(torch.tensor([0, 3, 0, 1])).item() == 0.5
    subnormal = torch.tensor([1e-310, 1e-310], dtype=torch.float64)  # clamped total: 1.0498
    assert perplexity(subnormal).item() == pytest.approx(2.0)
    # Two codes, 3:1: exp(-(3/4 log 3/4 + 1/4 log 1/4)).
    p = torch.tensor([0.75, 0.25], dtype=torch.float64)
    expected = (-(p * p.log()).sum()).exp().item()
    assert perplexity(torch.tensor([3.0, 1.0])).item() == pytest.approx(expected)
    with pytest.raises(TypeError, match="counts must be a torch.Tensor"):
        perplexity([1, 2])
    for fn in (perplexity, usage):  # no codes: usage would be NaN, perplexity 0
        with pytest.raises(ValueError, match="K >= 1"):
            fn(torch.zeros(3, 0))


# --- the C++ op called directly (torch.ops.fastvq.ema_scatter_cpp) ------------------------------

_CPP = fastvq.backends()["cpu"].available and hasattr(torch.ops.fastvq, "ema_scatter_cpp")
CPP_DEVICES = [
    pytest.param(
        device,
        marks=[pytest.mark.gpu] * (device == "cuda")
        + [pytest.mark.skipif(not _CPP, reason="fastvq._C without fastvq::ema_scatter_cpp")],
    )
    for device in ("cpu", "cuda")
]


@pytest.mark.parametrize("device", CPP_DEVICES)
def test_cpp_opcheck(device):
    op = torch.ops.fastvq.ema_scatter_cpp.default
    cs, es, z, idx, w = _ema_inputs(37, 5, 24, torch.float32, device, 19, "float")
    for det in (False, True):
        torch.library.opcheck(op, (cs, es, z, idx, w, 0.3, 0.7, det))
        torch.library.opcheck(op, (cs, es, z.half(), idx, None, 1.0, 1.0, det))
        torch.library.opcheck(op, (cs, es, z.bfloat16()[:0], idx[:0], None, 0.5, 0.5, det))


@pytest.mark.parametrize("device", CPP_DEVICES)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cpp_op_matches_reference(device, deterministic, dtype, poison):
    # Strided accumulators (the (K, D + 1) layout of ema_update_'s buffer), weights with zeros
    # (NaN rows under weight 0 must not leak), D = 37 (a partial column tile on CUDA).
    n, k, d = 515, 23, 37
    cs, es, z, idx, w = _ema_inputs(n, k, d, dtype, device, 20, "float")
    w[::7] = 0
    z[::7] = float("nan")
    buf = torch.cat([es, cs[:, None]], dim=1)
    counts, sums = buf[:, d], buf[:, :d]
    keep, gain = 0.8, 0.35
    torch.ops.fastvq.ema_scatter_cpp(counts, sums, z, idx, w, keep, gain, deterministic)
    live = w != 0
    zl, il, wl = z[live].double().cpu(), idx[live].cpu(), w[live].double().cpu()
    ref_c = keep * cs.double().cpu() + gain * torch.zeros(k, dtype=F64).index_add_(0, il, wl)
    ref_s = keep * es.double().cpu() + gain * torch.zeros(k, d, dtype=F64).index_add_(
        0, il, wl[:, None] * zl
    )
    torch.testing.assert_close(counts.double().cpu(), ref_c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sums.double().cpu(), ref_s, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not _CPP, reason="fastvq._C without fastvq::ema_scatter_cpp")
def test_cpp_op_bit_identical_across_thread_counts():
    # The CPU kernels split codes among threads (csrc/cpu/by_code.h): 1 and 2 threads must give
    # the same bits, for the EMA statistics and for quantize's codebook gradient alike.
    n, k, d = 30_000, 257, 33
    cs, es, z, _, w = _ema_inputs(n, k, d, torch.bfloat16, "cpu", 21, "float")
    g = torch.Generator().manual_seed(22)
    # Skewed: code 3 takes about half the rows.
    idx = torch.where(torch.rand(n, generator=g) > 0.5, torch.randint(0, k, (n,), generator=g), 3)
    cb = torch.randn(k, d, generator=g).bfloat16()
    up = torch.randn(n, d, generator=g).bfloat16()
    threads = torch.get_num_threads()
    runs = []
    try:
        for t in (1, 2, 1, 2):
            torch.set_num_threads(t)
            a, b = cs.clone(), es.clone()
            torch.ops.fastvq.ema_scatter_cpp(a, b, z, idx, w, 0.9, 0.1, False)
            stats = torch.ops.fastvq.quantize_fwd_cpp(z, cb, idx, "rotation")[1]
            dz, dc = torch.ops.fastvq.quantize_bwd_cpp(
                up, z, cb, idx, stats, "rotation", True, True
            )
            runs.append((a, b, dz, dc))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for x, y in zip(run, runs[0], strict=True):
            assert torch.equal(x, y)
    # ... and it computed something: the sums moved away from 0.9 * es.
    assert not torch.allclose(runs[0][1], 0.9 * es, atol=1e-2)


@pytest.mark.parametrize("case", CASES)
def test_ema_update_refuses_rows_that_share_the_statistics_memory(case):
    # The kernels read z (and weight) while they write the statistics: aliased, the result
    # would depend on the threads' order. The (K, D + 1) buffer layout (counts and sums as views
    # of one tensor) is fine.
    device, backend = case
    buf = torch.randn(64, 5, device=device)
    counts, sums = buf[:, 4], buf[:, :4]
    idx = torch.arange(64, device=device)
    with pytest.raises(ValueError, match="z must not share memory with cluster_size or embed_sum"):
        ema_update_(counts, sums, sums, idx, 0.5, backend=backend)
    with pytest.raises(ValueError, match="weight must not share memory"):
        ema_update_(counts, sums, torch.randn_like(sums), idx, 0.5, weight=counts, backend=backend)
    rows = torch.randn(64, 4, device=device)
    ema_update_(counts, sums, rows, idx, 0.0, backend=backend)
    assert torch.equal(counts, torch.ones_like(counts)) and torch.equal(sums, rows)


@pytest.mark.parametrize("case", CASES)
def test_ema_update_refuses_statistics_that_share_elements(case):
    # cluster_size = buf[:, 0] is also embed_sum's column 0: the backends wrote it in different
    # orders and disagreed (ATen's overlap check gives up on such strided views). Views of one
    # buffer that share no element, as the (K, D + 1) layout, are fine.
    device, backend = case
    z = torch.randn(6, 3, device=device)
    idx = torch.tensor([0, 1, 2, 3, 0, 1], device=device)
    buf = torch.ones(4, 4, device=device)
    overlapping = [
        (buf[:, 0], buf[:, :3]),
        (buf[:, 2], buf[:, 1:]),
        (buf.view(-1)[4:8], buf[:, 1:]),
    ]
    for counts, sums in overlapping:
        with pytest.raises(ValueError, match="cluster_size is written in place.* with embed_sum"):
            ema_update_(counts, sums, z, idx, 0.5, backend=backend)
    assert torch.equal(buf, torch.ones_like(buf))  # refused before any write
    buf = torch.ones(4, 7, device=device)
    for counts, sums in [(buf[:, 3], buf[:, :3]), (buf[:, 0], buf[:, 4:]), (buf[:, 3], buf[:, 4:])]:
        ema_update_(counts, sums, z, idx, 0.0, backend=backend)
        torch.testing.assert_close(counts, code_counts(idx, 4).float())


def test_reset_dead_codes_refuses_written_tensors_that_share_elements():
    codebook, cs, es, z = _dead_setup()
    dead = (cs < 1.0).nonzero().flatten()
    with pytest.raises(ValueError, match="codebook is written in place.* with embed_sum"):
        reset_dead_codes_(es, cs, es, z, 1.0)
    buf = torch.cat([es, cs[:, None]], 1)
    with pytest.raises(ValueError, match="codebook is written in place.* with cluster_size"):
        reset_dead_codes_(buf[:, 1:], buf[:, -1], es, z, 1.0)
    # Bytes, not elements: a float16 codebook over the first half of embed_sum's columns...
    wide = torch.zeros(es.shape[0], 14)
    with pytest.raises(ValueError, match="codebook is written in place.* with embed_sum"):
        reset_dead_codes_(wide.view(torch.float16)[:, :7], cs, wide[:, 3:10], z, 1.0)
    # ... and one over the other half, next to it, and one buffer for all three (no overlap).
    buf = torch.zeros(es.shape[0], 15)
    buf[:, -1] = cs
    got = reset_dead_codes_(wide[:, 7:].view(torch.float16)[:, :7], cs, wide[:, :7], z, 1.0)
    assert len(dead) > 0 and torch.equal(got, dead)
    assert torch.equal(reset_dead_codes_(buf[:, :7], buf[:, -1], buf[:, 7:-1], z, 1.0), dead)


@pytest.mark.parametrize(
    "backend", [b for b in ("cpu", "triton", "torch") if fastvq.backends()[b].available]
)
def test_ema_update_bumps_the_versions_it_writes(backend):
    # The C++ op wrote counts and sums without telling autograd: a backward that had saved them
    # before the update used the updated values, silently.
    counts, sums = torch.rand(4), torch.randn(4, 3)
    z = torch.randn(6, 3, requires_grad=True)
    loss = (z @ sums.T).sum() + (z.sum(1) * counts.sum()).sum()
    before = counts._version, sums._version
    fastvq.ema_update_(counts, sums, torch.randn(6, 3), torch.randint(0, 4, (6,)), decay=0.5,
                       backend=backend)  # fmt: skip
    assert counts._version > before[0] and sums._version > before[1]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("device", CPP_DEVICES)
def test_cpp_op_refuses_outputs_that_share_memory_with_inputs(device):
    ops = torch.ops.fastvq
    s = torch.arange(256.0, device=device).view(64, 4).clone()
    idx = torch.arange(63, -1, -1, device=device)
    with pytest.raises(
        ValueError, match="sums is written in place and must not share memory with z"
    ):
        ops.ema_scatter_cpp(torch.zeros(64, device=device), s, s, idx, None, 0.0, 1.0, True)
    c = torch.zeros(64, device=device)
    with pytest.raises(ValueError, match="counts is written in place .* share memory with weight"):
        ops.ema_scatter_cpp(c, torch.zeros(64, 4, device=device), s.clone(), idx, c, 0.0, 1.0, True)


def _cpp_ema(device, **changes):
    cs, es, z, idx, w = _ema_inputs(10, 6, 4, torch.float32, device, 23, "float")
    args = dict(counts=cs, sums=es, z=z, indices=idx, weight=w, keep=0.9, gain=0.1)
    args |= dict(deterministic=False) | changes
    torch.ops.fastvq.ema_scatter_cpp(*args.values())


BAD_CPP_EMA = [
    (dict(z=torch.randn(10)), r"z must have shape \(N, D\)"),
    (dict(z=torch.randn(10, 5)), r"sums must have shape \(6, 5\)"),
    (dict(z=torch.randn(10, 4).double()), "z must be float32, bfloat16 or float16"),
    (dict(z=torch.randn(4, 10).T), r"z must have unit column stride"),
    (dict(counts=torch.ones(0)), r"counts must have shape \(K,\) with K >= 1"),
    (dict(counts=torch.ones(6).double()), "counts must be Float"),
    (dict(sums=torch.ones(6, 4).bfloat16()), "sums must be Float"),
    (dict(sums=torch.ones(4, 6).T), "sums must have unit column stride"),
    (dict(sums=torch.ones(1, 4).expand(6, 4)), "sums is written in place and must not refer"),
    (dict(counts=torch.ones(1).expand(6)), "counts is written in place and must not refer"),
    (dict(indices=torch.zeros(9, dtype=LONG)), r"indices must have shape \(10,\)"),
    (dict(indices=torch.zeros(10, dtype=torch.int32)), "indices must be Long"),
    (dict(indices=torch.full((10,), 6)), r"indices must lie in \[0, 6\), got indices\[0\] = 6"),
    (dict(indices=torch.full((10,), -2)), r"indices must lie in \[0, 6\), got indices\[0\] = -2"),
    (dict(weight=torch.ones(10).double()), "weight must be Float"),
    (dict(weight=torch.ones(20)[::2]), "weight must be contiguous"),
    (dict(weight=torch.ones(9)), r"weight must have shape \(10,\)"),
]


@pytest.mark.parametrize("changes, match", BAD_CPP_EMA)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_cpp_op_bad_input_is_a_clear_error(changes, match, deterministic):
    if not _CPP:
        pytest.skip("fastvq._C without fastvq::ema_scatter_cpp")
    with pytest.raises(cpp_op_error(match), match=match):
        _cpp_ema("cpu", deterministic=deterministic, **changes)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_cuda_op_skips_out_of_range_indices(deterministic):
    # The CUDA glue does not sync to check the range: such rows are dropped, nothing else moves.
    cs, es, z, idx, _ = _ema_inputs(50, 6, 4, torch.float32, "cuda", 24)
    idx[::5] = torch.tensor([6, -1, 1 << 40, 7, -3] * 2, device="cuda")
    a, b = cs.clone(), es.clone()
    torch.ops.fastvq.ema_scatter_cpp(a, b, z, idx, None, 0.5, 0.5, deterministic)
    live = (idx >= 0) & (idx < 6)
    ref_c = 0.5 * cs + 0.5 * torch.zeros_like(cs).index_add_(
        0, idx[live], torch.ones(40, device="cuda")
    )
    ref_s = 0.5 * es + 0.5 * torch.zeros_like(es).index_add_(0, idx[live], z[live])
    torch.testing.assert_close(a, ref_c)
    torch.testing.assert_close(b, ref_s)


def _triton_ema(device, deterministic, **changes):
    cs, es, z, idx, w = _ema_inputs(10, 6, 4, torch.float32, device, 25, "float")
    args = dict(counts=cs, sums=es, z=z, indices=idx, weight=w) | changes
    args = {k: v.to(device) if torch.is_tensor(v) else v for k, v in args.items()}
    if deterministic:
        torch.ops.fastvq.ema_segment_triton(*args.values(), 0.9, 0.1)
    else:
        torch.ops.fastvq.ema_scatter_triton(*args.values(), 0.1)


def _shared(views, *shape):
    return views(torch.randn(*shape))


# The Triton launchers behind torch.ops.fastvq.ema_*_triton, past ema_update_'s checks: strided
# indices or weights were read as if contiguous (wrong counts), short ones read past their end.
BAD_TRITON_EMA = [
    (dict(z=torch.randn(10)), r"z must be a unit-column-stride \(\*, \*\) tensor"),
    (dict(z=torch.randn(10, 5)), r"sums must be a unit-column-stride \(\*, 5\) tensor"),
    (dict(z=torch.randn(4, 10).T), r"z must be a unit-column-stride"),
    (dict(z=torch.randint(0, 3, (10, 4))), "z must .* tensor of float32, bfloat16"),
    (dict(z=torch.randn(10, 4).double()), "z must .* tensor of float32, bfloat16, float16;"),
    (dict(sums=torch.zeros(6, 4)[:, ::2], z=torch.randn(10, 2)), "sums must be a unit-column"),
    (dict(counts=torch.ones(5)), r"counts must be a \(6,\) tensor"),
    (dict(counts=torch.ones(6).double()), "counts must .* of float32"),
    (dict(sums=torch.ones(6, 4).bfloat16()), "sums must .* of float32"),
    (dict(sums=torch.ones(4, 6).T), "sums must be a unit-column-stride"),
    (dict(sums=torch.ones(1, 4).expand(6, 4)), "sums is written in place"),
    (dict(counts=torch.ones(1).expand(6)), "counts is written in place"),
    (dict(sums=torch.ones(30).as_strided((6, 4), (2, 1))), r"sums' rows overlap \(row stride 2"),
    (dict(indices=torch.zeros(9, dtype=LONG)), r"indices must be a contiguous \(10,\)"),
    (dict(indices=torch.zeros(20, dtype=LONG)[::2]), "indices must be a contiguous"),
    (dict(indices=torch.zeros(10)), "indices must .* of int32, int64"),
    (dict(weight=torch.ones(10).double()), "weight must .* of float32"),
    (dict(weight=torch.ones(20)[::2]), "weight must be a contiguous"),
    (dict(weight=torch.ones(9)), r"weight must be a contiguous \(10,\)"),
    (dict(z=torch.randn(10, 0), sums=torch.ones(6, 0)), "need D >= 1 and K >= 1"),
    (dict(counts=torch.ones(0), sums=torch.ones(0, 4)), "need D >= 1 and K >= 1"),
    # Outputs that share elements with each other or an input (the order of reads and writes
    # would decide the result; ATen's overlap check answers "too hard" for these slices).
    (_shared(lambda b: dict(sums=b[:6, :4], z=b[:, 2:6]), 10, 8), "sums is .* with z"),
    (_shared(lambda b: dict(sums=b[:, :4], counts=b[:, 0]), 6, 5), "counts is .* with sums"),
    (_shared(lambda b: dict(counts=b[0, :6], weight=b[0]), 1, 10), "counts is .* with weight"),
]


@pytest.mark.parametrize("case", TRITON_CASES)
@pytest.mark.parametrize("changes, match", BAD_TRITON_EMA)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_triton_op_bad_input_is_a_clear_error(case, changes, match, deterministic):
    with pytest.raises(ValueError, match=match):
        _triton_ema(case[0], deterministic, **changes)


@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_launchers_refuse_an_operand_on_another_device(case):
    # Called directly: through torch.ops a meta operand goes to the fake.
    from fastvq.kernels.ema import ema_scatter, ema_segment

    cs, es, z, idx, w = _ema_inputs(10, 6, 4, torch.float32, case[0], 27, "float")
    meta = {"counts": cs.to("meta"), "sums": es.to("meta")}
    meta |= {"indices": idx.to("meta"), "weight": w.to("meta")}
    for name, bad in meta.items():
        args = dict(counts=cs, sums=es, z=z, indices=idx, weight=w) | {name: bad}
        for launch, more in ((ema_scatter, (1.0,)), (ema_segment, (0.5, 0.5))):
            with pytest.raises(ValueError, match=f"{name} must .* on {z.device}; got .* on meta"):
                launch(*args.values(), *more)


@pytest.mark.parametrize("case", TRITON_CASES)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_triton_op_skips_out_of_range_indices(case, deterministic):
    # As the CUDA glue, no sync to check the range: such rows are dropped, nothing else moves.
    device = case[0]
    cs, es, z, idx, _ = _ema_inputs(50, 6, 4, torch.float32, device, 26)
    idx[::5] = torch.tensor([6, -1, 1 << 40, 7, -3] * 2, device=device)
    a, b = cs.clone(), es.clone()
    if deterministic:
        torch.ops.fastvq.ema_segment_triton(a, b, z, idx, None, 0.5, 0.5)
    else:
        a.mul_(0.5)
        b.mul_(0.5)
        torch.ops.fastvq.ema_scatter_triton(a, b, z, idx, None, 0.5)
    live = (idx >= 0) & (idx < 6)
    ones = torch.ones(40, device=device)
    ref_c = 0.5 * cs + 0.5 * torch.zeros_like(cs).index_add_(0, idx[live], ones)
    ref_s = 0.5 * es + 0.5 * torch.zeros_like(es).index_add_(0, idx[live], z[live])
    torch.testing.assert_close(a, ref_c)
    torch.testing.assert_close(b, ref_s)


def test_partial_build_without_the_cpp_scatter(monkeypatch):
    # fastvq._C with a search kernel on a device but no ema_scatter_cpp kernel there: "auto" and
    # k-means use the torch scatter; an explicit ema_update_ backend says what is missing.
    from fastvq.ops import codebook as module

    monkeypatch.setitem(module._CPP_ON, "cpu", False)
    cs, es, z, idx, _ = _ema_inputs(50, 6, 4, torch.float32, "cpu", 25)
    a, b = cs.clone(), es.clone()
    ema_update_(a, b, z, idx, 0.5, backend="auto")
    ref = ref_c, ref_s = cs.clone(), es.clone()
    ema_update_(*ref, z, idx, 0.5, backend="torch")
    torch.testing.assert_close(a, ref_c)
    torch.testing.assert_close(b, ref_s)
    if fastvq.backends()["cpu"].available:
        with pytest.raises(ValueError, match="has no CPU kernel of fastvq::ema_scatter_cpp"):
            ema_update_(cs.clone(), es.clone(), z, idx, 0.5, backend="cpu")
    search = "cpu" if fastvq.backends()["cpu"].available else "auto"
    centroids = kmeans(z, 3, iters=2, backend=search)
    assert centroids.shape == (3, 4) and bool(centroids.isfinite().all())


def test_kmeans_refuses_a_non_finite_init():
    # x was checked, a given init not: inf centroids came back as they were.
    with pytest.raises(ValueError, match="init contains NaN or Inf"):
        kmeans(torch.randn(20, 4), 3, iters=0, init=torch.full((3, 4), float("inf")))


def test_ints_past_floats_range_are_named():
    # decay=10**400 raised OverflowError ("int too large to convert to float"), naming nothing.
    cs, es, z, idx = torch.ones(4), torch.zeros(4, 2), torch.randn(3, 2), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="decay must be a finite real number"):
        ema_update_(cs, es, z, idx, 10**400)
    with pytest.raises(ValueError, match="eps must be a finite real number"):
        fastvq.ema_codebook(cs, es, eps=10**400)
    with pytest.raises(ValueError, match="inv_temperature must be positive and finite"):
        fastvq.binary_entropy_loss(z, inv_temperature=10**400)
