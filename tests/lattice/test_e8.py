"""E8: the nearest-point decoder against brute force over every candidate it could return, and the
240-vector shell (codebook, index map, quantizer) against enumeration and brute force."""

import itertools
import math

import pytest
import torch

import fastvq
from fastvq.lattice.e8 import (
    E8_SHELL_SIZE,
    e8_nearest,
    e8_shell_codebook,
    e8_shell_codes,
    e8_shell_index,
    e8_shell_quantize,
)
from fastvq.testing import check_nearest

CORNERS = torch.tensor(list(itertools.product((0.0, 1.0), repeat=8)), dtype=torch.float64)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _in_e8(y):
    """E8 = D8 u (D8 + 1/2): all coordinates integers, or all in Z + 1/2, with an even sum."""
    frac = torch.remainder(y, 1.0)
    same = (frac == 0).all(-1) | (frac == 0.5).all(-1)
    return same & (torch.remainder(y.sum(-1), 2.0) == 0)


def _brute_nearest_distance(x):
    """Squared distance from each row of x (N, 8) float64 to E8, by brute force. The nearest point
    of D8 (and of its coset) rounds every coordinate down or up, so the 2 x 256 corners of the unit
    cells around x in both cosets contain it."""
    best = torch.full((len(x),), float("inf"), dtype=torch.float64)
    for shift in (0.0, 0.5):
        p = torch.floor(x - shift)[:, None, :] + CORNERS + shift  # (N, 256, 8)
        d = (p - x[:, None, :]).square().sum(-1)
        d = d.masked_fill(torch.remainder((p - shift).sum(-1), 2.0) != 0, float("inf"))
        best = torch.minimum(best, d.min(-1).values)
    return best


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nearest_matches_brute_force(dtype):
    g = _gen(0 if dtype == torch.float64 else 1)
    x = torch.cat(
        (
            3 * torch.randn(1000, 8, generator=g, dtype=torch.float64),
            100 * torch.randn(100, 8, generator=g, dtype=torch.float64),
            torch.randint(-3, 4, (200, 8), generator=g) / 4,  # on and between lattice points
        )
    ).to(dtype)
    y = e8_nearest(x)
    assert y.dtype == dtype and y.shape == x.shape
    assert _in_e8(y.double()).all()
    d = (y.double() - x.double()).square().sum(-1)
    tol = 0.0 if dtype == torch.float64 else 1e-4
    assert (d - _brute_nearest_distance(x.double()) <= tol).all()


def test_nearest_recovers_lattice_points():
    g = _gen(2)
    points = e8_nearest(5 * torch.randn(500, 8, generator=g, dtype=torch.float64))
    assert torch.equal(e8_nearest(points), points)
    # Within the packing radius sqrt(2)/2 the nearest point is unique.
    noise = torch.randn(500, 8, generator=g, dtype=torch.float64)
    noise *= 0.7 / torch.linalg.vector_norm(noise, dim=-1, keepdim=True)
    assert torch.equal(e8_nearest(points + noise), points)
    assert e8_nearest(points.view(50, 10, 8).float()).shape == (50, 10, 8)


def test_shell_codebook():
    c = e8_shell_codebook(torch.float64)
    assert c.shape == (E8_SHELL_SIZE, 8) and e8_shell_codebook().dtype == torch.float32
    assert (c.square().sum(-1) == 2).all() and _in_e8(c).all()
    assert len(torch.unique(torch.cat((c, -c)), dim=0)) == 240
    # Each root has inner products 2 once, 1 x 56, 0 x 126, -1 x 56, -2 once with the others.
    for row in c @ c.T:
        values, counts = torch.unique(row, return_counts=True)
        assert values.tolist() == [-2, -1, 0, 1, 2] and counts.tolist() == [1, 56, 126, 56, 1]
    # The documented order, enumerated directly.
    rows = []
    for i, j in itertools.combinations(range(8), 2):
        for si, sj in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
            x = torch.zeros(8, dtype=torch.float64)
            x[i], x[j] = si, sj
            rows.append(x)
    for t in range(128):
        neg = [(t >> (6 - k)) & 1 for k in range(7)]
        neg.append(sum(neg) % 2)
        rows.append(torch.tensor([0.5 - n for n in neg], dtype=torch.float64))
    assert torch.equal(c, torch.stack(rows))


