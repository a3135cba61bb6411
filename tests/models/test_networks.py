"""Shapes, ranges and argument errors of the encoders, decoders and the PatchGAN discriminator."""

import pytest
import torch
import torch.nn.functional as F

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
    # Without blocks every level kept width ch and lost its attention, against the docstring.
    with pytest.raises(ValueError, match="num_res_blocks must be >= 1, got 0"):
        Encoder(ch=8, ch_mult=(1, 2), num_res_blocks=0, resolution=8, norm_groups=4)


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


# --- forward passes against functional re-derivations (taming's / the paper's math, float64) ---


def _gn(x, sd, p):
    return F.group_norm(x, 4, sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-6)


def _conv(x, sd, p, **kw):
    return F.conv2d(x, sd[f"{p}.weight"], sd[f"{p}.bias"], **kw)


def _resnet(x, sd, p):
    h = _conv(F.silu(_gn(x, sd, f"{p}.norm1")), sd, f"{p}.conv1", padding=1)
    h = _conv(F.silu(_gn(h, sd, f"{p}.norm2")), sd, f"{p}.conv2", padding=1)
    skip = _conv(x, sd, f"{p}.nin_shortcut") if f"{p}.nin_shortcut.weight" in sd else x
    return skip + h


def _attn(x, sd, p):
    """taming's AttnBlock with explicit bmm: softmax(q^T k / sqrt(C)) over positions."""
    b, c, h, w = x.shape
    n = _gn(x, sd, f"{p}.norm")
    q, k, v = (_conv(n, sd, f"{p}.{t}").reshape(b, c, h * w) for t in "qkv")
    weights = torch.softmax(torch.bmm(q.transpose(1, 2), k) * c**-0.5, dim=2)  # (B, HW_q, HW_k)
    out = torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, h, w)
    return x + _conv(out, sd, f"{p}.proj_out")


def _level(h, sd, p):
    j = 0
    while f"{p}.block.{j}.conv1.weight" in sd:
        h = _resnet(h, sd, f"{p}.block.{j}")
        if f"{p}.attn.{j}.q.weight" in sd:
            h = _attn(h, sd, f"{p}.attn.{j}")
        j += 1
    return h


def _mid(h, sd):
    return _resnet(_attn(_resnet(h, sd, "mid.block_1"), sd, "mid.attn_1"), sd, "mid.block_2")


def _out(h, sd):
    return _conv(F.silu(_gn(h, sd, "norm_out")), sd, "conv_out", padding=1)


def _taming_encoder(sd, x, levels):
    h = _conv(x, sd, "conv_in", padding=1)
    for i in range(levels):
        h = _level(h, sd, f"down.{i}")
        if i != levels - 1:  # pad right/bottom by one, stride-2 conv3 without padding
            h = _conv(F.pad(h, (0, 1, 0, 1)), sd, f"down.{i}.downsample.conv", stride=2)
    return _out(_mid(h, sd), sd)


def _taming_decoder(sd, z, levels):
    h = _mid(_conv(z, sd, "conv_in", padding=1), sd)
    for i in reversed(range(levels)):
        h = _level(h, sd, f"up.{i}")
        if i != 0:
            h = h.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # nearest x2
            h = _conv(h, sd, f"up.{i}.upsample.conv", padding=1)
    return _out(h, sd)


VQGAN_SMALL = dict(
    ch=8,
    ch_mult=(1, 2),
    num_res_blocks=2,
    attn_resolutions=(8, 4),
    z_channels=3,
    resolution=8,
    norm_groups=4,
)


def _randomize(module):
    """Every parameter fresh N(0, 0.5) (GroupNorm affine included), so no term is an identity."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return module


def test_vqgan_matches_functional_reference():
    """Encoder and decoder against taming's forward re-derived from the state dict: residual
    blocks and their 1x1 skips, attention (scale 1/sqrt(C), over positions), asymmetric-padding
    downsampling, nearest upsampling, the middle's block-attn-block order, norm_out + swish."""
    enc = _randomize(Encoder(in_channels=2, **VQGAN_SMALL).double())
    dec = _randomize(Decoder(out_channels=2, **VQGAN_SMALL).double())
    x = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    z = enc(x)
    torch.testing.assert_close(z, _taming_encoder(enc.state_dict(), x, 2))
    torch.testing.assert_close(dec(z), _taming_decoder(dec.state_dict(), z, 2))
    assert dec.last_layer is dec.conv_out.weight


