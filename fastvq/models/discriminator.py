"""PatchGAN discriminator (pix2pix's NLayerDiscriminator, as taming-transformers uses it)."""

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from fastvq.ops._validate import check_choice, check_int

NORMS = ("batch", "spectral", "none")


class PatchGANDiscriminator(nn.Module):
    """x (B, in_channels, H, W) -> logits (B, 1, H / 2**n_layers - 2, W / 2**n_layers - 2); H and
    W at least min_size = 3 * 2**n_layers (24 at n_layers=3).

    n_layers stride-2 4x4 convolutions (widths ndf * min(2**i, 8)), one stride-1 4x4 convolution,
    and a 4x4 convolution to one logit per patch (70x70 receptive field at n_layers=3).
    norm="batch": BatchNorm after every inner convolution (taming); "spectral": spectral
    normalization on every convolution and no BatchNorm (StyleGAN-T/MAGVIT style); "none".
    Weights start as N(0, 0.02), BatchNorm scales as N(1, 0.02) (taming's weights_init).
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        check_choice("norm", norm, NORMS)
        in_channels, ndf = check_int("in_channels", in_channels, 1), check_int("ndf", ndf, 1)
        n_layers = check_int("n_layers", n_layers, 1)
        widths = [ndf * min(2**i, 8) for i in range(n_layers + 1)]
        inner_bias = norm != "batch"  # BatchNorm's shift makes a conv bias redundant

        def conv(c_in, c_out, stride, bias=True):
            layer = nn.Conv2d(c_in, c_out, 4, stride=stride, padding=1, bias=bias)
            nn.init.normal_(layer.weight, 0.0, 0.02)
            if bias:
                nn.init.zeros_(layer.bias)
            return spectral_norm(layer) if norm == "spectral" else layer

        def bn(c):
            if norm != "batch":
                return []
            layer = nn.BatchNorm2d(c)
            nn.init.normal_(layer.weight, 1.0, 0.02)
            nn.init.zeros_(layer.bias)
            return [layer]

        act = nn.LeakyReLU(0.2)
        layers = [conv(in_channels, widths[0], 2), act]
        for i in range(1, n_layers + 1):
            stride = 2 if i < n_layers else 1
            layers += [conv(widths[i - 1], widths[i], stride, inner_bias), *bn(widths[i]), act]
        layers.append(conv(widths[-1], 1, 1))
        self.main = nn.Sequential(*layers)
        # The stride-2 convolutions halve (floored), the last two take 1 and then 2 pixels off.
        self.n_layers, self.min_size = n_layers, 3 * 2**n_layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)
