"""Tokenizer: return-convention normalization, forward/backward, decode_indices consistency,
build_quantizer / build_tokenizer from config dicts and their errors."""

import pytest
import torch
from torch import nn

from fastvq.models import Tokenizer, TokenizerOutput, build_quantizer, build_tokenizer

ROTATED = dict(
    arch="rotated_vqvae", ch=4, ch_mult=[1, 2], num_res_blocks=1, z_channels=8, attn_heads=2
)
VQGAN = dict(
    arch="vqgan",
    ch=8,
    ch_mult=[1, 2],
    num_res_blocks=1,
    attn_resolutions=[4],
    z_channels=4,
    resolution=8,
    norm_groups=4,
)


def _x(b=2, res=8, seed=0):
    return torch.rand(b, 3, res, res, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("model,factor", [(ROTATED, 4), (VQGAN, 2)])
def test_build_forward_backward(standin, model, factor):
    torch.manual_seed(0)
    tok = build_tokenizer({**model, "quantizer": {"type": standin, "codebook_size": 16}})
    x = _x()
    out = tok(x)
    assert isinstance(out, TokenizerOutput)
    h = 8 // factor
    d = tok.quantizer.embed.shape[1]
    assert out.recon.shape == x.shape
    assert out.indices.shape == (2, h, h) and out.indices.dtype == torch.int64
    assert out.z.shape == (2, d, h, h)
    assert out.quant_loss.dim() == 0 and out.quant_loss > 0
    # indices are the nearest codes of z
    dist = ((out.z.permute(0, 2, 3, 1)[..., None, :] - tok.quantizer.embed) ** 2).sum(-1)
    assert torch.equal(out.indices, dist.argmin(-1))
    (out.recon.square().mean() + out.quant_loss).backward()
    assert tok.last_layer.grad is not None and tok.last_layer.grad.abs().sum() > 0
    enc_grads = [p.grad for p in tok.encoder.parameters()]
    assert all(g is not None and g.isfinite().all() for g in enc_grads)
    assert tok.quantizer.embed.grad.abs().sum() > 0  # from the codebook loss


@pytest.mark.parametrize("model", [ROTATED, VQGAN])
def test_decode_indices_matches_decode(standin, model):
    torch.manual_seed(1)
    tok = build_tokenizer({**model, "quantizer": {"type": standin, "codebook_size": 16}}).eval()
    with torch.no_grad():
        z_q, idx, loss = tok.encode(_x(seed=2))
        assert torch.equal(tok.codes_from_indices(idx), z_q)
        torch.testing.assert_close(tok.decode_indices(idx), tok.decode(z_q), rtol=0, atol=0)
        assert torch.equal(tok(_x(seed=2)).recon, tok.decode(z_q))


def test_quant_conv_and_embed_dim(standin):
    tok = build_tokenizer({**ROTATED, "embed_dim": 3, "quantizer": {"type": standin}})
    assert isinstance(tok.quant_conv, nn.Conv2d) and tok.quant_conv.out_channels == 3
    assert tok.quantizer.embed.shape == (16, 3)  # dim=3 injected into the quantizer
    assert tok(_x()).z.shape == (2, 3, 2, 2)
    tok = build_tokenizer({**ROTATED, "quantizer": {"type": standin, "dim": 5}})
    assert tok.quant_conv.out_channels == 5 and tok.quantizer.embed.shape[1] == 5
    tok = build_tokenizer({**ROTATED, "quantizer": {"type": standin}})
    assert isinstance(tok.quant_conv, nn.Identity)  # the paper's net: no 1x1 convs
    tok = build_tokenizer({**VQGAN, "quantizer": {"type": standin}})
    assert isinstance(tok.quant_conv, nn.Conv2d)  # taming's VQGAN always has them


class _Fixed(nn.Module):
    """Returns a configurable tuple to exercise the return-convention normalization."""

    codebook_size = 4

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        b, n, _ = x.shape
        if self.kind == "pair":
            return x * self.scale, torch.zeros(b, n, dtype=torch.long)
        if self.kind == "residual":  # per-quantizer losses, (B, N, Q) indices
            return x, torch.zeros(b, n, 3, dtype=torch.long), torch.tensor([1.0, 2.0, 3.0])
        return x  # not a tuple


def test_return_conventions():
    enc, dec = nn.Conv2d(3, 2, 2, stride=2), nn.ConvTranspose2d(2, 3, 2, stride=2)
    out = Tokenizer(enc, _Fixed("pair"), dec)(_x())
    assert out.quant_loss.item() == 0 and out.indices.shape == (2, 4, 4)
    out = Tokenizer(enc, _Fixed("residual"), dec)(_x())
    assert out.quant_loss.item() == 6 and out.indices.shape == (2, 4, 4, 3)
    with pytest.raises(TypeError, match="quantized, indices"):
        Tokenizer(enc, _Fixed("bare"), dec)(_x())
    tok = Tokenizer(enc, _Fixed("pair"), dec)
    assert tok.last_layer is dec.weight
    out = tok(_x(), quantize=False)  # autoencoder only
    assert out.indices is None and torch.equal(out.recon, dec(enc(_x())))
    with pytest.raises(TypeError, match="no get_output_from_indices"):
        tok.decode_indices(torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        tok(torch.zeros(3, 8, 8))


@pytest.mark.parametrize("name", ["VectorQuantize", "FSQ", "LFQ", "ResidualVQ"])
def test_peer_quantizers(name):
    """vector-quantize-pytorch's modules drop in: their return conventions are the contract's."""
    vqp = pytest.importorskip("vector_quantize_pytorch")
    kwargs = {
        "VectorQuantize": dict(codebook_size=16),
        "FSQ": dict(levels=[3, 3]),
        "LFQ": dict(codebook_size=16),
        "ResidualVQ": dict(num_quantizers=2, codebook_size=8),
    }[name]
    torch.manual_seed(3)
    tok = build_tokenizer({**ROTATED, "quantizer": {"type": getattr(vqp, name), **kwargs}}).eval()
    with torch.no_grad():
        out = tok(_x())
        assert out.recon.shape == (2, 3, 8, 8) and out.quant_loss.dim() == 0
        assert out.indices.shape[:3] == (2, 2, 2)
        z_q, idx, _ = tok.encode(_x())
        torch.testing.assert_close(tok.codes_from_indices(idx), z_q, rtol=1e-5, atol=1e-5)


def test_fastvq_nn_quantizer():
    pytest.importorskip("fastvq.nn.vector_quantize")
    q = build_quantizer({"type": "VectorQuantize", "codebook_size": 16}, dim=8)
    assert q.codebook_size == 16
    tok = build_tokenizer({**ROTATED, "quantizer": {"type": "VectorQuantize", "codebook_size": 16}})
    out = tok(_x())
    (out.recon.square().mean() + out.quant_loss).backward()
    assert out.indices.shape == (2, 2, 2)


@pytest.mark.parametrize(
    "cfg,err,match",
    [
        ({"quantizer": {"type": "VectorQuantize"}}, ValueError, "model.arch"),
        ({"arch": "unet", "quantizer": {"type": "VectorQuantize"}}, ValueError, "model.arch"),
        ({"arch": "vqgan"}, ValueError, "model.quantizer is required"),
        ({**VQGAN, "chmult": [1], "quantizer": {"type": "FSQ"}}, ValueError, "model.chmult"),
        ({**ROTATED, "attn_resolutions": [4], "quantizer": {}}, ValueError, "attn_resolutions"),
        ({**VQGAN, "quantizer": {"type": "Nope"}}, ValueError, "quantizer type must be one of"),
        # indices only (BEST-RQ targets): no quantized latents to decode
        (
            {**VQGAN, "quantizer": {"type": "RandomProjectionQuantizer"}},
            ValueError,
            "quantizer type must be one of",
        ),
        ({**VQGAN, "quantizer": {"codebook_size": 8}}, ValueError, "'type' key"),
        ({**VQGAN, "resolution": 9, "quantizer": {"type": "FSQ"}}, ValueError, "resolution"),
        ({**ROTATED, "resolution": 6, "quantizer": {"type": "FSQ"}}, ValueError, "resolution"),
        ([1, 2], ValueError, "mapping"),
        (
            {**VQGAN, "embed_dim": 3, "quantizer": {"type": "VectorQuantize", "dim": 5}},
            ValueError,
            r"model.embed_dim \(3\) and model.quantizer.dim \(5\) disagree",
        ),
    ],
)
def test_bad_configs(cfg, err, match):
    with pytest.raises(err, match=match):
        build_tokenizer(cfg)


def test_bad_quantizer_kwargs(standin):
    with pytest.raises(ValueError, match="StandInVQ: bad arguments"):
        build_quantizer({"type": standin, "codebook_sz": 3}, dim=4)
    # A flag given a string ("false" quoted in YAML, a typo) was truthy: the feature turned on.
    flags = [("VectorQuantize", "rotation_trick"), ("ResidualVQ", "kmeans_init"),
             ("GroupedResidualFSQ", "bound_hard_clamp"), ("LFQ", "spherical")]  # fmt: skip
    for name, flag in flags:
        cfg = {"type": name, "codebook_size": 16, "num_quantizers": 2, "levels": [3, 3]}
        with pytest.raises(ValueError, match=f"{name}: {flag} must be true"):
            build_quantizer({**cfg, flag: "false"}, dim=4)
    # null only where the argument defaults to it (SimVQ's rotation_trick=None was plain STE)
    vq = build_quantizer({"type": "VectorQuantize", "codebook_size": 16, "rotation_trick": None}, 4)
    assert vq.rotation_trick
    with pytest.raises(ValueError, match="SimVQ: rotation_trick must be true or false, got None"):
        build_quantizer({"type": "SimVQ", "codebook_size": 16, "rotation_trick": None}, 4)

    class CountedInit(standin):  # a user's class is its own to check: here a count
        def __init__(self, dim, codebook_size=16, kmeans_init: int = 0):
            super().__init__(dim, codebook_size)

    assert build_quantizer({"type": CountedInit, "kmeans_init": 10}, 4)


FASTVQ_QUANTIZERS = [
    ("vector_quantize", {"type": "VectorQuantize", "codebook_size": 16}),
    ("vector_quantize", {"type": "HyperCodebook", "codebook_size": 16, "codebook_dim": 4,
                         "embed_dim": 4, "hidden_dim": 8}),
    ("scalar", {"type": "FSQ", "levels": [5, 4, 3]}),
    ("scalar", {"type": "LFQ", "codebook_size": 16}),
    ("scalar", {"type": "BSQ", "codebook_size": 16}),
    ("scalar", {"type": "LatentQuantize", "levels": [3, 5, 7, 9]}),
    ("projected", {"type": "SimVQ", "codebook_size": 16}),
    ("lattice", {"type": "E8Quantize"}),
    ("residual", {"type": "ResidualVQ", "num_quantizers": 2, "codebook_size": 8}),
    ("residual", {"type": "ResidualFSQ", "levels": [3, 3], "num_quantizers": 2}),
    ("residual", {"type": "GroupedResidualVQ", "groups": 2, "num_quantizers": 2,
                  "codebook_size": 8}),
    ("residual", {"type": "GroupedResidualFSQ", "groups": 2, "levels": [3, 3],
                  "num_quantizers": 2}),
    ("residual", {"type": "ResidualSimVQ", "num_quantizers": 2, "codebook_size": 8}),
]  # fmt: skip


@pytest.mark.parametrize("module,qcfg", FASTVQ_QUANTIZERS, ids=lambda v: str(v)[:24])
def test_every_fastvq_quantizer_family_in_a_tokenizer(module, qcfg):
    """Output shapes, a finite loss, gradients to the encoder, decode_indices == decode, and each
    position quantized as its own latent vector, for each fastvq.nn quantizer family (fresh
    modules: skipped where one has not landed)."""
    pytest.importorskip(f"fastvq.nn.{module}")
    torch.manual_seed(4)
    tok = build_tokenizer({**ROTATED, "quantizer": qcfg})
    x = _x()
    out = tok(x)
    assert out.recon.shape == x.shape and out.indices.shape[:3] == (2, 2, 2)
    assert out.quant_loss.dim() == 0 and out.quant_loss.isfinite()
    (out.recon.square().mean() + out.quant_loss).backward()
    assert tok.encoder.net[0][0].weight.grad.abs().sum() > 0  # straight through to the encoder
    tok.eval()
    with torch.no_grad():
        z_q, idx, _ = tok.encode(x)
        torch.testing.assert_close(tok.decode_indices(idx), tok.decode(z_q), rtol=1e-5, atol=1e-5)
        # A position alone gets the code it gets among the others (a quantizer handed the map
        # in the wrong layout mixes positions, or fails where h * w != D).
        z = tok.latents(x)
        for i, j in [(0, 0), (1, 0), (1, 1)]:
            z_q1, idx1, _ = tok.quantize(z[:, :, i : i + 1, j : j + 1])
            assert torch.equal(idx1[:, 0, 0], idx[:, i, j])
            torch.testing.assert_close(z_q1[:, :, 0, 0], z_q[:, :, i, j], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("module,qcfg", FASTVQ_QUANTIZERS, ids=lambda v: str(v)[:24])
def test_decode_indices_in_a_model_cast_to(module, qcfg, dtype):
    """Residual stacks, lattices and the hyper-net decode indices to float32 codes: in a model
    cast to float64 or bf16, decode_indices failed with a dtype mismatch in the decoder."""
    pytest.importorskip(f"fastvq.nn.{module}")
    torch.manual_seed(5)
    tok = build_tokenizer({**ROTATED, "quantizer": qcfg}).eval().to(dtype)
    with torch.no_grad():
        z_q, idx, _ = tok.encode(_x().to(dtype))
        codes = tok.codes_from_indices(idx)
        assert codes.dtype == dtype
        # A lattice without projection decodes float32 unit codes (it holds no weights that
        # name the model's dtype): float32 rounding, in float64 too.
        tol = 1e-6 if dtype == torch.float64 else 2e-2
        torch.testing.assert_close(codes, z_q, rtol=tol, atol=tol)
        torch.testing.assert_close(tok.decode_indices(idx), tok.decode(z_q), rtol=tol, atol=tol)


@pytest.mark.parametrize("model,factor", [(ROTATED, 4), (VQGAN, 2)])
def test_refuses_sizes_the_encoder_does_not_divide(standin, model, factor):
    """17 x 17 gave a 16 x 16 (VQGAN) or 20 x 20 (rotated) reconstruction without a word."""
    tok = build_tokenizer({**model, "quantizer": {"type": standin, "codebook_size": 16}})
    x = _x(res=4 * factor)
    assert tok(x).recon.shape == x.shape
    for bad in (x[..., 1:, :], x[..., :-1]):
        with pytest.raises(
            ValueError, match=f"multiples of the encoder's downsampling factor {factor}"
        ):
            tok(bad)


def test_last_layer_falls_back_to_the_decoders_last_weight(standin):
    """A decoder without a last_layer property: the adaptive GAN weight's layer is its last
    parameter of dimension > 1 (the output convolution), not its first."""
    dec = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.GroupNorm(2, 6), nn.Conv2d(6, 3, 1))
    tok = Tokenizer(nn.Conv2d(3, 4, 1), standin(4), dec)
    assert tok.last_layer is dec[2].weight


@pytest.mark.parametrize("model", [ROTATED, VQGAN])
def test_in_and_out_channels(standin, model):
    """in_channels sizes the encoder's input, out_channels (default in_channels) the decoder's."""
    tok = build_tokenizer(
        {**model, "in_channels": 1, "out_channels": 2, "quantizer": {"type": standin}}
    )
    x = _x()[:, :1]
    assert tok(x).recon.shape == (2, 2, 8, 8)
    tok = build_tokenizer({**model, "in_channels": 1, "quantizer": {"type": standin}})
    assert tok(x).recon.shape == x.shape


def test_post_quant_conv_before_the_decoder(standin):
    """decode (and forward, with or without the quantizer) run post_quant_conv, then the decoder."""
    torch.manual_seed(5)
    tok = build_tokenizer({**VQGAN, "quantizer": {"type": standin}})
    assert isinstance(tok.post_quant_conv, nn.Conv2d)
    x = _x(seed=3)
    with torch.no_grad():
        z_q, _, _ = tok.encode(x)
        expected = tok.decoder(tok.post_quant_conv(z_q))
        assert torch.equal(tok.decode(z_q), expected)
        assert not torch.allclose(tok.decoder(z_q), expected)
        assert torch.equal(tok(x).recon, expected)
        z = tok.latents(x)
        assert torch.equal(tok(x, quantize=False).recon, tok.decoder(tok.post_quant_conv(z)))


def test_build_quantizer_keeps_the_configs_dim(standin):
    q = build_quantizer({"type": standin, "dim": 5}, dim=8)
    assert q.embed.shape == (16, 5)
    assert build_quantizer({"type": standin}, dim=8).embed.shape == (16, 8)


def test_rotated_defaults_are_the_papers(standin):
    """arch rotated_vqvae alone builds the paper's network: six residual blocks on each side,
    8-head attention, widths 64-128-256, downsampling 8, no 1x1 convs (D = z_channels = 256)."""
    tok = build_tokenizer({"arch": "rotated_vqvae", "quantizer": {"type": standin}})
    for part in (tok.encoder, tok.decoder):
        assert sum(type(m).__name__ == "ResBlock" for m in part.modules()) == 6
    (attn,) = [m for m in tok.decoder.modules() if isinstance(m, nn.MultiheadAttention)]
    assert attn.num_heads == 8 and attn.embed_dim == 256
    assert tok.encoder.downsample_factor == 8 and isinstance(tok.quant_conv, nn.Identity)
    assert tok.quantizer.embed.shape == (16, 256)


def test_codebook_sizes_in_index_order():
    """codebook_sizes: one size per trailing (G, Q) index entry, in their order, or (K,) when all
    are equal; a grouped stack's sizes come from each group's residual stack."""
    pytest.importorskip("fastvq.nn.residual")
    qcfg = {"type": "GroupedResidualVQ", "groups": 2, "num_quantizers": 2, "codebook_size": [8, 4]}
    tok = build_tokenizer({**ROTATED, "quantizer": qcfg})
    assert tok.codebook_sizes == (8, 4, 8, 4)
    idx = tok(_x()).indices
    assert idx.shape[3:] == (2, 2) and int(idx[..., 1].max()) < 4
    qcfg = {"type": "ResidualVQ", "num_quantizers": 3, "codebook_size": 8}
    assert build_tokenizer({**ROTATED, "quantizer": qcfg}).codebook_sizes == (8,)
    enc, dec = nn.Conv2d(3, 2, 2, stride=2), nn.ConvTranspose2d(2, 3, 2, stride=2)
    assert Tokenizer(enc, _Fixed("pair"), dec).codebook_sizes == (4,)
