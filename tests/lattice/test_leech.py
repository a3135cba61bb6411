"""Leech shell: the codebook against an independent enumeration of the documented order and the
lattice's defining congruences, the index maps by round trip, and the structured decoder against
brute force (float64 argmax over all 196,560 integer codes; first maximum on ties)."""

import itertools
import math

import pytest
import torch

from fastvq.lattice.golay import golay_codewords, golay_octads
from fastvq.lattice.leech import (
    LEECH_SIZE,
    leech_codebook,
    leech_codes,
    leech_index,
    leech_quantize,
)

SQRT32 = math.sqrt(32)


@pytest.fixture(scope="module")
def ints():
    """(196560, 24) float64 integer codes of squared norm 32 (unit codes times sqrt(32))."""
    x = leech_codebook(torch.float64) * SQRT32
    assert (x - x.round()).abs().max() < 1e-12
    return x.round()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _brute(z, ints):
    """float64 scores of z against every code: (best score, second best, argmax (first))."""
    best, second, arg = [], [], []
    for chunk in z.double().split(32):
        s = chunk @ ints.T
        top = s.topk(2, dim=-1).values
        best.append(top[:, 0])
        second.append(top[:, 1])
        arg.append(s.argmax(-1))
    return torch.cat(best), torch.cat(second), torch.cat(arg)


def _check(z, ints, exact, rel):
    """exact: indices equal brute force's first argmax. Otherwise the chosen code's float64 score is
    within rel * 4 ||z||_1 of the maximum, and indices agree where the top two are further apart."""
    index, codes = leech_quantize(z)
    assert index.dtype == torch.int64 and index.shape == z.shape[:-1]
    assert codes.dtype == z.dtype and torch.equal(codes, leech_codes(index, z.dtype))
    best, second, arg = _brute(z.reshape(-1, 24), ints)
    index = index.reshape(-1)
    if exact:
        assert torch.equal(index, arg)
        return
    tol = rel * 4 * z.reshape(-1, 24).double().abs().sum(-1)
    chosen = (z.reshape(-1, 24).double() * ints[index]).sum(-1)
    assert (best - chosen <= tol).all()
    clear = best - second > 2 * tol
    assert clear.float().mean() > 0.5  # the comparison below must not be vacuous
    assert torch.equal(index[clear], arg[clear])


def _shell_by_enumeration():
    """The documented canonical order, written out with plain loops."""
    rows = []
    for i, j in itertools.combinations(range(24), 2):
        for si, sj in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
            x = torch.zeros(24)
            x[i], x[j] = 4 * si, 4 * sj
            rows.append(x)
    shape1 = torch.stack(rows)
    signs = torch.ones(128, 8)
    for t in range(128):
        neg = [(t >> (6 - k)) & 1 for k in range(7)]
        neg.append(sum(neg) % 2)
        signs[t] = torch.tensor([1.0 - 2 * n for n in neg])
    shape2 = torch.zeros(759, 128, 24)
    for o, pos in enumerate(golay_octads()):
        shape2[o][:, pos] = 2 * signs
    s = 1.0 - 2 * golay_codewords().float()  # (4096, 24)
    shape3 = s[:, None, :] * (1 - 4 * torch.eye(24))[None]  # (codeword, position, coordinate)
    return torch.cat((shape1, shape2.view(-1, 24), shape3.view(-1, 24))).double()


def test_codebook_is_the_documented_order(ints):
    assert torch.equal(ints, _shell_by_enumeration())


def test_codebook_basic():
    c = leech_codebook()
    assert c.shape == (LEECH_SIZE, 24) and c.dtype == torch.float32 and c.device.type == "cpu"
    assert (torch.linalg.vector_norm(c, dim=-1) - 1).abs().max() < 1e-6
    assert torch.equal(leech_codebook(torch.float64).float(), c)


