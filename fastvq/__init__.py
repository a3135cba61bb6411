"""fastvq: fused kernels for vector quantization in PyTorch.

Importing fastvq loads the compiled extension if it was built, never Triton and never CUDA.
"""

from fastvq.ops._backends import backends
from fastvq.ops.nearest_code import nearest_code

__version__ = "0.1.0"
__all__ = ["backends", "nearest_code"]
