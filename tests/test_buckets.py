"""Aspect-ratio buckets: the bucket set, which bucket an image goes to and how it is cropped, the size and crop
conditioning values, and a bucketed stream that keeps every promise of the square one (each sample once per
epoch, every rank the same number of batches, one bucket per batch, skips counted, exact resume)."""

from __future__ import annotations

import io
import itertools
import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from ldm.conditioning.size import SizeEmbedder
from ldm.data import batch as B
from ldm.data.buckets import AspectBuckets, bucket_batches, bucket_quota, nearest
from ldm.data.datamodule import WebDataModule
from ldm.data.images import ImageDecoder
from ldm.data.shards import (
    INDEX_NAME,
    plan_bucketed_epoch,
    sample_sizes,
    write_shard_index,
)
from ldm.data.stream import BEYOND_BUCKET, PADDED, SKIPPED, ShardStream
from tests.shardutil import sample, write_shards, write_tar

BUCKETS = AspectBuckets(max_ratio=2.0, multiple=8).sizes(32)  # (H, W): 48x24, 40x24, 32x32, 24x40, 24x48
CANVASES = [(64, 32), (48, 32), (32, 32), (32, 48), (32, 64), (40, 30), (90, 30)]  # PIL (W, H); 3:1 goes to 2:1


def test_the_bucket_set_keeps_the_area_the_multiple_and_the_largest_ratio() -> None:
    assert BUCKETS == ((48, 24), (40, 24), (32, 32), (24, 40), (24, 48))
    assert AspectBuckets(2.0, 16).sizes(64) == ((96, 48), (80, 48), (64, 64), (48, 80), (48, 96))
    sdxl = AspectBuckets(max_ratio=4.0, multiple=64).sizes(1024)
    for h, w in sdxl:
        assert h % 64 == 0 and w % 64 == 0 and max(h, w) <= 4 * min(h, w) and (w, h) in sdxl
        assert abs(h * w / 1024**2 - 1) < 0.1  # about one area
    # most of SDXL's published training buckets are among ours
    assert {(1024, 1024), (1152, 896), (1216, 832), (1344, 768), (1728, 576), (2048, 512)} <= set(sdxl)
    with pytest.raises(ValueError, match="buckets.*multiple 64.*resolution 32"):
        AspectBuckets(multiple=64).sizes(32)


def test_an_image_goes_to_the_bucket_nearest_its_aspect_ratio() -> None:
    assert [BUCKETS[nearest(BUCKETS, (h, w))] for w, h in CANVASES] == [
        (24, 48), (24, 40), (32, 32), (40, 24), (48, 24), (24, 40), (24, 48)]


def _jpeg(size: tuple[int, int]) -> bytes:
    """A (W, H) image whose pixel (x, y) has red x, green y: crops can be read off its corners."""
    image = Image.new("RGB", size)
    image.putdata([(x, y, 0) for y in range(size[1]) for x in range(size[0])])
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["center", "random"])
def test_crop_covers_the_bucket_and_reports_original_size_and_offsets(mode: str) -> None:
    decoder = ImageDecoder(resolution=32, crop=mode, require=(), buckets=BUCKETS)
    for seed in range(5):
        out = decoder({"__key__": "k", "png": _jpeg((120, 80))}, random.Random(seed))  # 3:2 -> bucket 24x40
        assert out[B.IMAGE].shape == (3, 24, 40) and out[B.TARGET_SIZE].tolist() == [24, 40]
        assert out[B.ORIGINAL_SIZE].tolist() == [80, 120]
        top, left = out[B.CROP_COORDS].tolist()  # resized to cover 40 x 24: 40 x 27 (scale 1/3), then cropped
        assert left == 0 and 0 <= top <= 3 and (mode == "random" or top == 1)
        green = (out[B.IMAGE][1, 0, 0] + 1) * 127.5  # the crop's first row came from resized row `top`
        assert abs(green / 3 - top) < 1.0
    square = ImageDecoder(resolution=32, require=())({"__key__": "k", "png": _jpeg((120, 80))}, random.Random(0))
    assert square[B.IMAGE].shape == (3, 32, 32) and B.TARGET_SIZE not in square  # no buckets: square as before


