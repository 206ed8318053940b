"""An IterableDataset of ready batches streamed from WebDataset shards, and the loader that resumes it exactly."""

from __future__ import annotations

import copy
import hashlib
import logging
import random
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ldm.data import batch as B
from ldm.data.collate import collate
from ldm.data.decoder import SampleDecoder, SkipSample
from ldm.data.reader import Position, PositionReader, ShuffleBuffer
from ldm.data.shards import (
    Part,
    WorkerPlan,
    bucket_of_samples,
    count_samples,
    deal,
    in_buckets,
    plan_bucketed_epoch,
    plan_epoch,
    sample_sizes,
)

log = logging.getLogger(__name__)
SKIPPED = "_skipped"  # batch entry: {reason: count} since this worker's previous batch
WORKER = "_worker"  # batch entry: the (logical) worker that made the batch
POSITION = "_position"  # batch entry: where its worker stands after it
PADDED = "repeated to keep ranks in step"  # a reason that is not a skip: see ShardStream.batches
BEYOND_BUCKET = "beyond its bucket's planned count (json width/height not the image's?)"
MAX_SKIP_WARNINGS = 10  # per worker and epoch; the counts keep going


class ShardStream(IterableDataset):
    """Batches from shards, each rank yielding the same number per epoch.

    Finite mode reads every sample once per epoch following `plan_epoch` (the shard order reshuffled
    each epoch when training shuffles); resampled mode draws shards with replacement forever and cuts
    epochs of `epoch_length` batches per rank. What a worker yields depends only on the seed, the
    epoch, the rank and the worker; a sample's random crop and flip depend on the seed, the epoch and
    the sample alone.

    Every batch carries its worker's position after it (``POSITION``: what is left to read, the
    shuffle buffer's samples and RNG state, the samples held for unfilled buckets), so a resumed epoch
    reopens each shard where its worker stood, seeking to the sample in an uncompressed local tar,
    and decodes nothing twice (see EpochLoader). A compressed or remote shard is read from its start
    and the samples before the position are passed over undecoded.

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
        self.shard_of = {url: i for i, url in enumerate(urls)}
        self.fingerprint = hashlib.sha1("\n".join(urls).encode()).hexdigest()[:16]  # which shards positions refer to
        self.epoch = 0
        self.positions: list[dict[str, Any] | None] = [None] * self.workers  # where each worker resumes (None: its start)
        self.rotation = 0  # DataLoader worker p plays worker (p + rotation) % workers
        self._plans: tuple[int, list[WorkerPlan] | None] | None = None  # (epoch, this rank's slots), computed once

    def plan(self, worker: int) -> tuple[list[Part] | None, list[int], list[int] | None]:
        """The parts (None in resampled mode), batch sizes and batch buckets (None unless planned) of worker
        ``worker`` in this epoch."""
        if self.counts is None:
            return None, [self.batch_size] * (self.epoch_length // self.workers + (worker < self.epoch_length % self.workers)), None
        if self._plans is None or self._plans[0] != self.epoch:
            shuffle = f"{self.seed}/{self.epoch}" if self.shuffle_buffer else None
            layout = (self.world_size, self.workers, self.batch_size, shuffle)
            if self.sample_buckets is None:
                plans = plan_epoch(self.urls, self.counts, *layout)
            else:
                plans = plan_bucketed_epoch(self.urls, self.counts, self.sample_buckets, len(self.bucket_index), *layout)
            self._plans = (self.epoch, plans[self.rank])
        plan = self._plans[1][worker]
        return list(plan.parts), list(plan.sizes), None if plan.buckets is None else list(plan.buckets)

    def __len__(self) -> int:
        return sum(len(self.plan(w)[1]) for w in range(self.workers))

    def start(self, worker: int, plan: WorkerPlan | None = None) -> dict[str, Any]:
        """The position of worker ``worker`` before its first batch of this epoch: its own plan's, or ``plan``'s."""
        parts, sizes, buckets = self.plan(worker) if plan is None else (list(plan.parts), list(plan.sizes), plan.buckets)
        if parts is not None and self.shuffle_buffer:
            random.Random(self._seed(worker, "shards")).shuffle(parts)
        queues: dict[int, list[int]] = defaultdict(list)
        for bucket, size in zip(buckets or (), sizes):
            if size:  # an empty batch keeps the ranks in step: the worker repeats a sample
                queues[bucket].append(size)
        return {"batches": 0, "sizes": list(sizes), "queues": None if buckets is None else [[b, q] for b, q in queues.items()],
                "parts": None if parts is None else [[self.shard_of[p.url], p.start, p.stop, 0 if p.start == 0 else -1] for p in parts],
                "draw": 0, "index": 0, "byte": -1, "buffer": [], "draining": False, "rng": None, "held": [], "last": None}

    def rest_of_epoch(self, positions: list[dict[str, Any]], offset: int) -> list[dict[str, Any]]:
        """This rank's workers' starting positions for the rest of an epoch that another layout of ranks and
        workers began (an elastic resume): every sample the old workers had left (unread, in a shuffle buffer
        or held for a bucket), dealt once over this layout. Resampled streams owe no sample: each rank goes
        on with fresh draws for the batches its epoch has left (``offset`` delivered)."""
        if self.counts is None:
            owed = max(self.epoch_length - offset, 0)
            return [{**self.start(w), "sizes": [self.batch_size] * (owed // self.workers + (w < owed % self.workers))}
                    for w in range(self.workers)]
        segments = []
        for at in positions:
            singles = [pos for _, held in at["held"] for pos in held] + at["buffer"]
            segments += [Part(self.urls[s], i, i + 1) for s, i, _, _ in singles] + [Part(self.urls[s], a, b) for s, a, b, _ in at["parts"]]
        left = _merged(segments, self.shard_of)
        total = sum(p.stop - p.start for p in left)
        if total < self.world_size:
            raise ValueError(f"the interrupted epoch has {total} samples left, fewer than the {self.world_size} ranks to deal them "
                             f"to: resume on at most {max(total, 1)} ranks, or from an earlier checkpoint")
        plans = deal(left, self.world_size, self.workers, self.batch_size)
        if self.sample_buckets is not None:
            plans = in_buckets(plans, dict(zip(self.urls, self.sample_buckets)), len(self.bucket_index), self.batch_size)
        return [self.start(w, plans[self.rank][w]) for w in range(self.workers)]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = ((info.id if info is not None else 0) + self.rotation) % self.workers
        return self.batches(worker)

    def batches(self, worker: int) -> Iterator[dict[str, Any]]:
        """The batches worker ``worker`` of this rank yields this epoch from its position (``positions[worker]``)."""
        at = copy.deepcopy(self.positions[worker]) if self.positions[worker] is not None else self.start(worker)
        skipped: Counter[str] = Counter()
        reader = PositionReader(self.urls, skipped, at["parts"], self._seed(worker, "shards"), at["draw"], at["index"], at["byte"])
        raw: Iterator[tuple[Position, dict[str, Any]]] = iter(reader)
        shuffler = None
        if self.shuffle_buffer:
            rng = random.Random(self._seed(worker, "buffer"))
            if at["rng"] is not None:
                version, state, gauss = at["rng"]
                rng.setstate((version, tuple(state), gauss))
            shuffler = ShuffleBuffer(self.shuffle_buffer, rng, list(reader.read_at(at["buffer"])), at["draining"])
            raw = shuffler(raw)
        samples = self._decode(raw, worker, skipped)
        held = {bucket: list(self._decode(reader.read_at(positions), worker, skipped)) for bucket, positions in at["held"]}
        queues = None if at["queues"] is None else {bucket: deque(sizes) for bucket, sizes in at["queues"]}
        if self.bucket_index is None:
            groups = (list(islice(samples, size)) for size in at["sizes"])
        else:
            groups = self._by_bucket(samples, held, queues, skipped)
        last, sizes, done = at["last"], at["sizes"], at["batches"]

        def position(formed: int) -> dict[str, Any]:  # where the worker stands, ``formed`` batches into ``sizes``
            return {"batches": done + formed, "sizes": sizes[formed:], "last": last,
                    "queues": None if queues is None else [[b, list(q)] for b, q in queues.items()],
                    "held": [[b, [pos for pos, _ in items]] for b, items in held.items()], **reader.state(),
                    **(shuffler.state() if shuffler else {"buffer": [], "draining": False, "rng": None})}

        # one batch of lookahead: the skips behind a worker's final batch are reported with it; each batch
        # otherwise carries the skips before it, and its position from when it formed, so none counts twice
        pending: tuple[list, Counter[str], int] | None = None
        for index in range(len(sizes)):
            batch = next(groups, [])
            if not batch:  # skips left this worker short
                if self.world_size == 1:
                    break
                if last is None:  # nothing to repeat: fail rather than hang the other ranks
                    raise RuntimeError(f"rank {self.rank} worker {worker}: no readable sample in its shards")
                batch = list(self._decode(reader.read_at([last]), worker, skipped))  # DDP needs every rank to
                skipped[PADDED] += 1  # step: repeat a sample, as DistributedSampler pads
            if pending is not None:
                yield {**self._emit(*pending), WORKER: worker}
            last = batch[-1][0]
            pending = (batch, skipped.copy(), position(index + 1))
            skipped.clear()
        if reader.parts is not None:  # finite: read to the end, trailing bad samples get counted too
            for _ in samples:
                skipped["beyond the planned count"] += 1
        if pending is not None:
            batch, counts, at = pending
            yield {**self._emit(batch, counts + skipped, position(at["batches"] - done)), WORKER: worker}

    def _seed(self, worker: int, stream: str) -> str:
        return f"{self.seed}/{self.epoch}/{self.rank}/{worker}/{stream}"

    def _by_bucket(self, samples: Iterator[tuple[Position, dict[str, Any]]], held: dict[int, list],
                   queues: dict[int, deque[int]] | None, skipped: Counter[str]) -> Iterator[list]:
        """Batches of one bucket each, in the order they fill: to the planned sizes (``queues``: each bucket's
        batches to come), then the planned buckets' leftovers (short of their plan after skips); with no plan,
        full batches forever. ``held`` holds each bucket's samples until its batch fills."""
        for item in samples:
            bucket = self.bucket_index.get(tuple(item[1][B.TARGET_SIZE].tolist()), -1)
            if queues is not None and not queues.get(bucket):
                skipped[BEYOND_BUCKET] += 1
                continue
            held.setdefault(bucket, []).append(item)
            if len(held[bucket]) == (self.batch_size if queues is None else queues[bucket][0]):
                if queues is not None:
                    queues[bucket].popleft()
                yield held.pop(bucket)
        for bucket in list(held):
            yield held.pop(bucket)

    def _emit(self, batch: list[tuple[Position, dict[str, Any]]], skipped: Counter[str], position: dict[str, Any]) -> dict[str, Any]:
        """The collated batch with its skip counts and its worker's position after it."""
        collated, dropped = collate([sample for _, sample in batch])  # an optional key some samples lack leaves the batch, counted
        return {**collated, SKIPPED: dict(skipped + dropped), POSITION: _Carried(position)}

    def _decode(self, raw: Iterator[tuple[Position, dict[str, Any]]], worker: int,
                skipped: Counter[str]) -> Iterator[tuple[Position, dict[str, Any]]]:
        """Decoded samples with their positions; each sample's randomness (crop, flip) seeded by the sample."""
        warned = 0  # `skipped` restarts with every batch: this counts the whole epoch
        for position, sample in raw:
            shard, index, draw, _ = position
            own = f"{self.seed}/{self.epoch}/{shard}/{index}" + (f"/{self.rank}/{worker}/{draw}" if draw >= 0 else "")
            try:
                yield position, self.decoder(sample, random.Random(own))
            except SkipSample as err:
                skipped[str(err)] += 1
                warned += 1
                if warned <= MAX_SKIP_WARNINGS:
                    log.warning("skipped sample %s in %s: %s", sample.get("__key__"), sample.get("__url__"), err)


