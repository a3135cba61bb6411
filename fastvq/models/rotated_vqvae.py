"""The encoder and decoder of the rotated VQ-VAE paper ("Vector Quantization for Neural Networks").

What the paper fixes (its Sections 3.1, 3.3 and 4): encoder convolutions of 64 -> 128 -> 256
filters, kernel 3, stride 2, each followed by BatchNorm and LeakyReLU; six residual blocks; a
decoder of transposed convolutions with BatchNorm and LeakyReLU that mirrors the encoder, 8-head
attention, and a final transposed convolution with tanh; latents of D = 256 channels.

What it leaves open, and what we chose:
  * padding 1 on the stride-2 convolutions, so each halves the size exactly (32x32 -> 4x4 at
    three stages: downsampling factor 2**len(ch_mult), not VQGAN's 2**(len(ch_mult) - 1));
  * the residual blocks are ResNet basic blocks (conv3-BN-LeakyReLU-conv3-BN, identity skip,
    LeakyReLU after the sum) at the latent width, all six after the last downsampling convolution;
  * LeakyReLU slope 0.2 (the DCGAN/VQGAN discriminator convention);
  * the decoder mirrors the encoder: six residual blocks, then one 8-head self-attention block
    (pre-LayerNorm, residual) over the h*w latent positions - at the lowest resolution, where
    attention over 16 positions (CIFAR) costs nothing - then transposed convolutions kernel 3,
    stride 2, padding 1, output_padding 1 (exactly x2 each, the mirror of the encoder's kernel 3),
    the last one straight to the image channels and tanh, with no BatchNorm after it;
  * a 1x1 convolution to / from z_channels when it differs from the last width (the paper has
    z_channels = 256 = the last width, and then none is added).
"""

import torch
from torch import nn

LEAKY_SLOPE = 0.2


def _conv_bn_act(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.LeakyReLU(LEAKY_SLOPE),
    )


def _convt_bn_act(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.LeakyReLU(LEAKY_SLOPE),
    )


class ResBlock(nn.Module):
    """ResNet basic block at constant width: x -> act(x + BN(conv(act(BN(conv(x))))))."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )
        self.act = nn.LeakyReLU(LEAKY_SLOPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


class SelfAttention2d(nn.Module):
    """Multi-head self-attention over a (B, C, H, W) map's positions; pre-LayerNorm, residual."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        if channels % heads:
            raise ValueError(f"attn_heads must divide the channels ({channels}), got {heads}")
        self.norm = nn.LayerNorm(channels)
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        n = self.norm(t)
        t = t + self.attn(n, n, n, need_weights=False)[0]
        return t.transpose(1, 2).reshape(b, c, h, w)


def _widths(ch: int, ch_mult) -> list[int]:
    if ch < 1 or not ch_mult or any(m < 1 for m in ch_mult):
        raise ValueError(
            f"ch must be >= 1 and ch_mult a non-empty list of ints >= 1, got {ch}, {ch_mult}"
        )
    return [ch * m for m in ch_mult]


class RotatedEncoder(nn.Module):
    """x (B, in_channels, H, W) -> z (B, z_channels, H / 2**len(ch_mult), W / 2**len(ch_mult)).

    Defaults are the paper's: widths 64, 128, 256 (ch=64, ch_mult=(1, 2, 4)), six residual blocks,
    z_channels = 256.
    """

    def __init__(
        self,
        in_channels: int = 3,
        ch: int = 64,
        ch_mult=(1, 2, 4),
        num_res_blocks: int = 6,
        z_channels: int = 256,
    ):
        super().__init__()
        widths = _widths(ch, ch_mult)
        self.downsample_factor = 2 ** len(widths)
        layers = [
            _conv_bn_act(c_in, c_out)
            for c_in, c_out in zip([in_channels, *widths], widths, strict=False)
        ]
        layers += [ResBlock(widths[-1]) for _ in range(num_res_blocks)]
        if z_channels != widths[-1]:
            layers.append(nn.Conv2d(widths[-1], z_channels, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class RotatedDecoder(nn.Module):
    """z (B, z_channels, h, w) -> x_hat (B, out_channels, h * 2**len(ch_mult), ...) in (-1, 1)."""

    def __init__(
        self,
        out_channels: int = 3,
        ch: int = 64,
        ch_mult=(1, 2, 4),
        num_res_blocks: int = 6,
        z_channels: int = 256,
        attn_heads: int = 8,
    ):
        super().__init__()
        widths = _widths(ch, ch_mult)[::-1]  # 256, 128, 64
        layers = [] if z_channels == widths[0] else [nn.Conv2d(z_channels, widths[0], 1)]
        layers += [ResBlock(widths[0]) for _ in range(num_res_blocks)]
        if attn_heads:
            layers.append(SelfAttention2d(widths[0], attn_heads))
        layers += [
            _convt_bn_act(c_in, c_out) for c_in, c_out in zip(widths, widths[1:], strict=False)
        ]
        self.conv_out = nn.ConvTranspose2d(widths[-1], out_channels, 3, 2, 1, output_padding=1)
        self.net = nn.Sequential(*layers)

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight of the last transposed convolution (for the adaptive GAN weight)."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv_out(self.net(z)))
