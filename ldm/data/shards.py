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
import heapq
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

INDEX_NAME = "shardindex.json"  # wids-style index: {"shardlist": [{"url": ..., "nsamples": ...}]}


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
    """Each local file as [absolute path, size, modification time in ns] (remote URLs as they are):
    what caches keyed by content compare, so a rewritten file is never taken for the old one."""
    return [url if is_remote(url) else [os.path.abspath(url), os.path.getsize(url), os.stat(url).st_mtime_ns]
            for url in urls]


def _count_tar_samples(path: str) -> int:
    """Number of samples (runs of members sharing a key) in a local tar, reading headers only."""
    count, last = 0, None
    with tarfile.open(path, "r:*") as tar:
        try:
            for member in tar:
                if not member.isfile():
                    continue
                key = base_plus_ext(member.name)[0]
                if key is not None and key != last:
                    count, last = count + 1, key
        except (tarfile.TarError, OSError, EOFError):
            pass  # a truncated tail: count what can be read; the reader skips and counts the rest
    return count


def _index_counts(urls: list[str]) -> dict[str, int]:
    """Sample counts from `shardindex.json` files next to the shards, where they exist."""
    counts: dict[str, int] = {}
    for folder in {os.path.dirname(u) for u in urls if not is_remote(u)}:
        index = Path(folder) / INDEX_NAME
        if index.is_file():
            for entry in json.loads(index.read_text())["shardlist"]:
                counts[os.path.join(folder, entry["url"])] = int(entry["nsamples"])
    return counts


def count_samples(urls: list[str]) -> list[int]:
    """Samples per shard, from an index file or by scanning local tar headers."""
    known = _index_counts(urls)
    remote = [u for u in urls if is_remote(u) and u not in known]
    if remote:
        raise ValueError(
            f"cannot count the samples of remote shards such as {remote[0]!r}: finite epochs need the counts "
            f"to give every rank the same number of batches. Use resampled: true with epoch_length, "
            f"or put a {INDEX_NAME} next to local copies."
        )
    return [known[u] if u in known else _count_tar_samples(u) for u in urls]


def write_shard_index(paths: list[Path]) -> Path:
    """Write the wids-style index of freshly written shards (all in one folder)."""
    folder = Path(paths[0]).parent
    entries = [{"url": Path(p).name, "nsamples": _count_tar_samples(str(p))} for p in paths]
    index = folder / INDEX_NAME
    index.write_text(json.dumps({"__kind__": "wids-shard-index-v1", "wids_version": 1, "shardlist": entries}, indent=1))
    return index


@dataclass(frozen=True)
class Part:
    """Every `of`-th sample of a shard, starting at sample `index`."""

    url: str
    index: int
    of: int
    samples: int


@dataclass(frozen=True)
class WorkerPlan:
    """What one (rank, worker) slot reads in an epoch and how many batches it must yield."""

    parts: tuple[Part, ...]
    samples: int
    batches: int


def plan_epoch(urls: list[str], counts: list[int], world_size: int, workers: int, batch_size: int) -> list[list[WorkerPlan]]:
    """Balance shard parts over ``world_size x workers`` slots; plans[rank][worker]."""
    slots = world_size * workers
    cuts = -(-slots // len(urls)) if len(urls) < slots else 1  # cut shards when fewer than readers
    parts = [Part(u, j, cuts, (n - j + cuts - 1) // cuts) for u, n in zip(urls, counts) for j in range(cuts)]
    heap = [(0, s) for s in range(slots)]  # (samples so far, slot): largest part to the lightest slot
    assigned: list[list[Part]] = [[] for _ in range(slots)]
    for part in sorted(parts, key=lambda p: (-p.samples, p.url, p.index)):
        load, slot = heapq.heappop(heap)
        assigned[slot].append(part)
        heapq.heappush(heap, (load + part.samples, slot))
    samples = [sum(p.samples for p in a) for a in assigned]
    per_rank = [samples[r * workers:(r + 1) * workers] for r in range(world_size)]
    need = [sum(-(-m // batch_size) for m in ms) for ms in per_rank]
    quota = max(need)
    plans = []
    for rank, ms in enumerate(per_rank):
        if sum(ms) < quota:
            raise ValueError(
                f"rank {rank} has {sum(ms)} samples but every rank must yield {quota} batches: "
                f"too few samples for {world_size} ranks x {workers} workers x batch {batch_size}"
            )
        batches = [-(-m // batch_size) for m in ms]
        extra = quota - sum(batches)
        for w, m in enumerate(ms):  # spread the missing batches over workers that have spare samples
            give = min(extra, m - batches[w])
            batches[w] += give
            extra -= give
        plans.append([
            WorkerPlan(tuple(assigned[rank * workers + w]), m, batches[w]) for w, m in enumerate(ms)
        ])
    return plans