def test_size_conditioning_reads_the_bucket_and_requests_default_to_their_size_uncropped() -> None:
    embed = SizeEmbedder(features_per_value=4, image_size=32)
    trained = {B.ORIGINAL_SIZE: torch.tensor([[80, 120]]), B.CROP_COORDS: torch.tensor([[1, 0]]),
               B.TARGET_SIZE: torch.tensor([[24, 40]])}
    request = {B.TARGET_SIZE: torch.tensor([[24, 40]])}
    as_asked = {B.ORIGINAL_SIZE: torch.tensor([[24, 40]]), B.CROP_COORDS: torch.tensor([[0, 0]]), **request}
    assert torch.equal(embed(request, (6, 10)), embed(as_asked, (6, 10)))
    assert not torch.equal(embed(trained, (6, 10)), embed(as_asked, (6, 10)))
    square = {B.ORIGINAL_SIZE: torch.tensor([[32, 32]]), B.CROP_COORDS: torch.tensor([[0, 0]]), B.TARGET_SIZE: torch.tensor([[32, 32]])}
    assert torch.equal(embed({}, (8, 8)), embed(square, (8, 8)))  # nothing asked: the square default


def test_a_worker_makes_full_batches_and_one_of_each_buckets_leftovers() -> None:
    assert bucket_batches(Counter({0: 9, 2: 3}), 4, 0) == [(0, 4), (0, 4), (0, 1), (2, 3)]
    assert bucket_batches(Counter({0: 9, 2: 3}), 4, 6) == [(0, 2), (0, 2), (0, 2), (0, 2), (0, 1), (2, 3)]
    assert bucket_batches(Counter({1: 2}), 4, 4) == [(1, 1), (1, 1), (-1, 0), (-1, 0)]  # too few: the stream pads
    assert bucket_quota([3, 1], 2) == 5  # worker 0 yields batches 0, 2, 4
    assert bucket_quota([2, 2], 2) == 4


def _mixed_shards(folder: Path, counts: list[int], seed: int = 0) -> list[str]:
    rng, urls, n = random.Random(seed), [], 0
    folder.mkdir(parents=True, exist_ok=True)
    for i, count in enumerate(counts):
        urls.append(write_tar(folder / f"shard-{i:04d}.tar", (sample(n + j, rng.choice(CANVASES)) for j in range(count))))
        n += count
    return urls


@pytest.mark.parametrize("world, workers, batch", [(1, 1, 4), (2, 2, 4), (3, 1, 3), (4, 2, 2)])
def test_every_sample_once_one_bucket_per_batch_and_the_same_batch_count_on_every_rank_and_epoch(tmp_path: Path, world: int, workers: int,
                                                                         batch: int) -> None:
    urls = _mixed_shards(tmp_path, [13, 7, 20])
    decoder = ImageDecoder(resolution=32, require=(), buckets=BUCKETS)
    lengths = set()  # the trainer reads a loader's length once: it must not change with the epoch's deal
    for epoch in range(2):
        seen: Counter[str] = Counter()
        for rank in range(world):
            stream = ShardStream(urls, decoder, batch, rank=rank, world_size=world, workers=workers, shuffle_buffer=5, seed=1)
            stream.epoch = epoch
            count = 0
            for worker in range(workers):
                for b in stream.batches(worker):
                    assert len({tuple(s) for s in b[B.TARGET_SIZE].tolist()}) == 1
                    assert b[B.IMAGE].shape[-2:] == tuple(b[B.TARGET_SIZE][0])
                    assert 0 < len(b[B.KEY]) <= batch and PADDED not in b[SKIPPED]
                    seen.update(b[B.KEY])
                    count += 1
            assert count == len(stream)
            lengths.add(count)
        assert seen == Counter(f"{n:06d}" for n in range(40))
    assert len(lengths) == 1  # every rank, every epoch


