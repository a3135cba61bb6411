"""fastvq: fused kernels for vector quantization in PyTorch.

Importing fastvq loads the compiled extension if it was built, never Triton and never CUDA.
"""

# fastvq.lattice defines its ops (torch.ops.fastvq.leech_*, e8_*) in Python: imported here so
# that `import fastvq` registers every op an exported program may call (torch.export.load).
from fastvq import lattice  # noqa: F401
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
from fastvq.ops.scalar import binary_entropy_loss, bsq, bsq_codes, fsq, fsq_codes, lfq, lfq_codes

__version__ = "0.1.0"

# Imported on first use (fastvq.train.load_tokenizer after a bare `import fastvq`), so that
# importing fastvq stays light.
_SUBMODULES = ("models", "nn", "reference", "testing", "train")


def __getattr__(name: str):
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"fastvq.{name}")
    raise AttributeError(f"module 'fastvq' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_SUBMODULES})


__all__ = [
    "backends",
    "binary_entropy_loss",
    "bsq",
    "bsq_codes",
    "code_counts",
    "ema_codebook",
    "ema_update_",
    "fsq",
    "fsq_codes",
    "kmeans",
    "lfq",
    "lfq_codes",
    "nearest_code",
    "perplexity",
    "quantize",
    "reset_dead_codes_",
    "usage",
]