def test_shell_index_round_trip_and_rejects():
    c = e8_shell_codebook()
    assert torch.equal(e8_shell_index(c), torch.arange(240))
    assert torch.equal(e8_shell_index(c.double().view(2, 120, 8)), torch.arange(240).view(2, 120))
    # Any positive multiple, as leech_index (E8Quantize's unit codes were refused).
    assert torch.equal(e8_shell_index(c / 2**0.5), torch.arange(240))
    assert torch.equal(e8_shell_index(c * 3.7), torch.arange(240))
    for tiny_or_huge in (1e160, 1e300, 1e-200, 1e-310):  # squares beyond float64: refused before
        assert torch.equal(e8_shell_index(c.double() * tiny_or_huge), torch.arange(240))
    idx = torch.randint(0, 240, (4, 7), generator=_gen(3))
    assert torch.equal(e8_shell_codes(idx.int(), torch.float64), c.double()[idx])
    # One graph (the range check is skipped while compiling): the same codes.
    compiled = torch.compile(e8_shell_codes, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(idx, torch.float64), c.double()[idx])
    odd = torch.full((8,), 0.5)
    odd[3] = -0.5
    # Within 0.05 per coordinate of a shell vector: its index; further: rejected.
    g = _gen(4)
    near = c + (torch.rand(240, 8, generator=g) - 0.5) * 0.09
    assert torch.equal(e8_shell_index(near), torch.arange(240))
    off = c[7].clone()
    off[torch.randint(0, 8, (1,), generator=g)] += 0.12  # beyond a multiple's fit too
    for v in (torch.zeros(8), -c[0] * 0, odd, torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0]), off):
        with pytest.raises(ValueError, match="vectors"):
            e8_shell_index(torch.cat((c[:2], v[None])))


def _shell_family(name, g, n=2000):
    if name == "gaussian":
        return torch.randn(n, 8, generator=g, dtype=torch.float64)
    if name == "cauchy":
        return torch.tan(math.pi * (torch.rand(n, 8, generator=g, dtype=torch.float64) - 0.5))
    if name == "ternary":
        return torch.randint(-1, 2, (n, 8), generator=g).double()
    if name == "sparse_int":
        return torch.randint(-2, 3, (n, 8), generator=g) * (torch.rand(n, 8, generator=g) < 0.3)
    if name == "codes_and_sums":
        c = 2 * e8_shell_codebook(torch.float64)
        pick = torch.randint(0, 240, (2, n), generator=g)
        return torch.cat((c[pick[0]], c[pick[0]] + c[pick[1]]))
    raise AssertionError(name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "family", ["gaussian", "cauchy", "ternary", "sparse_int", "codes_and_sums"]
)
def test_shell_quantize_matches_brute_force(family, dtype):
    z = _shell_family(family, _gen(len(family))).to(dtype)
    index, codes = e8_shell_quantize(z)
    assert index.dtype == torch.int64 and codes.dtype == dtype
    assert torch.equal(codes, e8_shell_codes(index, dtype))
    scores = z.double() @ e8_shell_codebook(torch.float64).T
    if family in ("ternary", "sparse_int", "codes_and_sums"):  # exact scores: first maximum
        assert torch.equal(index, scores.argmax(-1))
        return
    tol = (1e-13 if dtype == torch.float64 else 1e-6) * z.double().abs().sum(-1)
    top = scores.topk(2, dim=-1).values
    assert (top[:, 0] - scores.gather(-1, index[:, None]).squeeze(-1) <= tol).all()
    clear = top[:, 0] - top[:, 1] > 2 * tol
    assert clear.float().mean() > 0.9
    assert torch.equal(index[clear], scores.argmax(-1)[clear])


