"""Image tokenizer networks: encoders, decoders, the PatchGAN discriminator and LPIPS.

Only torch is imported here; quantizer classes come from fastvq.nn when a config names them.
"""

from fastvq.models.discriminator import PatchGANDiscriminator
from fastvq.models.lpips import LPIPS
from fastvq.models.rotated_vqvae import RotatedDecoder, RotatedEncoder
from fastvq.models.tokenizer import (
    Tokenizer,
    TokenizerOutput,
    build_quantizer,
    build_tokenizer,
)
from fastvq.models.vqgan import Decoder, Encoder

__all__ = [
    "LPIPS",
    "Decoder",
    "Encoder",
    "PatchGANDiscriminator",
    "RotatedDecoder",
    "RotatedEncoder",
    "Tokenizer",
    "TokenizerOutput",
    "build_quantizer",
    "build_tokenizer",
]
