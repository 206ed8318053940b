"""Shard lists and the epoch plan that splits them across ranks and workers.

WebDataset's usual `split_by_node` / `split_by_worker` hand out whole shards, so ranks see
different sample counts when shards do not divide evenly, and DDP hangs on the rank that runs
out first. The plan below counts the samples of every shard once, cuts shards into interleaved
parts when there are fewer shards than readers, balances parts over every (rank, worker) slot,
and gives each worker a batch quota so that every rank yields the same number of batches while
every sample is read exactly once.
"""

from __future__ import annotations

import glob
import io
import json
import os
import random
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from ldm.data import entries as E
from ldm.data.buckets import Size, bucket_batches, bucket_quota, nearest

INDEX_NAME = "shardindex.json"  # wids-style index: {"shardlist": [{"url": ..., "nsamples": ..., "sizes": [[H, W], ...]}]}


def is_remote(url: str) -> bool:
    """True for URLs webdataset opens itself (`pipe:`, http(s), s3, gs, ...)."""
    return url.startswith("pipe:") or "://" in url


def expand_shards(pattern: str) -> list[str]:
    """Brace-expand (and glob, for local paths) a shard pattern; fail naming it if nothing exists."""
    urls: list[str] = []
    for url in expand_urls(pattern):
        if is_remote(url):
            urls.append(url)
        elif glob.has_magic(url):
            urls.extend(sorted(glob.glob(url)))
        else:
            urls.append(url)
    local_missing = [u for u in urls if not is_remote(u) and not os.path.isfile(u)]
    if not urls or len(local_missing) == len(urls):
        raise FileNotFoundError(f"shard pattern {pattern!r} matches no shard")
    if local_missing:
        raise FileNotFoundError(
            f"shard pattern {pattern!r}: {len(local_missing)} of {len(urls)} shards missing, e.g. {local_missing[:3]}"
        )
    return urls


def identify(urls: list[str]) -> list[str | list]:
    """Each local file as [resolved path, size, modification time in ns] (remote URLs as they are): what caches
    keyed by content compare. The path is resolved through symlinks, so the same shards reached through a linked
    folder (a git worktree's `data/`) hit the same cache; a rewritten file, or a link moved to other data, does not."""
    return [url if is_remote(url) else [os.path.realpath(url), os.path.getsize(url), os.stat(url).st_mtime_ns]
            for url in urls]


class UnreadableShard(ValueError):
    """A local shard that does not open as a tar archive; the message names the file."""


def _open_tar(path: str) -> tarfile.TarFile:
    """Open a local tar (plain or gz/bz2/xz) for reading; failure raises UnreadableShard naming it."""
    try:
        return tarfile.open(path, "r:*")
    except tarfile.ReadError:  # no compression tried makes a tar of it
        detail = "empty file" if os.path.getsize(path) == 0 else "not a tar archive"
    except (tarfile.TarError, OSError) as err:
        detail = f"{type(err).__name__}: {err}"
    raise UnreadableShard(f"unreadable shard {path}: {detail}")


def unreadable_shards(urls: list[str]) -> dict[str, str]:
    """{url: reason naming it} for the local shards that do not open as tar archives (zero-byte files,
    other formats). Only the first header is read: a truncated tail is the reader's to skip and count."""
    bad: dict[str, str] = {}
    for url in urls:
        if is_remote(url):
            continue
        try:
            _open_tar(url).close()
        except UnreadableShard as err:
            bad[url] = str(err)
    return bad


def _sample_members(tar: tarfile.TarFile) -> list[tuple[str, dict[str, tarfile.TarInfo]]]:
    """Each sample (a run of members sharing a key) of an open tar in order, with its members by extension,
    reading headers only; a truncated tail ends the list (the reader skips and counts the rest)."""
    samples: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
    try:
        for member in tar:
            key, extension = base_plus_ext(member.name)
            if member.isfile() and key is not None:
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][extension] = member
    except (tarfile.TarError, OSError, EOFError):
        pass
    return samples


