import itertools
import math
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fastvq
from fastvq.ops._backends import pick_backend
from fastvq.reference import METRICS, code_terms, topk_scores
from fastvq.testing import (
    backend_cases,
    check_nearest,
    count_syncs,
    cpp_op_error,
    random_search_inputs,
    run_isa_builds,
    screening_near_ties,
    screening_overflows,
    screening_rechecks,
)

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _cases():
    return [
        pytest.param(c, id=f"{c[0]}-{c[1]}", marks=[pytest.mark.gpu] * (c[0] == "cuda"))
        for c in backend_cases()
    ]


CASES = _cases()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (N, K, D): odd N, K off every tile, D from 1 to 1024 with the odd ones that break padding.
SHAPES = [
    (1, 1, 1),
    (97, 13, 3),
    (97, 300, 24),
    (64, 129, 8),
    (300, 70, 32),
    (1025, 257, 33),
    (33, 70, 256),
    (5, 1000, 59),
    (3, 17, 1024),
]
# The interpreter executes Triton programs in numpy, one program at a time: fewer, smaller shapes.
INTERPRETER_SHAPES = [
    (1, 1, 1),
    (97, 13, 3),
    (97, 300, 24),
    (130, 129, 33),
    (5, 70, 256),
    (3, 17, 1024),
]


def _shapes(backend):
    return INTERPRETER_SHAPES if backend == "triton" and INTERPRET else SHAPES


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_parity_with_float64(case, dtype, metric, precision, poison):
    device, backend = case
    for seed, (n, k, d) in enumerate(_shapes(backend)):
        z, codebook = random_search_inputs(n, k, d, dtype, device, seed)
        idx = fastvq.nearest_code(z, codebook, metric=metric, precision=precision, backend=backend)
        agree = check_nearest(z, codebook, idx, metric, precision)
        # Random Gaussian data has few near-ties: a kernel that is right only up to the bound
        # everywhere would still agree with float64 on most rows.
        assert agree >= (0.97 if precision == "exact" else 0.8), (n, k, d, agree)


@pytest.mark.parametrize("case", CASES)
def test_lowest_index_wins_exact_ties(case):
    device, backend = case
    g = torch.Generator().manual_seed(1)
    base = torch.randn(64, 24, generator=g)
    # Code j == j + 64 == j + 128 == j + 192: copies in other lanes, and in the same lane of
    # later tiles (of 64 or 128 codes); K = 263 ends in a partial tile.
    codebook = torch.cat([base] * 4 + [base[:7]]).to(device)
    z = (base + 1e-3 * torch.randn(64, 24, generator=g)).to(device)
    for metric in METRICS:
        idx = fastvq.nearest_code(z, codebook, metric=metric, backend=backend)
        check_nearest(z, codebook, idx, metric)
        assert bool((idx < 64).all()), f"{metric}: a duplicate with a higher index won a tie"
    # Unchecked, a row that scores -inf against every code (past the first tile too) gets 0.
    minus = -codebook.abs()
    inf_row = torch.zeros(2, 24, device=device)
    inf_row[:, 0] = float("inf")
    idx = fastvq.nearest_code(
        inf_row, minus, metric="dot", backend=backend, check_inputs_finite=False
    )
    assert idx.tolist() == [0, 0]
    # A zero vector scores 0 against every code under cosine: the first code wins.
    zero = torch.zeros(3, 24, device=device)
    assert fastvq.nearest_code(zero, codebook, metric="cosine", backend=backend).tolist() == [0] * 3


def test_finite_check_on_sums_that_overflow():
    """The check sums each tensor first; finite terms can overflow that sum, and NaN hidden among
    them must still be found: the exact check decides there."""
    from fastvq.ops._validate import check_finite

    g = torch.Generator().manual_seed(5)
    big = torch.rand(64, 8, generator=g) + 3e37  # sums to ~1.5e40: inf in float32
    check_finite(z=big, codebooks=[torch.randn(4, 8), big.flip(0)])
    # Summed in float32, where float16's own sum is inf: one pass and one sync, no exact check.
    with count_syncs() as syncs:
        check_finite(z=torch.full((40000, 2), 60000.0, dtype=torch.float16))
    assert len(syncs) == 1, syncs
    for bad in (float("nan"), float("inf")):
        hidden = big.clone()
        hidden[17, 3] = bad
        with pytest.raises(ValueError, match="^codebooks contains NaN or Inf"):
            check_finite(z=big, codebooks=[torch.randn(4, 8), hidden])
    # Through an op: dot scores of such z stay finite, and every row has its argmax.
    codebook = torch.randn(5, 8, generator=g) * 1e-3
    want = (big.double() @ codebook.double().T).argmax(-1)
    assert torch.equal(fastvq.nearest_code(big, codebook, metric="dot"), want)


def test_finite_check_totals_every_tensor_in_one_sync():
    """check_finite adds the tensors' sums into one total read by one sync; where the total is not
    finite, the exact check names the first offending tensor, and finite tensors whose sums are
    finite but whose total overflows pass."""
    from fastvq.ops._validate import NonFiniteError, check_finite

    g = torch.Generator().manual_seed(11)
    books = [torch.randn(16, 8, generator=g) for _ in range(8)]  # a stack of 8: the stacked total
    z = torch.randn(32, 8, generator=g)
    with count_syncs() as syncs:
        check_finite(z=z, codebook=books)
    assert [what for what, _ in syncs] == ["tolist"], syncs
    # Each sum finite, their total not: the exact check runs and passes them.
    half = torch.full((1, 8), 2.0**124)  # sums to 2^127, below float32's max (~2^128)
    check_finite(a=half, b=half)  # total 2^128: inf in float32
    check_finite(a=half, b=[half, half, half])  # the stacked total of four: inf too
    # Several bad tensors: the first named, whichever kind and position; a finite tensor whose own
    # sum overflows is never named.
    nan, inf = torch.tensor([float("nan")]), torch.tensor([-float("inf")])
    for kwargs, first in [
        (dict(z=half, codebook=[books[0], nan], x=inf), "codebook"),
        (dict(z=nan, codebook=[books[0], inf]), "z"),
        (dict(z=torch.full((64, 8), 3e37), codebook=books[:7] + [inf], x=nan), "codebook"),
        (dict(a=z, b=books[0], c=inf.double(), d=nan), "c"),
        (dict(z=z, codebook=books[:7] + [nan]), "codebook"),  # the last of a group, alone
    ]:
        with pytest.raises(NonFiniteError, match=f"^{first} contains NaN or Inf; pass"):
            check_finite(**kwargs)
    with pytest.raises(NonFiniteError, match="^x contains NaN or Inf$"):
        check_finite(False, x=nan)
    check_finite(z=z, codebook=[])  # an empty group holds nothing to check
    check_finite(a=half, b=[], c=half)  # ... in the exact check too
    with pytest.raises(NonFiniteError, match="^c contains"):
        check_finite(a=half, b=[], c=[half, nan])
    check_finite(z=torch.full((3, 2), float("nan"), device="meta"))  # meta tensors: skipped


@pytest.mark.parametrize("case", CASES)
def test_non_finite_inputs(case):
    device, backend = case
    z, codebook = random_search_inputs(9, 31, 8, torch.float32, device, 2)
    z[3, 5] = float("nan")
    hint = "; pass check_inputs_finite=False to skip this check"
    with pytest.raises(ValueError, match=f"^z contains NaN or Inf{hint}$"):
        fastvq.nearest_code(z, codebook, backend=backend)
    # l2 and cosine check the codebook through its squared norms on the C++ and Triton backends
    for bad, metric in itertools.product((math.nan, math.inf, -math.inf), METRICS):
        bad_codebook = codebook.clone()
        bad_codebook[7, 0] = bad
        with pytest.raises(ValueError, match=f"^codebook contains NaN or Inf{hint}$"):
            fastvq.nearest_code(z.nan_to_num(), bad_codebook, metric=metric, backend=backend)
    # Unchecked, the documented result: a NaN row gets 0, other rows are unaffected.
    idx = fastvq.nearest_code(z, codebook, backend=backend, check_inputs_finite=False)
    assert idx[3].item() == 0
    rest = torch.arange(9) != 3
    check_nearest(z[rest.to(device)], codebook, idx[rest.to(device)])
    # ... and a NaN code never wins, nor enters a top-k (the torch backend's argmax took it).
    nan_code = codebook.clone()
    nan_code[5, 0] = math.nan
    for metric, k in itertools.product(METRICS, (None, 3)):
        idx = fastvq.nearest_code(
            z.nan_to_num(), nan_code, metric=metric, backend=backend, k=k, check_inputs_finite=False
        )
        assert bool((idx != 5).all()), (metric, k)


