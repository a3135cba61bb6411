"""Tokenizer losses: reconstruction, LPIPS, GAN (hinge / non-saturating), adaptive weight, LeCAM.

VQGANLoss combines them the way taming-transformers' VQLPIPSWithDiscriminator does:
  generator:     recon_weight * rec + perceptual_weight * lpips + quant_weight * quant_loss
                 + factor(step) * lambda * disc_weight * g_loss,
                 lambda = |grad_last nll| / (|grad_last g_loss| + 1e-4) clamped to [0, 1e4]
                 (adaptive_weight) or 1, nll = recon_weight * rec + perceptual_weight * lpips;
  discriminator: factor(step) * (d_loss + lecam_weight * lecam),
with factor(step) = 0 before disc_start and 1 from it on. quant_loss is the quantizer's own loss
(commitment / codebook terms, and LFQ/BSQ entropy aux terms) as the Tokenizer returns it. The
generator's logs hold the applied weight factor * lambda * disc_weight as d_weight (taming's
d_weight is lambda alone).
"""

import torch
import torch.nn.functional as F
from torch import nn

from fastvq.ops._validate import check_choice, check_int

RECON = ("l1", "l2")
GAN = ("hinge", "non_saturating")


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Mean |x - x_hat| (l1) or mean (x - x_hat)^2 (l2) over all elements: a scalar.
    x, x_hat: the same shape."""
    check_choice("kind", kind, RECON)
    if x.shape != x_hat.shape:  # else (B, 1, H, W) broadcasts against (B, 3, H, W) silently
        raise ValueError(
            f"x and x_hat must have the same shape, got {tuple(x.shape)} and {tuple(x_hat.shape)}"
        )
    d = x_hat - x
    return d.abs().mean() if kind == "l1" else d.square().mean()


def generator_loss(logits_fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """Generator side: hinge -> -mean(D(G)); non_saturating -> mean(softplus(-D(G))) = -log sig."""
    check_choice("kind", kind, GAN)
    if kind == "hinge":
        return -logits_fake.mean()
    return F.softplus(-logits_fake).mean()


def discriminator_loss(
    logits_real: torch.Tensor, logits_fake: torch.Tensor, kind: str = "hinge"
) -> torch.Tensor:
    """Discriminator side, halved as in taming:
    hinge: (mean relu(1 - D(x)) + mean relu(1 + D(G))) / 2;
    non_saturating: (mean softplus(-D(x)) + mean softplus(D(G))) / 2 (binary cross-entropy).
    """
    check_choice("kind", kind, GAN)
    if kind == "hinge":
        return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def adaptive_disc_weight(
    nll_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer: torch.Tensor,
    max_weight: float = 1e4,
    all_reduce: bool = False,
) -> torch.Tensor:
    """|d nll / d last_layer| / (|d g_loss / d last_layer| + 1e-4), clamped to [0, max_weight].

    Balances the GAN gradient against the reconstruction gradient at the decoder's last layer
    (Esser et al. 2021, eq. 7). Both graphs are retained; the result is detached (a constant).
    all_reduce: the losses are means over equal shards of one batch, one per process of
    torch.distributed's default group: the norms are those of the whole batch's gradients (the
    shards' mean), the same weight on every rank.
    """
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    if all_reduce:
        import torch.distributed as dist

        both = torch.stack([nll_grad, g_grad])
        dist.all_reduce(both)
        nll_grad, g_grad = both / dist.get_world_size()
    weight = torch.linalg.vector_norm(nll_grad) / (torch.linalg.vector_norm(g_grad) + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def lecam_reg(
    logits_real: torch.Tensor,
    logits_fake: torch.Tensor,
    ema_real: torch.Tensor,
    ema_fake: torch.Tensor,
) -> torch.Tensor:
    """LeCAM regularizer (Tseng et al. 2021): mean relu(D(x) - a_F)^2 + mean relu(a_R - D(G))^2.

    a_R, a_F: moving averages of the real and fake logits. The relu form is the authors' code
    (lecam-gan); it penalizes only real logits above the fake average and fake logits below the
    real average.
    """
    return (
        F.relu(logits_real - ema_fake).square().mean()
        + F.relu(ema_real - logits_fake).square().mean()
    )


def disc_factor(step: int, disc_start: int) -> float:
    """0 before disc_start, 1 from it on (taming's adopt_weight)."""
    return 0.0 if step < disc_start else 1.0


class VQGANLoss(nn.Module):
    """Generator and discriminator objectives of a VQGAN-style tokenizer; holds the discriminator.

    generator_loss(x, x_hat, quant_loss, step, last_layer) and
    discriminator_loss(x, x_hat, step, micro_batches=1) each return (total scalar, logs of
    detached scalars).
    The discriminator's parameters are self.discriminator.parameters() (its own optimizer); the
    LeCAM moving averages are buffers, so they checkpoint with the module.
    """

    def __init__(
        self,
        *,
        recon: str = "l1",
        recon_weight: float = 1.0,
        perceptual_weight: float = 0.0,
        lpips: nn.Module | None = None,
        discriminator: nn.Module | None = None,
        disc_weight: float = 0.0,
        disc_start: int = 0,
        disc_loss: str = "hinge",
        adaptive_weight: bool = True,
        lecam_weight: float = 0.0,
        lecam_decay: float = 0.99,
        quant_weight: float = 1.0,
        all_reduce: bool = False,
    ):
        """all_reduce: the processes of torch.distributed's default group each hold an equal
        shard of the batch (the trainer's DDP): LeCAM's averages take the mean logits over them
        (else each averages its own shard's, and their buffers drift apart) and the adaptive
        weight the norms of the whole batch's gradients (else each rank weighs its shard's)."""
        super().__init__()
        check_choice("recon", recon, RECON)
        check_choice("disc_loss", disc_loss, GAN)
        if perceptual_weight > 0 and lpips is None:
            raise ValueError(
                "perceptual_weight > 0 needs an LPIPS module (loss.lpips: {backbone: path, head: "
                "path}); set perceptual_weight=0 to train without the perceptual loss"
            )
        if (disc_weight > 0 or lecam_weight > 0) and discriminator is None:
            raise ValueError(
                "disc_weight > 0 or lecam_weight > 0 needs a discriminator (disc: ...)"
            )
        if not 0.0 <= lecam_decay < 1.0:
            raise ValueError(f"lecam_decay must be in [0, 1), got {lecam_decay}")
        self.recon, self.recon_weight = recon, recon_weight
        self.perceptual_weight = perceptual_weight
        self.lpips = lpips if perceptual_weight > 0 else None
        self.discriminator = discriminator
        self.disc_weight, self.disc_start, self.disc_loss = disc_weight, disc_start, disc_loss
        self.adaptive_weight = adaptive_weight
        self.lecam_weight, self.lecam_decay = lecam_weight, lecam_decay
        self.quant_weight = quant_weight
        self.all_reduce = all_reduce
        # EMA of the mean real / fake logits; count = updates so far (the first one copies).
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))
        self.register_buffer("ema_count", torch.zeros((), dtype=torch.long))

    @property
    def uses_disc(self) -> bool:
        return self.discriminator is not None and (self.disc_weight > 0 or self.lecam_weight > 0)

    def generator_loss(
        self,
        x: torch.Tensor,
        x_hat: torch.Tensor,
        quant_loss: torch.Tensor,
        step: int,
        last_layer: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """Total generator-side loss and logs. x, x_hat: (B, C, H, W); quant_loss: scalar.

        last_layer (the decoder's last weight) is needed for the adaptive weight once the GAN
        term is on; without it (or with grad disabled, where no graph is kept) the weight is 1.
        The weight is that of this call's batch (all processes' shards with all_reduce): under
        gradient accumulation each micro-batch gets its own.
        The GAN term's backward also reaches the discriminator's parameters unless they are
        frozen (requires_grad_(False)), as the trainer does for the generator step.
        """
        rec = reconstruction_loss(x, x_hat, self.recon)
        nll = self.recon_weight * rec
        logs = {"rec": rec.detach()}
        if self.lpips is not None:
            p = self.lpips(x.contiguous(), x_hat.contiguous()).mean()
            nll = nll + self.perceptual_weight * p
            logs["lpips"] = p.detach()
        total = nll + self.quant_weight * quant_loss
        logs["quant"] = quant_loss.detach()
        factor = disc_factor(step, self.disc_start)
        if self.discriminator is not None and self.disc_weight > 0 and factor > 0:
            g = generator_loss(self.discriminator(x_hat.contiguous()), self.disc_loss)
            weight = torch.ones((), device=g.device)
            if self.adaptive_weight and last_layer is not None and torch.is_grad_enabled():
                weight = adaptive_disc_weight(nll, g, last_layer, all_reduce=self.all_reduce)
            weight = factor * self.disc_weight * weight
            total = total + weight * g
            logs.update(g_loss=g.detach(), d_weight=weight.detach())
        logs["total"] = total.detach()
        return total, logs

    def discriminator_loss(
        self, x: torch.Tensor, x_hat: torch.Tensor, step: int, micro_batches: int = 1
    ) -> tuple[torch.Tensor, dict]:
        """Discriminator-side loss on real x and detached x_hat; 0 (with no graph) before
        disc_start or without a discriminator. Updates the LeCAM averages when training, with
        decay lecam_decay ** (1 / micro_batches): a discriminator step whose batch comes in
        micro_batches calls (gradient accumulation) forgets at lecam_decay per step, as one call
        with the whole batch does."""
        micro_batches = check_int("micro_batches", micro_batches, 1)
        factor = disc_factor(step, self.disc_start)
        if not self.uses_disc or factor == 0:
            zero = x.new_zeros(())
            return zero, {"d_loss": zero}
        real = self.discriminator(x.detach().contiguous())
        fake = self.discriminator(x_hat.detach().contiguous())
        d = discriminator_loss(real, fake, self.disc_loss)
        total = d
        logs = {
            "d_loss": d.detach(),
            "logits_real": real.detach().mean(),
            "logits_fake": fake.detach().mean(),
        }
        if self.lecam_weight > 0:
            if self.training:
                decay = self.lecam_decay ** (1 / micro_batches)
                self._update_ema(real.detach().mean(), fake.detach().mean(), decay)
            reg = lecam_reg(real, fake, self.ema_real, self.ema_fake)
            total = total + self.lecam_weight * reg
            logs["lecam"] = reg.detach()
        total = factor * total
        logs["d_total"] = total.detach()
        return total, logs

    @torch.no_grad()
    def _update_ema(self, real_mean: torch.Tensor, fake_mean: torch.Tensor, decay: float) -> None:
        if self.all_reduce:  # every process's shard has the same size: the mean of means
            import torch.distributed as dist

            means = torch.stack([real_mean, fake_mean]).float()
            dist.all_reduce(means)
            real_mean, fake_mean = means / dist.get_world_size()
        decay = decay if self.ema_count > 0 else 0.0
        self.ema_real.mul_(decay).add_((1 - decay) * real_mean.float())
        self.ema_fake.mul_(decay).add_((1 - decay) * fake_mean.float())
        self.ema_count += 1


def build_loss(
    loss_cfg: dict, disc_cfg: dict | None = None, in_channels: int = 3, all_reduce: bool = False
) -> VQGANLoss:
    """VQGANLoss from the config's "loss" and "disc" sections (LPIPS from local files only);
    all_reduce: VQGANLoss's."""
    cfg = dict(loss_cfg)
    lpips_cfg = cfg.pop("lpips", None)
    lpips = None
    if cfg.get("perceptual_weight", 0.0) > 0:
        from fastvq.models.lpips import LPIPS

        if not isinstance(lpips_cfg, dict):
            raise ValueError(
                "loss.perceptual_weight > 0 needs loss.lpips: {backbone: <torchvision vgg16 "
                "state_dict>, head: <lpips vgg.pth>}; or set loss.perceptual_weight=0"
            )
        lpips = LPIPS.from_files(lpips_cfg.get("backbone"), lpips_cfg.get("head"))
    disc = None
    if disc_cfg is not None:
        from fastvq.models.discriminator import PatchGANDiscriminator

        try:
            disc = PatchGANDiscriminator(in_channels, **disc_cfg)
        except (TypeError, ValueError) as e:  # an unknown key, a wrong type or value
            raise ValueError(f"bad disc config {disc_cfg}: {e}") from e
    try:
        return VQGANLoss(lpips=lpips, discriminator=disc, all_reduce=all_reduce, **cfg)
    except TypeError as e:
        raise ValueError(f"bad loss config {loss_cfg}: {e}") from e
