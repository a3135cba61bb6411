"""Losses against direct computations: reconstruction, GAN (hinge / non-saturating), the adaptive
discriminator weight against torch.autograd.grad at the decoder's last layer, the discriminator
start step, LeCAM, and the perceptual term with a random-weight LPIPS."""

import pytest
import torch
import torch.nn.functional as F

from fastvq.models import LPIPS, PatchGANDiscriminator, build_tokenizer
from fastvq.train.losses import (
    VQGANLoss,
    adaptive_disc_weight,
    build_loss,
    discriminator_loss,
    generator_loss,
    lecam_reg,
    reconstruction_loss,
)

MODEL = dict(arch="vqgan", ch=8, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[],
             z_channels=4, resolution=16, norm_groups=4,
             quantizer={"type": "VectorQuantize", "codebook_size": 8})  # fmt: skip


def _img(seed, b=2, res=16):
    return torch.rand(b, 3, res, res, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_reconstruction():
    x, y = _img(0).double(), _img(1).double()
    d = (y - x).flatten()
    assert reconstruction_loss(x, y, "l1").item() == pytest.approx(d.abs().mean().item(), 1e-12)
    assert reconstruction_loss(x, y, "l2").item() == pytest.approx(d.square().mean().item(), 1e-12)
    assert reconstruction_loss(x, x, "l2").item() == 0
    with pytest.raises(ValueError, match="kind"):
        reconstruction_loss(x, y, "l3")
    # A one-channel reconstruction of RGB images broadcast to a finite loss, silently.
    with pytest.raises(ValueError, match=r"same shape, got \(2, 3, 16, 16\) and \(2, 1, 16"):
        reconstruction_loss(x, y[:, :1], "l1")


def test_gan_losses_on_known_logits():
    real = torch.tensor([2.0, 0.5, -1.0], dtype=torch.float64)
    fake = torch.tensor([-2.0, 0.0, 3.0], dtype=torch.float64)
    # hinge: D wants real >= 1 and fake <= -1; G maximizes D(G).
    d = 0.5 * ((0 + 0.5 + 2.0) / 3 + (0 + 1 + 4) / 3)
    assert discriminator_loss(real, fake, "hinge").item() == pytest.approx(d)
    assert generator_loss(fake, "hinge").item() == pytest.approx(-1 / 3)
    # non-saturating: binary cross-entropy with labels real = 1, fake = 0; G: -log sigmoid(D(G)).
    bce = F.binary_cross_entropy_with_logits
    d = 0.5 * (bce(real, torch.ones_like(real)) + bce(fake, torch.zeros_like(fake)))
    assert discriminator_loss(real, fake, "non_saturating").item() == pytest.approx(d.item())
    g = -torch.log(torch.sigmoid(fake)).mean()
    assert generator_loss(fake, "non_saturating").item() == pytest.approx(g.item())
    with pytest.raises(ValueError, match="kind"):
        generator_loss(fake, "wgan")


def test_lecam_formula_and_moving_averages():
    real = torch.tensor([1.0, -0.5, 2.0])
    fake = torch.tensor([0.3, -2.0])
    a_r, a_f = torch.tensor(0.5), torch.tensor(-0.2)
    want = ((real - a_f).clamp(min=0) ** 2).mean() + ((a_r - fake).clamp(min=0) ** 2).mean()
    assert lecam_reg(real, fake, a_r, a_f).item() == pytest.approx(want.item())

    torch.manual_seed(0)
    disc = PatchGANDiscriminator(3, ndf=4, n_layers=1, norm="none")
    loss = VQGANLoss(discriminator=disc, disc_weight=0.5, lecam_weight=0.1, lecam_decay=0.9)
    x, y = _img(1), _img(2)
    means = []
    for _ in range(2):
        _, logs = loss.discriminator_loss(x, y, step=0)
        means.append((logs["logits_real"], logs["logits_fake"]))
    # The first update copies the means, the second decays towards them.
    (r0, f0), (r1, f1) = means
    assert loss.ema_real.item() == pytest.approx(r0.item())  # same disc: r1 == r0
    assert loss.ema_count.item() == 2
    total, logs = loss.discriminator_loss(x, y, step=0)
    assert total.item() == pytest.approx((logs["d_loss"] + 0.1 * logs["lecam"]).item(), rel=1e-6)
    loss.eval()
    loss.discriminator_loss(x, y, step=0)
    assert loss.ema_count.item() == 3  # evaluation leaves the averages alone
    loss._update_ema(torch.tensor(2.0), torch.tensor(-3.0), 0.9)
    assert loss.ema_real.item() == pytest.approx(0.9 * r1.item() + 0.2)
    assert loss.ema_fake.item() == pytest.approx(0.9 * f1.item() - 0.3)
    # A step in 4 micro-batches (gradient accumulation) forgets at lecam_decay per step too.
    loss.train()
    before = loss.ema_real.clone()
    for _ in range(4):
        _, logs = loss.discriminator_loss(x, y, step=0, micro_batches=4)
    r = logs["logits_real"]  # the same for every micro-batch here
    assert loss.ema_real.item() == pytest.approx(0.9 * before.item() + 0.1 * r.item(), rel=1e-6)


def test_lecam_alone_trains_the_discriminator_and_averages_over_ranks(monkeypatch):
    import torch.distributed as dist

    torch.manual_seed(0)
    disc = PatchGANDiscriminator(3, ndf=4, n_layers=1, norm="none")
    # disc_weight 0 with LeCAM on: the discriminator still trains (the trainer builds its
    # optimizer where uses_disc).
    loss = VQGANLoss(discriminator=disc, disc_weight=0.0, lecam_weight=0.1)
    total, _ = loss.discriminator_loss(_img(1), _img(2), step=0)
    assert loss.uses_disc and total.requires_grad and loss.ema_count.item() == 1
    # Under DDP the averages are the mean over ranks: two ranks with these means sum to twice
    # them, and the average is the means again (not twice them).
    monkeypatch.setattr(dist, "all_reduce", lambda t, *args, **kwargs: t.mul_(2))
    monkeypatch.setattr(dist, "get_world_size", lambda *args, **kwargs: 2)
    loss = VQGANLoss(discriminator=disc, disc_weight=0.5, lecam_weight=0.1, all_reduce=True)
    loss._update_ema(torch.tensor(2.0), torch.tensor(-1.5), 0.9)
    assert (loss.ema_real.item(), loss.ema_fake.item()) == (2.0, -1.5)


def test_adaptive_weight_matches_autograd_at_last_layer():
    torch.manual_seed(0)
    tok = build_tokenizer(MODEL)
    disc = PatchGANDiscriminator(3, ndf=4, n_layers=2, norm="none")
    loss = VQGANLoss(recon="l1", discriminator=disc, disc_weight=0.8, disc_start=0)
    x = _img(3)
    out = tok(x)
    last = tok.last_layer
    assert last is tok.decoder.conv_out.weight
    total, logs = loss.generator_loss(x, out.recon, out.quant_loss, step=5, last_layer=last)
    # Direct computation: gradient norms of nll and g_loss with respect to the last layer.
    nll = (out.recon - x).abs().mean()
    g = -disc(out.recon).mean()
    (g_nll,) = torch.autograd.grad(nll, last, retain_graph=True)
    (g_g,) = torch.autograd.grad(g, last, retain_graph=True)
    want = g_nll.norm() / (g_g.norm() + 1e-4)
    # The logged weight is the one applied: lambda * disc_weight.
    assert logs["d_weight"].item() == pytest.approx(0.8 * want.item(), rel=1e-5)
    assert logs["d_weight"].item() not in (0.0, 0.8)
    want_total = nll + out.quant_loss + want * 0.8 * g
    assert total.item() == pytest.approx(want_total.item(), rel=1e-5)
    # The weight is a constant: the total's gradient at the last layer is grad nll + lambda grad g.
    (g_total,) = torch.autograd.grad(total, last, retain_graph=True)
    (g_q,) = torch.autograd.grad(out.quant_loss, last, retain_graph=True, allow_unused=True)
    assert g_q is None  # the quantizer loss does not reach the decoder
    torch.testing.assert_close(g_total, g_nll + 0.8 * want * g_g, rtol=1e-4, atol=1e-7)

    # The function itself, and its clamp.
    w = adaptive_disc_weight(nll, g, last)
    assert w.item() == pytest.approx(want.item(), rel=1e-6) and not w.requires_grad
    assert adaptive_disc_weight(nll, 1e-9 * g, last, max_weight=7.0).item() == 7.0
    # adaptive_weight=False: lambda = 1.
    loss.adaptive_weight = False
    _, logs = loss.generator_loss(x, out.recon, out.quant_loss, step=5, last_layer=last)
    assert logs["d_weight"].item() == pytest.approx(0.8)


def test_disc_start_step():
    torch.manual_seed(0)
    disc = PatchGANDiscriminator(3, ndf=4, n_layers=1, norm="none")
    loss = VQGANLoss(recon="l2", discriminator=disc, disc_weight=1.0, disc_start=3)
    x = _img(4)
    y = _img(5).requires_grad_(True)
    q = torch.tensor(0.25)
    before, logs = loss.generator_loss(x, y, q, step=2)
    assert "g_loss" not in logs
    assert before.item() == pytest.approx(((y - x) ** 2).mean().item() + 0.25, rel=1e-6)
    d_before, _ = loss.discriminator_loss(x, y, step=2)
    assert d_before.item() == 0 and not d_before.requires_grad
    after, logs = loss.generator_loss(x, y, q, step=3)
    assert "g_loss" in logs and after.item() != pytest.approx(before.item())
    d_after, _ = loss.discriminator_loss(x, y, step=3)
    assert d_after.requires_grad and d_after.item() > 0
    # The discriminator loss never sends gradient into the generator's output.
    d_after.backward()
    assert y.grad is None


def test_perceptual_term_with_random_lpips(tmp_path):
    torch.manual_seed(0)
    lp = LPIPS()
    loss = VQGANLoss(recon="l1", perceptual_weight=0.5, lpips=lp)
    x, y = _img(6), _img(7)
    total, logs = loss.generator_loss(x, y, torch.tensor(0.0), step=0)
    want = (y - x).abs().mean() + 0.5 * lp(x, y).mean()
    assert total.item() == pytest.approx(want.item(), rel=1e-6)
    assert logs["lpips"].item() > 0
    same, _ = loss.generator_loss(x, x, torch.tensor(0.0), step=0)
    assert same.item() == 0
    with pytest.raises(ValueError, match="needs an LPIPS module"):
        VQGANLoss(perceptual_weight=1.0)
    # From the config: missing weight files name what to provide.
    with pytest.raises(FileNotFoundError, match="backbone"):
        files = {"backbone": str(tmp_path / "vgg.pth"), "head": str(tmp_path / "lin.pth")}
        build_loss({"perceptual_weight": 1.0, "lpips": files})
    with pytest.raises(ValueError, match="loss.lpips"):
        build_loss({"perceptual_weight": 1.0, "lpips": None})
    with pytest.raises(ValueError, match="needs a discriminator"):
        build_loss({"disc_weight": 0.5})


def test_weighted_terms_and_adaptive_weight_with_perceptual_term():
    """Non-default recon / perceptual / quant weights each scale their own term, and the adaptive
    weight balances the GAN gradient against the whole nll = recon_weight * rec + perceptual_weight
    * lpips (taming's nll_loss), not the reconstruction term alone; float64 against autograd."""
    torch.manual_seed(0)
    tok = build_tokenizer(MODEL).double()
    disc = PatchGANDiscriminator(3, ndf=4, n_layers=2, norm="none").double()
    lp = LPIPS().double()
    loss = VQGANLoss(recon="l2", recon_weight=0.7, perceptual_weight=0.3, lpips=lp,
                     discriminator=disc, disc_weight=0.6, quant_weight=0.4)  # fmt: skip
    x = _img(8).double()
    out = tok(x)
    last = tok.last_layer
    total, logs = loss.generator_loss(x, out.recon, out.quant_loss, step=0, last_layer=last)
    rec = (out.recon - x).square().mean()
    p = lp(x, out.recon).mean()
    nll = 0.7 * rec + 0.3 * p
    g = -disc(out.recon).mean()
    (g_nll,) = torch.autograd.grad(nll, last, retain_graph=True)
    (g_rec,) = torch.autograd.grad(rec, last, retain_graph=True)
    (g_g,) = torch.autograd.grad(g, last, retain_graph=True)
    want = g_nll.norm() / (g_g.norm() + 1e-4)
    alone = 0.7 * g_rec.norm() / (g_g.norm() + 1e-4)
    assert abs(float(want) - float(alone)) > 1e-3 * float(want)  # the perceptual term matters
    assert float(logs["d_weight"]) == pytest.approx(0.6 * float(want), rel=1e-9)
    assert out.quant_loss.item() > 0
    want_total = nll + 0.4 * out.quant_loss + 0.6 * want * g
    assert total.item() == pytest.approx(want_total.item(), rel=1e-9)
    assert logs["rec"].item() == pytest.approx(rec.item(), rel=1e-12)
    assert logs["lpips"].item() == pytest.approx(p.item(), rel=1e-12)


@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_discriminator_min_size(n_layers):
    disc = PatchGANDiscriminator(ndf=4, n_layers=n_layers).eval()
    m = disc.min_size
    assert disc(torch.randn(2, 3, m, m)).shape == (2, 1, 1, 1)
    with pytest.raises(RuntimeError):
        disc(torch.randn(2, 3, m - 1, m - 1))


def test_trainer_refuses_images_smaller_than_the_discriminator(make_config):
    from fastvq.train.trainer import Trainer

    cfg = make_config("disc={ndf: 4, n_layers: 3}", "loss.disc_weight=0.5")  # 16 px < 24
    with pytest.raises(ValueError, match="disc.n_layers=3. needs images of at least 24 px, got"):
        Trainer(cfg, datasets=(None, None))
    cfg = make_config("disc={ndf: 4, n_layers: 3}", "loss.disc_weight=0.5", "data.resolution=24")
    assert Trainer(cfg, datasets=(None, None)).disc.min_size == 24  # the smallest that fits


def test_build_loss_discriminator_takes_the_model_channels():
    loss = build_loss({"disc_weight": 0.5}, {"ndf": 4, "n_layers": 1, "norm": "none"}, 1)
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(9)) * 2 - 1
    total, logs = loss.discriminator_loss(x, x.flip(-1), step=0)
    assert logs["logits_real"].shape == () and total.item() > 0