@pytest.mark.parametrize("case", CASES)
def test_shapes_layouts_and_empty(case, poison):
    device, backend = case
    z, codebook = random_search_inputs(2 * 3 * 5, 37, 24, torch.float32, device, 3)
    flat = fastvq.nearest_code(z, codebook, backend=backend)
    # Leading dimensions are kept, and a non-contiguous z gives the same answer.
    z5 = z.reshape(2, 3, 5, 24)
    assert torch.equal(fastvq.nearest_code(z5, codebook, backend=backend), flat.view(2, 3, 5))
    zt = z5.transpose(0, 2).contiguous().transpose(0, 2)
    assert not zt.is_contiguous()
    assert torch.equal(
        fastvq.nearest_code(zt, codebook[:, :].T.contiguous().T, backend=backend),
        flat.view(2, 3, 5),
    )
    empty = fastvq.nearest_code(z5[:, :0], codebook, backend=backend, return_distance=True)
    assert empty[0].shape == (2, 0, 5) and empty[0].dtype == torch.int64
    assert empty[1].shape == (2, 0, 5)
    one = fastvq.nearest_code(z[0], codebook, backend=backend)  # a single (D,) vector
    assert one.shape == () and one.item() == flat[0].item()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("metric", METRICS)
def test_return_distance(case, metric):
    device, backend = case
    z, codebook = random_search_inputs(50, 77, 33, torch.float32, device, 4)
    idx, values = fastvq.nearest_code(
        z, codebook, metric=metric, backend=backend, return_distance=True
    )
    z64, c64 = z.double(), codebook[idx].double()
    expected = {
        "l2": (z64 - c64).square().sum(-1),
        "dot": (z64 * c64).sum(-1),
        "cosine": torch.nn.functional.cosine_similarity(z64, c64, dim=-1),
    }[metric]
    assert values.dtype == torch.float32
    torch.testing.assert_close(values.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_return_distance_of_half_inputs_is_float32(case):
    # From the half values, in float32 (a bfloat16 distance was off by up to 0.04).
    device, backend = case
    z, codebook = random_search_inputs(50, 77, 33, torch.bfloat16, device, 5)
    idx, values = fastvq.nearest_code(z, codebook, backend=backend, return_distance=True)
    assert values.dtype == torch.float32
    expected = (z.double() - codebook[idx].double()).square().sum(-1)
    torch.testing.assert_close(values.double(), expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("k", [None, 3])
def test_torch_backend_chunks_give_the_whole_search(k, monkeypatch):
    # Chunks of 2 and 3 rows (one chunk holds the whole search below 2^26 or 2^24 scores).
    import fastvq.ops.nearest_code as ops

    z, codebook = random_search_inputs(97, 13, 5, torch.float32, "cpu", 6)
    whole = fastvq.nearest_code(z, codebook, backend="torch", k=k)
    monkeypatch.setattr(ops, "_CHUNK_ELEMENTS", 40)
    monkeypatch.setattr(ops, "_TOPK_CHUNK_ELEMENTS", 30)
    assert torch.equal(fastvq.nearest_code(z, codebook, backend="torch", k=k), whole)


def test_distance_is_differentiable():
    z = torch.randn(20, 8, dtype=torch.float64, requires_grad=True)
    codebook = torch.randn(30, 8, dtype=torch.float64, requires_grad=True)
    idx, dist = fastvq.nearest_code(z, codebook, return_distance=True)
    dist.sum().backward()
    torch.testing.assert_close(z.grad, 2 * (z - codebook[idx]).detach())
    expected = torch.zeros_like(codebook).index_add_(0, idx, -2 * (z - codebook[idx]).detach())
    torch.testing.assert_close(codebook.grad, expected)


@pytest.mark.parametrize("k", [None, 3])
def test_distances_in_row_chunks(k, monkeypatch):
    """return_distance gathers the chosen codes in chunks of rows (here 20 values, 2 or 6 rows at
    a time, where one gather of N x k x D values could exceed memory): the same values and
    gradients as in one piece."""
    from fastvq.ops import nearest_code as op

    g = torch.Generator().manual_seed(3)
    z = torch.randn(3, 5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    codebook = torch.randn(30, 4, dtype=torch.float64, generator=g, requires_grad=True)
    runs = []
    for elements in (op._GATHER_ELEMENTS, 20):
        monkeypatch.setattr(op, "_GATHER_ELEMENTS", elements)
        idx, dist = fastvq.nearest_code(z, codebook, k=k, metric="dot", return_distance=True)
        grads = torch.autograd.grad((dist * dist.detach()).sum(), [z, codebook])
        runs.append((idx, dist, *grads))
    expected = (z[..., None, :] if k else z) * codebook[runs[0][0]]
    assert runs[0][1].shape == runs[0][0].shape == (3, 5, *([k] if k else []))
    torch.testing.assert_close(runs[0][1], expected.sum(-1), rtol=0, atol=0)
    for a, b in zip(runs[0][:2], runs[1][:2], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(runs[0][2:], runs[1][2:], strict=True):  # summed in another order
        torch.testing.assert_close(a, b)


def test_cosine_distance_gradient_is_finite_at_zero_rows_and_codes():
    # A zero row, and a row whose best code is the zero code (every other cosine is negative):
    # cosine 0 with a zero gradient, and the codebook's gradient stays finite.
    z = torch.tensor([[0.0, 0.0], [-1.0, -1.0], [1.0, 2.0]], requires_grad=True)
    codebook = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    idx, cos = fastvq.nearest_code(z, codebook, metric="cosine", return_distance=True)
    assert idx.tolist() == [0, 0, 2] and cos[:2].tolist() == [0.0, 0.0]
    cos.sum().backward()
    assert bool(z.grad.isfinite().all()) and bool(codebook.grad.isfinite().all())
    assert z.grad[:2].abs().sum() == 0


@pytest.mark.parametrize("case", CASES)
def test_cosine_is_scale_invariant_over_float32s_range(case):
    # Rows and codes from 2^-80 (float32 squares underflow) to 2^70 (they overflow): the indices
    # and cosines of the unscaled search; a code is a zero code only when it is 0.
    device, backend = case
    z, codebook = random_search_inputs(40, 30, 8, torch.float32, device, 12)
    idx, cos = fastvq.nearest_code(
        z, codebook, metric="cosine", backend=backend, return_distance=True
    )
    for z_scale, c_scale in [(1.0, 2.0**70), (1.0, 2.0**-80), (2.0**70, 1.0), (2.0**-80, 1.0)]:
        got, got_cos = fastvq.nearest_code(
            z * z_scale, codebook * c_scale, metric="cosine", backend=backend,
            return_distance=True,
        )  # fmt: skip
        assert torch.equal(got, idx), (z_scale, c_scale)
        torch.testing.assert_close(got_cos, cos, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_exact_search_ignores_the_callers_autocast(case):
    # A bf16 autocast around the call must not turn the exact search's matmul bf16 (the torch
    # backend's scores are a torch matmul): same indices and distances as without it.
    device, backend = case
    z, codebook = random_search_inputs(300, 200, 32, torch.float32, device, 14)
    for metric, k in itertools.product(METRICS, (None, 3)):
        kwargs = dict(metric=metric, backend=backend, k=k, return_distance=True)
        want = fastvq.nearest_code(z, codebook, **kwargs)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            got = fastvq.nearest_code(z, codebook, **kwargs)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (metric, k)


@pytest.mark.parametrize("case", CASES)
def test_l2_reaches_codes_whose_squares_leave_float32(case):
    # Codes of norm 1.9e19 to 2.5e19: |c|^2 exceeds float32 but the bias -|c|^2 / 2 and the scores
    # (rows of norm up to 1.3e19) do not. Scaling by 2^62 is exact: the unscaled search's indices.
    device, backend = case
    z, codebook = random_search_inputs(40, 30, 8, torch.float32, device, 13)
    norms = torch.linspace(4.1, 5.4, 30, device=device)[:, None]
    codebook = codebook / codebook.norm(dim=1, keepdim=True) * norms
    z = z / z.norm(dim=1).max() * 2.8
    idx = fastvq.nearest_code(z, codebook, backend=backend)
    assert len(set(idx.tolist())) > 3  # not one code (a code whose bias overflowed never wins)
    assert torch.equal(fastvq.nearest_code(z * 2.0**62, codebook * 2.0**62, backend=backend), idx)


@pytest.mark.skipif(not fastvq.backends()["triton"].available, reason="Triton unavailable")
@pytest.mark.parametrize(
    "args, error, match",
    [
        (lambda z, c, b: (z[0], c, None, b), ValueError, r"must be \(N, D\) and \(K, D\)"),
        (lambda z, c, b: (z, c[:, :3], None, b), ValueError, "must be one D in 1..1024"),
        (lambda z, c, b: (z, c.half(), None, b), TypeError, "must share one of float32"),
        (lambda z, c, b: (z.double(), c.double(), None, b), TypeError, "must share one of"),
        (lambda z, c, b: (z.t().contiguous().t(), c, None, b), ValueError, "contiguous"),
        (lambda z, c, b: (z, c, None, b[:-1]), ValueError, r"code_bias must be None or .*\(9,\)"),
        (lambda z, c, b: (z, c, b.double(), None), ValueError, "code_scale must be None or"),
    ],
)
def test_triton_ops_reject_bad_input(args, error, match):
    # The custom ops are public (README: screen=False), past fastvq.nearest_code's checks.
    z, codebook = random_search_inputs(5, 9, 4, torch.float32, "cuda" if CUDA else "cpu", 13)
    bias = code_terms(codebook, "l2")[1]
    for op in (torch.ops.fastvq.nearest_code_triton, torch.ops.fastvq.nearest_code_topk_triton):
        extra = (False,) if op is torch.ops.fastvq.nearest_code_triton else (2, False)
        with pytest.raises(error, match=match):
            op(*args(z, codebook, bias), *extra)


def test_float64_runs_on_the_reference():
    z, codebook = torch.randn(40, 5, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64)
    idx = fastvq.nearest_code(z, codebook)
    assert torch.equal(idx, torch.cdist(z, codebook).argmin(1))
    with pytest.raises(ValueError, match="float64 inputs run on backend='torch'"):
        fastvq.nearest_code(z, codebook, backend="cpu")


@pytest.mark.parametrize("case", CASES)
def test_cosine_against_normalized_brute_force(case):
    # check_nearest scores through code_terms, as the kernels are fed: this oracle normalizes the
    # rows instead, so a wrong cosine (scale, bias) cannot pass on both sides. Codes of norms from
    # 1e-2 to 1e2 make cosine and dot disagree on most rows. Either side of a float32 near-tie.
    device, backend = case
    z, codebook = random_search_inputs(64, 50, 8, torch.float32, "cpu", 23)
    codebook = codebook * torch.logspace(-2, 2, 50)[:, None]
    cos = F.normalize(z.double(), dim=1) @ F.normalize(codebook.double(), dim=1).T
    best = cos.topk(4, dim=1).values
    idx = fastvq.nearest_code(z.to(device), codebook.to(device), metric="cosine", backend=backend)
    assert (best[:, 0] - cos.gather(1, idx.cpu()[:, None])[:, 0]).max().item() <= 1e-5
    assert (idx.cpu() != (z @ codebook.T).argmax(1)).double().mean().item() > 0.5
    top = fastvq.nearest_code(
        z.to(device), codebook.to(device), metric="cosine", backend=backend, k=4
    )
    assert (best - cos.gather(1, top.cpu())).abs().max().item() <= 1e-5


def test_reference_search_against_brute_force():
    # fastvq.reference.nearest_code / nearest_code_topk (bench/'s baseline, the reference
    # quantize's search) against float64 brute force, independent of code_terms: small integers
    # (exact scores, ties everywhere; every code twice, so the copy at i + 40 never wins),
    # torch.argmax's first-maximum rule for l2 / dot, and normalized rows for cosine.
    from fastvq.reference import nearest_code as ref_search
    from fastvq.reference import nearest_code_topk as ref_topk

    g = torch.Generator().manual_seed(22)
    base = torch.randint(-2, 3, (40, 5), generator=g).double()
    codebook = torch.cat([base, base])
    z = torch.randint(-2, 3, (100, 5), generator=g).double()
    exact = {"l2": z @ codebook.T - codebook.square().sum(1) / 2, "dot": z @ codebook.T}
    for metric, scores in exact.items():
        idx = ref_search(z, codebook, metric)
        assert torch.equal(idx, scores.argmax(1)), metric
        assert bool((idx < 40).all()), metric
        top = ref_topk(z, codebook, 5, metric)
        assert torch.equal(top[:, 0], idx), metric
        want = scores.sort(dim=1, descending=True, stable=True)
        assert torch.equal(top, want.indices[:, :5]), metric
    x = torch.randn(100, 5, generator=g, dtype=torch.float64)
    cos = F.normalize(x, dim=1) @ F.normalize(codebook, dim=1).T
    idx = ref_search(x, codebook, "cosine")
    assert (cos.max(1).values - cos.gather(1, idx[:, None])[:, 0]).max().item() <= 1e-12
    # A NaN score never wins (code 0 is NaN: its rows take the copy, code 40).
    nan_code = codebook.clone()
    nan_code[0, 0] = float("nan")
    for metric in METRICS:
        idx = ref_search(x, nan_code, metric)
        assert bool((idx != 0).all()), metric
        assert bool((idx[ref_search(x, codebook, metric) == 0] == 40).all()), metric
    # Half-precision inputs on the CPU are scored in float32: 1000 * 999 overflows float16.
    zh = torch.tensor([[1000.0]], dtype=torch.float16)
    ch = torch.tensor([[0.0], [999.0]], dtype=torch.float16)
    assert ref_search(zh, ch).tolist() == [1]
    assert ref_topk(zh, ch, 2).tolist() == [[1, 0]]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(z=torch.randn(4, 8).int()), TypeError, "z must be float32"),
        (dict(codebook=torch.randn(5, 8).long()), TypeError, "codebook must be float32"),
        (dict(z=[[0.0] * 8]), TypeError, "z must be a torch.Tensor"),
        (dict(codebook=torch.randn(5, 8, 1)), ValueError, r"codebook must have shape \(K, D\)"),
        (dict(codebook=torch.randn(0, 8)), ValueError, "K >= 1"),
        (dict(z=torch.randn(4, 7)), ValueError, "z's last dimension"),
        (dict(z=torch.tensor(1.0)), ValueError, "0-d"),
        (dict(z=torch.randn(3, 1025), codebook=torch.randn(5, 1025)), ValueError, "D must be"),
        (dict(metric="euclid"), ValueError, "metric must be one of"),
        (dict(precision="tf32"), ValueError, "precision must be one of"),
        (dict(backend="numpy"), ValueError, "backend must be one of"),
        (dict(z=torch.randn(4, 8, device="meta")), ValueError, "z is on meta"),
        (dict(k=True), TypeError, "k must be an int, got bool"),
        (dict(k=0), ValueError, "k must be >= 1, got 0"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = dict(z=torch.randn(4, 8), codebook=torch.randn(5, 8)) | kwargs
    with pytest.raises(error, match=match):
        fastvq.nearest_code(args.pop("z"), args.pop("codebook"), **args)


def test_unavailable_backend_is_a_clear_error():
    z, codebook = torch.randn(4, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match="backend 'cuda' (is unavailable|runs on cuda)"):
        fastvq.nearest_code(z, codebook, backend="cuda")


@pytest.mark.skipif(not fastvq.backends()["triton"].available, reason="Triton unavailable")
def test_codebook_beyond_the_gpu_kernels_int32_indices():
    # A stride-0 view: 2^31 - 2^16 + 1 codes without the memory; the check comes before a copy.
    from fastvq.ops.nearest_code import MAX_GPU_CODES

    codebook = torch.zeros(1, 8).expand(MAX_GPU_CODES + 1, 8)
    with pytest.raises(ValueError, match="backend 'triton' searches at most 2\\^31 - 2\\^16"):
        fastvq.nearest_code(
            torch.randn(2, 8), codebook, backend="triton", check_inputs_finite=False
        )


def test_n_times_k_beyond_int32():
    # 65,536 x 32,769 candidates > 2^31; each z is a code plus small noise, so the answer is known.
    backend = "cpu" if fastvq.backends()["cpu"].available else "torch"
    g = torch.Generator().manual_seed(5)
    codebook = torch.randn(32_769, 16, generator=g)
    target = torch.randint(0, len(codebook), (65_536,), generator=g)
    z = codebook[target] + 1e-3 * torch.randn(65_536, 16, generator=g)
    assert torch.equal(fastvq.nearest_code(z, codebook, backend=backend), target)


@pytest.mark.parametrize("case", CASES)
def test_huge_codebook_small_batch(case):
    # N = 3, K = 2^20: the kernels must split K (and stay correct doing so).
    device, backend = case
    k = 1 << 20 if backend != "triton" else 5000
    z, codebook = random_search_inputs(3, k, 8, torch.float32, device, 6)
    idx = fastvq.nearest_code(z, codebook, backend=backend)
    check_nearest(z, codebook, idx)


@pytest.mark.parametrize("case", CASES)
def test_large_exact_search_screens_on_gpus(case, monkeypatch):
    # N K >= 2^24 and D >= 24 with row tiles that fill the GPU: both GPU backends screen with
    # tf32 and recheck by 3xTF32, here on rows built to defeat the screening pass alone.
    device, backend = case
    if device != "cuda":
        pytest.skip("the GPU backends screen large searches; CPU tests force it on small ones")
    screens = []
    if backend == "triton":
        import fastvq.kernels.nearest_code as kernels

        spy = lambda *a, screen=kernels._screen: screens.append(1) or screen(*a)  # noqa: E731
        monkeypatch.setattr(kernels, "_screen", spy)
    near_z, codebook, _ = screening_near_ties()
    z, _ = random_search_inputs(65536, 1, 24, torch.float32, "cpu", 22)
    z[: near_z.shape[0]] = near_z
    z, codebook = z.to(device), codebook.to(device)
    finite = z.isfinite().all(1)
    for metric in METRICS:
        idx = fastvq.nearest_code(
            z, codebook, metric=metric, backend=backend, check_inputs_finite=False
        )
        check_nearest(z[finite], codebook, idx[finite], metric)
    assert backend != "triton" or len(screens) == len(METRICS), "the search did not screen"


@pytest.mark.parametrize("case", CASES)
def test_opcheck(case):
    device, backend = case
    if backend == "torch":
        pytest.skip("the torch backend is plain PyTorch, not a custom op")
    op = (
        torch.ops.fastvq.nearest_code_triton
        if backend == "triton"
        else torch.ops.fastvq.nearest_code
    )
    z, codebook = random_search_inputs(17, 40, 24, torch.float32, device, 7)
    bias = torch.randn(40, device=device)
    torch.library.opcheck(op, (z, codebook, None, bias, False))
    torch.library.opcheck(op, (z.half(), codebook.half(), bias.abs(), None, True))
    torch.library.opcheck(op, (z, codebook, None, bias, False, True))


@pytest.mark.parametrize("case", CASES)
def test_op_screen_changes_how_not_what(case, monkeypatch):
    # `screen` forces the exact float32 search to screen, forbids it or leaves it to the size:
    # the same indices every way, on rows that defeat the screening pass alone. The CPU kernel
    # takes the argument and has nothing to change.
    device, backend = case
    if backend == "torch":
        pytest.skip("the torch backend is plain PyTorch, not a custom op")
    ops = torch.ops.fastvq
    op = ops.nearest_code_triton if backend == "triton" else ops.nearest_code
    screened = []
    if backend == "triton":
        import fastvq.kernels.nearest_code as kernels

        spy = lambda *a, screen=kernels._screen: screened.append(1) or screen(*a)  # noqa: E731
        monkeypatch.setattr(kernels, "_screen", spy)
    z, codebook, _ = screening_near_ties()
    z, codebook = z[z.isfinite().all(1)].to(device), codebook.to(device)
    for metric in METRICS:
        scale, bias = code_terms(codebook, metric)
        outs = []
        for screen in (True, False, None):
            calls = len(screened)
            outs.append(op(z, codebook, scale, bias, False, screen))
            if backend == "triton" and screen is not None:
                assert len(screened) - calls == screen, f"screen={screen}: {len(screened) - calls}"
        check_nearest(z, codebook, outs[1], metric)
        for out in outs[::2]:
            assert torch.equal(out, outs[1]), (metric, (out != outs[1]).nonzero().flatten())


@pytest.mark.parametrize("case", CASES)
def test_compiles_without_graph_breaks(case):
    device, backend = case

    def step(z, codebook):
        idx, dist = fastvq.nearest_code(z, codebook, backend=backend, return_distance=True)
        return codebook[idx] - z, dist.mean()

    z, codebook = random_search_inputs(64, 100, 16, torch.float32, device, 8)
    eager = step(z, codebook)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(z, codebook)
    torch.testing.assert_close(compiled, eager)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 70),
    k=st.integers(1, 90),
    d=st.integers(1, 70),
    metric=st.sampled_from(METRICS),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31),
)
def test_fuzz_shapes(n, k, d, metric, dtype, seed):
    z, codebook = random_search_inputs(n, k, d, dtype, "cpu", seed)
    for backend in ("torch", "cpu") if fastvq.backends()["cpu"].available else ("torch",):
        idx = fastvq.nearest_code(z, codebook, metric=metric, backend=backend)
        check_nearest(z, codebook, idx, metric)


@settings(max_examples=60, deadline=None)
@given(
    z_shape=st.lists(st.integers(0, 4), min_size=0, max_size=3),
    c_shape=st.lists(st.integers(0, 4), min_size=0, max_size=3),
    z_dtype=st.sampled_from([torch.float32, torch.int32, torch.bool, torch.float16]),
    c_dtype=st.sampled_from([torch.float32, torch.int64, torch.bfloat16]),
)
def test_fuzz_bad_input_is_a_clear_error_or_a_right_answer(z_shape, c_shape, z_dtype, c_dtype):
    z, codebook = torch.ones(z_shape).to(z_dtype), torch.ones(c_shape).to(c_dtype)
    try:
        idx = fastvq.nearest_code(z, codebook)
    except (TypeError, ValueError) as e:
        assert any(name in str(e) for name in ("z", "codebook")), str(e)
        return
    assert idx.shape == z.shape[:-1]
    check_nearest(z.float(), codebook.float(), idx)


def test_import_needs_no_extension_gpu_or_triton():
    # Hide the compiled extension: import still works, the torch backend answers, and backends()
    # says why the C++ backends are missing. Importing touches neither CUDA nor Triton.
    code = """
import sys, warnings
sys.modules["fastvq._C"] = None
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch, fastvq
assert any("fastvq._C" in str(w.message) for w in caught), caught
assert "triton" not in sys.modules and not torch.cuda.is_initialized()
report = fastvq.backends()
assert not report["cpu"].available and "make install" in report["cpu"].reason, report
z, c = torch.randn(10, 4), torch.randn(6, 4)
assert torch.equal(fastvq.nearest_code(z, c), torch.cdist(z, c).argmin(1))
"""
    subprocess.run(
        [sys.executable, "-c", code], check=True, env=os.environ | {"TRITON_INTERPRET": "0"}
    )


@pytest.mark.skipif(not fastvq.backends()["triton"].available, reason="Triton unavailable")
def test_triton_split_k_is_identical_to_one_pass():
    from fastvq.kernels.nearest_code import nearest_code_triton

    device = "cuda" if CUDA else "cpu"
    # D = 300 leaves an uneven last D chunk; K = 700 an uneven last tile in some splits.
    z, codebook = random_search_inputs(37, 700, 300, torch.float32, device, 9)
    bias = -0.5 * codebook.square().sum(-1)
    one = nearest_code_triton(z, codebook, None, bias, False, splits=1)
    split = nearest_code_triton(z, codebook, None, bias, False, splits=5)
    assert torch.equal(one, split)
    check_nearest(z, codebook, one)
    # Exact ties across splits go to the lowest index, screened or not.
    g = torch.Generator().manual_seed(1)
    base = torch.randn(64, 24, generator=g)
    codebook = torch.cat([base] * 4).to(device)  # code j == j + 64 == j + 128 == j + 192
    z = (base + 1e-3 * torch.randn(64, 24, generator=g)).to(device)
    bias = -0.5 * codebook.square().sum(-1)
    for splits, screen in itertools.product((2, 4), (False, True)):
        idx = nearest_code_triton(z, codebook, None, bias, False, splits=splits, screen=screen)
        assert bool((idx < 64).all()), (splits, screen)


def _screening_inputs(n, k, d, metric, device, seed):
    """Gaussian z and codebook with the metric's (scale, bias) as the op passes them."""
    z, codebook = random_search_inputs(n, k, d, torch.float32, device, seed)
    return (z, codebook, *code_terms(codebook, metric))


@pytest.mark.skipif(not fastvq.backends()["triton"].available, reason="Triton unavailable")
@pytest.mark.parametrize("metric", METRICS)
def test_triton_screened_search_is_the_3xtf32_search(metric, poison):
    from fastvq.kernels.nearest_code import nearest_code_triton

    device = "cuda" if CUDA else "cpu"
    # D = 1 and 33 pad the single chunk, 300 takes chunks with an uneven last one; K = 1 has no
    # runner-up; recheck splits of 1 (default here) and 3.
    for seed, (n, k, d, splits) in enumerate(
        [(300, 257, 33, None), (200, 700, 300, 3), (130, 1, 8, None), (257, 64, 1, 3)]
    ):
        args = _screening_inputs(n, k, d, metric, device, seed)
        direct = nearest_code_triton(*args, False, screen=False)
        screened = nearest_code_triton(*args, False, splits=splits, screen=True)
        assert torch.equal(screened, direct), (n, k, d)
        check_nearest(*args[:2], screened, metric)


@pytest.mark.skipif(not fastvq.backends()["triton"].available, reason="Triton unavailable")
def test_triton_screening_rechecks_the_rows_it_cannot_decide(monkeypatch):
    import fastvq.kernels.nearest_code as kernels

    device = "cuda" if CUDA else "cpu"
    z, codebook, near = (t.to(device) for t in screening_near_ties())
    for metric in METRICS:
        args = (z, codebook, *code_terms(codebook, metric))
        direct = kernels.nearest_code_triton(*args, False, screen=False)
        assert torch.equal(kernels.nearest_code_triton(*args, False, screen=True), direct), metric
        # Without the recheck the screening answer is wrong on rows of both kinds of centre: the
        # recheck is what makes the two equal.
        with monkeypatch.context() as m:
            m.setattr(kernels, "_screen", lambda *a, screen=kernels._screen: screen(*a).zero_())
            unchecked = kernels.nearest_code_triton(*args, False, screen=True)
        wrong = unchecked != direct
        assert wrong[near < 20].any() and wrong[near >= 20].any(), metric


@pytest.mark.skipif(not fastvq.backends()["triton"].available, reason="Triton unavailable")
@pytest.mark.parametrize("d", [2, 24])
def test_triton_screening_rechecks_rows_whose_scores_may_overflow(d, monkeypatch):
    import fastvq.kernels.nearest_code as kernels

    device = "cuda" if CUDA else "cpu"
    for case, args in enumerate(screening_overflows(d)):
        if CUDA and case == 4:
            # On a GPU, Triton's own 3xTF32 split rounds float32's largest value to inf too
            # (cvt.rna, sm_90 TTGIR): the search scores code 0 NaN as the screening pass does
            # (README: outside the contract). The interpreter computes the product in float32.
            continue
        args = tuple(t if t is None else t.to(device) for t in args)
        direct = kernels.nearest_code_triton(*args, False, screen=False)
        assert torch.equal(kernels.nearest_code_triton(*args, False, screen=True), direct), case
        with monkeypatch.context() as m:  # the screening pass alone errs: the flag decides
            m.setattr(kernels, "_screen", lambda *a, screen=kernels._screen: screen(*a).zero_())
            assert not torch.equal(kernels.nearest_code_triton(*args, False, screen=True), direct)


@pytest.mark.skipif(not fastvq.backends()["triton"].available, reason="Triton unavailable")
def test_triton_screening_rechecks_rows_near_float32s_range():
    """A row whose scores may reach 2^126 (here |z| |c| = 1.5 2^124, a factor 4 below) is
    rechecked however clear its winner; a row of ordinary size is not."""
    import fastvq.kernels.nearest_code as kernels

    device = "cuda" if CUDA else "cpu"
    z = torch.zeros(2, 8, device=device)
    z[0, 0], z[1, 0] = 2.0**63, 1.0
    codebook = torch.zeros(2, 8, device=device)
    codebook[:, 0] = torch.tensor([3 * 2.0**61, -3 * 2.0**61])
    out = torch.empty(2, dtype=torch.int64, device=device)
    assert kernels._screen(z, codebook, None, None, out, lambda kernel: kernel).tolist() == [1, 0]
    assert out.tolist() == [0, 0]


@pytest.mark.skipif(not fastvq.backends()["triton"].available, reason="Triton unavailable")
def test_triton_screens_the_large_searches_of_a_gpu(monkeypatch):
    # The choice on an H100 (132 SMs), without one: large exact searches whose row blocks cover
    # the SMs screen; small N K, D < 24 and a small batch over a large codebook do not.
    import fastvq.kernels.nearest_code as kernels

    gpu = types.SimpleNamespace(multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: gpu)
    monkeypatch.setattr(kernels, "triton_interpreting", lambda: False)
    cuda = torch.device("cuda")
    for n, k, d, screens in [
        (65536, 65536, 32, True),
        (65536, 196560, 24, True),
        (16384, 65536, 256, True),
        (65536, 16384, 8, False),
        (4096, 2048, 32, False),
        (64, 1 << 20, 32, False),
    ]:
        assert kernels._use_screening(n, k, d, None, cuda) == screens, (n, k, d)
        assert kernels._use_screening(n, k, d, not screens, cuda) == (not screens)


@pytest.mark.skipif(not fastvq.backends()["triton"].available, reason="Triton unavailable")
@pytest.mark.parametrize("d", [3, 33, 300])
def test_triton_tf32_split_matches_its_reference(d, poison):
    from fastvq.kernels.nearest_code import _tf32_split, _tf32_split_reference

    device = "cuda" if CUDA else "cpu"
    g = torch.Generator().manual_seed(d)
    x = torch.randn(70, d, generator=g) * 2.0 ** torch.randint(-60, 60, (70, 1), generator=g)
    # a subnormal, a value that rounds up to inf, ties of the rounding, inf and NaN
    x[0, 0], x[1, 0] = 1e-40, torch.finfo(torch.float32).max
    x[2, :2] = torch.tensor([1 + 2.0**-11, -(1 + 3 * 2.0**-11)])
    x[3, -1], x[4, 0] = float("inf"), float("nan")
    scale, bias = torch.rand(70, generator=g) + 0.5, torch.randn(70, generator=g)
    for s, b in ((None, None), (scale, None), (scale, bias), (None, bias)):
        rounded, norm, res = _tf32_split_reference(x, s)
        out = _tf32_split(x.to(device), *(t if t is None else t.to(device) for t in (s, b)),
                          maxima=True)  # fmt: skip
        assert torch.equal(out[0].cpu().view(torch.int32), rounded.view(torch.int32))
        torch.testing.assert_close(out[1].cpu(), torch.stack([norm, res], 1), equal_nan=True)
        finite = torch.arange(70) > 4  # maxima over the rows without inf or NaN
        out = _tf32_split(x[finite].to(device), *(t if t is None else t[finite].to(device)
                          for t in (s, b)), maxima=True)  # fmt: skip
        unscaled = torch.linalg.vector_norm(x[finite], dim=1, dtype=torch.float64).max()
        expect = [norm[finite].max(), res[finite].max(), 0.0 if b is None else b.abs().max(),
                  1.0 if s is None else s.max(), unscaled]  # fmt: skip
        torch.testing.assert_close(out[2].cpu(), torch.tensor(expect, dtype=torch.float64))
    # NaN in a code reaches the maximum norm, so that every row is rechecked; so does the NaN
    # residual of a code whose tf32 copy is inf (x[1]) under a scale of 0.
    out = _tf32_split(x.to(device), scale.to(device), bias.to(device), maxima=True)
    assert out[2][0].isnan()
    out = _tf32_split(x[1:3].to(device), torch.tensor([0.0, 1.0], device=device), maxima=True)
    assert out[2][1].isnan() and not out[2][0].isnan()
    assert rounded[2, 0] == 1 + 2.0**-10 and rounded[2, 1] == -(1 + 2.0**-9)  # away from zero
    assert rounded[0, 0] == 0 and rounded[1, 0] == float("inf")


@pytest.mark.skipif(not fastvq.backends()["triton"].available, reason="Triton unavailable")
@pytest.mark.parametrize("metric", METRICS)
def test_triton_screening_flags_the_rows_the_reference_does(metric):
    # The kernel's rechecked rows against the reference: float64 margins of the tf32 scores
    # against twice the PyTorch bound. They may differ only where the margin lies within the
    # kernel's float32 accumulation error of the threshold.
    import fastvq.kernels.nearest_code as kernels

    device = "cuda" if CUDA else "cpu"
    z, codebook = random_search_inputs(600, 700, 8, torch.float32, "cpu", 4)
    codebook += 2  # off the origin: |bias| weighs in the l2 bound
    z += 2
    scale, bias = code_terms(codebook, metric)
    expect, near = screening_rechecks(z, codebook, scale, bias)
    out = torch.empty(600, dtype=torch.int64, device=device)
    args = (t if t is None else t.to(device) for t in (z, codebook, scale, bias))
    flags = kernels._screen(*args, out, lambda kernel: kernel).cpu().bool()
    assert torch.equal(flags[~near], expect[~near])
    assert 0 < int(expect.sum()) < 600, "a test with no (or only) rechecked rows tests nothing"


@pytest.mark.parametrize("d", [2, 24, 1024])
@pytest.mark.parametrize("metric", METRICS)
def test_screening_bound_holds(d, metric):
    # The bound must cover |screening score - true score| + |3xTF32 score - true score| for every
    # code. Model of the two passes on the CPU: float32 matmuls of the tf32-rounded operands and
    # of the original ones (whose error exceeds 3xTF32's). Rows of mixed scale (from 2^-70 to
    # 2^40), subnormal entries and codes of very different norms.
    from fastvq.kernels.nearest_code import _screening_reference

    g = torch.Generator().manual_seed(d)
    z = torch.randn(64, d, generator=g) * 2.0 ** torch.randint(-70, 40, (64, 1), generator=g)
    codebook = torch.randn(512, d, generator=g) * 2.0 ** torch.randint(-8, 8, (512, 1), generator=g)
    z[0, 0] = 1e-40
    codebook[1, -1] = -3e-41
    scale, bias = code_terms(codebook, metric)
    z_tf32, c_tf32, bound = _screening_reference(z, codebook, scale, bias)

    def scores(a, b, dtype):
        s = a.to(dtype) @ b.to(dtype).T
        if scale is not None:
            s = s * scale.to(dtype)
        return s if bias is None else s + bias.to(dtype)

    true = scores(z, codebook, torch.float64)
    err = (scores(z_tf32, c_tf32, torch.float32) - true).abs()
    err += (scores(z, codebook, torch.float32) - true).abs()
    ratio = (err / bound[:, None]).max().item()
    assert ratio <= 1, ratio
    # ... and is not vacuous: within 50x of the worst error seen at small D.
    if d <= 24:
        assert ratio > 0.02, ratio


def test_gpu_backends_need_compute_capability_8(monkeypatch):
    # The CUDA kernels are built for sm_80+ (setup.py) and the Triton search uses bf16/tf32
    # tensor cores: on an older GPU both are unavailable with the reason, and "auto" takes torch.
    from fastvq.ops import _backends

    monkeypatch.setattr(_backends, "EXTENSION_ERROR", None)
    monkeypatch.setattr(_backends, "HAS_CUDA_KERNELS", True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    gpu = types.SimpleNamespace(major=7, minor=5)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: gpu)
    report = fastvq.backends()
    for name in ("cuda", "triton") if _backends.HAS_TRITON else ("cuda",):
        assert not report[name].available, name
        assert "compute capability 8.0+" in report[name].reason and "7.5" in report[name].reason
    assert pick_backend("auto", torch.device("cuda"), torch.float32) == "torch"
    # Every op family's "auto" agrees: the scalar quantizers and E8 too.
    from fastvq.lattice.e8 import _pick as e8_backend
    from fastvq.ops.codebook import _stats_backend as stats_backend
    from fastvq.ops.scalar import _impl as scalar_backend

    assert scalar_backend("auto", torch.device("cuda"), torch.float32) == "torch"
    assert e8_backend("auto", torch.device("cuda"), "e8_nearest", True) == "torch"
    for gpu.major, gpu.minor in [(8, 0), (9, 0)]:  # 8.0 (an A100) is the oldest supported
        report = fastvq.backends()
        assert report["cuda"].available and report["triton"].available == _backends.HAS_TRITON
    # A machine mixing generations decides by the tensors' GPU, not the current one.
    gpus = {0: types.SimpleNamespace(major=9, minor=0), 1: types.SimpleNamespace(major=7, minor=5)}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: gpus[index])
    old, new = torch.device("cuda:1"), torch.device("cuda:0")
    assert not fastvq.backends(old)["cuda"].available and fastvq.backends(new)["cuda"].available
    assert "cuda:1 has 7.5" in fastvq.backends(old)["cuda"].reason
    assert pick_backend("auto", old, torch.float32) == "torch"
    assert scalar_backend("auto", old, torch.float32) == "torch"
    assert e8_backend("auto", old, "e8_nearest", True) == "torch"
    assert stats_backend("auto", old, False) == "torch"
    assert pick_backend("auto", new, torch.float32) != "torch"
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert pick_backend("auto", new, torch.float32) != "torch"
    assert pick_backend("auto", torch.device("cuda"), torch.float32) == "torch"


def test_pick_backend_rules(monkeypatch):
    # "auto" on CPU tensors: C++ when it is built, else torch. A named backend must be available
    # and take tensors on their device. Triton runs on CPU tensors only with TRITON_INTERPRET=1.
    from fastvq.ops import _backends
    from fastvq.ops._backends import triton_interpreting

    cpu, meta = torch.device("cpu"), torch.device("meta")
    has_cpu = fastvq.backends()["cpu"].available
    assert pick_backend("auto", cpu, torch.float32) == ("cpu" if has_cpu else "torch")
    assert pick_backend("torch", meta, torch.float32) == "torch"
    if has_cpu:
        with pytest.raises(ValueError, match="backend 'cpu' runs on cpu tensors here, got .* meta"):
            pick_backend("cpu", meta, torch.float32)
    monkeypatch.setattr(_backends, "EXTENSION_ERROR", "fastvq._C failed to load (test)")
    with pytest.raises(ValueError, match=r"backend 'cpu' is unavailable: fastvq._C failed to load"):
        pick_backend("cpu", cpu, torch.float32)
    assert pick_backend("auto", cpu, torch.float32) == "torch"
    for value, interpreting in [(None, False), ("0", False), ("true", False), ("1", True)]:
        if value is None:
            monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        else:
            monkeypatch.setenv("TRITON_INTERPRET", value)
        assert triton_interpreting() is interpreting, value
        if _backends.HAS_TRITON and not CUDA:
            assert fastvq.backends()["triton"].available is interpreting, value


# --- the C++ CPU kernels' own paths -------------------------------------------------------------

needs_cpp = pytest.mark.skipif(not fastvq.backends()["cpu"].available, reason="no C++ build")
ISA_SHAPES = [(1, 7, 3), (5, 33, 5), (13, 200, 9), (37, 1000, 13), (3000, 70, 6), (7, 5000, 4)]
_ISA_SCRIPT = f"""
import sys, torch, fastvq
ops, g, out = torch.ops.fastvq, torch.Generator().manual_seed(0), []
for n, k, d in {ISA_SHAPES}:
    z, c = torch.randint(-2, 3, (n, d), generator=g), torch.randint(-2, 3, (k, d), generator=g)
    bias = torch.randint(-3, 4, (k,), generator=g).float()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            zz, cc = z.to(dtype), c.to(dtype)
            out.append(ops.nearest_code(zz, cc, None, bias, False, None)[:, None])
            out += [ops.nearest_code_topk(zz, cc, None, bias, min(k, t), False) for t in (20, 40)]
torch.save(out, sys.argv[1])
"""


@needs_cpp
def test_cpp_isa_builds_give_the_exact_answer(tmp_path):
    """The AVX2 and the SSE2 build (FASTVQ_CPU_BASELINE=1; csrc/cpu/isa.h) of the search and the
    top-k, each dtype, 1 and 2 threads, on small integers (every score exact, with FMA or not):
    the float64 answer, ties by index. Tails of rows, codes, dims and several code blocks."""
    runs = run_isa_builds(_ISA_SCRIPT, tmp_path)
    g, i = torch.Generator().manual_seed(0), 0
    for n, k, d in ISA_SHAPES:
        z, c = torch.randint(-2, 3, (n, d), generator=g), torch.randint(-2, 3, (k, d), generator=g)
        bias = torch.randint(-3, 4, (k,), generator=g).double()
        scores = z.double() @ c.double().T + bias
        want = [topk_scores(scores, t) for t in (1, min(k, 20), min(k, 40))] * 6  # dtypes, threads
        for got in runs:
            for a, b in zip(got[i : i + len(want)], want, strict=True):
                assert torch.equal(a, b), (n, k, d)
        i += len(want)


@needs_cpp
def test_cpp_ties_across_code_blocks_and_fp16_subnormals():
    ops = torch.ops.fastvq
    g = torch.Generator().manual_seed(0)
    # D = 256: a block holds 96 float32 (128 half) codes, so 300 equal codes span 3-4 blocks.
    z, code = torch.randn(13, 256, generator=g), torch.randn(1, 256, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        codebook = code.expand(300, 256).contiguous().to(dtype)
        assert ops.nearest_code(z.to(dtype), codebook, None, None, False, None).tolist() == [0] * 13
    inf_rows = torch.zeros(2, 256)
    inf_rows[:, 0] = float("inf")  # -inf against every code of every block: code 0
    minus = -(torch.rand(300, 256, generator=g) + 0.5)
    assert ops.nearest_code(inf_rows, minus, None, None, False, None).tolist() == [0, 0]
    # D = 3: the scalar half -> float conversion of the tail; 0x0300 is the subnormal 768 2^-24.
    z = torch.tensor([0x0300, 0, 0], dtype=torch.int16).view(torch.float16).repeat(7, 1)
    codebook = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [-1.0, 0, 0]], dtype=torch.float16)
    for bias1, want in ((5e-5, 1), (4e-5, 0)):  # code 1 scores its bias, code 0 768 2^-24
        bias = torch.tensor([0.0, bias1, 0.0])
        assert ops.nearest_code(z, codebook, None, bias, False, None).tolist() == [want] * 7


