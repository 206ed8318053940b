"""LatentDiffusion: the stage-2 LightningModule. It wires codec, conditioner, objective, backbone and sampler."""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, ExitStack, nullcontext
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from ldm.autoencoder.codec import LatentCodec, check_same_codec
from ldm.backbones.base import Backbone
from ldm.conditioning.conditioner import Conditioner
from ldm.data import batch as B
from ldm.data.latents import check_cache
from ldm.diffusion.ema import EMA
from ldm.diffusion.guidance import CFGDenoiser, predict
from ldm.diffusion.init_weights import load_init_weights
from ldm.diffusion.loss_by_noise import LossByNoise
from ldm.diffusion.objectives import DDPM, Objective
from ldm.diffusion.posthoc_ema import PostHocEMA, PowerEMASnapshots, power_emas
from ldm.diffusion.samplers import DPMSolverPP2M, Sampler, randn
from ldm.nn.frozen import frozen_names
from ldm.training.module import ParameterGroups, TrainingModule
from ldm.training.speed import speed_up

CODEC_KEY = "codec"  # checkpoint / export entry: the fingerprint of the latent space the model was trained in
BackboneFactory = Callable[[int, int, int | None, int | None], Backbone]  # (in, out, context_dim, vector_dim)


class LatentDiffusion(TrainingModule):
    """Conditional denoising in the latent space of a frozen autoencoder (Rombach et al. 2022, Sec. 3.3).

    The backbone is built here from a factory, because only this module knows the latent and concat
    channels and the conditioning dims. Frozen parts (codec, frozen text encoders) are rebuilt from
    their own weights files and left out of checkpoints; the EMA of the backbone is kept in them.
    """

    def __init__(
        self,
        backbone: BackboneFactory,  # e.g. class_path: ldm.backbones.unet.UNet + its own knobs
        codec: LatentCodec,
        conditioner: Conditioner | None = None,  # None: unconditional
        objective: Objective | None = None,  # default DDPM(prediction="eps")
        sampler: Sampler | None = None,  # any Sampler subclass; default DPMSolverPP2M, 25 steps
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,  # stepped after every optimizer step
        ema_decay: float | None = 0.9999,  # None: no EMA; else sampling and validation use the EMA
        cfg_scale: float = 4.0,  # guidance for predict and metrics
        grid_cfg_scales: tuple[float, ...] = (1.0, 4.0),  # guidance scales of the logged sample grids
        num_logged_samples: int = 8,  # samples per grid (the first of the first val batch)
        seed: int = 0,  # sample i of a generation uses noise seeded by seed + its index
        init_weights: str | None = None,  # start from: our export or checkpoint, a diffusers UNet or DiT file
        max_nonfinite_steps: int = 10,  # consecutive NaN/inf steps (each skipped) before the run stops
        channels_last: bool = False,  # the backbone's 4-d weights NHWC (convolutional backbones)
        compile: dict[str, Any] | bool = False,  # torch.compile the backbone (True, or its keyword arguments)
        loss_buckets: int = 10,  # loss per noise level: buckets of t (DDPM) or log-SNR (flow), */loss_by_t/<k>
        posthoc_ema: PostHocEMA | None = None,  # {sigma_rels, every_n_steps}: EDM2 power EMAs, snapshots to reconstruct
        frames: int | None = None,  # clips of this many frames where no data says (prediction requests); None: images
    ) -> None:
        super().__init__(lr_scheduler, max_nonfinite_steps)
        self.save_hyperparameters(ignore=["backbone", "codec", "conditioner", "objective", "sampler"])
        self.codec = codec
        self.conditioner = conditioner or Conditioner([])
        self.objective = objective or DDPM()
        self.sampler = sampler or DPMSolverPP2M()
        channels = codec.latent_channels
        self.backbone = backbone(
            channels + self.conditioner.concat_channels, channels, self.conditioner.context_dim, self.conditioner.vector_dim
        )
        if init_weights is not None:  # before the EMA copies the backbone
            load_init_weights(self.backbone, self.conditioner, init_weights)
        speed_up(self.backbone, channels_last)
        self.ema = EMA(self.backbone, ema_decay) if ema_decay is not None else None  # an uncompiled copy
        self.power_emas = power_emas(self.backbone, posthoc_ema)  # post-hoc EMA profiles (tools/posthoc_ema.py)
        speed_up(self.backbone, compile=compile)
        self.optimizer = optimizer
        self._ema_stack = ExitStack()
        self._loss: Tensor | None = None  # the last training loss, which the guard checks
        self._step_finite: Tensor | bool = True
        self.train_loss_by_t, self.eval_loss_by_t = (LossByNoise(self.objective, loss_buckets) for _ in range(2))

    # --- training -----------------------------------------------------------------------------
    def optimizer_groups(self) -> ParameterGroups:
        return [(self.optimizer, [*self.backbone.parameters(), *self.conditioner.parameters()])]

    def latents(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> Tensor:
        """Normalised latents, the posterior drawn from ``generator``: from a latent cache's moments (refused
        when the cache was made with another codec or other statistics), else from encoded images."""
        if B.LATENT_MEAN in batch:
            check_cache(batch, self.codec.fingerprint_hash(), B.CACHE_CODEC, "autoencoder or latent statistics")
            return self.codec.from_moments(batch[B.LATENT_MEAN], batch[B.LATENT_STD], generator)
        return self.codec.encode(batch[B.IMAGE], generator)

    def diffusion_loss(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> Tensor:
        """Per-sample objective loss at random times; the conditioner drops conditions while training."""
        return self.timed_loss(batch, generator)[0]

    def timed_loss(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``diffusion_loss`` and the times it was drawn at, (B,) each."""
        z = self.latents(batch, generator)  # (B, C, h, w)
        cond = self.conditioner(batch, tuple(z.shape[-2:]))
        t = self.objective.sample_t(z.shape[0], z.device, generator)  # (B,)
        noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype) if generator else torch.randn_like(z)
        pred = predict(self.backbone, self.objective.add_noise(z, noise, t), self.objective.model_time(t), cond)
        return self.objective.loss(pred.float(), z, noise, t), t  # (B,), (B,)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        losses, t = self.timed_loss(batch)
        self.train_loss_by_t.update(losses, t)  # on the device: no host sync
        self._loss = loss = losses.mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        if self.trainer._logger_connector.should_update_logs:  # a step Lightning writes (its own monitors ask so too)
            self.log_loss_by_t(self.train_loss_by_t, "train")

    def log_loss_by_t(self, metric: LossByNoise, split: str) -> None:
        """Log the mean loss of each noise bucket since the last log, over all ranks (the one all-reduce and host
        read), as ``<split>/loss_by_t/<k>`` and, at evaluations, a bar chart; then start afresh."""
        if not metric.update_count:  # e.g. the end of a predict epoch
            return
        means, counts = metric.compute()
        metric.reset()
        scalars = metric.scalars(means, counts, f"{split}/loss_by_t")
        if split == "train":  # to the loggers, as Lightning's LearningRateMonitor: self.log would repeat the last
            for logger in self.loggers:  # value of a bucket empty in this interval (its step keys live an epoch)
                logger.log_metrics(scalars, self.trainer.fit_loop.epoch_loop._batches_that_stepped)
            return
        self.log_dict(scalars, sync_dist=True)  # already over all ranks; said so Lightning does not warn
        if self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                picture = metric.picture(means, f"{split} loss at step {self.global_step}")
                logger.experiment.add_image(f"{split}/loss_by_t", picture, self.global_step)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """A NaN/inf loss or gradient makes the optimizer step that follows change nothing (see NonFiniteGuard)."""
        self._step_finite = self.guard_step(self._loss, optimizer)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Step, then update the EMA: once per optimizer step, however many batches a step accumulates,
        and not after a skipped (non-finite) step."""
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self.backbone, self._step_finite)
        for ema in self.power_emas:
            ema.update(self.backbone, self._step_finite)

    def configure_callbacks(self) -> list[L.Callback]:
        """The writer of the post-hoc EMA snapshots, with ``posthoc_ema``."""
        settings = self.hparams.posthoc_ema
        return [PowerEMASnapshots(settings["every_n_steps"])] if settings else []

    def _eval_loss(self, batch: Mapping[str, Any], batch_idx: int, split: str) -> None:
        # fixed times and noise per batch, so successive validations compare like with like
        generator = torch.Generator(self.device).manual_seed(self.hparams.seed + batch_idx)
        losses, t = self.timed_loss(batch, generator)
        self.eval_loss_by_t.update(losses, t)
        loss = losses.mean()
        self.log(f"{split}/loss", loss, prog_bar=split == "val", sync_dist=True)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_loss(batch, batch_idx, "val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_loss(batch, batch_idx, "test")

    # --- evaluation and sampling use the EMA weights, swapped in once per epoch ------------------
    def ema_weights(self, ema: EMA | None = None) -> AbstractContextManager:
        """Context in which self.backbone holds ``ema``'s weights (default the EMA's; a no-op without EMA)."""
        ema = self.ema if ema is None else ema
        return ema.swapped(self.backbone) if ema is not None else nullcontext()

    def on_validation_epoch_start(self) -> None:
        self._ema_stack.enter_context(self.ema_weights())

    def on_validation_epoch_end(self) -> None:
        self._ema_stack.close()
        self.log_loss_by_t(self.eval_loss_by_t, "test" if self.trainer.testing else "val")

    on_test_epoch_start = on_predict_epoch_start = on_validation_epoch_start
    on_test_epoch_end = on_predict_epoch_end = on_validation_epoch_end

    @property
    def size_multiple(self) -> int:
        """What image sides must be multiples of: the autoencoder's downsampling times the backbone's multiple."""
        return self.codec.downsample_factor * self.backbone.size_multiple

    def latent_shape(self, batch: Mapping[str, Any]) -> tuple[int, ...]:
        """(h, w), or (T, h, w) for clips, of the latents to generate for a batch: from its images, clips or cached
        latents, or its `target_size` (and the model's ``frames``)."""
        f = self.codec.downsample_factor
        if B.LATENT_MEAN in batch:
            return tuple(batch[B.LATENT_MEAN].shape[2:])
        if B.IMAGE in batch:
            *frames, h, w = batch[B.IMAGE].shape[2:]
            return (*frames, h // f, w // f)
        h, w = batch[B.TARGET_SIZE][0].tolist()
        frames = self.hparams.frames
        return (h // f, w // f) if frames is None else (frames, h // f, w // f)

    @torch.no_grad()
    def generate(self, batch: Mapping[str, Any], cfg_scale: float | None = None, indices: Tensor | None = None) -> Tensor:
        """Images (B, 3, H, W), or clips (B, 3, T, H, W), in [-1, 1] for the batch's conditions; sample i's noise is
        seeded by seed + indices[i].

        Uses self.backbone as it is: inside validation/test/predict that is the EMA (see ema_weights).
        """
        shape = self.latent_shape(batch)
        size = shape[-2:]
        indices = torch.arange(B.batch_size(batch)) if indices is None else indices
        # one CPU generator per sample for its initial noise and every later draw of a stochastic sampler:
        # a sample is the same whatever batch, rank, world size or device draws it
        generators = [torch.Generator().manual_seed(self.hparams.seed + int(i)) for i in indices]
        noise = randn((len(generators), self.codec.latent_channels, *shape), generators, self.device)  # (B, C, [T,] h, w)
        scale = self.hparams.cfg_scale if cfg_scale is None else cfg_scale
        cond = self.conditioner(batch, size, drop=False)
        uncond = self.conditioner.unconditional(batch, size) if scale != 1.0 else None
        denoise = CFGDenoiser(self.backbone, self.objective, cond, uncond, scale)
        latents = self.sampler(denoise, noise, self.objective, generators)
        return self.codec.decode(latents)

    def log_images(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Samples for the batch's first conditions at each grid guidance scale, plus the real images."""
        head = B.head(batch, self.hparams.num_logged_samples)
        out = {f"samples_cfg{s:g}": self.generate(head, s) for s in self.hparams.grid_cfg_scales}
        if B.IMAGE in head:
            out["real"] = head[B.IMAGE]
        return out

    def evaluation_images(self, batch: Mapping[str, Any], draw: int = 0) -> Tensor:
        """Generated images for a data batch at `cfg_scale`, the ``draw``-th for each sample, seeded by the
        sample's key: the same sample gets the same noise whatever the batch, rank or world size."""
        keys = batch[B.KEY] if B.KEY in batch else range(B.batch_size(batch))
        # torch seeds its CPU generator with 32 bits: draws hash into them rather than add above them
        indices = torch.tensor([zlib.crc32((str(k) if draw == 0 else f"{k}#{draw}").encode()) for k in keys])
        return self.generate(batch, indices=indices)

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Any]:
        """The batch's requests (index, caption, label) with their generated `images`."""
        images = self.generate(batch, indices=batch.get(B.INDEX))
        return {B.GENERATED: images, **{k: batch[k] for k in (B.INDEX, B.CAPTION, B.LABEL) if k in batch}}

    # --- checkpoints --------------------------------------------------------------------------
    def _frozen_keys(self) -> set[str]:
        """State-dict keys rebuilt from their own weights files: codec and frozen conditioner parts."""
        keys = {f"codec.{k}" for k in self.codec.state_dict()}
        return keys | {f"conditioner.{k}" for k in frozen_names(self.conditioner)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        frozen = self._frozen_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
        super().on_save_checkpoint(checkpoint)
        checkpoint[CODEC_KEY] = self.codec.fingerprint()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint trained in another latent space, then restore the frozen parts from their files."""
        path = self._trainer.ckpt_path if self._trainer is not None else None  # None: load_from_checkpoint
        check_same_codec(checkpoint.get(CODEC_KEY), self.codec, f"checkpoint {path}" if path else "this checkpoint")
        current = self.state_dict()
        checkpoint["state_dict"].update({k: current[k] for k in self._frozen_keys()})

    def export_state(self, ema: EMA | None = None) -> tuple[dict[str, Tensor], dict[str, str]]:
        """The weights that sample (the EMA backbone, the trained conditioning), with the codec's fingerprint
        as metadata; the frozen parts load from their own files. ``ema``: another EMA's backbone (a post-hoc profile)."""
        with self.ema_weights(ema):
            state = {f"backbone.{k}": v.detach().cpu().clone() for k, v in self.backbone.state_dict().items()}
        frozen = self._frozen_keys()
        state |= {f"conditioner.{k}": v for k, v in self.conditioner.state_dict().items() if f"conditioner.{k}" not in frozen}
        return state, {CODEC_KEY: json.dumps(self.codec.fingerprint())}