def test_the_plan_reads_sizes_from_the_index_the_json_or_the_image_header(tmp_path: Path) -> None:
    told = sample(1, (32, 48))
    told["json"] = json.dumps({"width": 30, "height": 20}).encode()  # the json's size is read, the image left unread
    urls = [write_tar(tmp_path / "a.tar", [sample(0, (64, 32)), told]), write_tar(tmp_path / "b.tar", [sample(2, (40, 30))])]
    assert sample_sizes(urls) == [[(32, 64), (20, 30)], [(30, 40)]]
    write_shard_index([Path(u) for u in urls])
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert [e["sizes"] for e in index["shardlist"]] == [[[32, 64], [20, 30]], [[30, 40]]]
    index["shardlist"][0]["sizes"][0] = [10, 20]  # the index, not the tar, is what is read
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    assert sample_sizes(urls)[0][0] == (10, 20)


def test_a_json_size_that_is_not_the_images_is_skipped_and_counted_not_fatal(tmp_path: Path) -> None:
    samples = [sample(n, (64, 32)) for n in range(6)]  # all wide
    samples[2]["json"] = json.dumps({"width": 32, "height": 64}).encode()  # ... says this one is tall
    urls = [write_tar(tmp_path / "lying.tar", samples)]
    plan = plan_bucketed_epoch(urls, [6], [[4, 4, 0, 4, 4, 4]], len(BUCKETS), 1, 1, 4)[0][0]
    assert list(plan.buckets) == [0, 4, 4, 4, 4] and list(plan.sizes) == [1, 1, 1, 2, 1]  # 5 batches, any deal's most
    batches = list(ShardStream(urls, ImageDecoder(resolution=32, require=(), buckets=BUCKETS), 4).batches(0))
    keys = [k for b in batches for k in b[B.KEY]]
    skipped = sum((Counter(b[SKIPPED]) for b in batches), Counter())
    assert len(keys) == 5 and skipped[BEYOND_BUCKET] == 1  # the planned tall batch never fills; a wide one over its plan


@pytest.mark.parametrize("workers", [0, 2])
def test_the_loader_state_resumes_a_bucketed_stream_exactly(tmp_path: Path, workers: int) -> None:
    _mixed_shards(tmp_path, [9, 8, 7])

    def loader():
        data = WebDataModule(train=str(tmp_path / "shard-*.tar"), batch_size=3, num_workers=workers, resolution=32,
                             shuffle_buffer=4, pin_memory=False, require=(), buckets=AspectBuckets(2.0, 8))
        data.setup("fit")
        return data.train_dataloader()

    def keys(batches) -> list[list[str]]:
        return [list(b[B.KEY]) for b in batches]

    reference = loader()
    expected = keys(reference) + keys(reference)  # epochs 0 and 1
    for stop in (1, 4):
        interrupted = loader()
        seen = keys(itertools.islice(iter(interrupted), stop))
        resumed = loader()
        resumed.load_state_dict(interrupted.state_dict())
        assert seen + keys(resumed) + keys(resumed) == expected, stop


def test_a_worker_with_fewer_samples_than_its_batch_quota_repeats_one_under_ddp(tmp_path: Path) -> None:
    """9 samples in 3 buckets over 2 ranks x 2 workers: one slot holds 1 sample but owes 2 batches; it repeats
    its sample (counted as padding, as a DistributedSampler pads) so both ranks yield 5 batches."""
    urls = write_shards(tmp_path, [9], [(16, 8), (12, 10), (8, 16)])
    decoder = ImageDecoder(resolution=8, require=(), buckets=AspectBuckets(2.0, 8).sizes(8))
    counts, padded, seen = [], 0, Counter()
    for rank in range(2):
        stream = ShardStream(urls, decoder, 2, rank=rank, world_size=2, workers=2)
        batches = [b for worker in range(2) for b in stream.batches(worker)]
        counts.append(len(batches))
        padded += sum(b[SKIPPED].get(PADDED, 0) for b in batches)
        seen.update(k for b in batches for k in b[B.KEY])
    assert counts == [5, 5] and padded == 1
    assert set(seen) == {f"{n:06d}" for n in range(9)} and sum(seen.values()) == 10
