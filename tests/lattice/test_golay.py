"""The extended Golay code: it is the unique self-dual [24, 12, 8] code, so the weight distribution
and self-orthogonality pin it down; the octads must form the Steiner system S(5, 8, 24)."""

import itertools

import torch

from fastvq.lattice.golay import (
    GENERATOR,
    golay_codewords,
    golay_octad_of_message,
    golay_octads,
)


def test_generator_is_systematic_and_self_orthogonal():
    gen = torch.tensor([[int(c) for c in row.replace(" ", "")] for row in GENERATOR])
    assert gen.shape == (12, 24)
    assert torch.equal(gen[:, :12], torch.eye(12, dtype=gen.dtype))
    assert torch.equal((gen @ gen.T) % 2, torch.zeros(12, 12, dtype=gen.dtype))


def test_codewords():
    words = golay_codewords()
    assert words.shape == (4096, 24) and words.dtype == torch.int64
    assert len(torch.unique(words, dim=0)) == 4096
    # Row m is the codeword of message m: its first 12 bits are m.
    msg = (words[:, :12] << torch.arange(12)).sum(-1)
    assert torch.equal(msg, torch.arange(4096))
    weights, counts = torch.unique(words.sum(-1), return_counts=True)
    assert weights.tolist() == [0, 8, 12, 16, 24]
    assert counts.tolist() == [1, 759, 2576, 759, 1]
    # Closed under XOR (linear), on random pairs.
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 4096, (2, 1000), generator=g)
    assert torch.equal(words[a] ^ words[b], words[a ^ b])


def test_octads_form_steiner_system():
    octads = golay_octads()
    assert octads.shape == (759, 8)
    assert (octads.diff(dim=-1) > 0).all()  # ascending positions
    masks = (1 << octads).sum(-1)
    words = golay_codewords()
    word_masks = (words << torch.arange(24)).sum(-1)
    # Every octad is a weight-8 codeword, in message order.
    octad_msgs = masks & 4095
    assert (octad_msgs.diff() > 0).all()
    assert torch.equal(word_masks[octad_msgs], masks)
    of_msg = golay_octad_of_message()
    assert torch.equal(of_msg[octad_msgs], torch.arange(759))
    assert (of_msg >= 0).sum() == 759
    # S(5, 8, 24): each of the 42,504 five-subsets lies in exactly one octad.
    fives = torch.tensor([sum(1 << i for i in c) for c in itertools.combinations(range(24), 5)])
    inside = (fives[:, None] & masks[None, :]) == fives[:, None]
    assert torch.equal(inside.sum(-1), torch.ones(len(fives), dtype=torch.int64))
