"""Tokenizer = encoder -> (1x1 conv) -> any fastvq.nn quantizer -> (1x1 conv) -> decoder.

build_quantizer / build_tokenizer turn the config's "model" section into modules. The quantizer
classes are imported lazily from fastvq.nn so that importing fastvq.models stays cheap and the
quantizer families can land independently.
"""

import functools
import importlib
import inspect
from typing import NamedTuple

import torch
from torch import nn

from fastvq._ext import register_namedtuple
from fastvq.ops._validate import check_choice, check_floating

# fastvq.nn class name -> module holding it (the contract's layout of issue 5). Not
# RandomProjectionQuantizer: it returns indices only (BEST-RQ targets), no quantized latents.
QUANTIZERS = {
    "VectorQuantize": "fastvq.nn.vector_quantize",
    "HouseholderVQ": "fastvq.nn.vector_quantize",
    "HyperCodebook": "fastvq.nn.vector_quantize",
    "FSQ": "fastvq.nn.scalar",
    "LFQ": "fastvq.nn.scalar",
    "BSQ": "fastvq.nn.scalar",
    "LatentQuantize": "fastvq.nn.scalar",
    "LeechQuantize": "fastvq.nn.lattice",
    "E8Quantize": "fastvq.nn.lattice",
    "SimVQ": "fastvq.nn.projected",
    "ResidualVQ": "fastvq.nn.residual",
    "GroupedResidualVQ": "fastvq.nn.residual",
    "ResidualFSQ": "fastvq.nn.residual",
    "ResidualLFQ": "fastvq.nn.residual",
    "ResidualSimVQ": "fastvq.nn.residual",
    "GroupedResidualFSQ": "fastvq.nn.residual",
    "GroupedResidualLFQ": "fastvq.nn.residual",
}
# Quantizers that take channel-first latents (b, dim, *spatial) only, like the peer's
# LatentQuantize: the tokenizer hands them its (B, D, h, w) maps as they are.
CHANNEL_FIRST = {"LatentQuantize"}


@register_namedtuple
class TokenizerOutput(NamedTuple):
    recon: torch.Tensor  # (B, C, H, W) reconstruction
    indices: torch.Tensor | None  # (B, h, w), (B, h, w, Q) residual, (B, h, w, G, Q) grouped
    quant_loss: torch.Tensor  # scalar: commitment + codebook + aux (entropy) terms, 0 if none
    z: torch.Tensor  # (B, D, h, w) latents entering the quantizer


