"""An IterableDataset of ready batches streamed from WebDataset shards."""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Iterator
from itertools import islice
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from webdataset.tariterators import tarfile_samples

from ldm.data.shards import Part, WorkerPlan, count_samples, plan_epoch
from ldm.data.transforms import SampleTransform, SkipSample

log = logging.getLogger(__name__)
SKIPPED = "_skipped"  # batch entry: {reason: count} since this worker's previous batch
PADDED = "repeated to keep ranks in step"  # a reason that is not a skip: see ShardStream.batches
MAX_SKIP_WARNINGS = 10  # per worker and epoch; the counts keep going


class ShardStream(IterableDataset):
    """Batches from shards, each rank yielding the same number per epoch.

    Finite mode reads every sample once per epoch following `plan_epoch`; resampled mode draws
    shards with replacement forever and cuts epochs of `epoch_length` batches per rank.
    """

    def __init__(
        self,
        urls: list[str],
        transform: SampleTransform,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 0,
        shuffle_buffer: int = 0,
        seed: int = 0,
        resampled: bool = False,
        epoch_length: int | None = None,
    ) -> None:
        if resampled and not epoch_length:
            raise ValueError("resampled: true needs epoch_length (batches per rank and epoch)")
        self.urls, self.transform, self.batch_size = urls, transform, batch_size
        self.rank, self.world_size, self.workers, self.shuffle_buffer, self.seed = rank, world_size, max(workers, 1), shuffle_buffer, seed
        self.resampled, self.epoch_length = resampled, epoch_length
        self.plans = None if resampled else plan_epoch(urls, count_samples(urls), world_size, self.workers, batch_size)[rank]
        self.epoch = 0

    def __len__(self) -> int:
        return self.epoch_length if self.plans is None else sum(p.batches for p in self.plans)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        return self.batches(info.id if info is not None else 0)

    def batches(self, worker: int) -> Iterator[dict[str, Any]]:
        """The batches DataLoader worker `worker` of this rank yields this epoch."""
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}")
        skipped: Counter[str] = Counter()
        if self.plans is None:
            batches = self.epoch_length // self.workers + (worker < self.epoch_length % self.workers)
            sizes = [self.batch_size] * batches
            raw = self._read_forever(rng, skipped)
        else:
            plan: WorkerPlan = self.plans[worker]
            sizes = _batch_sizes(plan.samples, plan.batches, self.batch_size)
            parts = list(plan.parts)
            if self.shuffle_buffer:
                rng.shuffle(parts)
            raw = self._read_parts(parts, skipped)
        if self.shuffle_buffer:
            raw = _shuffle(raw, self.shuffle_buffer, rng)
        samples = self._decode(raw, rng, skipped)
        last: list[dict[str, Any]] = []
        for size in sizes:
            batch = list(islice(samples, size))
            if not batch:  # skips left this worker short
                if self.world_size == 1:
                    break
                if not last:  # nothing to repeat: fail rather than hang the other ranks
                    raise RuntimeError(f"rank {self.rank} worker {worker}: no readable sample in its shards")
                batch = last[-1:]  # DDP needs every rank to step: repeat a sample, as DistributedSampler pads
                skipped[PADDED] += 1
            if last:  # one batch of lookahead, so the skips behind the final batch are reported with it
                yield self._collate(last, skipped)
            last = batch
        if self.plans is not None:  # finite: read to the end, trailing bad samples get counted too
            for _ in samples:
                skipped["beyond the planned count"] += 1
        if last:
            yield self._collate(last, skipped)

    @staticmethod
    def _collate(batch: list[dict[str, Any]], skipped: Counter[str]) -> dict[str, Any]:
        out = default_collate(batch)
        out[SKIPPED] = dict(skipped)
        skipped.clear()
        return out

    def _read_parts(self, parts: list[Part], skipped: Counter[str]) -> Iterator[dict[str, Any]]:
        for part in parts:
            for i, sample in enumerate(tarfile_samples([{"url": part.url}], handler=_tar_handler(skipped, part.url))):
                if i % part.of == part.index:
                    yield sample

    def _read_forever(self, rng: random.Random, skipped: Counter[str]) -> Iterator[dict[str, Any]]:
        while True:
            url = rng.choice(self.urls)
            yield from tarfile_samples([{"url": url}], handler=_tar_handler(skipped, url))

    def _decode(self, raw: Iterator[dict[str, Any]], rng: random.Random, skipped: Counter[str]) -> Iterator[dict[str, Any]]:
        for sample in raw:
            try:
                yield self.transform(sample, rng)
            except SkipSample as err:
                skipped[str(err)] += 1
                if sum(skipped.values()) <= MAX_SKIP_WARNINGS:
                    log.warning("skipped sample %s in %s: %s", sample.get("__key__"), sample.get("__url__"), err)


def _batch_sizes(samples: int, batches: int, batch_size: int) -> list[int]:
    """`batches` sizes of at most `batch_size` summing to `samples`, full batches first."""
    sizes, left = [], samples
    for j in range(batches):
        sizes.append(max(1, min(batch_size, left - (batches - j - 1))))
        left -= sizes[-1]
    return sizes


def _tar_handler(skipped: Counter[str], url: str):
    """Count an unreadable tar (or its truncated tail) and go on with the next shard."""

    def handle(err: Exception) -> bool:
        skipped[f"unreadable tar data: {type(err).__name__}"] += 1
        log.warning("unreadable data in %s: %s", url, err)
        return True

    return handle


def _shuffle(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Reservoir-style shuffle buffer of `size` items."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


class EpochLoader(DataLoader):
    """A DataLoader over a ShardStream that starts a new epoch on each iteration and keeps the skip counts.

    Lightning's `set_epoch` reaches samplers only; workers receive a copy of the dataset when an
    iteration starts, so bumping the number here reshuffles every epoch. The workers' skip counts
    travel inside their batches; they are taken out here into `skipped`, so whoever iterates the
    loader gets clean batches and the counts alike.
    """

    def __init__(self, dataset: ShardStream, skipped: Counter[str] | None = None, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.skipped: Counter[str] = Counter() if skipped is None else skipped  # reason -> samples, all epochs

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.dataset.epoch += 1
        for batch in super().__iter__():
            self.skipped.update(batch.pop(SKIPPED))
            yield batch