def test_shapes_norms_distinct_negation(ints):
    assert torch.equal(ints.square().sum(-1), torch.full((LEECH_SIZE,), 32.0, dtype=torch.float64))
    assert len(torch.unique(ints, dim=0)) == LEECH_SIZE
    assert len(torch.unique(torch.cat((ints, -ints)), dim=0)) == LEECH_SIZE
    pattern = ints.abs().sort(-1, descending=True).values
    want = [([4] * 2 + [0] * 22, 1104), ([2] * 8 + [0] * 16, 97152), ([3] + [1] * 23, 98304)]
    start = 0
    for row, count in want:
        block = pattern[start : start + count]
        assert (block == torch.tensor(row, dtype=torch.float64)).all()
        start += count


def test_lattice_congruences(ints):
    """Conway & Sloane ch. 4 sec. 11: integer x is in the Leech lattice (scaled by sqrt 8) iff for
    some m in {0, 1}: every x_i = m (mod 2), sum x_i = 4m (mod 8), and the coordinates with
    x_i = 2 (mod 4) for m = 0, x_i = 1 (mod 4) for m = 1, form a Golay codeword."""
    x = ints.long()
    m = x[:, :1] % 2
    assert ((x % 2) == m).all()
    assert torch.equal(x.sum(-1) % 8, 4 * m.squeeze(-1))
    bits = torch.where(m == 0, x % 4 == 2, x % 4 == 1).long()
    words = golay_codewords()
    msg = (bits[:, :12] << torch.arange(12)).sum(-1)
    assert torch.equal(words[msg], bits)


def test_inner_products_and_minimum_distance(ints):
    """Every minimal vector sees the same distribution of inner products (the shell is a spherical
    11-design): 32 once, 16 x 4600, 8 x 47104, 0 x 93150, and the negatives."""
    rows = torch.randint(0, LEECH_SIZE, (6,), generator=_gen(1))
    ip = ints[rows] @ ints.T
    for r in ip:
        values, counts = torch.unique(r, return_counts=True)
        assert values.tolist() == [-32, -16, -8, 0, 8, 16, 32]
        assert counts.tolist() == [1, 4600, 47104, 93150, 47104, 4600, 1]
    dist2 = 64 - 2 * ip  # squared distance between vectors of squared norm 32
    dist2[torch.arange(6), rows] = float("inf")
    assert dist2.min() == 32


def test_codes_from_indices(ints):
    idx = torch.randint(0, LEECH_SIZE, (3, 5), generator=_gen(2))
    c = leech_codes(idx.int(), torch.float64)
    assert c.shape == (3, 5, 24) and c.dtype == torch.float64
    assert torch.equal(c, ints[idx] / SQRT32)
    assert torch.equal(leech_codes(idx), c.float())
    # One graph (the range check is skipped while compiling, the tables are the custom op's).
    compiled = torch.compile(leech_codes, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(idx, torch.float64), c)
    # Meta indices hold no values to check: shapes only.
    meta = leech_codes(torch.zeros(3, dtype=torch.long, device="meta"))
    assert meta.shape == (3, 24) and meta.device.type == "meta"
    first3 = torch.tensor([-3.0] + [1.0] * 23, dtype=torch.float64) / SQRT32
    assert torch.equal(leech_codes(torch.tensor(98256)), first3.float())


@pytest.mark.parametrize(
    "dtype, scale", [(torch.float32, 1.0), (torch.float64, SQRT32), (torch.float16, 1.0)]
)
def test_index_round_trip_all(dtype, scale):
    c = leech_codebook(dtype) * scale
    step = 1 if dtype == torch.float32 else 5  # every index once; the other dtypes on a sample
    assert torch.equal(leech_index(c[::step]), torch.arange(0, LEECH_SIZE, step))
    # Negation and positive rescaling stay in the codebook.
    neg = leech_index(-c[::7] * 1000)
    assert torch.equal(leech_codes(neg, dtype), -leech_codebook(dtype)[::7])
    assert leech_index(c[:6].view(2, 3, 24)).shape == (2, 3)
    # Multiples whose squares overflow or underflow float64 (refused before).
    for tiny_or_huge in (1e160, 1e-200, 1e-310):
        assert torch.equal(
            leech_index(c[::997].double() * tiny_or_huge), torch.arange(0, LEECH_SIZE, 997)
        )


