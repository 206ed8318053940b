"""FID and CLIP score of generated images, at validation and test, for either stage."""

from __future__ import annotations

import logging
import os
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from ldm.metrics.clip_score import CLIPScorer, try_build_clip_scorer
from ldm.metrics.features import InceptionFeatures, load_cached_stats, save_cached_stats
from ldm.metrics.fid import frechet_distance

log = logging.getLogger(__name__)


class _Moments:
    """Streaming sums (count, sum x, sum x x^T) of features: they all-reduce across ranks, whatever
    each rank's sample count, and give the FID statistics exactly."""

    def __init__(self, dim: int, device: torch.device) -> None:
        self.n = torch.zeros((), dtype=torch.float64, device=device)
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def add(self, feats: Tensor) -> None:
        f = feats.double()  # (B, D)
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def reduce(self, strategy: Any) -> tuple[Tensor, Tensor, int]:
        n, total, outer = (strategy.reduce(t, reduce_op="sum") for t in (self.n, self.sum, self.outer))
        mu = total / n  # (D,)
        sigma = (outer - n * torch.outer(mu, mu)) / (n - 1)  # (D, D), unbiased like np.cov
        return mu.cpu(), sigma.cpu(), int(n)


class SampleMetrics(L.Callback):
    """Generates one image per evaluation sample with ``pl_module.evaluation_images(batch)`` (samples for
    LatentDiffusion, reconstructions for AutoencoderKL: rFID) and logs ``<split>/fid`` against the split's
    real images, and ``<split>/clip_score`` against the captions.

    Each generated sample is seeded by its data key, so with the whole split (``max_samples: null``)
    the figures are the same for any number of ranks. Reference statistics are cached in ``cache_dir``,
    keyed by data, split, resolution, sample cap and extractor. Without Inception (or CLIP) weights on
    the machine the metric is disabled with one log line, never an error.
    """

    def __init__(
        self,
        fid: bool = True,
        inception_weights: str | None = None,  # local FID Inception file; None: torch-fidelity's cache
        feature_extractor: nn.Module | None = None,  # replaces Inception (e.g. a small net in tests)
        clip_model: str | None = None,  # open_clip architecture for CLIP score; None: off
        clip_pretrained: str | None = None,  # its tag (if cached) or local weights path
        clip_scorer: CLIPScorer | None = None,  # a ready scorer instead of clip_model/clip_pretrained
        max_samples: int | None = None,  # per split and evaluation (split over ranks); None: all
        every_n_validations: int = 1,  # 0: only at test
        cache_dir: str = "~/.cache/ldm/fid_stats",
    ) -> None:
        super().__init__()
        self.fid, self.inception_weights, self.extractor = fid, inception_weights, feature_extractor
        self.clip_model, self.clip_pretrained, self.scorer = clip_model, clip_pretrained, clip_scorer
        self.max_samples, self.every_n_validations = max_samples, every_n_validations
        self.cache_dir = os.path.expanduser(cache_dir)
        self._validations = 0
        self._active = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.fid and self.extractor is None:
            try:
                self.extractor = InceptionFeatures(self.inception_weights)
            except FileNotFoundError as err:
                log.warning("FID disabled: %s", err)
                self.fid = False
        if self.scorer is None and self.clip_model is not None:
            self.scorer = try_build_clip_scorer(self.clip_model, self.clip_pretrained)

    # --- per epoch -----------------------------------------------------------------------------
    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> None:
        self._split, self._seen, self._fake, self._real, self._reference = split, 0, None, None, None
        self._clip = torch.zeros(2, dtype=torch.float64)  # (sum of scores, count)
        for module in (self.extractor, self.scorer):  # here, not in setup: the strategy moves pl_module after setup
            if module is not None:
                module.to(pl_module.device).eval()
        if self.fid:
            self._key = self._reference_key(trainer, split)
            self._reference = load_cached_stats(self.cache_dir, self._key)
            # every rank must take the same path in _finish: use the cache only where all ranks found it
            found = torch.tensor(float(self._reference is not None), device=pl_module.device)
            if not trainer.strategy.reduce(found, reduce_op="min"):
                self._reference = None

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validations += not trainer.sanity_checking
        self._active = (
            not trainer.sanity_checking and self.every_n_validations > 0 and self._validations % self.every_n_validations == 0
            and (self.fid or self.scorer is not None)
        )
        if self._active:
            self._start(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._active = self.fid or self.scorer is not None
        if self._active:
            self._start(trainer, pl_module, "test")

    def _batch(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict[str, Any]) -> None:
        cap = None if self.max_samples is None else -(-self.max_samples // trainer.world_size)
        if not self._active or (cap is not None and self._seen >= cap):
            return
        take = len(batch["image"]) if cap is None else min(len(batch["image"]), cap - self._seen)
        batch = {k: v[:take] for k, v in batch.items() if isinstance(v, (Tensor, list))}
        images = pl_module.evaluation_images(batch)  # (B, 3, H, W) in [-1, 1]
        self._seen += take
        if self.fid:
            fake = self.extractor(images)  # (B, D)
            self._fake = self._fake or _Moments(fake.shape[1], fake.device)
            self._fake.add(fake)
            if self._reference is None:
                real = self.extractor(batch["image"])
                self._real = self._real or _Moments(real.shape[1], real.device)
                self._real.add(real)
        if self.scorer is not None and "caption" in batch:
            scores = self.scorer(images, batch["caption"]).double().cpu()  # (B,)
            self._clip += torch.stack([scores.sum(), torch.tensor(float(len(scores)))]).double()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch(trainer, pl_module, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch(trainer, pl_module, batch)

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active:
            return
        split, strategy = self._split, trainer.strategy
        metrics: dict[str, float] = {}
        if self.fid and self._fake is not None:
            mu, sigma, n = self._fake.reduce(strategy)
            if self._reference is None:
                self._reference = self._real.reduce(strategy)
                if trainer.is_global_zero:
                    save_cached_stats(self.cache_dir, self._key, *self._reference)
            metrics[f"{split}/fid"] = frechet_distance(mu, sigma, self._reference[0], self._reference[1])
            metrics[f"{split}/fid_samples"] = float(n)
        if self.scorer is not None:
            total, count = strategy.reduce(self._clip.to(pl_module.device), reduce_op="sum").tolist()
            if count:
                metrics[f"{split}/clip_score"] = total / count
        for name, value in metrics.items():  # equal on all ranks; logged on each, so any rank can monitor them
            pl_module.log(name, value, sync_dist=True)
        self._active = False

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module)

    def _reference_key(self, trainer: L.Trainer, split: str) -> dict[str, Any]:
        data = trainer.datamodule
        hp = getattr(data, "hparams", {})
        # Under a cap, which samples come first depends on how the split is dealt to ranks, loader workers and batches.
        layout = (trainer.world_size, hp.get("num_workers"), hp.get("eval_batch_size") or hp.get("batch_size"))
        return {
            "data": getattr(data, "patterns", {}).get(split),
            "split": split,
            "resolution": hp.get("resolution"),
            "max_samples": self.max_samples,
            "layout": layout if self.max_samples is not None else None,
            "extractor": self.inception_weights if isinstance(self.extractor, InceptionFeatures) else type(self.extractor).__name__,
        }