def _split_output(out) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalize the vector-quantize-pytorch return conventions to (quantized, indices, loss).

    (quantized, indices) -> loss 0; (quantized, indices, loss) with loss of any shape
    (ResidualVQ: one per quantizer) -> loss.sum(); extra trailing entries are ignored.
    """
    if not isinstance(out, tuple | list) or len(out) < 2:
        raise TypeError(
            "the quantizer must return (quantized, indices[, loss]) like vector-quantize-pytorch, "
            f"got {type(out).__name__}"
        )
    quantized, indices = out[0], out[1]
    loss = out[2] if len(out) > 2 else None
    if loss is None:
        loss = quantized.new_zeros((), dtype=torch.float32)
    elif isinstance(loss, torch.Tensor):
        loss = loss.sum()
    else:
        loss = torch.as_tensor(float(loss), device=quantized.device)
    return quantized, indices, loss


class Tokenizer(nn.Module):
    """Image tokenizer around any quantizer with vector-quantize-pytorch's conventions.

    The quantizer sees channel-last latents (B, h*w, D), its outputs reshaped back to maps;
    those in CHANNEL_FIRST see the (B, D, h, w) maps themselves.

    Args:
        encoder: (B, C, H, W) -> (B, Z, h, w).
        quantizer: (B, N, D) -> (quantized (B, N, D), indices (B, N) or (B, N, Q)[, loss]).
        decoder: (B, Z, h, w) -> (B, C, H, W); its `last_layer` property (or else its last
            parameter of dimension > 1) is the weight used by the adaptive GAN weight.
        quant_conv, post_quant_conv: optional (B, Z, h, w) <-> (B, D, h, w) maps (1x1 convs).
    """

    def __init__(
        self,
        encoder: nn.Module,
        quantizer: nn.Module,
        decoder: nn.Module,
        quant_conv: nn.Module | None = None,
        post_quant_conv: nn.Module | None = None,
    ):
        super().__init__()
        self.encoder = encoder
        self.quantizer = quantizer
        self.decoder = decoder
        self.quant_conv = quant_conv if quant_conv is not None else nn.Identity()
        self.post_quant_conv = post_quant_conv if post_quant_conv is not None else nn.Identity()

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's last weight (taming's get_last_layer)."""
        last = getattr(self.decoder, "last_layer", None)
        if last is None:
            last = [p for p in self.decoder.parameters() if p.dim() > 1][-1]
        return last

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    @property
    def codebook_sizes(self) -> tuple[int, ...] | None:
        """The size of each codebook behind the indices' trailing (G, Q) entries, in their order,
        or one size (K,) shared by all; None for a quantizer without codebook_size."""
        layers = self.quantizer.rvqs if self._grouped else [self.quantizer]
        sizes = []
        for layer in layers:
            per_layer = getattr(layer, "codebook_sizes", None)
            k = getattr(layer, "codebook_size", None)
            if per_layer is None and k is None:
                return None
            sizes += list(per_layer) if per_layer is not None else [k]
        return (sizes[0],) if len(set(sizes)) == 1 else tuple(sizes)

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) in [-1, 1] -> latents entering the quantizer (B, D, h, w); H and W
        must be multiples of the encoder's downsample_factor (where it has one), else the
        reconstruction would come back smaller or larger than x."""
        check_floating("x", x)
        if x.dim() != 4:
            raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
        factor = getattr(self.encoder, "downsample_factor", None)
        if factor and (x.shape[-2] % factor or x.shape[-1] % factor):
            raise ValueError(
                f"x's height and width must be multiples of the encoder's downsampling factor "
                f"{factor}, got {tuple(x.shape[-2:])}"
            )
        return self.quant_conv(self.encoder(x))

    @property
    def _grouped(self) -> bool:
        """GroupedResidual* (fastvq.nn's and the peer's): indices lead with a groups axis."""
        return hasattr(self.quantizer, "rvqs")

    @property
    def _channel_first(self) -> bool:
        return type(self.quantizer).__name__ in CHANNEL_FIRST

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (B, D, h, w) -> (z_q (B, D, h, w), indices (B, h, w[, G][, Q]), quant_loss scalar)."""
        if self._channel_first:
            return _split_output(self.quantizer(z))
        b, d, h, w = z.shape
        quantized, indices, loss = _split_output(self.quantizer(z.flatten(2).transpose(1, 2)))
        z_q = quantized.transpose(1, 2).reshape(b, d, h, w)
        if self._grouped:  # (G, B, N, Q) -> (B, N, G, Q)
            indices = indices.movedim(0, 2)
        return z_q, indices.reshape(b, h, w, *indices.shape[2:]), loss

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) in [-1, 1] -> quantize(latents(x)): (z_q, indices, quant_loss)."""
        return self.quantize(self.latents(x))

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """z_q (B, D, h, w) -> x_hat (B, C, H, W)."""
        return self.decoder(self.post_quant_conv(z_q))

    def codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, h, w[, G][, Q]) -> the quantized latents z_q (B, D, h, w) they stand for."""
        if indices.dim() < 3:
            raise ValueError(f"indices must be (B, h, w[, Q]), got shape {tuple(indices.shape)}")
        if not (indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool):
            # Token files hold uint16 / int32 (fastvq tokenize): some quantizers index only with
            # int64 (SimVQ's codebook[...], E8's lookup refused uint16).
            indices = indices.long()
        if self._channel_first:  # (b, *spatial[, c]) -> (b, dim, *spatial)
            return self._decoder_dtype(self.quantizer.indices_to_codes(indices))
        b, h, w = indices.shape[:3]
        flat = indices.reshape(b, h * w, *indices.shape[3:])
        if self._grouped:
            flat = flat.movedim(2, 0)
        q = self.quantizer
        if hasattr(q, "get_output_from_indices"):
            codes = q.get_output_from_indices(flat)
        elif hasattr(q, "indices_to_codes"):  # FSQ / LFQ in vector-quantize-pytorch
            codes = q.indices_to_codes(flat)
        elif getattr(q, "codebook", None) is not None:
            codes = q.codebook[flat]
        else:
            raise TypeError(
                f"{type(q).__name__} has no get_output_from_indices, indices_to_codes or codebook"
            )
        return self._decoder_dtype(codes.transpose(1, 2).reshape(b, -1, h, w))

    def _decoder_dtype(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes in the dtype of the layers decoding them: some quantizers (residual stacks,
        lattices) decode indices to float32 even in a model cast to bf16 or float64."""
        for p in (*self.post_quant_conv.parameters(), *self.decoder.parameters()):
            if p.is_floating_point():
                return codes.to(p.dtype)
        return codes

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, h, w[, G][, Q]) from encode -> x_hat (B, C, H, W), equal to decode(z_q)
        (to float32's rounding in a float64 model whose quantizer decodes float32 codes: a
        lattice without projection)."""
        return self.decode(self.codes_from_indices(indices))

    def forward(self, x: torch.Tensor, quantize: bool = True) -> TokenizerOutput:
        """x (B, C, H, W) -> TokenizerOutput(recon, indices, quant_loss, z).

        quantize=False skips the quantizer (plain autoencoder, e.g. to pretrain before VQ):
        indices is None and quant_loss 0.
        """
        z = self.latents(x)
        if not quantize:
            return TokenizerOutput(self.decode(z), None, z.new_zeros((), dtype=torch.float32), z)
        z_q, indices, loss = self.quantize(z)
        return TokenizerOutput(self.decode(z_q), indices, loss, z)


def _quantizer_class(name):
    if isinstance(name, type) and issubclass(name, nn.Module):
        return name  # a class passed directly (Python callers, tests)
    if name not in QUANTIZERS:
        raise ValueError(f"quantizer type must be one of {sorted(QUANTIZERS)}, got {name!r}")
    module = importlib.import_module(QUANTIZERS[name])
    return getattr(module, name)


def _accepts(cls, arg: str) -> bool:
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False
    return arg in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _flag_kinds(cls) -> dict:
    """{argument: whether None is allowed} for cls's bool arguments (default or annotation)."""
    return {
        arg: p.default is None or p.annotation == bool | None
        for arg, p in inspect.signature(cls).parameters.items()
        if isinstance(p.default, bool) or p.annotation in (bool, bool | None)
    }


@functools.cache
def _flags() -> dict:
    """{argument: None allowed} for the arguments that every built-in quantizer taking them
    declares bool: what a residual stack passes on to its layers, through **kwargs, too."""
    kinds: dict[str, list] = {}
    for name in QUANTIZERS:
        cls = _quantizer_class(name)
        flags = _flag_kinds(cls)
        for arg in inspect.signature(cls).parameters:
            kinds.setdefault(arg, []).append(flags.get(arg))
    return {arg: any(k) for arg, k in kinds.items() if None not in k}


def build_quantizer(cfg: dict, dim: int | None = None) -> nn.Module:
    """{"type": "<fastvq.nn class name>", **kwargs} -> that class(**kwargs).

    dim, when given, is passed as `dim=` unless cfg sets it or the class takes no `dim`. The
    built-in quantizers' flags (rotation_trick, kmeans_init, ...) must be true or false (or
    null where the argument defaults to it): a string such as "false" or a typo would be
    truthy, and null falsy, turning a feature on or off without a word.
    """
    if not isinstance(cfg, dict) or "type" not in cfg:
        raise ValueError(
            f"quantizer config must be a mapping with a 'type' key (one of {sorted(QUANTIZERS)}), "
            f"got {cfg!r}"
        )
    kwargs = dict(cfg)
    cls = _quantizer_class(kwargs.pop("type"))
    if cls in {_quantizer_class(name) for name in QUANTIZERS}:  # not a user's class
        flags = {**_flags(), **_flag_kinds(cls)}  # cls's own declaration first
        for arg, value in kwargs.items():
            if arg in flags and not (isinstance(value, bool) or value is None and flags[arg]):
                allowed = "true, false or null" if flags[arg] else "true or false"
                raise ValueError(
                    f"quantizer {cls.__name__}: {arg} must be {allowed}, got {value!r}"
                )
    if dim is not None and "dim" not in kwargs and _accepts(cls, "dim"):
        kwargs["dim"] = dim
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"quantizer {cls.__name__}: bad arguments {kwargs}: {e}") from e


