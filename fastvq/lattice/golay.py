"""The extended binary Golay code G24: 4,096 codewords of length 24, weights 0, 8, 12, 16, 24.

Codeword m (0 <= m < 4096) is the XOR of the generator rows i for which bit i of m is set. The
generator is systematic, [I_12 | A], so coordinates 0..11 of codeword m are the bits of m and a
codeword's message is read back from its first 12 coordinates. A is the bordered circulant of the
quadratic residues mod 11 (MacWilliams & Sloane, ch. 2 sec. 6; Conway & Sloane, ch. 3 sec. 2.8):
rows 0..10 are cyclic shifts of 1 at {0} + {1, 3, 4, 5, 9}, with a last column of ones, and row 11
is (1^11, 0). The tests check the weight distribution 1, 759, 2576, 759, 1 and the Steiner system.

The 759 weight-8 codewords are the octads; they are ordered by message.
"""

import functools

import torch

# Coordinate j of row i is character j (the space between the two halves is for reading only).
GENERATOR = (
    "100000000000 110111000101",
    "010000000000 011011100011",
    "001000000000 101101110001",
    "000100000000 010110111001",
    "000010000000 001011011101",
    "000001000000 000101101111",
    "000000100000 100010110111",
    "000000010000 110001011011",
    "000000001000 111000101101",
    "000000000100 011100010111",
    "000000000010 101110001011",
    "000000000001 111111111110",
)
GOLAY_SIZE = 4096
OCTAD_COUNT = 759


@functools.cache
def _codewords_cpu() -> torch.Tensor:
    gen = torch.tensor([[int(c) for c in row.replace(" ", "")] for row in GENERATOR])
    msg_bits = (torch.arange(GOLAY_SIZE)[:, None] >> torch.arange(12)) & 1
    return (msg_bits @ gen) % 2


@functools.cache
def _octads_cpu() -> tuple[torch.Tensor, torch.Tensor]:
    words = _codewords_cpu()
    is_octad = words.sum(-1) == 8
    octads = words[is_octad].nonzero()[:, 1].view(OCTAD_COUNT, 8)  # nonzero() is row-major: sorted
    octad_of_message = torch.full((GOLAY_SIZE,), -1)
    octad_of_message[is_octad] = torch.arange(OCTAD_COUNT)
    return octads, octad_of_message


def golay_codewords(device=None) -> torch.Tensor:
    """All 4,096 codewords as bits: (4096, 24) int64 in {0, 1}; row m is the codeword of message m
    (so row m's first 12 entries are the bits of m, least significant first)."""
    return _codewords_cpu().to(device)


def golay_octads(device=None) -> torch.Tensor:
    """The 759 octads (weight-8 codewords) as (759, 8) int64 coordinate positions, ascending within
    each row; rows are ordered by their codeword's message."""
    return _octads_cpu()[0].to(device)


def golay_octad_of_message(device=None) -> torch.Tensor:
    """(4096,) int64: the octad number of message m's codeword, or -1 if it is not an octad."""
    return _octads_cpu()[1].to(device)