def test_vqgan_module_layout_is_taming():
    """taming's state-dict names (checkpoints map over by name): num_res_blocks blocks per encoder
    level and num_res_blocks + 1 per decoder level, attention after each block at the listed
    feature sizes only, downsample on every encoder level but the last, upsample on every decoder
    level but level 0."""
    kw = dict(VQGAN_SMALL, ch_mult=(1, 2, 2), resolution=16, attn_resolutions=(8,))
    enc, dec = Encoder(in_channels=3, **kw), Decoder(out_channels=3, **kw)

    def layout(model, kind):
        return {
            k.rsplit(".", 1)[0]  # the module, without .weight / .bias
            for k in model.state_dict()
            if k.startswith(kind) and ".norm" not in k
        }

    # resolutions per level: 16, 8, 4 (attention at 8: level 1 only)
    assert layout(enc, "down.") == {
        "down.0.block.0.conv1", "down.0.block.0.conv2", "down.0.block.1.conv1",
        "down.0.block.1.conv2", "down.0.downsample.conv",
        "down.1.block.0.conv1", "down.1.block.0.conv2", "down.1.block.0.nin_shortcut",
        "down.1.block.1.conv1", "down.1.block.1.conv2", "down.1.attn.0.q", "down.1.attn.0.k",
        "down.1.attn.0.v", "down.1.attn.0.proj_out", "down.1.attn.1.q", "down.1.attn.1.k",
        "down.1.attn.1.v", "down.1.attn.1.proj_out", "down.1.downsample.conv",
        "down.2.block.0.conv1", "down.2.block.0.conv2",
        "down.2.block.1.conv1", "down.2.block.1.conv2",
    }  # fmt: skip
    blocks = {f"up.{i}.block.{j}.conv1" for i in range(3) for j in range(3)}
    assert {k for k in layout(dec, "up.") if k.endswith("conv1")} == blocks
    assert {k for k in layout(dec, "up.") if "attn" in k and k.endswith(".q")} == {
        f"up.1.attn.{j}.q" for j in range(3)
    }
    assert {k for k in layout(dec, "up.") if "upsample" in k} == {
        f"up.{i}.upsample.conv" for i in (1, 2)
    }
    assert all(m.eps == 1e-6 for m in enc.modules() if isinstance(m, torch.nn.GroupNorm))


def _bn(x, sd, p):
    return F.batch_norm(x, None, None, sd[f"{p}.weight"], sd[f"{p}.bias"], training=True)


def _leaky(x):
    return F.leaky_relu(x, 0.2)


