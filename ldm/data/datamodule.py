"""WebDataModule: img2dataset-layout WebDataset shards as Lightning train/val/test loaders."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from ldm.data import batch as B
from ldm.data.buckets import AspectBuckets
from ldm.data.collate import DROPPED
from ldm.data.entries import MAP_KINDS, MapKind
from ldm.data.formats import ShardFormat, decoder_for
from ldm.data.images import ANNOTATIONS, ImageDecoder
from ldm.data.latents import LatentCache
from ldm.data.prompts import PromptDataset, RequestBatches
from ldm.data.shards import expand_shards, identify, unreadable_shards
from ldm.data.stream import PADDED, EpochLoader, ShardStream

log = logging.getLogger(__name__)
# the least value each numeric option takes (None, where allowed, means its default)
LOWEST = {"batch_size": 1, "eval_batch_size": 1, "num_workers": 0, "resolution": 1, "shuffle_buffer": 0, "epoch_length": 1,
          "predict_width": 1, "predict_height": 1}


class WebDataModule(L.LightningDataModule):
    """Streams batches {key, image, caption, label?, original_size, crop_coords, extra maps} from shards;
    with ``buckets``, each batch of one aspect-ratio bucket, which it carries as target_size.

    Shard patterns take brace ranges (`shards-{0000..0099}.tar`), globs, and any URL webdataset
    opens (`pipe:`, http(s)). Every rank yields the same number of batches per epoch; corrupt samples,
    samples lacking a required annotation and shards that do not open are skipped and counted
    (`data/skipped` in the logger). Settings that cannot work are refused here, before any training.
    A split whose shards are a latent cache (tools/cache_latents.py; its cache.json beside them) yields
    {key, latent_mean, latent_std, caption, label?, maps and text embeddings at latent size} instead:
    the shards say which decoder they need: the first of ``formats`` that recognises them, else images.
    """

    def __init__(
        self,
        train: str | None = None,  # shard pattern of the training split
        val: str | None = None,  # shard pattern of the validation split
        test: str | None = None,  # shard pattern of the test split
        predict: str | None = None,  # .txt (a prompt per line) or .jsonl generation requests (with width, height)
        predict_width: int | None = None,  # the size of requests that give none (default: the square resolution)
        predict_height: int | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,  # val/test batch size (default: batch_size)
        num_workers: int = 4,
        resolution: int = 256,  # square output side; with buckets, the side of the square of their area
        buckets: AspectBuckets | None = None,  # aspect-ratio buckets, e.g. {max_ratio: 2.0, multiple: 64}; None: square crops
        crop: Literal["center", "random"] = "random",  # training crop; val/test always center
        hflip: bool = False,  # random horizontal flips in training
        extra_keys: dict[str, MapKind] | None = None,  # maps every sample carries, by kind (ldm.data.entries.MAP_KINDS): {seg.png: class} -> key "seg"
        require: tuple[str, ...] = (B.CAPTION,),  # annotations every sample must carry (caption, label); others optional
        shuffle_buffer: int = 1000,  # training samples held for shuffling (0: off)
        resampled: bool = False,  # training: draw shards with replacement forever
        epoch_length: int | None = None,  # batches per rank and epoch when resampled
        seed: int = 0,
        pin_memory: bool = True,
        formats: list[ShardFormat] | None = None,  # shard kinds read besides images, each recognising its own (None: [LatentCache])
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["formats"])
        self.formats = [LatentCache()] if formats is None else list(formats)
        _check_options(self.hparams)
        self.patterns = {"train": train, "val": val, "test": test}
        self.resolution = resolution  # the side of every square image it yields (tools and the CLI's checks read it)
        self.buckets = None if buckets is None else buckets.sizes(resolution)  # (H, W) of each bucket
        self._prompts: PromptDataset | None = None
        self.skipped: Counter[str] = Counter()  # reason -> samples, filled by the loaders
        self._reported = 0  # skips already reported
        self._datasets: dict[str, ShardStream] = {}

    def setup(self, stage: str) -> None:
        if stage == "predict":
            self.prompts()
            return
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}[stage]
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        hp = self.hparams
        for split in splits:
            if self.patterns[split] is None:
                continue
            train, urls = split == "train", self._readable_shards(split)
            self._datasets[split] = ShardStream(
                urls,
                decoder_for(urls, self.image_decoder(train), self.formats),
                batch_size=hp.batch_size if train else hp.eval_batch_size or hp.batch_size,
                rank=rank,
                world_size=world,
                workers=hp.num_workers,
                shuffle_buffer=hp.shuffle_buffer if train else 0,
                seed=hp.seed,
                resampled=hp.resampled and train,
                epoch_length=hp.epoch_length if train else None,
            )

    def prompts(self) -> PromptDataset:
        """The prediction requests (read once), each with the size it asks for."""
        hp = self.hparams
        if hp.predict is None:
            raise ValueError("WebDataModule: predict needs a prompt file (set data.init_args.predict)")
        if self._prompts is None:
            maps = {B.map_key(entry): kind for entry, kind in (hp.extra_keys or {}).items()}
            size = (hp.predict_width or self.resolution, hp.predict_height or self.resolution)
            self._prompts = PromptDataset(hp.predict, size, maps)
        return self._prompts

    def image_decoder(self, train: bool) -> ImageDecoder:
        """How this module decodes image shards: training's crop and flips, or evaluation's center crop
        (val, test, and what tools/cache_latents.py encodes)."""
        hp = self.hparams
        return ImageDecoder(resolution=self.resolution, crop=hp.crop if train else "center", hflip=hp.hflip and train,
                            extra_keys=dict(hp.extra_keys or {}), require=tuple(hp.require), buckets=self.buckets)

    def _readable_shards(self, split: str) -> list[str]:
        """The split's shards less those that do not open: each left out with one warning and counted as skipped."""
        urls = expand_shards(self.patterns[split])
        bad = unreadable_shards(urls)
        if len(bad) == len(urls):
            raise ValueError(f"data.init_args.{split}: no shard of {self.patterns[split]!r} is readable, "
                             f"e.g. {next(iter(bad.values()))}")
        for reason in bad.values():
            log.warning("left out of the epoch: %s", reason)
            self.skipped[reason] += 1
        return [url for url in urls if url not in bad]

    def describe(self, split: str) -> dict[str, Any]:
        """What the split's evaluation images are made of, for caches keyed by content (FID reference
        statistics): every shard file with its size and modification time, and the decoding settings.
        How samples are dealt to ranks, workers and batches is included: it decides which come first."""
        pattern = self.patterns.get(split)
        if pattern is None:
            raise ValueError(f"WebDataModule: no {split} shards configured (set data.init_args.{split})")
        hp = self.hparams
        world = self.trainer.world_size if self.trainer else 1
        return {"files": identify(expand_shards(pattern)), "resolution": hp.resolution, "crop": "center", "require": sorted(hp.require),
                **({"buckets": [list(b) for b in self.buckets]} if self.buckets else {}),
                "formats": [[type(f).__qualname__, vars(f)] for f in self.formats],  # e.g. VideoClips' frames, stride
                "layout": [world, hp.num_workers, hp.eval_batch_size or hp.batch_size]}

    def _loader(self, split: str) -> EpochLoader:
        if split not in self._datasets:
            raise ValueError(f"WebDataModule: no {split} shards configured (set data.init_args.{split})")
        workers = self.hparams.num_workers
        trainer = self.trainer
        return EpochLoader(
            self._datasets[split],
            skipped=self.skipped,
            epoch=(lambda: trainer.current_epoch) if trainer is not None else None,  # shuffles follow the trainer's epoch
            batch_size=None,  # batches are made in the workers, to give every rank the same count
            num_workers=workers,
            pin_memory=self.hparams.pin_memory and torch.cuda.is_available(),
            persistent_workers=False,  # a fresh copy per epoch carries the new epoch number
            prefetch_factor=4 if workers else None,
        )

    def train_dataloader(self) -> EpochLoader:
        return self._loader("train")

    def val_dataloader(self) -> EpochLoader:
        return self._loader("val")

    def test_dataloader(self) -> EpochLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        """Requests in batches of one size each (see RequestBatches)."""
        return DataLoader(RequestBatches(self.prompts(), self.hparams.eval_batch_size or self.hparams.batch_size), batch_size=None)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Report the samples skipped so far (log scalar + warning) whenever the count grows."""
        total = sum(n for reason, n in self.skipped.items() if reason != PADDED and not reason.endswith(DROPPED))
        if sum(self.skipped.values()) > self._reported:
            self._reported = sum(self.skipped.values())
            log.warning("data: %d samples skipped so far (%s)", total, dict(self.skipped))
            if self.trainer is not None and self.trainer.logger is not None:
                self.trainer.logger.log_metrics({"data/skipped": total}, step=self.trainer.global_step)
        return batch


def _check_options(hp: Mapping[str, Any]) -> None:
    """Refuse settings that cannot work, naming each as its config key."""
    for name, lowest in LOWEST.items():
        if hp[name] is not None and hp[name] < lowest:
            raise ValueError(f"data.init_args.{name} must be at least {lowest}, got {hp[name]}")
    if hp["resampled"] and hp["epoch_length"] is None:
        raise ValueError("data.init_args.resampled: true needs data.init_args.epoch_length (batches per rank and epoch)")
    unknown = [key for key in hp["require"] if key not in ANNOTATIONS]
    if unknown:
        raise ValueError(f"data.init_args.require: {unknown} not among the annotations {list(ANNOTATIONS)}")
    kinds = list(MAP_KINDS)
    extra = hp["extra_keys"] or {}
    if not isinstance(extra, Mapping) or any(kind not in kinds for kind in extra.values()):
        raise ValueError(f"data.init_args.extra_keys maps each entry to its kind ({' or '.join(kinds)}), "
                         f"e.g. {{seg.png: class}}; got {extra!r}")
