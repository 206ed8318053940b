"""Resume without replay and elastic resume at the loader: a position reopens shards where workers stood,
and an epoch interrupted on one layout of ranks and workers finishes on another with every sample once."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import pytest

from ldm.data import batch as B
from ldm.data.buckets import AspectBuckets
from ldm.data.images import ImageDecoder
from ldm.data.stream import EpochLoader, ShardStream
from tests.shardutil import write_shards

SIZES = [(40, 32), (64, 32), (32, 64), (48, 40)]  # (W, H): a mix of aspect ratios for the bucketed layouts


def loaders(urls: list[str], world: int, workers: int, bucketed: bool, batch: int = 3) -> list[EpochLoader]:
    """One loader per rank of a ``world``-rank layout (the ranks simulated in this process)."""
    buckets = AspectBuckets(2.0, 8).sizes(32) if bucketed else None
    decoder = ImageDecoder(resolution=32, require=(), buckets=buckets)
    return [EpochLoader(ShardStream(urls, decoder, batch, rank=r, world_size=world, workers=workers, shuffle_buffer=4, seed=3),
                        batch_size=None, num_workers=workers if workers > 1 else 0) for r in range(world)]


def keys(batches) -> list[str]:
    return [k for b in batches for k in b[B.KEY]]


def gathered(states: list[dict]) -> dict:
    """The checkpoint state of a DDP run: every rank's position, as EpochLoader.state_dict gathers them."""
    return {**states[0], "ranks": [s["ranks"][0] for s in states]}


@pytest.mark.parametrize("bucketed", [False, True], ids=["square", "buckets"])
@pytest.mark.parametrize("old, new", [((4, 1), (2, 2)), ((2, 2), (4, 1)), ((2, 1), (1, 1))], ids=["4to2", "2to4", "2to1"])
def test_an_epoch_interrupted_on_one_layout_finishes_on_another_with_every_sample_once(
        tmp_path: Path, old: tuple[int, int], new: tuple[int, int], bucketed: bool) -> None:
    urls = write_shards(tmp_path, [17, 9, 14], SIZES)
    everything = Counter(keys(b for loader in loaders(urls, 1, 1, bucketed) for b in loader))
    assert len(everything) == 40 and set(everything.values()) == {1}

    before = loaders(urls, *old, bucketed)
    seen = Counter(k for loader in before for k in keys(itertools.islice(iter(loader), 3)))  # 3 batches a rank
    state = gathered([loader.state_dict() for loader in before])
    after = loaders(urls, *new, bucketed)
    for loader in after:
        loader.load_state_dict(state)
    lengths = {len(loader) for loader in after}
    rest = [[list(b[B.KEY]) for b in loader] for loader in after]
    assert len(lengths) == 1 and {3 + len(r) for r in rest} == lengths  # every rank steps alike; the trainer's count
    assert seen + Counter(k for r in rest for batch in r for k in batch) == everything  # none lost, none repeated
    assert all(len(batch) for r in rest for batch in r)
    next_epoch = Counter(k for loader in after for k in keys(loader))
    assert next_epoch == everything and len({len(loader) for loader in after}) == 1


def test_a_resume_decodes_nothing_before_its_position(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Resuming late in the epoch decodes only the samples still to come (and those its shuffle buffer holds):
    the shards are reopened at the worker's position, not replayed."""
    urls = write_shards(tmp_path, [60, 60], (16, 16))
    reference = loaders(urls, 1, 1, False)[0]
    expected = keys(reference)
    interrupted = loaders(urls, 1, 1, False)[0]
    seen = keys(itertools.islice(iter(interrupted), 36))  # 108 of 120 samples
    decoded = []
    original = ImageDecoder.__call__
    monkeypatch.setattr(ImageDecoder, "__call__", lambda self, raw, rng: decoded.append(raw["__key__"]) or original(self, raw, rng))
    resumed = loaders(urls, 1, 1, False)[0]
    resumed.load_state_dict(interrupted.state_dict())
    assert seen + keys(resumed) == expected
    assert len(decoded) == 12 and sorted(decoded) == sorted(expected[108:])  # 4 from the buffer, 8 read on


def test_a_position_survives_a_truncated_shard_and_a_compressed_one(tmp_path: Path) -> None:
    """Seeking needs an uncompressed local tar; a gzipped shard is read from its start (undecoded) to the
    position, and a truncated one ends early: the resumed epoch is still the uninterrupted one's."""
    import gzip

    urls = write_shards(tmp_path, [10, 10, 10], (16, 16))
    Path(urls[1] + ".gz").write_bytes(gzip.compress(Path(urls[1]).read_bytes()))
    data = Path(urls[2]).read_bytes()
    Path(urls[2]).write_bytes(data[: len(data) * 2 // 3])  # a tail lost in a copy
    urls[1] += ".gz"
    expected = keys(loaders(urls, 1, 1, False)[0])
    for stop in (2, 5, 7):
        interrupted = loaders(urls, 1, 1, False)[0]
        seen = keys(itertools.islice(iter(interrupted), stop))
        resumed = loaders(urls, 1, 1, False)[0]
        resumed.load_state_dict(interrupted.state_dict())
        assert seen + keys(resumed) == expected, stop


def test_a_position_of_other_shards_is_refused(tmp_path: Path) -> None:
    urls = write_shards(tmp_path, [6, 6], (16, 16))
    loader = loaders(urls, 1, 1, False)[0]
    next(iter(loader))
    other = loaders(urls[:1], 1, 1, False)[0]
    with pytest.raises(ValueError, match="another list of training shards"):
        other.load_state_dict(loader.state_dict())