@dataclass(frozen=True)
class _Carried:
    """A value a batch carries to the loader untouched: the DataLoader's conversion and pinning walk into lists and
    dicts (a position's thousand-entry buffer, every batch), not into this."""

    value: Any


def _merged(segments: list[Part], shard_of: dict[str, int]) -> list[Part]:
    """The segments in shard order, adjacent runs of one shard joined (an elastic resume reads few runs)."""
    out: list[Part] = []
    for part in sorted(segments, key=lambda p: (shard_of[p.url], p.start)):
        if out and out[-1].url == part.url and out[-1].stop == part.start:
            out[-1] = Part(part.url, out[-1].start, part.stop)
        elif part.stop > part.start:
            out.append(part)
    return out


class EpochLoader(DataLoader):
    """A DataLoader over a ShardStream whose position is saved in checkpoints and restored exactly.

    Each iteration is one epoch, numbered by ``epoch`` (the trainer's epoch; without one, the loader
    counts its own iterations). The workers' skip counts and positions travel inside their batches and
    are taken out here (``skipped``). ``state_dict`` records, for every rank (gathered under DDP), each
    worker's position after its last delivered batch and which worker delivers next; after
    ``load_state_dict`` the epoch's iteration reopens every worker where it stood and rotates the workers
    so the next batch comes from the worker that was next: the remaining batches arrive in the same
    order as without the interruption, and start-up does not grow with the position in the epoch.
    Lightning saves and restores this state with the checkpoint.

    A checkpoint of another layout (number of ranks or workers) resumes elastically: what every old
    worker had left of the epoch is dealt once over the new ranks and workers, and the epoch's length
    becomes the batches already delivered plus the new share.
    """

    def __init__(self, dataset: ShardStream, skipped: Counter[str] | None = None,
                 epoch: Callable[[], int] | None = None, **kwargs: Any) -> None:
        # its own generator: creating an iterator draws the workers' base seed from it, not from the global RNG
        super().__init__(dataset, generator=torch.Generator().manual_seed(0), **kwargs)
        self.skipped: Counter[str] = Counter() if skipped is None else skipped  # reason -> samples, all epochs
        self.iterations = 0
        self.epoch = epoch or (lambda: self.iterations)
        self._position: dict[str, Any] = {"epoch": 0, "next": 0, "offset": 0, "workers": [None] * dataset.workers}
        self._restored: dict[str, Any] | None = None  # a checkpoint's state, until its epoch starts
        self._resumed: tuple[int, dict[str, Any] | None] | None = None  # (epoch, where this rank resumes in it)

    def __len__(self) -> int:
        resumed = self._resume(self.epoch())
        if resumed is None:
            return len(self.dataset)
        return resumed["offset"] + sum(at["batches"] + len(at["sizes"]) for at in resumed["workers"])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.epoch()
        resumed = self._resume(epoch) or {"next": 0, "offset": 0, "workers": [None] * self.dataset.workers}
        self._restored = self._resumed = None
        self.iterations += 1
        workers = self.dataset.workers
        position = self._position = {"epoch": epoch, **copy.deepcopy(resumed)}
        self.dataset.epoch, self.dataset.rotation = epoch, position["next"]
        self.dataset.positions = copy.deepcopy(position["workers"])
        for batch in super().__iter__():
            worker, at = batch.pop(WORKER), batch.pop(POSITION).value
            self.skipped.update(batch.pop(SKIPPED))
            position["workers"][worker] = at
            position["next"] = (worker + 1) % workers
            yield batch

    def _resume(self, epoch: int) -> dict[str, Any] | None:
        """Where this rank resumes in ``epoch``: the checkpoint's position when it was taken in that epoch (its
        own rank's, or an elastic share of every rank's), else None (the epoch starts from its beginning)."""
        if self._resumed is None or self._resumed[0] != epoch:
            state, dataset = self._restored, self.dataset
            resumed = None
            if state is not None and state["epoch"] == epoch:
                dataset.epoch = epoch
                ranks = state["ranks"]
                if len(ranks) == dataset.world_size and all(len(r["workers"]) == dataset.workers for r in ranks):
                    resumed = {k: ranks[dataset.rank][k] for k in ("next", "offset", "workers")}
                else:
                    done = {r["offset"] + sum(at["batches"] for at in r["workers"]) for r in ranks}
                    if len(done) != 1:
                        raise ValueError(f"the checkpoint's ranks delivered different numbers of batches ({sorted(done)}): "
                                         f"it cannot be resumed with another number of ranks or workers")
                    offset = done.pop()
                    old = [at for r in ranks for at in r["workers"]]
                    resumed = {"next": 0, "offset": offset, "workers": dataset.rest_of_epoch(old, offset)}
            self._resumed = (epoch, resumed)
        return self._resumed[1]

    def state_dict(self) -> dict[str, Any]:
        """The epoch and every rank's position and skip counts (a collective under DDP)."""
        own = copy.deepcopy(self._position)
        for worker, at in enumerate(own["workers"]):
            if at is None:  # not started: its whole share is left
                self.dataset.epoch = own["epoch"]
                own["workers"][worker] = self.dataset.start(worker)
        own = {**own, "skipped": dict(self.skipped)}
        ranks = [own]
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            ranks = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, own)
        return {"epoch": own["epoch"], "shards": self.dataset.fingerprint, "ranks": ranks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "ranks" not in state:
            raise ValueError("the checkpoint's data position is in the replay format of earlier ldm versions: resume "
                             "it with that version, or start the epoch anew (fit from its weights)")
        if state["shards"] != self.dataset.fingerprint:
            raise ValueError("the checkpoint's data position refers to another list of training shards than "
                             "data.init_args.train gives now: resume with the same shards")
        self._restored, self._resumed = state, None
        ranks = state["ranks"]
        self.skipped.clear()
        if self.dataset.rank < len(ranks):
            self.skipped.update(ranks[self.dataset.rank]["skipped"])