ARCHS = ("rotated_vqvae", "vqgan")
_DEFAULTS = {
    # The rotated VQ-VAE paper's network (fastvq/models/rotated_vqvae.py): downsampling 8.
    "rotated_vqvae": dict(
        in_channels=3,
        ch=64,
        ch_mult=(1, 2, 4),
        num_res_blocks=6,
        z_channels=256,
        attn_heads=8,
        quant_conv=False,
    ),
    # taming-transformers' f16 VQGAN (vqgan_imagenet_f16_1024.yaml) at 256x256.
    "vqgan": dict(
        in_channels=3,
        ch=128,
        ch_mult=(1, 1, 2, 2, 4),
        num_res_blocks=2,
        attn_resolutions=(16,),
        z_channels=256,
        resolution=256,
        dropout=0.0,
        norm_groups=32,
        quant_conv=True,
    ),
}
_COMMON = {"arch", "quantizer", "embed_dim", "out_channels", "resolution"}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def build_tokenizer(cfg: dict) -> Tokenizer:
    """Build a Tokenizer from the config's "model" section.

    Keys (defaults by arch in _DEFAULTS): arch (rotated_vqvae | vqgan, required), quantizer
    ({"type": ..., **kwargs}, required), in_channels, out_channels (= in_channels), ch, ch_mult,
    num_res_blocks, z_channels, resolution; rotated_vqvae: attn_heads; vqgan: attn_resolutions,
    dropout, norm_groups. embed_dim: the quantizer's input dim D (default: quantizer.dim if set,
    else z_channels); quant_conv: 1x1 convs z_channels <-> D (forced on when D != z_channels).
    """
    if not isinstance(cfg, dict):
        raise ValueError(f"model config must be a mapping, got {type(cfg).__name__}")
    check_choice("model.arch", cfg.get("arch"), ARCHS)
    if "quantizer" not in cfg:
        raise ValueError(
            "model.quantizer is required, e.g. {type: VectorQuantize, codebook_size: 1024}"
        )
    arch = cfg["arch"]
    known = set(_DEFAULTS[arch]) | _COMMON
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"unknown key model.{unknown[0]} for arch {arch}; keys: {sorted(known)}")
    c = {**_DEFAULTS[arch], **cfg}
    for key in ("ch_mult", "attn_resolutions"):
        # A scalar (model.ch_mult=2) failed in tuple() with "'int' object is not iterable".
        if key in c and not (isinstance(c[key], list | tuple) and all(_is_int(v) for v in c[key])):
            raise ValueError(f"model.{key} must be a list of ints, e.g. [1, 2, 4], got {c[key]!r}")
    ints = {"ch": 1, "num_res_blocks": 0, "resolution": 1, "norm_groups": 1, "z_channels": 1,
            "in_channels": 1, "out_channels": 1, "attn_heads": 0}  # fmt: skip
    for key, low in ints.items():
        # else a ZeroDivisionError (norm_groups=0), a TypeError (None, 1.5), no blocks (-1) or
        # "dim must be >= 1" naming no key (z_channels=0); a rotated VQ-VAE takes any
        # resolution, so null leaves it unchecked there, and out_channels null is in_channels
        unset = c.get(key) is None and (
            key == "out_channels" or key == "resolution" and arch != "vqgan"
        )
        if key in c and not unset and not (_is_int(c[key]) and c[key] >= low):
            raise ValueError(f"model.{key} must be an int >= {low}, got {c[key]!r}")
    if c.get("embed_dim") is not None and not (_is_int(c["embed_dim"]) and c["embed_dim"] >= 1):
        # 0 read as unset (`or`), silently.
        raise ValueError(
            f"model.embed_dim must be a positive int, or null for model.quantizer.dim (else "
            f"model.z_channels), got {c['embed_dim']!r}"
        )
    if not isinstance(c["quant_conv"], bool):  # "no" is a string in YAML 1.2, and truthy
        raise ValueError(f"model.quant_conv must be true or false, got {c['quant_conv']!r}")
    z = c["z_channels"]
    qcfg = c["quantizer"]
    qdim = qcfg.get("dim") if isinstance(qcfg, dict) else None
    if c.get("embed_dim") and qdim and c["embed_dim"] != qdim:
        raise ValueError(
            f"model.embed_dim ({c['embed_dim']}) and model.quantizer.dim ({qdim}) disagree: the "
            "quantizer's input is the embedding; set one of them"
        )
    dim = c.get("embed_dim") or qdim or z
    out_channels = c.get("out_channels") or c["in_channels"]
    ch_mult = tuple(c["ch_mult"])

    if arch == "rotated_vqvae":
        from fastvq.models.rotated_vqvae import RotatedDecoder, RotatedEncoder

        enc = RotatedEncoder(c["in_channels"], c["ch"], ch_mult, c["num_res_blocks"], z)
        dec = RotatedDecoder(
            out_channels, c["ch"], ch_mult, c["num_res_blocks"], z, c["attn_heads"]
        )
        factor = enc.downsample_factor
    else:
        from fastvq.models.vqgan import Decoder, Encoder

        shared = {
            k: c[k]
            for k in ("ch", "num_res_blocks", "z_channels", "resolution", "dropout", "norm_groups")
        }
        shared.update(ch_mult=ch_mult, attn_resolutions=tuple(c["attn_resolutions"]))
        enc = Encoder(in_channels=c["in_channels"], **shared)
        dec = Decoder(out_channels=out_channels, **shared)
        factor = enc.downsample_factor
    if c.get("resolution") and c["resolution"] % factor:
        raise ValueError(
            f"model.resolution must be a multiple of the downsampling factor {factor}, "
            f"got {c['resolution']}"
        )
    quantizer = build_quantizer(qcfg, dim)
    qc = pqc = None
    if c["quant_conv"] or dim != z:
        qc, pqc = nn.Conv2d(z, dim, 1), nn.Conv2d(dim, z, 1)
    return Tokenizer(enc, quantizer, dec, qc, pqc)