def _img(seed):
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_lecam_term_uses_real_and_fake_averages_in_their_places():
    """L30: the discriminator's LeCAM term is lecam_reg(real, fake, ema_real, ema_fake)."""
    torch.manual_seed(0)
    disc = PatchGANDiscriminator(3, ndf=4, n_layers=1, norm="none")
    loss = VQGANLoss(discriminator=disc, disc_weight=0.5, lecam_weight=0.1).eval()
    loss.ema_real.fill_(1.0)
    loss.ema_fake.fill_(-1.0)
    loss.ema_count.fill_(3)
    x, y = _img(1), _img(2)
    _, logs = loss.discriminator_loss(x, y, step=0)
    want = lecam_reg(disc(x), disc(y), torch.tensor(1.0), torch.tensor(-1.0))
    assert want.item() > 0
    assert logs["lecam"].item() == pytest.approx(want.item(), rel=1e-6)


def test_generator_loss_without_grad_uses_weight_one():
    """L24: under no_grad (no graph) the adaptive weight is 1, as documented, not an error."""
    torch.manual_seed(0)
    disc = PatchGANDiscriminator(3, ndf=4, n_layers=1, norm="none")
    loss = VQGANLoss(discriminator=disc, disc_weight=0.5)
    last = torch.nn.Parameter(torch.randn(3, 3))
    x = _img(3)
    with torch.no_grad():
        x_hat = torch.einsum("oc,bchw->bohw", last, x)
        _, logs = loss.generator_loss(x, x_hat, torch.tensor(0.0), step=0, last_layer=last)
    assert logs["d_weight"].item() == pytest.approx(0.5)


def test_loss_config_validation():
    """L21, L28, L27."""
    disc = PatchGANDiscriminator(3, ndf=4, n_layers=1)
    with pytest.raises(ValueError, match="lecam_decay"):
        VQGANLoss(discriminator=disc, lecam_weight=0.1, lecam_decay=1.0)
    with pytest.raises(ValueError, match="needs a discriminator"):
        VQGANLoss(lecam_weight=0.1)
    from fastvq.models import LPIPS

    loss = VQGANLoss(perceptual_weight=0.0, lpips=LPIPS())
    assert loss.lpips is None
    _, logs = loss.generator_loss(_img(1), _img(2), torch.tensor(0.0), step=0)
    assert "lpips" not in logs


def test_trainer_refuses_images_smaller_than_lpips(make_config):
    """VGG's deepest tap follows four 2x2 poolings: 8 px failed in max_pool at the first step."""
    from fastvq.train.trainer import Trainer

    cfg = make_config("data.resolution=8", "loss.perceptual_weight=0.5")
    with pytest.raises(ValueError, match="LPIPS .* needs images of at least 16 px, got"):
        Trainer(cfg, datasets=(None, None))
