"""Shapes, ranges and argument errors of the encoders, decoders and the PatchGAN discriminator."""

import pytest
import torch

from fastvq.models import (
    Decoder,
    Encoder,
    PatchGANDiscriminator,
    RotatedDecoder,
    RotatedEncoder,
)


@pytest.mark.parametrize("res", [8, 16, 24])
@pytest.mark.parametrize("ch_mult", [(1, 2), (1, 2, 4)])
def test_rotated_shapes(res, ch_mult):
    torch.manual_seed(0)
    if res % 2 ** len(ch_mult):
        pytest.skip("resolution not a multiple of the factor")
    enc = RotatedEncoder(in_channels=3, ch=4, ch_mult=ch_mult, num_res_blocks=2, z_channels=6)
    dec = RotatedDecoder(
        out_channels=3, ch=4, ch_mult=ch_mult, num_res_blocks=2, z_channels=6, attn_heads=2
    )
    f = 2 ** len(ch_mult)  # one stride-2 conv per width
    assert enc.downsample_factor == f
    x = torch.rand(2, 3, res, res + f) * 2 - 1
    z = enc(x)
    assert z.shape == (2, 6, res // f, (res + f) // f)
    y = dec(z)
    assert y.shape == x.shape
    assert y.abs().max() < 1  # tanh output
    y.square().mean().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in enc.parameters())
    assert dec.last_layer is dec.conv_out.weight and dec.last_layer.grad.abs().sum() > 0


def test_rotated_paper_defaults():
    enc, dec = RotatedEncoder(), RotatedDecoder()
    convs = [m for m in enc.modules() if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)]
    assert [c.out_channels for c in convs] == [64, 128, 256]
    assert all(c.kernel_size == (3, 3) for c in convs)
    n_res = sum(type(m).__name__ == "ResBlock" for m in enc.modules())
    assert n_res == 6
    attn = [m for m in dec.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert len(attn) == 1 and attn[0].num_heads == 8
    z = enc(torch.rand(1, 3, 32, 32))
    assert z.shape == (1, 256, 4, 4) and dec(z).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="attn_heads"):
        RotatedDecoder(ch=4, ch_mult=(1, 3), attn_heads=8)  # 12 channels, 8 heads


@pytest.mark.parametrize(
    "ch_mult,res,attn",
    [((1,), 8, ()), ((1, 2), 8, (4,)), ((1, 1, 2), 16, (16, 4)), ((1, 2), 12, (6,))],
)
def test_vqgan_shapes(ch_mult, res, attn):
    torch.manual_seed(0)
    kw = dict(
        ch=8,
        ch_mult=ch_mult,
        num_res_blocks=1,
        attn_resolutions=attn,
        z_channels=3,
        resolution=res,
        norm_groups=4,
    )
    enc, dec = Encoder(in_channels=2, **kw), Decoder(out_channels=2, **kw)
    f = 2 ** (len(ch_mult) - 1)
    assert enc.downsample_factor == f
    x = torch.randn(2, 2, res, res)
    z = enc(x)
    assert z.shape == (2, 3, res // f, res // f)
    assert dec(z).shape == x.shape
    n_attn = sum(type(m).__name__ == "AttnBlock" for m in enc.modules())
    levels = [res // 2**i for i in range(len(ch_mult))]
    assert n_attn == 1 + sum(r in attn for r in levels)  # mid + one per block at listed sizes
    dec(z).sum().backward()
    assert dec.last_layer.grad is not None


def test_vqgan_errors():
    with pytest.raises(ValueError, match="norm_groups"):
        Encoder(
            ch=6, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), resolution=8, norm_groups=4
        )
    with pytest.raises(ValueError, match="resolution"):
        Decoder(ch=8, ch_mult=(1, 2, 2), resolution=10, norm_groups=4)
    with pytest.raises(ValueError, match="ch_mult"):
        Encoder(ch=8, ch_mult=(), resolution=8, norm_groups=4)


@pytest.mark.parametrize("norm", ["batch", "spectral", "none"])
@pytest.mark.parametrize("n_layers,res", [(1, 8), (2, 16), (3, 32)])
def test_patchgan_shapes(norm, n_layers, res):
    torch.manual_seed(0)
    disc = PatchGANDiscriminator(in_channels=3, ndf=4, n_layers=n_layers, norm=norm)
    x = torch.randn(2, 3, res, res)
    out = disc(x)
    side = res // 2**n_layers - 2  # n_layers stride-2 convs, then two 4x4 stride-1 convs
    assert out.shape == (2, 1, side, side)
    has_bn = any(isinstance(m, torch.nn.BatchNorm2d) for m in disc.modules())
    assert has_bn == (norm == "batch")
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == n_layers + 2
    assert [c.out_channels for c in convs] == [4 * min(2**i, 8) for i in range(n_layers + 1)] + [1]
    if norm == "spectral":  # every weight rescaled to spectral norm ~1 (power iteration)
        disc.eval()
        w = convs[1].weight.flatten(1)
        assert torch.linalg.matrix_norm(w, ord=2) < 1.1


def test_patchgan_errors():
    with pytest.raises(ValueError, match="norm"):
        PatchGANDiscriminator(norm="layer")
    with pytest.raises(ValueError, match="n_layers"):
        PatchGANDiscriminator(n_layers=0)
