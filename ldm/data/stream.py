"""An IterableDataset of ready batches streamed from WebDataset shards, and the loader that resumes it exactly."""

from __future__ import annotations

import logging
import random
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from ldm.data import batch as B
from ldm.data.collate import collate
from ldm.data.decoder import SampleDecoder, SkipSample
from ldm.data.shards import (
    Part,
    bucket_of_samples,
    count_samples,
    plan_bucketed_epoch,
    plan_epoch,
    sample_sizes,
)

log = logging.getLogger(__name__)
SKIPPED = "_skipped"  # batch entry: {reason: count} since this worker's previous batch
WORKER = "_worker"  # batch entry: the (logical) worker that made the batch
PADDED = "repeated to keep ranks in step"  # a reason that is not a skip: see ShardStream.batches
BEYOND_BUCKET = "beyond its bucket's planned count (json width/height not the image's?)"
MAX_SKIP_WARNINGS = 10  # per worker and epoch; the counts keep going


class ShardStream(IterableDataset):
    """Batches from shards, each rank yielding the same number per epoch.

    Finite mode reads every sample once per epoch following `plan_epoch` (the shard order reshuffled
    each epoch when training shuffles); resampled mode draws shards with replacement forever and cuts
    epochs of `epoch_length` batches per rank. What a worker yields depends only on the seed, the
    epoch, the rank and the worker, so a resumed epoch replays it exactly (see EpochLoader).

    With a bucketed decoder (``decoder.buckets``; its samples carry their bucket as ``target_size``) a batch
    holds one bucket. Finite mode plans every sample's bucket from its recorded size
    (``plan_bucketed_epoch``); a worker fills each bucket up to its next planned batch size, and a
    bucket's leftovers make one smaller batch, so every sample is still read once an epoch.
    Resampled mode yields full batches of whichever bucket fills first.
    """

    def __init__(
        self,
        urls: list[str],
        decoder: SampleDecoder,  # raw sample -> batch entry: images, or a latent cache's moments
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
        self.urls, self.decoder, self.batch_size = urls, decoder, batch_size
        self.rank, self.world_size, self.workers, self.shuffle_buffer, self.seed = rank, world_size, max(workers, 1), shuffle_buffer, seed
        self.resampled, self.epoch_length = resampled, epoch_length
        self.counts = None if resampled else count_samples(urls)
        buckets = getattr(decoder, "buckets", None)  # a plain function decodes to one size
        self.bucket_index = None if buckets is None else {size: i for i, size in enumerate(buckets)}
        self.sample_buckets = None if buckets is None or resampled else bucket_of_samples(sample_sizes(urls), buckets)
        self.epoch = 0
        self.done = [0] * self.workers  # batches per worker already consumed this epoch: replayed, not yielded
        self.rotation = 0  # DataLoader worker p plays worker (p + rotation) % workers

    def plan(self, worker: int) -> tuple[list[Part] | None, list[int], list[int] | None]:
        """The parts (None in resampled mode), batch sizes and batch buckets (None unless planned) of worker
        ``worker`` in this epoch."""
        if self.counts is None:
            return None, [self.batch_size] * (self.epoch_length // self.workers + (worker < self.epoch_length % self.workers)), None
        shuffle = f"{self.seed}/{self.epoch}" if self.shuffle_buffer else None
        layout = (self.world_size, self.workers, self.batch_size, shuffle)
        if self.sample_buckets is None:
            plan = plan_epoch(self.urls, self.counts, *layout)[self.rank][worker]
        else:
            plan = plan_bucketed_epoch(self.urls, self.counts, self.sample_buckets, len(self.bucket_index), *layout)[self.rank][worker]
        return list(plan.parts), list(plan.sizes), None if plan.buckets is None else list(plan.buckets)

    def __len__(self) -> int:
        return sum(len(self.plan(w)[1]) for w in range(self.workers))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = ((info.id if info is not None else 0) + self.rotation) % self.workers
        return self.batches(worker)

    def batches(self, worker: int) -> Iterator[dict[str, Any]]:
        """The batches worker ``worker`` of this rank yields this epoch, after replaying its first ``done[worker]``."""
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}")
        skipped: Counter[str] = Counter()
        parts, sizes, buckets = self.plan(worker)
        if parts is None:
            raw = self._read_forever(rng, skipped)
        else:
            if self.shuffle_buffer:
                rng.shuffle(parts)
            raw = self._read_parts(parts, skipped)
        if self.shuffle_buffer:
            raw = _shuffle(raw, self.shuffle_buffer, rng)
        samples = self._decode(raw, rng, skipped)
        if self.bucket_index is None:
            groups = (list(islice(samples, size)) for size in sizes)
        else:
            groups = self._by_bucket(samples, None if buckets is None else zip(buckets, sizes), skipped)
        last: list[dict[str, Any]] = []
        for index in range(len(sizes)):
            batch = next(groups, [])
            if not batch:  # skips left this worker short
                if self.world_size == 1:
                    break
                if not last:  # nothing to repeat: fail rather than hang the other ranks
                    raise RuntimeError(f"rank {self.rank} worker {worker}: no readable sample in its shards")
                batch = last[-1:]  # DDP needs every rank to step: repeat a sample, as DistributedSampler pads
                skipped[PADDED] += 1
            if last:  # one batch of lookahead, so the skips behind the final batch are reported with it
                yield from self._emit(last, index - 1, worker, skipped)
            last = batch
        if parts is not None:  # finite: read to the end, trailing bad samples get counted too
            for _ in samples:
                skipped["beyond the planned count"] += 1
        if last:
            yield from self._emit(last, len(sizes) - 1, worker, skipped)

    def _by_bucket(self, samples: Iterator[dict[str, Any]], plan: Iterator[tuple[int, int]] | None,
                   skipped: Counter[str]) -> Iterator[list[dict[str, Any]]]:
        """Batches of one bucket each, in the order they fill: to the planned (bucket, size) batches, then the
        planned buckets' leftovers (short of their plan after skips); with no plan, full batches forever."""
        queues: dict[int, deque[int]] | None = None
        if plan is not None:
            queues = defaultdict(deque)
            for bucket, size in plan:
                if size:  # an empty batch keeps the ranks in step: the caller repeats a sample
                    queues[bucket].append(size)
        held: dict[int, list[dict[str, Any]]] = {}
        for sample in samples:
            bucket = self.bucket_index.get(tuple(sample[B.TARGET_SIZE].tolist()), -1)
            if queues is not None and not queues.get(bucket):
                skipped[BEYOND_BUCKET] += 1
                continue
            held.setdefault(bucket, []).append(sample)
            if len(held[bucket]) == (self.batch_size if queues is None else queues[bucket][0]):
                if queues is not None:
                    queues[bucket].popleft()
                yield held.pop(bucket)
        yield from held.values()

    def _emit(self, batch: list[dict[str, Any]], index: int, worker: int, skipped: Counter[str]) -> Iterator[dict[str, Any]]:
        """The collated batch with its worker and skip counts; nothing for a batch consumed before a resume."""
        counts = skipped.copy()
        skipped.clear()
        if index >= self.done[worker]:
            collated, dropped = collate(batch)  # an optional key some samples lack leaves the batch, counted
            yield {**collated, SKIPPED: dict(counts + dropped), WORKER: worker}

    def _read_parts(self, parts: list[Part], skipped: Counter[str]) -> Iterator[dict[str, Any]]:
        for part in parts:
            samples = tarfile_samples([{"url": part.url}], handler=_tar_handler(skipped, part.url))
            yield from islice(samples, part.start, part.stop)

    def _read_forever(self, rng: random.Random, skipped: Counter[str]) -> Iterator[dict[str, Any]]:
        while True:
            url = rng.choice(self.urls)
            yield from tarfile_samples([{"url": url}], handler=_tar_handler(skipped, url))

    def _decode(self, raw: Iterator[dict[str, Any]], rng: random.Random, skipped: Counter[str]) -> Iterator[dict[str, Any]]:
        warned = 0  # `skipped` restarts with every batch: this counts the whole epoch
        for sample in raw:
            try:
                yield self.decoder(sample, rng)
            except SkipSample as err:
                skipped[str(err)] += 1
                warned += 1
                if warned <= MAX_SKIP_WARNINGS:
                    log.warning("skipped sample %s in %s: %s", sample.get("__key__"), sample.get("__url__"), err)


def _tar_handler(skipped: Counter[str], url: str):
    """Count an unreadable tar (or its truncated tail) once and go on with the next shard.

    webdataset reports a truncated tail twice (the member's data, then the next header): one count.
    """
    reported = False

    def handle(err: Exception) -> bool:
        nonlocal reported
        if not reported:
            skipped[f"unreadable tar data: {type(err).__name__}"] += 1
            log.warning("unreadable data in %s: %s", url, err)
            reported = True
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
    """A DataLoader over a ShardStream whose position is saved in checkpoints and restored exactly.

    Each iteration is one epoch, numbered by ``epoch`` (the trainer's epoch; without one, the loader
    counts its own iterations). The workers' skip counts travel inside their batches and are taken out
    here into ``skipped``. ``state_dict`` records the
    epoch, how many batches each worker has delivered and which worker delivers next; after
    ``load_state_dict``, the epoch's iteration replays (decodes and drops) what was delivered and
    rotates the workers so the next batch comes from the worker that was next: the remaining batches
    arrive in the same order as without the interruption. Lightning saves and restores this state
    with the checkpoint (a loader with ``state_dict``/``load_state_dict`` is resumable to it).
    """

    def __init__(self, dataset: ShardStream, skipped: Counter[str] | None = None,
                 epoch: Callable[[], int] | None = None, **kwargs: Any) -> None:
        # its own generator: creating an iterator draws the workers' base seed from it, not from the global RNG
        super().__init__(dataset, generator=torch.Generator().manual_seed(0), **kwargs)
        self.skipped: Counter[str] = Counter() if skipped is None else skipped  # reason -> samples, all epochs
        self.iterations = 0
        self.epoch = epoch or (lambda: self.iterations)
        workers = dataset.workers
        self._position = {"epoch": 0, "done": [0] * workers, "next": 0}
        self._restored: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch, restored, self._restored = self.epoch(), self._restored, None
        self.iterations += 1
        workers = self.dataset.workers
        resumed = restored is not None and restored["epoch"] == epoch  # else a new epoch starts from its beginning
        position = {"epoch": epoch, "done": list(restored["done"]) if resumed else [0] * workers,
                    "next": restored["next"] if resumed else 0}
        self._position = position
        self.dataset.epoch, self.dataset.done, self.dataset.rotation = epoch, list(position["done"]), position["next"]
        for batch in super().__iter__():
            worker = batch.pop(WORKER)
            self.skipped.update(batch.pop(SKIPPED))
            position["done"][worker] += 1
            position["next"] = (worker + 1) % workers
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {**self._position, "done": list(self._position["done"]), "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restored = state
        self.skipped.clear()
        self.skipped.update(state["skipped"])
