"""Lattice codebooks: the Golay code, the Leech lattice shell (196,560 codes) and E8.

Decoders run as C++ (CPU), Triton and CUDA kernels where available, with plain-PyTorch paths on
any device; the Leech index tables (about 0.9 MiB) are built on first use per device.
"""

from fastvq.lattice.e8 import (
    E8_SHELL_SIZE,
    e8_nearest,
    e8_shell_codebook,
    e8_shell_codes,
    e8_shell_index,
    e8_shell_quantize,
)
from fastvq.lattice.golay import golay_codewords, golay_octads
from fastvq.lattice.leech import (
    LEECH_SIZE,
    leech_codebook,
    leech_codes,
    leech_index,
    leech_quantize,
)

__all__ = [
    "E8_SHELL_SIZE",
    "LEECH_SIZE",
    "e8_nearest",
    "e8_shell_codebook",
    "e8_shell_codes",
    "e8_shell_index",
    "e8_shell_quantize",
    "golay_codewords",
    "golay_octads",
    "leech_codebook",
    "leech_codes",
    "leech_index",
    "leech_quantize",
]
