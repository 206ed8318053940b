"""Stage-1 autoencoder loss: pixel + LPIPS reconstruction as a learned-variance NLL, KL and an adaptive PatchGAN term.

Follows LDM's ``LPIPSWithDiscriminator`` (Rombach et al. 2022) and VQGAN's adaptive weight (Esser et al. 2021).
The LightningModule owns the two optimizers: it steps the autoencoder on ``autoencoder_loss`` and the
discriminator on ``discriminator_loss``, and may skip the latter while ``disc_factor_at(step)`` is 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn

from ldm.autoencoder.discriminator import (
    NLayerDiscriminator,
    hinge_d_loss,
    vanilla_d_loss,
)
from ldm.autoencoder.lpips import Net, build_lpips

_D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


@contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Run ``module`` as a constant: the graph built inside holds none of its parameters, so backward skips them."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


class AutoencoderLoss(nn.Module):
    """Generator and discriminator losses of the KL autoencoder, computed in fp32 whatever the autocast outside."""

    def __init__(
        self,
        rec_loss: Literal["l1", "l2"] = "l1",  # pixel distance
        logvar_init: float = 0.0,  # initial learned log-variance s of the NLL: rec / e^s + s
        kl_weight: float = 1e-6,  # weight of KL(q(z|x) || N(0, I))
        perceptual_weight: float = 1.0,  # LPIPS weight inside the NLL; 0 builds no LPIPS network
        lpips_net: Net = "vgg",  # LPIPS trunk: "vgg" (LDM's) or "alex"
        lpips_weights: str | None = None,  # local trunk or LPIPS state dict; None: torch hub's cache, else download
        lpips_random_init: bool = False,  # random trunk, uncalibrated distances: tests and CPU smoke runs only
        disc_start: int = 50001,  # first global step with the GAN terms
        disc_weight: float = 0.5,  # scales the adaptive GAN weight (Esser et al. 2021, Eq. 7)
        disc_factor: float = 1.0,  # GAN factor once started
        disc_loss: Literal["hinge", "vanilla"] = "hinge",  # discriminator objective
        disc_layers: int = 3,  # PatchGAN stride-2 layers (3: 70x70 patches, inputs >= 24 px)
        disc_channels: int = 64,  # PatchGAN first-layer width
        disc_in_channels: int = 3,  # image channels
    ) -> None:
        super().__init__()
        self.rec_loss = rec_loss
        self.kl_weight = kl_weight
        self.perceptual_weight = perceptual_weight
        self.disc_start = disc_start
        self.disc_weight = disc_weight
        self.disc_factor = disc_factor
        self.disc_loss = disc_loss
        self.logvar = nn.Parameter(torch.tensor(logvar_init))
        self.perceptual_loss = (build_lpips(lpips_net, lpips_weights, lpips_random_init)
                                if perceptual_weight > 0 else None)
        self.discriminator = NLayerDiscriminator(disc_in_channels, disc_channels, disc_layers)

    def disc_factor_at(self, global_step: int) -> float:
        """GAN factor at a step: 0 before ``disc_start`` (the autoencoder first learns to reconstruct)."""
        return self.disc_factor if global_step >= self.disc_start else 0.0

    def autoencoder_loss(
        self,
        inputs: Tensor,  # (B, C, H, W) images in [-1, 1]
        recon: Tensor,  # (B, C, H, W) their reconstructions
        kl: Tensor,  # (B,) per-sample KL of the posterior
        last_layer: Tensor,  # the decoder's last conv weight, for the adaptive GAN weight
        global_step: int,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Autoencoder loss and its detached parts; the discriminator is a constant here and runs only once started."""
        batch = inputs.shape[0]
        with torch.autocast(inputs.device.type, enabled=False):
            inputs, recon = inputs.float(), recon.float()
            diff = inputs - recon  # (B, C, H, W)
            rec = diff.abs() if self.rec_loss == "l1" else diff.square()
            perceptual = rec.new_zeros(batch) if self.perceptual_loss is None else self.perceptual_loss(inputs, recon)  # (B,)
            rec_total = rec + self.perceptual_weight * perceptual[:, None, None, None]  # (B, C, H, W)
            # NLL under one learned scale s, as LDM: rec / e^s + s, summed over pixels, averaged over the batch
            nll = (rec_total / self.logvar.exp() + self.logvar).sum() / batch
            kl = kl.float().sum() / batch
            total = nll + self.kl_weight * kl
            g = d_weight = total.new_zeros(())
            factor = self.disc_factor_at(global_step)
            if factor > 0:
                with _frozen(self.discriminator):
                    g = -self.discriminator(recon).mean()
                if nll.requires_grad:  # without a graph (validation) the weight is unknown: LDM leaves the term out
                    d_weight = self._adaptive_weight(nll, g, last_layer)
                total = total + d_weight * factor * g
        logs = {
            "rec": rec.mean(),
            "perceptual": perceptual.mean(),
            "nll": nll,
            "kl": kl,
            "g": g,
            "d_weight": d_weight,
            "logvar": self.logvar,
            "total": total,
        }
        return total, {k: v.detach() for k, v in logs.items()}

    def _adaptive_weight(self, nll: Tensor, g: Tensor, last_layer: Tensor) -> Tensor:
        """lambda = ||grad_L nll|| / (||grad_L g|| + 1e-4) at the decoder's last layer L (Esser et al. 2021, Eq. 7)."""
        (nll_grad,) = torch.autograd.grad(nll, last_layer, retain_graph=True)
        (g_grad,) = torch.autograd.grad(g, last_layer, retain_graph=True)
        return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach() * self.disc_weight

    def discriminator_loss(self, inputs: Tensor, recon: Tensor, global_step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Discriminator loss on real images and detached reconstructions, times the GAN factor, and its logs."""
        with torch.autocast(inputs.device.type, enabled=False):
            logits_real = self.discriminator(inputs.detach().float())  # (B, 1, h, w)
            logits_fake = self.discriminator(recon.detach().float())  # (B, 1, h, w)
            d = self.disc_factor_at(global_step) * _D_LOSSES[self.disc_loss](logits_real, logits_fake)
        return d, {"d": d.detach(), "logits_real": logits_real.detach().mean(), "logits_fake": logits_fake.detach().mean()}
