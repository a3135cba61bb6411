"""The VQGAN encoder and decoder (Esser et al. 2021; taming's diffusionmodules/model.py).

GroupNorm + swish residual blocks, single-head attention blocks at chosen resolutions, widths
ch * ch_mult[i] per level, and one 2x down/upsampling between consecutive levels: the downsampling
factor is 2**(len(ch_mult) - 1) (ch_mult=(1, 1, 2, 2, 4) at 256x256 gives 16x16 latents).
Module layout follows taming's (conv_in, down[i].block/attn/downsample, mid, norm_out, conv_out)
so its checkpoints map over by name, except that double_z and the timestep embedding are gone.
"""

import torch
import torch.nn.functional as F
from torch import nn


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    if channels % groups:
        raise ValueError(f"norm_groups must divide every width, got {groups} for width {channels}")
    return nn.GroupNorm(groups, channels, eps=1e-6)  # eps as in taming


class ResnetBlock(nn.Module):
    """norm-swish-conv3, norm-swish-dropout-conv3, plus a skip (1x1 conv when widths differ)."""

    def __init__(self, c_in: int, c_out: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions with 1x1-conv q, k, v, residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (t.flatten(2).transpose(1, 2) for t in (self.q(n), self.k(n), self.v(n)))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H*W, C), scale 1/sqrt(C) as taming
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 conv3 after asymmetric (0, 1, 0, 1) padding: exactly H/2 for even H, as taming."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2 then conv3."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class _Mid(nn.Module):
    def __init__(self, channels: int, groups: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups, dropout)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


def _check(ch: int, ch_mult, num_res_blocks: int, resolution: int, attn_resolutions=()) -> None:
    if ch < 1 or not ch_mult or any(int(m) < 1 for m in ch_mult):
        raise ValueError(
            f"ch must be >= 1 and ch_mult a non-empty list of ints >= 1, got {ch}, {ch_mult}"
        )
    if num_res_blocks < 1:  # the encoder's blocks widen each level and hold its attention
        raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
    factor = 2 ** (len(ch_mult) - 1)
    if resolution % factor:
        raise ValueError(
            f"resolution must be a multiple of the downsampling factor {factor} "
            f"(2**(len(ch_mult) - 1)), got {resolution}"
        )
    levels = [resolution // 2**i for i in range(len(ch_mult))]
    unused = sorted(set(attn_resolutions) - set(levels))
    if unused:  # else no level gets those attention blocks, without a word
        raise ValueError(
            f"attn_resolutions must be resolutions of the levels {levels} (resolution {resolution} "
            f"halved per level), got {unused}"
        )


class Encoder(nn.Module):
    """x (B, in_channels, H, W) -> z (B, z_channels, H / f, W / f), f = 2**(len(ch_mult) - 1).

    attn_resolutions lists the feature-map sizes (in pixels of the nominal `resolution`) at which
    attention blocks follow the residual blocks; the middle always has one (taming).
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        ch: int = 128,
        ch_mult=(1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions=(16,),
        z_channels: int = 256,
        resolution: int = 256,
        dropout: float = 0.0,
        norm_groups: int = 32,
    ):
        super().__init__()
        _check(ch, ch_mult, num_res_blocks, resolution, attn_resolutions)
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        res, c_in = resolution, ch
        for i, mult in enumerate(ch_mult):
            level, c_out = _Level(), ch * mult
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(c_in, c_out, norm_groups, dropout))
                c_in = c_out
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(c_in, norm_groups))
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(c_in)
                res //= 2
            self.down.append(level)
        self.mid = _Mid(c_in, norm_groups, dropout)
        self.norm_out = _norm(c_in, norm_groups)
        self.conv_out = nn.Conv2d(c_in, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for i, block in enumerate(level.block):
                h = block(h)
                if level.attn:
                    h = level.attn[i](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z (B, z_channels, h, w) -> x_hat (B, out_channels, h * f, w * f), f = 2**(len(ch_mult) - 1).

    Mirror of Encoder with num_res_blocks + 1 blocks per level (taming); no output activation.
    """

    def __init__(
        self,
        *,
        out_channels: int = 3,
        ch: int = 128,
        ch_mult=(1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions=(16,),
        z_channels: int = 256,
        resolution: int = 256,
        dropout: float = 0.0,
        norm_groups: int = 32,
    ):
        super().__init__()
        _check(ch, ch_mult, num_res_blocks, resolution, attn_resolutions)
        c_in = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, c_in, 3, padding=1)
        self.mid = _Mid(c_in, norm_groups, dropout)
        up = []
        for i in reversed(range(len(ch_mult))):
            level, c_out = _Level(), ch * ch_mult[i]
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(c_in, c_out, norm_groups, dropout))
                c_in = c_out
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(c_in, norm_groups))
            if i != 0:
                level.upsample = Upsample(c_in)
                res *= 2
            up.insert(0, level)  # up[i] is level i, as in taming
        self.up = nn.ModuleList(up)
        self.norm_out = _norm(c_in, norm_groups)
        self.conv_out = nn.Conv2d(c_in, out_channels, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """conv_out.weight (for the adaptive GAN weight)."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for i, block in enumerate(level.block):
                h = block(h)
                if level.attn:
                    h = level.attn[i](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