def _count_tar_samples(path: str) -> int:
    """Number of samples in a local tar, reading headers only."""
    with _open_tar(path) as tar:
        return len(_sample_members(tar))


def shard_keys(path: str) -> list[str]:
    """The keys of a local tar's samples in order, reading headers only."""
    with _open_tar(path) as tar:
        return [key for key, _ in _sample_members(tar)]


def sample_offsets(path: str) -> list[int] | None:
    """The byte offset of each sample's first member in a local uncompressed tar, where reading can start
    without reading what comes before (headers only); None for a compressed tar, which cannot seek."""
    try:
        with tarfile.open(path, "r:") as tar:
            return [min(m.offset for m in members.values()) for _, members in _sample_members(tar)]
    except tarfile.ReadError:
        return None


def is_plain_tar(path: str) -> bool:
    """True for an uncompressed tar, where reading can start at any member's byte offset."""
    try:
        with tarfile.open(path, "r:"):
            return True
    except (tarfile.TarError, OSError):
        return False


def plain_tar_samples(path: str, byte: int, handler: Callable[[Exception], bool]) -> Iterator[tuple[int, dict[str, Any], int]]:
    """(byte offset, raw sample, the next sample's byte offset or -1) of an uncompressed tar read from ``byte``, a
    sample's first member: webdataset's samples ({"__key__", "__url__", extension: bytes}, members grouped by key),
    with the offsets its reader does not give, so a position can seek back to its sample. An error ends the
    reading, after ``handler`` (webdataset's kind) is told."""
    with open(path, "rb") as f:
        f.seek(byte)
        sample: dict[str, Any] | None = None
        start = byte
        try:
            with tarfile.open(fileobj=f, mode="r|") as stream:
                for member in stream:
                    key, extension = base_plus_ext(member.name)
                    if not member.isreg() or key is None:
                        continue
                    data = stream.extractfile(member).read()  # a member cut short raises before it joins a sample
                    stream.members = []
                    if sample is not None and key != sample["__key__"]:
                        yield start, sample, byte + member.offset
                        sample = None
                    if sample is None:
                        sample, start = {"__key__": key, "__url__": path}, byte + member.offset
                    sample[extension.lower()] = data
        except (tarfile.TarError, OSError, EOFError) as err:
            handler(err)
        if sample is not None:
            yield start, sample, -1


def _index_entries(urls: list[str]) -> dict[str, dict]:
    """The entries of `shardindex.json` files next to the shards, where they exist, by shard URL."""
    entries: dict[str, dict] = {}
    for folder in {os.path.dirname(u) for u in urls if not is_remote(u)}:
        index = Path(folder) / INDEX_NAME
        if index.is_file():
            for entry in json.loads(index.read_text())["shardlist"]:
                entries[os.path.join(folder, entry["url"])] = entry
    return entries


def _unindexed_remote(urls: list[str], known: dict[str, dict], field: str, need: str) -> None:
    """Refuse remote shards whose index entry lacks ``field``: they cannot be scanned."""
    remote = [u for u in urls if is_remote(u) and field not in known.get(u, {})]
    if remote:
        raise ValueError(f"cannot read the {field} of remote shards such as {remote[0]!r}: {need}. Put a "
                         f"{INDEX_NAME} with them next to local copies (tools/make_shards.py writes one)")


def count_samples(urls: list[str]) -> list[int]:
    """Samples per shard, from an index file or by scanning local tar headers."""
    known = _index_entries(urls)
    _unindexed_remote(urls, known, "nsamples", "finite epochs need the counts to give every rank the same number of "
                      "batches. Use resampled: true with epoch_length, or")
    return [int(known[u]["nsamples"]) if u in known else _count_tar_samples(u) for u in urls]


def sample_sizes(urls: list[str]) -> list[list[Size | None]]:
    """Every sample's image size (H, W) per shard, in shard order (None where unreadable): from the index
    file's ``sizes``, else from each sample's json ``width``/``height``, else its image's header; never a decode."""
    known = _index_entries(urls)
    _unindexed_remote(urls, known, "sizes", "bucketed epochs plan each sample's bucket before reading it")
    return [[tuple(s) if s else None for s in known[u]["sizes"]] if "sizes" in known.get(u, {})
            else [size for _, size in scan_shard(u)] for u in urls]