@needs_cpp
def test_cpp_rows_split_over_threads_without_a_code_split():
    # N = 1500 on 2 threads: two row ranges and no K split, a branch 1 and 3 threads never take.
    ops = torch.ops.fastvq
    g = torch.Generator().manual_seed(0)
    z, codebook = torch.randn(1500, 16, generator=g), torch.randn(100, 16, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.nearest_code(z, codebook, None, None, False, None)
        top = ops.nearest_code_topk(z, codebook, None, None, 5, False)
        torch.set_num_threads(2)
        assert torch.equal(ops.nearest_code(z, codebook, None, None, False, None), one)
        assert torch.equal(ops.nearest_code_topk(z, codebook, None, None, 5, False), top)
    finally:
        torch.set_num_threads(threads)
    check_nearest(z, codebook, one, "dot")


@needs_cpp
def test_cpp_op_rejects_bad_k_and_strided_code_terms():
    # The ops' own checks, which the Python layer's validation otherwise hides: k > 128 would
    # overrun the kernel's fixed 128-entry arrays.
    ops = torch.ops.fastvq
    z, codebook = torch.randn(4, 8), torch.randn(200, 8)
    for k, book in ((0, codebook), (129, codebook), (201, codebook), (6, codebook[:5])):
        with pytest.raises(ValueError, match="k must be between 1 and"):
            ops.nearest_code_topk(z, book, None, None, k, False)
    strided = torch.randn(400)[::2]
    for terms in ((strided, None), (None, strided)):
        with pytest.raises(ValueError, match="must be contiguous"):
            ops.nearest_code(z, codebook, *terms, False, None)
    for args, name in (
        ((z.T.contiguous().T, codebook), "z"),
        ((z, codebook.T.contiguous().T), "codebook"),
    ):
        with pytest.raises(ValueError, match=f"nearest_code: {name} must be contiguous"):
            ops.nearest_code(*args, None, None, False, None)


def _squared_norms_op(case, dtype):
    """The squared-norms op of the search of `case` (device, backend) for dtype, or a skip."""
    device, backend = case
    if backend == "triton" and dtype != torch.float64:
        return torch.ops.fastvq.squared_norms_triton
    if backend == "cpu":
        return torch.ops.fastvq.squared_norms
    pytest.skip(f"backend {backend!r} on {dtype} takes its code terms from code_terms alone")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_squared_norms(case, dtype, poison):
    """fastvq::squared_norms (C++) and squared_norms_triton against math.fsum of the squares:
    float64 sums of D positive terms err by at most (D - 1) 2^-53 of themselves (D 2^-53 for
    float64 inputs, whose squares round too). D over the partial sums' tails and several Triton
    D chunks; magnitudes whose squares leave float32's range (the search's code terms need them)."""
    op = _squared_norms_op(case, dtype)
    device = case[0]
    g = torch.Generator().manual_seed(0)
    top = 30 if dtype in (torch.float32, torch.float64, torch.bfloat16) else 2
    for d in (1, 3, 7, 8, 9, 31, 33, 256):
        x = torch.randn(200, d, generator=g, dtype=torch.float64)
        x = (x * torch.logspace(-top, top, 200, dtype=torch.float64)[:, None]).to(dtype)
        got = op(x.to(device)).cpu()
        assert got.dtype == torch.float64 and got.shape == (200,)
        rows = x.double().tolist()
        exact = torch.tensor([math.fsum(v * v for v in row) for row in rows], dtype=torch.float64)
        assert ((got - exact).abs() <= d * 2**-53 * exact).all(), d
        assert torch.equal(op(x[7:].to(device)).cpu(), got[7:])  # rows do not see neighbours
    ints = torch.randint(-300, 300, (100, 33), generator=g).to(dtype)
    assert torch.equal(op(ints.to(device)).cpu(), ints.double().square().sum(-1))
    special = torch.tensor([[1.0, math.inf], [math.nan, 1.0], [0.0, -0.0]], dtype=dtype)
    got = op(special.to(device)).tolist()
    assert got[0] == math.inf and math.isnan(got[1]) and got[2] == 0
    assert op(x[:0].to(device)).shape == (0,)
    torch.library.opcheck(op, (x.to(device),))


@needs_cpp
def test_cpp_squared_norms_thread_count_and_bad_input():
    op = torch.ops.fastvq.squared_norms
    x = torch.randn(5000, 32)  # tasks of 1024 rows: several per thread
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = op(x)
        torch.set_num_threads(2)
        assert torch.equal(op(x), one)
    finally:
        torch.set_num_threads(threads)
    for bad, match in (
        (torch.randn(8), "must have shape"),
        (torch.randn(8, 6)[:, ::2], "must be contiguous"),
        (torch.ones(4, 3, dtype=torch.int32), "must be float32, float64"),
    ):
        with pytest.raises(cpp_op_error(match), match=f"squared_norms: x {match}"):
            op(bad)


@pytest.mark.skipif(not fastvq.backends()["triton"].available, reason="Triton unavailable")
def test_triton_squared_norms_rejects_what_it_cannot_sum():
    from fastvq.kernels.nearest_code import squared_norms_triton

    # float64 would be summed from float32 values: an error, not a silently rounded answer
    for bad in (torch.randn(4, 3).double(), torch.randn(8, 6)[:, ::2], torch.randn(8)):
        with pytest.raises(ValueError, match="squared_norms_triton: x must be a contiguous"):
            squared_norms_triton(bad)


@pytest.mark.parametrize("case", CASES)
def test_search_code_terms_are_correctly_rounded(case):
    """The C++ and Triton searches' l2 bias is code_terms': -|c|^2 / 2 rounded once to float32
    (a float32 sum of squares is off by more than half an ulp in some codes); their cosine scale
    is code_terms' (norms in float64 both), also for codes whose squares leave float32's range."""
    from fastvq.ops.nearest_code import _squared_norms

    device, backend = case

    def search_terms(codebook, metric):
        codebook = codebook.to(device)
        return code_terms(codebook, metric, _squared_norms(codebook, metric, backend))

    _squared_norms_op(case, torch.float32)  # skips the backends that use code_terms as it is
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(2000, 256, generator=g)
    c64 = codebook.double()
    exact = code_terms(c64, "l2")[1]
    assert torch.equal(c64, codebook.double())  # squares its own copy, never the codebook
    assert not torch.equal(codebook.square().sum(-1).mul(-0.5), exact.float())
    assert torch.equal(code_terms(codebook, "l2")[1], exact.float())
    assert torch.equal(search_terms(codebook, "l2")[1].cpu(), exact.float())
    # norms: 16x these; inf and NaN as nearest_code(check_inputs_finite=False) passes them
    codebook[:6] = torch.tensor([1e-40, 1e-30, 1e30, 0.0, math.inf, math.nan])[:, None]
    scale = search_terms(codebook, "cosine")[0].cpu()
    assert torch.equal(scale, code_terms(codebook, "cosine")[0])  # its norms are float64 too
    # 1 / (16 1e-40) exceeds float32: a zero code, as a zero, infinite or NaN norm
    want = [0.0, 1e30 / 16, 1e-30 / 16, 0.0, 0.0, 0.0]
    assert scale[:6].tolist() == pytest.approx(want, rel=1e-6)


@pytest.mark.skipif(not fastvq.backends()["cpu"].available, reason="fastvq._C not built")
def test_cpp_op_fakes_refuse_mixed_devices():
    """One meta argument sends a C++ op to its fake kernel: the fake must refuse mixed devices as
    the kernel does, not return uninitialised memory on the CPU (or skip an in-place update)."""
    from fastvq.ops.scalar import _fsq_tables

    ops, long = torch.ops.fastvq, torch.long
    params, basis = _fsq_tables((4, 4), torch.device("cpu"), torch.float32)
    z, g, idx = torch.randn(4, 2), torch.randn(4, 2), torch.zeros(4, dtype=long)
    calls = {
        "nearest_code": lambda m: ops.nearest_code(z, m(5, 2), None, None, False),
        "nearest_code_topk": lambda m: ops.nearest_code_topk(z, m(5, 2), None, None, 2, False),
        "ema_scatter_cpp": lambda m: ops.ema_scatter_cpp(
            torch.ones(5), torch.zeros(5, 2), m(4, 2), idx, None, 0.5, 0.5, False
        ),
        "quantize_fwd_cpp": lambda m: ops.quantize_fwd_cpp(z, m(5, 2), idx, "ste"),
        "quantize_bwd_cpp": lambda m: ops.quantize_bwd_cpp(
            g, z, m(5, 2), idx, torch.zeros(4, 0), "ste", False, True
        ),
        "fsq_fwd_cpp": lambda m: ops.fsq_fwd_cpp(m(4, 2), params, basis),
        "fsq_bwd_cpp": lambda m: ops.fsq_bwd_cpp(g, m(4, 2), params),
        "bsq_bwd_cpp": lambda m: ops.bsq_bwd_cpp(g, m(4, 2)),
        "binary_entropy_bwd_cpp": lambda m: ops.binary_entropy_bwd_cpp(
            torch.randn(4), torch.randn(2, 2), m(4, 2), 1.0, False
        ),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=f"{name}: all tensors must be on one device"):
            call(lambda *shape: torch.empty(*shape, device="meta"))


def test_python_op_fakes_refuse_mixed_devices():
    """The Triton and torch-bodied custom ops, as test_cpp_op_fakes_refuse_mixed_devices: their
    fakes returned uninitialised CPU tensors, and the in-place EMA scatters did nothing."""
    ops, long = torch.ops.fastvq, torch.long
    z, g, idx = torch.randn(4, 2), torch.randn(4, 2), torch.zeros(4, dtype=long)
    calls = {
        "nearest_code_triton": lambda m: ops.nearest_code_triton(z, m(5, 2), None, None, False),
        "nearest_code_topk_triton": lambda m: ops.nearest_code_topk_triton(
            z, m(5, 2), None, None, 2, False
        ),
        "ema_scatter_triton": lambda m: ops.ema_scatter_triton(
            torch.ones(5), torch.zeros(5, 2), m(4, 2), idx, None, 1.0
        ),
        "ema_segment_triton": lambda m: ops.ema_segment_triton(
            torch.ones(5), torch.zeros(5, 2), m(4, 2), idx, None, 0.5, 1.0
        ),
        "quantize_fwd": lambda m: ops.quantize_fwd(z, m(5, 2), idx, "ste", False),
        "quantize_bwd": lambda m: ops.quantize_bwd(
            g, z, m(5, 2), idx, torch.zeros(4, 0), "ste", False, True, False
        ),
        "fsq_bwd": lambda m: ops.fsq_bwd(g, m(4, 2), [4, 4], "torch"),
        "bsq_bwd": lambda m: ops.bsq_bwd(g, m(4, 2), "torch"),
        "binary_entropy_bwd": lambda m: ops.binary_entropy_bwd(
            torch.randn(4), torch.randn(2, 2), m(4, 2), 1.0, False, "torch"
        ),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=f"{name}: all tensors must be on one device"):
            call(lambda *shape: torch.empty(*shape, device="meta"))


def test_meta_tensors_give_shapes():
    # Meta tensors hold no values: the NaN/Inf check is skipped (it would fail copying out of
    # them) and the search returns meta outputs of the documented shapes.
    z, codebook = torch.empty(5, 2, 3, device="meta"), torch.empty(4, 3, device="meta")
    idx = fastvq.nearest_code(z, codebook)
    assert idx.device.type == "meta" and idx.shape == (5, 2) and idx.dtype == torch.int64
    idx, dist = fastvq.nearest_code(z, codebook, k=2, return_distance=True)
    assert idx.shape == dist.shape == (5, 2, 2) and dist.dtype == torch.float32


def test_meta_tensors_take_every_path():
    # Shapes only: the float64 / plain-PyTorch path asked autocast about the meta device, which
    # it does not know (RuntimeError: unknown device type for autocast).
    z = torch.empty(5, 4, dtype=torch.float64, device="meta")
    c = torch.empty(7, 4, dtype=torch.float64, device="meta")
    assert fastvq.nearest_code(z, c).shape == (5,)
    assert fastvq.nearest_code(z.float(), c.float(), backend="torch").shape == (5,)


@pytest.mark.parametrize("k", [1, 3])
def test_reference_holds_one_score_chunk_at_a_time(monkeypatch, k):
    # Its chunks bound the plain-PyTorch search's memory only if each is freed before the next
    # is scored (the generator and the loop each kept one: 512 MiB where 256 was meant).
    import importlib
    import weakref

    reference = importlib.import_module("fastvq.reference.nearest_code")  # the module
    chunks, real = [], reference.nearest_code_scores

    def scores(*args):
        assert all(c() is None for c in chunks), "an earlier chunk is still alive"
        out = real(*args)
        chunks.append(weakref.ref(out))
        return out

    monkeypatch.setattr(reference, "nearest_code_scores", scores)
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 64 * 10)
    monkeypatch.setattr(reference, "_TOPK_CHUNK_ELEMENTS", 64 * 10)
    z, codebook = torch.randn(50, 4), torch.randn(64, 4)
    if k == 1:
        got = reference.nearest_code(z, codebook)
        assert torch.equal(got, torch.cdist(z, codebook).argmin(1))
    else:
        got = reference.nearest_code_topk(z, codebook, k)
        assert torch.equal(got[:, 0], torch.cdist(z, codebook).argmin(1))
    assert len(chunks) == 5