def test_index_rejects_non_codes():
    not_codes = [
        torch.zeros(24),
        torch.randn(24, generator=_gen(3)),
        torch.tensor([2.0] * 7 + [-2.0] + [0.0] * 16),  # positions 0..7 are not an octad
        torch.tensor([-3.0] + [1.0] * 23) * torch.tensor([-1.0] * 3 + [1.0] * 21),  # 3 flips
        torch.tensor([4.0, 4.0, 4.0] + [0.0] * 21),
    ]
    # An octad with an odd number of minus signs is not in the shell either.
    odd = torch.zeros(24)
    odd[golay_octads()[0]] = 2.0
    odd[golay_octads()[0][0]] = -2.0
    not_codes.append(odd)
    # Within 0.05 per coordinate at squared norm 32 of a code: its index; 0.1 off: rejected.
    idx = torch.tensor([5, 2000, 150000])
    x = leech_codes(idx, torch.float64) * SQRT32
    g = _gen(4)
    near = x + (torch.rand(3, 24, generator=g, dtype=torch.float64) - 0.5) * 0.06
    assert torch.equal(leech_index(near), idx)
    for row in x:
        off = row.clone()
        k = int(torch.nonzero(off.abs() <= 1)[0])  # a zero (shapes 1, 2) or a +-1 (shape 3)
        off[k] += 0.1
        not_codes.append(off)
    for v in not_codes:
        with pytest.raises(ValueError, match="vectors"):
            leech_index(torch.cat((leech_codes(torch.arange(3)), v[None].float())))


def _family(name, seed, n=192):
    """(n, 24) float64 test inputs; the EXACT ones keep every score exact in float32 too."""
    g = _gen(seed)
    pick = torch.randint(0, LEECH_SIZE, (2, n), generator=g)
    ints = (leech_codes(pick, torch.float64) * SQRT32).round()
    gauss = torch.randn(n, 24, generator=g, dtype=torch.float64)
    if name == "small_int":
        return torch.randint(-2, 3, (n, 24), generator=g).double()
    if name == "ternary":  # many zeros and equal magnitudes: ties everywhere
        return torch.randint(-1, 2, (n, 24), generator=g).double()
    if name == "signs":
        return torch.randint(0, 2, (n, 24), generator=g).double() * 2 - 1
    if name == "sparse_int":
        return torch.randint(-3, 4, (n, 24), generator=g) * (torch.rand(n, 24, generator=g) < 0.12)
    if name == "codes":
        return ints[0]
    if name == "unit_codes":
        return leech_codes(pick[0], torch.float64)
    if name == "sum_of_codes":
        return ints[0] + ints[1]
    if name == "zeros":
        return torch.zeros(4, 24, dtype=torch.float64)
    if name == "gaussian":
        return gauss
    if name == "unit_norm":
        return gauss / torch.linalg.vector_norm(gauss, dim=-1, keepdim=True)
    if name == "codes_plus_noise":
        return ints[0] + 0.05 * gauss
    if name == "sparse_gaussian":  # three non-zeros per row
        cols = torch.rand(n, 24, generator=g).argsort(-1)[:, :3]
        return torch.zeros(n, 24, dtype=torch.float64).scatter_(-1, cols, gauss[:, :3])
    if name == "cauchy":
        return torch.tan(math.pi * (torch.rand(n, 24, generator=g, dtype=torch.float64) - 0.5))
    if name == "large_scale":
        return 1e6 * gauss
    raise AssertionError(name)


