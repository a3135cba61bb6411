import pytest
import torch
from torch import nn

import fastvq


class StandInVQ(nn.Module):
    """A minimal quantizer with vector-quantize-pytorch's conventions, on fastvq.quantize:
    (B, N, D) -> (quantized, indices (B, N), commitment + codebook loss)."""

    def __init__(self, dim: int, codebook_size: int = 16, beta: float = 0.25):
        super().__init__()
        self.codebook_size, self.beta = codebook_size, beta
        self.embed = nn.Parameter(torch.randn(codebook_size, dim))

    @property
    def codebook(self) -> torch.Tensor:
        return self.embed

    def forward(self, x):
        b, n, d = x.shape
        q, idx = fastvq.quantize(x.reshape(-1, d), self.embed.detach())
        q = q.view(b, n, d)
        codes = self.embed[idx].view(b, n, d)
        loss = (
            self.beta * (x - codes.detach()).square().mean() + (x.detach() - codes).square().mean()
        )
        return q, idx.view(b, n), loss

    def get_output_from_indices(self, indices):
        return self.embed[indices]


@pytest.fixture
def standin():
    return StandInVQ


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run many tiny convolutions; with 2 intra-op threads on the shared 2-core CI
    machine test_networks.py took 53 s, with 1 thread 1.6 s (oversubscription), so use 1."""
    was = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(was)
