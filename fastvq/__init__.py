"""fastvq: fused kernels for vector quantization in PyTorch.

Importing fastvq loads the compiled extension if it was built, never Triton and never CUDA.
"""

from fastvq.ops._backends import backends
from fastvq.ops.codebook import (
    code_counts,
    ema_codebook,
    ema_update_,
    kmeans,
    perplexity,
    reset_dead_codes_,
    usage,
)
from fastvq.ops.nearest_code import nearest_code
from fastvq.ops.quantize import quantize

__version__ = "0.1.0"
__all__ = [
    "backends",
    "code_counts",
    "ema_codebook",
    "ema_update_",
    "kmeans",
    "nearest_code",
    "perplexity",
    "quantize",
    "reset_dead_codes_",
    "usage",
]