EXACT = ["small_int", "ternary", "signs", "sparse_int", "codes", "unit_codes", "sum_of_codes"]
EXACT += ["zeros"]
FLOATING = ["gaussian", "unit_norm", "codes_plus_noise", "sparse_gaussian", "cauchy", "large_scale"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("family", EXACT + FLOATING)
def test_quantize_matches_brute_force(ints, family, dtype):
    z = _family(family, seed=len(family) + (dtype == torch.float32)).to(dtype)
    rel = 1e-13 if dtype == torch.float64 else 2e-6
    _check(z, ints, exact=family in EXACT, rel=rel)


def test_torch_backend_decodes_every_chunk():
    # The plain-PyTorch decoder runs in chunks of 64 rows (the tests of _decode bypass them):
    # every row past the first chunk, and a last chunk of 5, must be decoded too.
    z = torch.randn(3 * 64 + 5, 24, generator=_gen(11), dtype=torch.float64)
    codes, idx = leech_quantize(z, backend="torch")
    want_codes, want_idx = leech_quantize(z, backend="cpu")
    assert torch.equal(idx, want_idx) and torch.equal(codes, want_codes)


def test_quantize_half_dtypes_shapes_and_special_rows(ints):
    z = torch.randint(-2, 3, (2, 3, 24), generator=_gen(7))
    want, _ = leech_quantize(z.double())
    for dtype in (torch.float16, torch.bfloat16):
        index, codes = leech_quantize(z.to(dtype))
        assert torch.equal(index, want) and codes.shape == (2, 3, 24) and codes.dtype == dtype
    # The direction is quantized: a positive scale changes nothing, negation negates the code.
    g = torch.randn(64, 24, generator=_gen(8), dtype=torch.float64)
    index, codes = leech_quantize(g)
    assert torch.equal(leech_quantize(g * 0.25)[0], index)
    assert torch.equal(leech_quantize(-g)[1], -codes)
    # Zero rows tie every code (index 0); NaN / Inf rows get index 0 too.
    special = torch.zeros(3, 24)
    special[1, 4] = float("nan")
    special[2, 0] = float("inf")
    special = torch.cat((torch.randn(2, 24, generator=_gen(9)), special))
    index, _ = leech_quantize(special)
    assert index[2:].tolist() == [0, 0, 0]
    assert torch.equal(index[:2], leech_quantize(special[:2])[0])
    empty_index, empty_codes = leech_quantize(torch.zeros(0, 24))
    assert empty_index.shape == (0,) and empty_codes.shape == (0, 24)
    # More rows than one decoder chunk.
    big = torch.randint(-1, 2, (1500, 24), generator=_gen(10)).double()
    index, _ = leech_quantize(big)
    assert torch.equal(index[-50:], _brute(big[-50:], ints)[2])


def test_bad_inputs():
    with pytest.raises(ValueError, match="z"):
        leech_quantize(torch.zeros(5, 23))
    with pytest.raises(ValueError, match="z"):
        leech_quantize(torch.tensor(1.0))
    with pytest.raises(TypeError, match="z"):
        leech_quantize(torch.zeros(5, 24, dtype=torch.int64))
    with pytest.raises(TypeError, match="z"):
        leech_quantize([0.0] * 24)
    with pytest.raises(ValueError, match="vectors"):
        leech_index(torch.zeros(5, 8))
    with pytest.raises(TypeError, match="vectors"):
        leech_index(torch.zeros(5, 24, dtype=torch.int32))
    with pytest.raises(TypeError, match="indices"):
        leech_codes(torch.zeros(5))
    with pytest.raises(ValueError, match="indices"):
        leech_codes(torch.tensor([0, LEECH_SIZE]))
    with pytest.raises(ValueError, match="indices"):
        leech_codes(torch.tensor([-1]))
    with pytest.raises(TypeError, match="dtype"):
        leech_codes(torch.tensor([0]), torch.int64)  # unit codes would round to 0


@pytest.mark.parametrize("op", ["leech_unit_codes", "e8_shell_lookup"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_raw_code_ops_refuse_other_dtypes(op, dtype):
    # Called directly, past leech_codes / e8_shell_codes: codes of 0 (int), 0.5 entries (bool),
    # or a result in float32 where the fake promised `dtype`.
    import fastvq.lattice  # noqa: F401  (registers both ops)

    with pytest.raises(TypeError, match="dtype must be float32"):
        getattr(torch.ops.fastvq, op)(torch.tensor([0, 1]), dtype)
