"""FID, KID and CLIP score of generated images, at validation and test, for either stage."""

from __future__ import annotations

import logging
import zlib
from typing import Any, Protocol, runtime_checkable

import lightning as L
import torch
from torch import nn

from ldm.data import batch as B
from ldm.metrics.clip_score import CLIPScorer, try_build_clip_scorer
from ldm.metrics.features import InceptionFeatures
from ldm.metrics.fid import frechet_distance, kid
from ldm.metrics.statistics import FeatureSet, ReferenceCache
from ldm.weights.io import state_sha256

log = logging.getLogger(__name__)


@runtime_checkable
class DescribedData(Protocol):
    """A data module that can say what a split's evaluation images are made of (``WebDataModule`` can)."""

    def describe(self, split: str) -> dict[str, Any]: ...


def _order(batch: dict[str, Any], n: int) -> torch.Tensor | None:
    """Order keys of the first ``n`` samples (from their data keys), so kept features sort alike on any ranks."""
    return torch.tensor([zlib.crc32(str(k).encode()) for k in batch[B.KEY][:n]]) if B.KEY in batch else None


class SampleMetrics(L.Callback):
    """Generates one image per evaluation sample with ``pl_module.evaluation_images(batch)`` (samples for
    LatentDiffusion, reconstructions for AutoencoderKL: rFID) and logs ``<split>/fid`` (and with ``kid``
    ``<split>/kid``, ``<split>/kid_std``) against the split's real images, and ``<split>/clip_score``
    against the captions.

    Each generated sample is seeded by its data key, so with the whole split (``max_samples: null``)
    the figures are the same for any number of ranks. ``max_samples`` caps the split samples generated
    from, ``draws`` samples each; the reference is the same samples' real images, or with
    ``full_reference`` the whole split's (a paper's "FID-5k against the 10k test set"; 50k with draws 5). The real images' features are computed once and
    cached in ``cache_dir`` under the data module's description of the split (every shard file with its
    size and modification time, resolution, ...), the sample cap and the extractor's weights, so edited
    shards never reuse stale statistics. Without Inception (or CLIP) weights on the machine and no way
    to download them, the metric is disabled with one log line naming the option to set.
    """

    def __init__(
        self,
        fid: bool = True,
        inception_weights: str | None = None,  # local FID Inception file; None: torch hub's cache, else download
        feature_extractor: nn.Module | None = None,  # replaces Inception (e.g. a small net in tests)
        kid: bool = False,  # also KID (keeps every feature: 8 KiB per image and set)
        kid_subsets: int = 100,  # KID's random subsets (torch-fidelity's default)
        kid_subset_size: int = 1000,  # their size, clipped to the sample count
        clip_model: str | None = None,  # open_clip architecture for CLIP score; None: off
        clip_pretrained: str | None = None,  # its tag (cache, else download) or a local weights path
        clip_scorer: CLIPScorer | None = None,  # a ready scorer instead of clip_model/clip_pretrained
        max_samples: int | None = None,  # split samples generated from per evaluation (split over ranks); None: all
        draws: int = 1,  # samples generated per split sample, each from its own noise (FID-50k from a 10k split)
        full_reference: bool = False,  # the whole split is the reference, whatever max_samples (FID-5k vs 10k)
        every_n_validations: int = 1,  # 0: only at test
        cache_dir: str = "~/.cache/ldm/fid_stats",
    ) -> None:
        super().__init__()
        self.fid, self.inception_weights, self.extractor = fid, inception_weights, feature_extractor
        self.kid, self.kid_subsets, self.kid_subset_size = kid, kid_subsets, kid_subset_size
        self.clip_model, self.clip_pretrained, self.scorer = clip_model, clip_pretrained, clip_scorer
        self.max_samples, self.draws, self.full_reference = max_samples, draws, full_reference
        self.every_n_validations = every_n_validations
        self.cache = ReferenceCache(cache_dir)
        self._validations = 0
        self._active = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.fid and self.extractor is None:
            try:
                self.extractor = InceptionFeatures(self.inception_weights)
            except FileNotFoundError as err:
                log.warning("FID disabled: %s", err)
                self.fid = False
        if self.fid:
            self._extractor_id = state_sha256(self.extractor)  # its weights name it in the reference key
        if self.scorer is None and self.clip_model is not None:
            self.scorer = try_build_clip_scorer(self.clip_model, self.clip_pretrained)

    # --- per epoch -----------------------------------------------------------------------------
    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> None:
        self._split, self._seen = split, 0
        self._fake, self._real = FeatureSet(self.kid), FeatureSet(self.kid)
        self._clip = torch.zeros(2, dtype=torch.float64)  # (sum of scores, count)
        for module in (self.extractor, self.scorer):  # here, not in setup: the strategy moves pl_module after setup
            if module is not None:
                module.to(pl_module.device).eval()
        self._key, self._reference = self._reference_key(trainer, split), None
        if self.fid and self._key is not None:
            self._reference = self.cache.load(self._key, keep=self.kid)
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
        if not self._active:
            return
        cap = None if self.max_samples is None else -(-self.max_samples // trainer.world_size)
        size = B.batch_size(batch)
        take = size if cap is None else max(0, min(size, cap - self._seen))  # the batch's samples to generate from
        real = size if self.full_reference else take  # real images the reference takes from it
        if self.fid and self._reference is None and real:
            self._real.add(self.extractor(batch[B.IMAGE][:real]), _order(batch, real))
        if not take:
            return
        batch = B.head(batch, take)
        for draw in range(self.draws):
            images = pl_module.evaluation_images(batch, draw)  # (B, 3, H, W) in [-1, 1]
            if self.fid:
                order = _order(batch, take)
                self._fake.add(self.extractor(images), None if order is None else order + (draw << 32))
            if self.scorer is not None and B.CAPTION in batch:
                scores = self.scorer(images, batch[B.CAPTION]).double().cpu()  # (B,)
                self._clip += torch.stack([scores.sum(), torch.tensor(float(len(scores)))]).double()
        self._seen += take

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch(trainer, pl_module, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch(trainer, pl_module, batch)

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active:
            return
        split, strategy = self._split, trainer.strategy
        reduce = lambda t: strategy.reduce(t, reduce_op="sum")  # noqa: E731
        gather = strategy.all_gather if trainer.world_size > 1 else None
        metrics: dict[str, float] = {}
        if self.fid:
            fake = self._fake.merged(reduce, gather)
            if self._reference is None:
                self._reference = self._real.merged(reduce, gather)
                if trainer.is_global_zero and self._key is not None:
                    self.cache.save(self._key, self._reference)
            metrics[f"{split}/fid"] = frechet_distance(*fake.mu_sigma(), *self._reference.mu_sigma())
            metrics[f"{split}/fid_samples"] = float(fake.count)
            if self.kid:
                mean, std = kid(fake.features, self._reference.features, self.kid_subsets, self.kid_subset_size)
                metrics[f"{split}/kid"], metrics[f"{split}/kid_std"] = mean, std
        if self.scorer is not None:
            total, count = reduce(self._clip.to(pl_module.device)).tolist()
            if count:
                metrics[f"{split}/clip_score"] = total / count
        for name, value in metrics.items():  # equal on all ranks; logged on each, so any rank can monitor them
            pl_module.log(name, value, sync_dist=True)
        self._active = False

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module)

    def _reference_key(self, trainer: L.Trainer, split: str) -> dict[str, Any] | None:
        """What the split's real features depend on, or None (no caching) when the data cannot say."""
        data = trainer.datamodule
        if not self.fid or not isinstance(data, DescribedData):
            return None
        description = data.describe(split)
        whole = self.max_samples is None or self.full_reference
        if whole:  # the whole split: how it is dealt to ranks and batches does not matter
            description.pop("layout", None)
        return {"data": description, "split": split, "max_samples": None if whole else self.max_samples,
                "extractor": self._extractor_id}