def test_shell_quantize_special_rows():
    z = torch.zeros(4, 8)
    z[1, 2] = float("nan")
    z[2, 5] = -float("inf")
    z[3] = torch.tensor([0.0, 0, 0, -1, 0, 0, 0, 0])
    index, codes = e8_shell_quantize(z.view(2, 2, 8))
    assert index.shape == (2, 2) and codes.shape == (2, 2, 8)
    # zero / NaN / Inf rows: index 0; a single -1 at position 3: lowest pair (0, 3) with signs +-
    assert index.flatten().tolist() == [0, 0, 0, 4 * 2 + 1]
    assert e8_shell_quantize(torch.zeros(0, 8, dtype=torch.bfloat16))[1].dtype == torch.bfloat16


@pytest.mark.parametrize("fn", [e8_nearest, e8_shell_quantize, e8_shell_index])
def test_bad_inputs(fn):
    name = "vectors" if fn is e8_shell_index else ("x" if fn is e8_nearest else "z")
    with pytest.raises(ValueError, match=name):
        fn(torch.zeros(3, 24))
    with pytest.raises(TypeError, match=name):
        fn(torch.zeros(3, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match=name):
        fn(torch.zeros(3, 8, dtype=torch.bool))
    with pytest.raises(TypeError, match="indices"):
        e8_shell_codes(torch.zeros(3))
    with pytest.raises(ValueError, match="indices"):
        e8_shell_codes(torch.tensor([240]))
    # An integer or bool dtype would silently give wrong codes (0.5 for bool): refused.
    for dtype in (torch.int64, torch.bool):
        with pytest.raises(TypeError, match="dtype"):
            e8_shell_codes(torch.tensor([3]), dtype)
        with pytest.raises(TypeError, match="dtype"):
            e8_shell_codebook(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dtypes_strides_and_brute_force_via_nearest_code(dtype):
    """Half inputs widen exactly to float32: the same indices as their float32 values; the shell
    quantizer agrees with fastvq.nearest_code(metric="dot") tie-aware, and on sparse integer rows
    (exact scores) with its first maximum; any strides and leading dimensions."""
    g = _gen(11)
    base = torch.cat(
        (
            torch.randn(200, 8, generator=g),
            torch.randint(-2, 3, (200, 8), generator=g) * (torch.rand(200, 8, generator=g) < 0.3),
        )
    ).to(dtype)
    z = base.view(100, 4, 8).transpose(0, 1)  # (4, 100, 8), not contiguous
    index, codes = e8_shell_quantize(z)
    assert index.shape == (4, 100) and codes.dtype == dtype
    assert torch.equal(index, e8_shell_quantize(z.float().contiguous())[0])
    c64 = e8_shell_codebook(torch.float64)
    z64 = z.reshape(-1, 8).double()
    check_nearest(z64, c64, index.reshape(-1), metric="dot")
    exact = (z64 == z64.round()).all(-1)  # the sparse integer rows
    assert exact.sum() == 200
    assert torch.equal(index.reshape(-1)[exact], fastvq.nearest_code(z64[exact], c64, metric="dot"))
    # e8_nearest: dtype kept, distances as brute force on the (exactly widened) values.
    x = (3 * torch.randn(300, 8, generator=g)).to(dtype)
    y = e8_nearest(x.T.contiguous().T)
    assert y.dtype == dtype and _in_e8(y.double()).all()
    d = (y.double() - x.double()).square().sum(-1)
    assert (d - _brute_nearest_distance(x.double()) <= 1e-4).all()


def test_bad_inputs_more():
    for fn, name in ((e8_nearest, "x"), (e8_shell_quantize, "z")):
        with pytest.raises(ValueError, match=name):
            fn(torch.tensor(1.0))
        with pytest.raises(TypeError, match=name):
            fn([0.0] * 8)
        with pytest.raises(TypeError, match=name):
            fn(torch.zeros(3, 8, dtype=torch.complex64))
    assert e8_nearest(torch.zeros(0, 8)).shape == (0, 8)