def test_rotated_matches_functional_reference():
    """RotatedEncoder / RotatedDecoder (train-mode BatchNorm) against the module docstring's
    network re-derived from the state dict: conv-BN-LeakyReLU(0.2) downsampling, basic residual
    blocks act(x + BN(conv(act(BN(conv(x)))))), then in the decoder one pre-LayerNorm multi-head
    attention (residual) at the lowest resolution before the transposed convolutions, and tanh."""
    torch.manual_seed(0)
    kw = dict(ch=4, ch_mult=(1, 2), num_res_blocks=2, z_channels=6)
    enc = _randomize(RotatedEncoder(in_channels=3, **kw).double()).train()
    dec = _randomize(RotatedDecoder(out_channels=3, attn_heads=2, **kw).double()).train()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def res(h, sd, p):
        r = _leaky(_bn(F.conv2d(h, sd[f"{p}.body.0.weight"], padding=1), sd, f"{p}.body.1"))
        r = _bn(F.conv2d(r, sd[f"{p}.body.3.weight"], padding=1), sd, f"{p}.body.4")
        return _leaky(h + r)

    sd = enc.state_dict()
    h = x
    for i in range(2):
        h = _leaky(_bn(F.conv2d(h, sd[f"net.{i}.0.weight"], stride=2, padding=1), sd, f"net.{i}.1"))
    h = res(res(h, sd, "net.2"), sd, "net.3")
    z_ref = F.conv2d(h, sd["net.4.weight"], sd["net.4.bias"])
    z = enc(x)
    torch.testing.assert_close(z, z_ref)

    sd = dec.state_dict()
    h = res(res(F.conv2d(z, sd["net.0.weight"], sd["net.0.bias"]), sd, "net.1"), sd, "net.2")
    b, c, hh, ww = h.shape
    t = h.flatten(2).transpose(1, 2)  # (B, positions, C)
    n = F.layer_norm(t, (c,), sd["net.3.norm.weight"], sd["net.3.norm.bias"])
    q, k, v = (n @ w.T + bias for w, bias in zip(
        sd["net.3.attn.in_proj_weight"].chunk(3), sd["net.3.attn.in_proj_bias"].chunk(3),
        strict=True,
    ))  # fmt: skip
    heads = [
        torch.softmax(qh @ kh.transpose(1, 2) / (c // 2) ** 0.5, -1) @ vh
        for qh, kh, vh in zip(q.chunk(2, -1), k.chunk(2, -1), v.chunk(2, -1), strict=True)
    ]
    att = torch.cat(heads, -1) @ sd["net.3.attn.out_proj.weight"].T + sd["net.3.attn.out_proj.bias"]
    h = (t + att).transpose(1, 2).reshape(b, c, hh, ww)
    h = _leaky(
        _bn(F.conv_transpose2d(h, sd["net.4.0.weight"], stride=2, padding=1, output_padding=1),
            sd, "net.4.1")
    )  # fmt: skip
    out = F.conv_transpose2d(
        h, sd["conv_out.weight"], sd["conv_out.bias"], stride=2, padding=1, output_padding=1
    )
    torch.testing.assert_close(dec(z), torch.tanh(out))


def test_rotated_decoder_mirrors_the_encoder():
    """The paper's decoder: six residual blocks at the latent width, like the encoder's."""
    dec = RotatedDecoder()
    n_res = sum(type(m).__name__ == "ResBlock" for m in dec.modules())
    assert n_res == 6


def _patchgan_reference(disc, x, n_layers, norm):
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    bns = iter(m for m in disc.modules() if isinstance(m, torch.nn.BatchNorm2d))
    h = x
    for i, conv in enumerate(convs):
        if norm == "batch" and 0 < i < len(convs) - 1:
            assert conv.bias is None  # taming: bias-free convolutions before BatchNorm
        else:
            assert conv.bias is not None
        stride = 2 if i < n_layers else 1
        h = F.conv2d(h, conv.weight, conv.bias, stride=stride, padding=1)
        if i == len(convs) - 1:
            return h
        if norm == "batch" and i > 0:
            bn = next(bns)
            h = F.batch_norm(h, None, None, bn.weight, bn.bias, training=True)
        h = _leaky(h)


@pytest.mark.parametrize("norm", ["batch", "none"])
def test_patchgan_matches_functional_reference(norm):
    """pix2pix's NLayerDiscriminator: LeakyReLU(0.2) after every convolution but the last,
    BatchNorm after the inner ones, biases only where no BatchNorm follows."""
    disc = _randomize(PatchGANDiscriminator(in_channels=3, ndf=4, n_layers=2, norm=norm).double())
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(disc.train()(x), _patchgan_reference(disc, x, 2, norm))


def test_patchgan_init_and_spectral_norm():
    """taming's weights_init: convolutions N(0, 0.02), BatchNorm scales N(1, 0.02); spectral
    normalization puts every convolution's largest singular value at 1."""
    torch.manual_seed(0)
    disc = PatchGANDiscriminator(ndf=16, n_layers=2, norm="batch")
    w = torch.cat([m.weight.flatten() for m in disc.modules() if isinstance(m, torch.nn.Conv2d)])
    assert 0.018 < w.std().item() < 0.022 and abs(w.mean().item()) < 0.002
    s = torch.cat([m.weight for m in disc.modules() if isinstance(m, torch.nn.BatchNorm2d)])
    assert 0.98 < s.mean().item() < 1.02 and 0.01 < s.std().item() < 0.03
    disc = PatchGANDiscriminator(ndf=4, n_layers=2, norm="spectral").eval()
    for conv in (m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)):
        sigma = torch.linalg.matrix_norm(conv.weight.flatten(1).detach(), ord=2).item()
        assert 0.9 < sigma < 1.1
