"""Estimates the latent statistics at the end of a stage-1 fit, so they leave the run with the weights."""

from __future__ import annotations

import logging
from itertools import islice

import lightning as L
import torch

from ldm.autoencoder.vae import estimate_latent_stats
from ldm.data import batch as B
from ldm.training.nonfinite import diverged

log = logging.getLogger(__name__)


class LatentStatistics(L.Callback):
    """At the end of training, stores the per-channel mean/std of posterior samples of ``batches``
    training batches in the autoencoder's buffers (``pl_module.vae``), where the export (and
    every later checkpoint) carries them: stage 2 normalises latents with them. Statistics with NaN/inf (a
    diverged run whose latents overflow, its weights still finite) end the run instead: nothing carries them.

    The posterior samples come from a generator of its own, seeded by ``seed`` (plus the rank), so
    the estimate does not depend on how the run used the global RNG. Under DDP every rank encodes
    its share and the sums are all-reduced.
    """

    def __init__(
        self,
        batches: int = 50,  # training batches per rank (fewer if the epoch ends first)
        seed: int = 0,  # seeds the posterior samples
    ) -> None:
        super().__init__()
        self.batches, self.seed = batches, seed

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.datamodule is None:
            raise ValueError("LatentStatistics reads the training split from the data module; fit with one")
        device = pl_module.device
        generator = torch.Generator(device).manual_seed(self.seed + trainer.global_rank)
        images = (b[B.IMAGE].to(device) for b in islice(trainer.datamodule.train_dataloader(), self.batches))
        was_training = pl_module.training
        pl_module.eval()
        mean, std = estimate_latent_stats(pl_module.vae, images, generator, lambda t: trainer.strategy.reduce(t, reduce_op="sum"))
        pl_module.train(was_training)
        if not (mean.isfinite().all() and std.isfinite().all()):  # equal on every rank (all-reduced): all stop
            raise diverged(f"at step {trainer.global_step} the latent statistics are not finite (mean {mean.tolist()}, "
                           f"std {std.tolist()}): the autoencoder's latents overflow",
                           "Nothing was written with them.")
        pl_module.vae.set_latent_stats(mean, std)
        log.info("latent statistics: mean %s, std %s", [round(v, 4) for v in mean.tolist()], [round(v, 4) for v in std.tolist()])
