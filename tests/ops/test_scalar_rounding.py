"""The Triton scalar kernels' rounding helpers, bit for bit against torch on the values where
rounding modes differ: exact ties. The parity tests elsewhere accept either neighbour of a tie
(a rounding away from the float64 reference), so they cannot tell half-even from half-up."""

import pytest
import torch

from fastvq.ops._backends import triton_interpreting

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
scalar = pytest.importorskip("fastvq.kernels.scalar")
if not torch.cuda.is_available() and not triton_interpreting():
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _round_and_cast_kernel(x_ptr, rounded_ptr, bf16_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    x = tl.load(x_ptr + i)
    tl.store(rounded_ptr + i, scalar._round_half_even(x))
    tl.store(bf16_ptr + i, scalar._cast_for(x, bf16_ptr))


def test_round_half_even_and_bfloat16_cast_match_torch():
    # n + 1/2 for even and odd n of both signs (and their float32 neighbours), then float32 bit
    # patterns whose low 16 bits are 0x8000, a tie of the bfloat16 rounding, with even and odd
    # kept halves, and their neighbours.
    halves = torch.arange(-6, 6, dtype=torch.float32) + 0.5
    up = torch.nextafter(halves, torch.tensor(float("inf")))
    down = torch.nextafter(halves, torch.tensor(float("-inf")))
    bits = torch.tensor([0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0x00008000, 0x7F7F8000])
    bits = torch.cat([bits, bits | (1 << 31)]).to(torch.int32)
    x = torch.cat([halves, up, down, bits.view(torch.float32)])
    x = torch.cat([x, x.new_zeros(64 - len(x))]).to(DEVICE)
    rounded = torch.empty_like(x)
    bf16 = torch.empty(x.shape, dtype=torch.bfloat16, device=DEVICE)
    _round_and_cast_kernel[(1,)](x, rounded, bf16, 64)
    assert torch.equal(rounded, torch.round(x))
    assert torch.equal(bf16.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # NaN in the interpreter
def test_bfloat16_cast_keeps_nan():
    # 0x7FFFFFFF is the only float32 NaN NVIDIA GPUs compute (0 * inf, NaN * g, ...): the
    # rounding's carry wrapped it to 0x80000000, -0.0, so a NaN gradient came out as -0.0 in
    # bfloat16. numpy computes 0x7FC00000 / 0xFFC00000, which the carry leaves NaN: the bit
    # patterns are given here. Any NaN pattern out is right (torch writes 0x7FC0, a GPU 0x7FFF).
    nans = [0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FFF8000, 0x7FFFFFFE]
    bits = torch.tensor(nans + [0x7F800000, 0xFF800000, 0x7F7FFFFF, 0x3F800000], dtype=torch.int64)
    x = bits.to(torch.int32).view(torch.float32)  # int64 -> int32 keeps the low 32 bits
    x = torch.cat([x, x.new_zeros(16 - len(x))]).to(DEVICE)
    bf16 = torch.empty(x.shape, dtype=torch.bfloat16, device=DEVICE)
    _round_and_cast_kernel[(1,)](x, torch.empty_like(x), bf16, 16)
    nan = x.isnan()
    assert torch.equal(bf16.isnan(), nan), bf16.view(torch.int16)[: len(nans)]
    assert torch.equal(bf16[~nan].float(), x[~nan].to(torch.bfloat16).float())  # inf, max -> inf
