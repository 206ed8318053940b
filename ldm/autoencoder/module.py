"""AutoencoderKL: the stage-1 LightningModule (wiring only: networks, loss and math live beside it)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import Tensor
from torch.optim.lr_scheduler import LRScheduler
from torchmetrics import MetricCollection
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from ldm.autoencoder.loss import AutoencoderLoss
from ldm.autoencoder.vae import VAE
from ldm.autoencoder.weights import load_vae_weights
from ldm.data import batch as B
from ldm.training.module import ParameterGroups, TrainingModule
from ldm.training.speed import speed_up


class AutoencoderKL(TrainingModule):
    """Trains a VAE with reconstruction + LPIPS + KL + PatchGAN losses (Rombach et al. 2022, Sec. 3).

    Two optimizers (autoencoder, discriminator) stepped by hand; the discriminator and its learning-rate
    schedule step only once its GAN term is on (``loss.disc_start``).
    """

    def __init__(
        self,
        vae: VAE,
        loss: AutoencoderLoss,
        optimizer: OptimizerCallable = torch.optim.Adam,  # autoencoder (+ learned log-variance)
        disc_optimizer: OptimizerCallable = torch.optim.Adam,  # discriminator
        lr_scheduler: LRSchedulerCallable | None = None,  # one per optimizer, stepped after each of its steps
        grad_clip: float | None = 1.0,  # max gradient norm for each optimizer (None: off)
        weights: str | None = None,  # initial VAE weights: ours, diffusers or an SD checkpoint
        num_logged_images: int = 8,  # images in the TensorBoard grids
        max_nonfinite_steps: int = 10,  # consecutive NaN/inf optimizer steps (each skipped) before the run stops
        channels_last: bool = False,  # the VAE's and discriminator's 4-d weights NHWC
        compile: dict[str, Any] | bool = False,  # torch.compile VAE and discriminator (True, or its keyword arguments)
    ) -> None:
        super().__init__(lr_scheduler, max_nonfinite_steps)
        self.save_hyperparameters(ignore=["vae", "loss"])
        self.automatic_optimization = False
        self.vae, self.loss = vae, loss
        if weights is not None:
            load_vae_weights(self.vae, weights)
        for module in (self.vae, self.loss.discriminator):
            speed_up(module, channels_last, compile)
        self.optimizer, self.disc_optimizer = optimizer, disc_optimizer
        self.autoencoder_steps = 0  # one per batch; the GAN schedule (disc_start) counts these
        metrics = MetricCollection({"psnr": PeakSignalNoiseRatio(data_range=1.0), "ssim": StructuralSimilarityIndexMeasure(data_range=1.0)})
        self.val_metrics, self.test_metrics = metrics.clone(prefix="val/"), metrics.clone(prefix="test/")

    @property
    def size_multiple(self) -> int:
        """What image sides must be multiples of: the autoencoder's downsampling factor."""
        return self.vae.downsample_factor

    def optimizer_groups(self) -> ParameterGroups:
        discriminator = self.loss.discriminator
        autoencoder = [p for n, p in self.named_parameters() if not n.startswith("loss.discriminator")]
        return [(self.optimizer, autoencoder), (self.disc_optimizer, discriminator.parameters())]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x = batch[B.IMAGE]  # (B, 3, H, W) in [-1, 1]
        (opt_g, opt_d), (sched_g, sched_d) = self.optimizers(), self.lr_schedulers() or (None, None)
        running = [(b, b.clone()) for b in self.loss.discriminator.buffers()]  # its batch-norm statistics
        recon, posterior = self.vae(x)
        step = self.autoencoder_steps
        loss, logs = self.loss.autoencoder_loss(x, recon, posterior.kl(), self.vae.last_layer, step)
        finite = self._step(opt_g, sched_g, loss)
        if self.loss.disc_factor_at(step) > 0:
            d_loss, d_logs = self.loss.discriminator_loss(x, recon, step)
            finite = finite & self._step(opt_d, sched_d, d_loss)
            logs |= d_logs
        for buffer, before in running:  # as they were after a skipped batch (whose NaN image would poison them)
            buffer.copy_(torch.where(finite, buffer, before))
        self.autoencoder_steps += 1
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, prog_bar=False)
        self.log("train/loss", logs["total"], prog_bar=True)

    def _step(self, optimizer: LightningOptimizer, scheduler: LRScheduler | None, loss: Tensor) -> Tensor:
        """Backward, step and advance the schedule; a NaN/inf loss or gradient makes the step change nothing.
        Returns whether it was finite (a device bool)."""
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        finite = self.guard_step(loss, optimizer)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        return finite

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip each optimizer's gradient norm to ``grad_clip`` (AMP gradients are unscaled by now)."""
        self.clip_gradients(optimizer, self.hparams.grad_clip)

    def _evaluate(self, batch: dict[str, Any], split: str, metrics: MetricCollection) -> None:
        x = batch[B.IMAGE]
        recon, posterior = self.vae(x, sample=False)
        _, logs = self.loss.autoencoder_loss(x, recon, posterior.kl(), self.vae.last_layer, self.autoencoder_steps)
        metrics.update(_unit(recon), _unit(x))
        self.log_dict({f"{split}/{k}": logs[k] for k in ("rec", "nll", "kl")}, sync_dist=True)
        if self.loss.perceptual_loss is not None:  # the LPIPS distance of the reconstructions
            self.log(f"{split}/lpips", logs["perceptual"], sync_dist=True)
        self.log(f"{split}/l1", (recon.float() - x.float()).abs().mean(), sync_dist=True)
        self.log_dict(metrics, prog_bar=split == "val")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_metrics)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_metrics)

    @torch.no_grad()
    def evaluation_images(self, batch: dict[str, Any], draw: int = 0) -> Tensor:
        """Reconstructions (posterior mean) of the batch's images, for rFID; every draw is the same."""
        return self.vae(batch[B.IMAGE], sample=False)[0].clamp(-1, 1)

    @torch.no_grad()
    def log_images(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Inputs, reconstructions and decoded prior samples, in [-1, 1], for image grids."""
        x = batch[B.IMAGE][: self.hparams.num_logged_images]
        recon, posterior = self.vae(x, sample=False)
        generator = torch.Generator(x.device).manual_seed(0)
        z = torch.randn(posterior.mean.shape, generator=generator, device=x.device)  # N(0, I) prior
        return {"inputs": x, "reconstructions": recon, "prior_samples": self.vae.decode(z)}

    def export_state(self) -> tuple[dict[str, Tensor], None]:
        """The VAE's weights with its latent statistics (what stage 2's codec loads)."""
        return self.vae.state_dict(), None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["autoencoder_steps"] = self.autoencoder_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.autoencoder_steps = checkpoint.get("autoencoder_steps", 0)


def _unit(x: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1] in fp32, clamped, for image metrics."""
    return ((x.float() + 1) / 2).clamp(0, 1)
