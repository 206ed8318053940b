"""Where a worker's stream stands: its raw samples read with their positions (shard, index, draw, byte offset),
from shard runs or shards drawn with replacement, and the resumable shuffle buffer over them (see ShardStream)."""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Iterator
from typing import Any

from webdataset.tariterators import tarfile_samples

from ldm.data.shards import is_plain_tar, is_remote, plain_tar_samples, sample_offsets

log = logging.getLogger(__name__)

Position = list[int]  # a sample: [shard (its index in the stream's urls), place in the shard, draw (resampled; -1),
# byte offset of its first tar member (-1: unknown)]


class PositionReader:
    """A worker's raw samples in order, each with its position, from its parts (finite: [shard, start, stop,
    byte offset of start or -1] still to read, consumed as it reads) or from shards drawn with replacement
    (resampled: ``draws`` seeds the draws; ``draw``, ``index`` and ``byte`` say where to start). ``state()``
    says where it stands; a position's byte offset lets a resume seek straight to its sample."""

    def __init__(self, urls: list[str], skipped: Counter[str], parts: list[list[int]] | None, draws: str,
                 draw: int = 0, index: int = 0, byte: int = -1) -> None:
        self.urls, self.skipped, self.parts = urls, skipped, parts
        self.draws = random.Random(draws)
        for _ in range(draw):
            self.draws.randrange(len(urls))
        self.draw, self.index, self.byte = draw, index, byte
        self._plain: dict[int, bool] = {}
        self._offsets: dict[int, list[int]] = {}

    def state(self) -> dict[str, Any]:
        return {"parts": None if self.parts is None else [list(p) for p in self.parts], "draw": self.draw,
                "index": self.index, "byte": self.byte}

    def __iter__(self) -> Iterator[tuple[Position, dict[str, Any]]]:
        if self.parts is not None:
            while self.parts:
                shard, start, stop, byte = self.parts[0]
                for index, at, raw, following in self._read(shard, start, stop, byte):
                    self.parts[0][1:] = [index + 1, stop, following]
                    yield [shard, index, -1, at], raw
                self.parts.pop(0)
            return
        while True:
            shard = self.draws.randrange(len(self.urls))
            for index, at, raw, following in self._read(shard, self.index, None, self.byte):
                self.index, self.byte = index + 1, following
                yield [shard, index, self.draw, at], raw
            self.draw, self.index, self.byte = self.draw + 1, 0, -1

    def read_at(self, positions: list[Position]) -> Iterator[tuple[Position, dict[str, Any]]]:
        """The raw samples at ``positions`` (a resumed shuffle buffer or bucket), each read on its own."""
        for shard, index, draw, byte in positions:
            for _, _, raw, _ in self._read(shard, index, index + 1, byte):
                yield [shard, index, draw, byte], raw

    def _read(self, shard: int, start: int, stop: int | None, byte: int) -> Iterator[tuple[int, int, dict[str, Any], int]]:
        """(index, byte offset, raw sample, the next sample's byte offset) of samples ``start`` to ``stop`` (None:
        the end) of shard ``shard``. An uncompressed local tar is read from ``byte`` (or the offset its headers give
        for ``start``); another is read from its start, passing over the samples before ``start`` undecoded."""
        url = self.urls[shard]
        handler = tar_handler(self.skipped, url)
        if shard not in self._plain:
            self._plain[shard] = not is_remote(url) and is_plain_tar(url)
        if not self._plain[shard]:
            for index, raw in enumerate(tarfile_samples([{"url": url}], handler=handler)):
                if stop is not None and index >= stop:
                    break
                if index >= start:
                    yield index, -1, raw, -1
            return
        if byte < 0 and start:
            if shard not in self._offsets:
                self._offsets[shard] = sample_offsets(url)
            if start >= len(self._offsets[shard]):
                return
            byte = self._offsets[shard][start]
        for index, raw in enumerate(plain_tar_samples(url, max(byte, 0), handler), start):
            if stop is not None and index >= stop:
                break
            yield index, *raw


class ShuffleBuffer:
    """Reservoir-style shuffle buffer of ``size`` items, resumable: ``state()`` gives its items' positions,
    whether it is emptying (its input ended) and its RNG state."""

    def __init__(self, size: int, rng: random.Random, buffer: list[tuple[Position, Any]], draining: bool = False) -> None:
        self.size, self.rng, self.buffer, self.draining = size, rng, buffer, draining

    def state(self) -> dict[str, Any]:
        version, state, gauss = self.rng.getstate()
        return {"buffer": [pos for pos, _ in self.buffer], "draining": self.draining, "rng": [version, list(state), gauss]}

    def __call__(self, items: Iterator[tuple[Position, Any]]) -> Iterator[tuple[Position, Any]]:
        if not self.draining:
            for item in items:
                if len(self.buffer) < self.size:
                    self.buffer.append(item)
                    continue
                i = self.rng.randrange(self.size)
                out, self.buffer[i] = self.buffer[i], item
                yield out
            self.rng.shuffle(self.buffer)
            self.draining = True
        while self.buffer:
            yield self.buffer.pop(0)


def tar_handler(skipped: Counter[str], url: str):
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