def scan_shard(path: str) -> list[tuple[str, Size | None]]:
    """(key, size (H, W)) of each sample of a local tar in order, reading only its json and, without one,
    its image header (None where neither gives a size)."""
    with _open_tar(path) as tar:
        return [(key, _member_size(tar, members)) for key, members in _sample_members(tar)]


def _member_size(tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo]) -> Size | None:
    try:
        if E.JSON in members:
            meta = json.loads(tar.extractfile(members[E.JSON]).read())
            if isinstance(meta, dict) and isinstance(meta.get(E.WIDTH), int) and isinstance(meta.get(E.HEIGHT), int):
                return meta[E.HEIGHT], meta[E.WIDTH]
        image = next((members[k] for k in E.IMAGE_EXTENSIONS if k in members), None)
        if image is not None:
            width, height = Image.open(io.BytesIO(tar.extractfile(image).read())).size  # the header only
            return height, width
    except Exception:  # noqa: BLE001 - a damaged sample: no size, left out of the plan; the reader counts it
        pass
    return None


def write_shard_index(paths: list[Path]) -> Path:
    """Write the wids-style index of shards all in one folder: each one's sample count and every sample's
    size (what a bucketed epoch plans with), read from the tars. Written whole, then renamed: processes
    that finish at once never leave a torn index."""
    folder = Path(paths[0]).parent
    entries = []
    for path in paths:
        sizes = [size for _, size in scan_shard(str(path))]
        entries.append({"url": Path(path).name, "nsamples": len(sizes), "sizes": [list(s) if s else None for s in sizes]})
    index, partial = folder / INDEX_NAME, folder / f"{INDEX_NAME}.partial{os.getpid()}"
    partial.write_text(json.dumps({"__kind__": "wids-shard-index-v1", "wids_version": 1, "shardlist": entries}, indent=1))
    os.replace(partial, index)
    return index


@dataclass(frozen=True)
class Part:
    """Samples ``start`` to ``stop`` (exclusive, in shard order) of one shard."""

    url: str
    start: int
    stop: int


@dataclass(frozen=True)
class WorkerPlan:
    """What one (rank, worker) slot reads in an epoch and the sizes of the batches it yields.

    The slot's batches are the rank's batches ``worker``, ``worker + workers``, ... of the epoch.
    """

    parts: tuple[Part, ...]
    sizes: tuple[int, ...]
    buckets: tuple[int, ...] | None = None  # bucketed: the bucket of each batch

    @property
    def samples(self) -> int:
        return sum(self.sizes)


