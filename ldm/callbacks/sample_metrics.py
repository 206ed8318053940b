"""Metrics of generated images or clips (FID, sFID, Inception Score, precision and recall, KID, CLIP score,
PSNR/SSIM/LPIPS of reconstructions, FVD, ...) at validation and test, for either stage: the SampleMetric list of
``ldm.metrics`` run over the split."""

from __future__ import annotations

import logging
import zlib
from typing import Any, Protocol, runtime_checkable

import lightning as L
import torch
from torch import nn

from ldm.data import batch as B
from ldm.data.shards import identify
from ldm.metrics.base import SampleMetric
from ldm.metrics.evaluation import Evaluation, load_metrics
from ldm.metrics.fid import FID
from ldm.metrics.reference_batch import (
    image_count,
    is_reference_batch,
    read_images,
    read_statistics,
)
from ldm.metrics.statistics import ReferenceCache
from ldm.training.fsdp import call_as_forward, sharded
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
    LatentDiffusion, reconstructions for AutoencoderKL: rFID) and logs each of ``metrics`` under its names
    (``<split>/fid``, ``<split>/sfid``, ``<split>/inception_score``, ``<split>/precision`` and ``<split>/recall``,
    ``<split>/kid`` and ``<split>/kid_std``, ``<split>/clip_score``, ...) and the number of
    generated images, ``<split>/samples``. Distribution metrics compare the generated images with the
    split's real images, paired metrics each with its original, text metrics each with its caption.

    A video run's batches are clips (B, 3, T, H, W): FVD (``ldm.metrics.fvd``) reads each clip whole through
    I3D (``i3d_weights``), the other metrics every frame (per-frame FID and KID over all frames, CLIP score the
    mean over frames, PSNR/SSIM/LPIPS of each frame against the real one); ``<split>/samples`` counts clips.

    Each generated sample is seeded by its data key, so with the whole split (``max_samples: null``)
    the figures are the same for any number of ranks. ``max_samples`` caps the split samples generated
    from, ``draws`` samples each; the reference is the same samples' real images, or with
    ``full_reference`` the whole split's (a paper's "FID-5k against the 10k test set"; 50k with draws 5).
    The real images' features are computed once and cached in ``cache_dir`` under the data module's
    description of the split (every shard file with its size and modification time, resolution, ...), the
    sample cap, the clips' frame count, the feature kind and the extractors' weights, so edited shards never
    reuse stale statistics. With ``reference``, an ADM reference batch (``VIRTUAL_imagenet256_labeled.npz``), the
    distribution metrics compare with it instead: its published statistics as they are, its images (dealt
    to the ranks) where features are needed, so the figures compare with the papers'. A metric whose weights
    (Inception, CLIP, LPIPS) are not on the machine, with no way to download them, is disabled with one log
    line naming the option to set (FVD without I3D: ``i3d_weights``), and the others run.
    """

    def __init__(
        self,
        metrics: list[SampleMetric] | None = None,  # ldm.metrics classes; None: [FID]
        inception_weights: str | None = None,  # local FID Inception file; None: torch hub's cache, else download
        feature_extractor: nn.Module | None = None,  # replaces Inception, of images and frames (a small net in tests)
        max_samples: int | None = None,  # split samples generated from per evaluation (split over ranks); None: all
        draws: int = 1,  # samples generated per split sample, each from its own noise (FID-50k from a 10k split)
        full_reference: bool = False,  # the whole split is the reference, whatever max_samples (FID-5k vs 10k)
        every_n_validations: int = 1,  # 0: only at test
        cache_dir: str = "~/.cache/ldm/fid_stats",
        reference: str | None = None,  # an ADM reference batch (.npz) in place of the split's real images
        i3d_weights: str | None = None,  # local FVD I3D (i3d_torchscript.pt); None: torch hub's cache, else download
    ) -> None:
        super().__init__()
        self.metrics = [FID()] if metrics is None else list(metrics)
        self.inception_weights, self.i3d_weights, self.extractor = inception_weights, i3d_weights, feature_extractor
        self.max_samples, self.draws, self.full_reference = max_samples, draws, full_reference
        self.every_n_validations = every_n_validations
        self.cache = ReferenceCache(cache_dir)
        if reference is not None and not is_reference_batch(reference):
            raise ValueError(f"reference of SampleMetrics: {reference} is not an ADM reference batch (.npz)")
        self.reference = reference
        self._validations = 0
        self._active = self._loaded = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self._loaded:  # once, whatever the stages run
            self.metrics, self.extractor = load_metrics(self.metrics, self.extractor, self.inception_weights,
                                                        self.i3d_weights)
            extractor = self.extractor
            self._extractor_id = None if extractor is None else state_sha256(extractor)  # names it in cache keys
            self._loaded = True

    # --- per epoch -----------------------------------------------------------------------------
    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> None:
        self._split, self._seen = split, 0
        for module in (self.extractor, *self.metrics):  # here, not in setup: the strategy moves pl_module after setup
            if module is not None:
                module.to(pl_module.device).eval()
        self._evaluation = Evaluation(self.metrics, self.extractor)
        self._key, self._keyed = None, False  # the split's key waits for the first batch (a clip's frame count)
        if self.reference is not None:
            self._use_cache(trainer, pl_module, self._reference_key(trainer, split))
            self._evaluation.use_statistics(read_statistics(self.reference), image_count(self.reference))
            if self._evaluation.needs_reference:
                self._add_reference_batch(trainer, pl_module)

    def _use_cache(self, trainer: L.Trainer, pl_module: L.LightningModule, key: dict[str, Any] | None) -> None:
        """Take the reference's features cached under ``key`` (None: no caching) where every rank found them."""
        self._key, self._keyed = key, True
        if key is not None:
            cached = self._evaluation.cached_reference(self.cache, key)
            # every rank must take the same path in _finish: use the cache only where all ranks found it
            found = torch.tensor(float(cached is not None), device=pl_module.device)
            if trainer.strategy.reduce(found, reduce_op="min"):
                self._evaluation.reference = cached

    def _add_reference_batch(self, trainer: L.Trainer, pl_module: L.LightningModule, batch_size: int = 50) -> None:
        """The reference batch's images, dealt to the ranks batch by batch, ordered by their index in the file."""
        for i, images in enumerate(read_images(self.reference, batch_size)):
            if i % trainer.world_size == trainer.global_rank:
                order = torch.arange(i * batch_size, i * batch_size + len(images))
                self._evaluation.add_reference(images.to(pl_module.device), order)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validations += not trainer.sanity_checking
        self._active = (
            not trainer.sanity_checking and self.every_n_validations > 0 and self._validations % self.every_n_validations == 0
            and bool(self.metrics)
        )
        if self._active:
            self._start(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._active = bool(self.metrics)
        if self._active:
            self._start(trainer, pl_module, "test")

    def _batch(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict[str, Any]) -> None:
        if not self._active:
            return
        if not self._keyed:  # every rank has a first batch
            shape = batch[B.IMAGE].shape  # (B, 3, [T,] H, W)
            frames = shape[2] if len(shape) == 5 else None
            self._use_cache(trainer, pl_module, self._reference_key(trainer, self._split, frames))
        cap = None if self.max_samples is None else -(-self.max_samples // trainer.world_size)
        size = B.batch_size(batch)
        take = size if cap is None else max(0, min(size, cap - self._seen))  # the batch's samples to generate from
        real = size if self.full_reference else take  # real images the reference takes from it
        if self._evaluation.needs_reference and self.reference is None and real:
            self._evaluation.add_reference(batch[B.IMAGE][:real], _order(batch, real))
        if sharded(trainer.strategy) and self._idle(trainer, pl_module, batch, take):
            return
        if not take:
            return
        batch = B.head(batch, take)
        order = _order(batch, take)
        for draw in range(self.draws):
            images = call_as_forward(trainer.strategy, pl_module, "evaluation_images", batch, draw)  # (B, 3, [T,] H, W)
            self._evaluation.add_generated(images, batch[B.IMAGE], batch.get(B.CAPTION),
                                           None if order is None else order + (draw << 32))
        self._seen += take

    def _idle(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict[str, Any], take: int) -> bool:
        """Under FSDP every rank must generate as often (each backbone unit gathers its parameters collectively),
        yet ranks reach ``max_samples`` on different batches (batch sizes differ: buckets, a short last batch):
        a rank done while another still generates samples one of its batch's conditions, unscored. True if so."""
        wanted = trainer.strategy.reduce(torch.tensor(float(take), device=pl_module.device), reduce_op="max")
        if take or not wanted:
            return False
        for draw in range(self.draws):
            call_as_forward(trainer.strategy, pl_module, "evaluation_images", B.head(batch, 1), draw)
        return True

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch(trainer, pl_module, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch(trainer, pl_module, batch)

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active:
            return
        strategy, evaluation = trainer.strategy, self._evaluation
        reduce = lambda t: strategy.reduce(t.to(pl_module.device), reduce_op="sum")
        gather = strategy.all_gather if trainer.world_size > 1 else None
        fresh = evaluation.needs_reference  # the reference is merged from this evaluation's real images
        values = evaluation.compute(reduce, gather) | {"samples": float(evaluation.samples)}
        if fresh and trainer.is_global_zero and self._key is not None:
            evaluation.save_reference(self.cache, self._key)
        for name, value in values.items():  # equal on all ranks; logged on each, so any rank can monitor them
            pl_module.log(f"{self._split}/{name}", value, sync_dist=True)
        self._active = False

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module)

    def _reference_key(self, trainer: L.Trainer, split: str, frames: int | None = None) -> dict[str, Any] | None:
        """What the split's real features (of clips of ``frames`` frames) depend on, or None (no caching) when the data
        cannot say."""
        data = trainer.datamodule
        if self._evaluation.compared and self.reference is not None:
            return {"data": identify([self.reference]), "extractor": self._extractor_id}
        if not self._evaluation.compared or not isinstance(data, DescribedData):
            return None
        description = data.describe(split)
        whole = self.max_samples is None or self.full_reference
        if whole:  # the whole split: how it is dealt to ranks and batches does not matter
            description.pop("layout", None)
        return {"data": description, "split": split, "max_samples": None if whole else self.max_samples,
                "extractor": self._extractor_id, **({"frames": frames} if frames is not None else {})}
