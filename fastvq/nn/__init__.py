"""Quantizer modules built on fastvq's ops.

Drop-ins for vector-quantize-pytorch 1.32.0 (same constructor arguments, input layouts and
return tuples; documented differences in each module's docstring): VectorQuantize, ResidualVQ,
GroupedResidualVQ, FSQ, ResidualFSQ, GroupedResidualFSQ, LFQ, ResidualLFQ, GroupedResidualLFQ,
LatentQuantize, SimVQ, ResidualSimVQ, RandomProjectionQuantizer. From the seed papers:
HouseholderVQ (rotated VQ-VAE), HyperCodebook (meta-quantization's hyper-net codebook,
CodebookMLP) and k-means initialization from encoder outputs (VectorQuantize.init_from /
ResidualVQ.init_from). Also BSQ, the fixed lattice-shell codebooks LeechQuantize (196,560 codes)
and E8Quantize (240 codes), and defer_codebook_updates: gradient accumulation's micro-batches
update EMA codebooks as one batch.
"""

from fastvq.nn.lattice import E8Quantize, LeechQuantize
from fastvq.nn.projected import RandomProjectionQuantizer, SimVQ
from fastvq.nn.residual import (
    GroupedResidualFSQ,
    GroupedResidualLFQ,
    GroupedResidualVQ,
    ResidualFSQ,
    ResidualLFQ,
    ResidualSimVQ,
    ResidualVQ,
)
from fastvq.nn.scalar import BSQ, FSQ, LFQ, LatentQuantize
from fastvq.nn.vector_quantize import (
    CodebookMLP,
    HouseholderVQ,
    HyperCodebook,
    VectorQuantize,
    defer_codebook_updates,
)

__all__ = [
    "BSQ",
    "CodebookMLP",
    "E8Quantize",
    "FSQ",
    "GroupedResidualFSQ",
    "GroupedResidualLFQ",
    "GroupedResidualVQ",
    "HouseholderVQ",
    "HyperCodebook",
    "LFQ",
    "LatentQuantize",
    "LeechQuantize",
    "RandomProjectionQuantizer",
    "ResidualFSQ",
    "ResidualLFQ",
    "ResidualSimVQ",
    "ResidualVQ",
    "SimVQ",
    "VectorQuantize",
    "defer_codebook_updates",
]