def plan_epoch(urls: list[str], counts: list[int], world_size: int, workers: int, batch_size: int,
               shuffle_seed: str | None = None) -> list[list[WorkerPlan]]:
    """Deal every sample once over ``world_size`` ranks x ``workers`` slots; plans[rank][worker].

    The shards are laid end to end in order, or in an order shuffled by ``shuffle_seed`` (a new one each
    epoch), and dealt by ``deal``.
    """
    order = list(range(len(urls)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    return deal([Part(urls[i], 0, counts[i]) for i in order], world_size, workers, batch_size)


def deal(segments: list[Part], world_size: int, workers: int, batch_size: int) -> list[list[WorkerPlan]]:
    """Deal the samples of ``segments`` (runs of shards, laid end to end) once over ``world_size`` ranks x
    ``workers`` slots; plans[rank][worker]. A whole epoch deals whole shards; an elastic resume deals what its
    interrupted epoch had left.

    Ranks get N // R or N // R + 1 samples and the same number of batches Q (the largest rank's
    ceil(n / batch_size)); every batch of every rank holds m or m + 1 samples, so ranks stay in step
    and weigh their gradients alike. The one exception: with batch_size 1 and N not divisible by R,
    Q is the smaller rank's count and one batch of the larger ranks holds 2. Batch i of a rank comes
    from slot i % workers, the order a DataLoader interleaves its workers in. Slots read consecutive
    runs of the segments, so a rank reads few shards and reads each at most once.
    """
    total, workers = sum(p.stop - p.start for p in segments), max(workers, 1)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if total < world_size:
        raise ValueError(f"{total} samples cannot give each of {world_size} ranks one: too few samples "
                         f"for {world_size} ranks x {workers} workers x batch {batch_size}")
    per_rank = [total // world_size + (r < total % world_size) for r in range(world_size)]
    quota = min(-(-per_rank[0] // batch_size), per_rank[-1])  # batches per rank
    runs = _Runs(segments)
    plans = []
    for n in per_rank:
        sizes = [n // quota + (i < n % quota) for i in range(quota)]  # larger batches first
        slots = [tuple(sizes[w::workers]) for w in range(workers)]
        plans.append([WorkerPlan(runs.take(sum(slot)), slot) for slot in slots])
    return plans


def plan_bucketed_epoch(urls: list[str], counts: list[int], buckets: list[list[int]], bucket_count: int, world_size: int,
                        workers: int, batch_size: int, shuffle_seed: str | None = None) -> list[list[WorkerPlan]]:
    """``plan_epoch``'s deal of samples to slots, in batches of one bucket each (``buckets``: every sample's
    bucket per shard, -1 for a sample without a size, which is left out); see ``in_buckets``."""
    plans = plan_epoch(urls, counts, world_size, workers, batch_size, shuffle_seed)
    return in_buckets(plans, dict(zip(urls, buckets, strict=True)), bucket_count, batch_size)


def in_buckets(plans: list[list[WorkerPlan]], buckets: dict[str, list[int]], bucket_count: int,
               batch_size: int) -> list[list[WorkerPlan]]:
    """The slots of ``plans`` in batches of one bucket each (``buckets``: every sample's bucket per shard URL).

    Every rank yields the same number of batches in every epoch: the trainer reads a loader's length once,
    so it cannot follow the reshuffled deal. A slot of n samples has at most min(n, (n + K (b - 1)) // b)
    batches of size b in K buckets, whatever the deal: the ranks' quota comes from that bound, and each
    slot halves batches to meet it (see ``bucket_batches``).
    """
    bound = [[min(p.samples, (p.samples + bucket_count * (batch_size - 1)) // batch_size) for p in rank] for rank in plans]
    quota = max(bucket_quota(b, len(b)) for b in bound)
    out = []
    for rank in plans:
        slots = []
        for w, plan in enumerate(rank):
            need = Counter(b for part in plan.parts for b in buckets[part.url][part.start : part.stop] if b >= 0)
            batches = bucket_batches(need, batch_size, quota // len(rank) + (w < quota % len(rank)))
            slots.append(WorkerPlan(plan.parts, tuple(s for _, s in batches), tuple(b for b, _ in batches)))
        out.append(slots)
    return out


def bucket_of_samples(sizes: list[list[Size | None]], buckets: tuple[Size, ...]) -> list[list[int]]:
    """Each sample's bucket (-1 without a size), per shard."""
    return [[-1 if s is None else nearest(buckets, s) for s in shard] for shard in sizes]


class _Runs:
    """Consecutive runs of samples cut from segments laid end to end."""

    def __init__(self, segments: list[Part]) -> None:
        self.segments = [p for p in segments if p.stop > p.start]
        self.segment, self.offset = 0, self.segments[0].start if self.segments else 0

    def take(self, samples: int) -> tuple[Part, ...]:
        parts = []
        while samples:
            segment = self.segments[self.segment]
            stop = min(segment.stop, self.offset + samples)
            parts.append(Part(segment.url, self.offset, stop))
            samples -= stop - self.offset
            if stop == segment.stop and self.segment + 1 < len(self.segments):
                self.segment += 1
                self.offset = self.segments[self.segment].start
            else:
                self.offset = stop
        return tuple(parts)
