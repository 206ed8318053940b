"""WebDataModule / ShardStream: batch contents, distributed split, corrupt input."""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
import webdataset as wds
from jsonargparse import ArgumentParser

from ldm.data.datamodule import WebDataModule
from ldm.data.formats import ShardFormat
from ldm.data.images import ImageDecoder
from ldm.data.latents import LatentCache
from ldm.data.shards import count_samples, expand_shards, identify, plan_epoch
from ldm.data.stream import SKIPPED, ShardStream
from tests.shardutil import jpeg_bytes, write_shards


def test_batches_have_keys_shapes_and_values(tmp_path: Path) -> None:
    write_shards(tmp_path, [6, 5])
    dm = WebDataModule(train=str(tmp_path / "shard-{0000..0001}.tar"), batch_size=4, num_workers=0,
                       resolution=16, crop="center", extra_keys={"seg.png": "class"}, shuffle_buffer=0)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert [len(b["caption"]) for b in batches] == [4, 4, 3]
    b = batches[0]
    assert b["image"].shape == (4, 3, 16, 16) and b["image"].dtype == torch.float32
    assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
    assert b["label"].dtype == torch.long and b["seg"].shape == (4, 1, 16, 16) and b["seg"].dtype == torch.long
    assert b["original_size"].tolist()[0] == [32, 40] and b["crop_coords"].shape == (4, 2)
    for batch in batches:
        for caption, label, seg in zip(batch["caption"], batch["label"], batch["seg"]):
            n = int(caption.split()[1])
            assert label == n % 5 and (seg == n % 5).all()
    # the red channel encodes the sample index written into the jpg
    red = (batches[0]["image"][:, 0].mean((1, 2)) + 1) * 127.5
    expected = torch.tensor([int(c.split()[1]) for c in batches[0]["caption"]], dtype=torch.float)
    assert torch.allclose(red, expected, atol=3)
    assert sorted(int(c.split()[1]) for b in batches for c in b["caption"]) == list(range(11))


def test_random_crop_and_flip_keep_maps_aligned(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    folder.mkdir()
    from PIL import Image
    img = Image.new("RGB", (48, 24), (0, 0, 0))
    seg = Image.new("L", (48, 24), 0)
    for x in range(24, 48):  # right half white in the image, class 1 in the map
        for y in range(24):
            img.putpixel((x, y), (255, 255, 255))
            seg.putpixel((x, y), 1)
    buf, sbuf = io.BytesIO(), io.BytesIO()
    img.save(buf, format="PNG")
    seg.save(sbuf, format="PNG")
    with wds.TarWriter(str(folder / "a.tar")) as sink:
        for k in range(8):
            sink.write({"__key__": f"{k}", "png": buf.getvalue(), "txt": "x", "seg.png": sbuf.getvalue()})
    stream = ShardStream([str(folder / "a.tar")], ImageDecoder(16, "random", True, {"seg.png": "class"}), batch_size=8)
    batch = next(stream.batches(0))
    white = batch["image"][:, 0] > 0
    assert torch.equal(white, batch["seg"][:, 0] == 1)
    assert len({tuple(c) for c in batch["crop_coords"].tolist()}) > 1  # crops vary


@pytest.mark.parametrize("counts,world,workers,batch", [
    ([7, 3, 5], 2, 2, 2),  # shards do not divide evenly over 4 readers
    ([9], 2, 2, 2),  # one shard, four readers: cut into interleaved parts
    ([5, 5, 5, 5, 1], 3, 1, 4),
    ([4, 4], 2, 0, 3),
])
def test_every_sample_once_and_equal_batches_per_rank(tmp_path: Path, counts, world, workers, batch) -> None:
    urls = write_shards(tmp_path, counts)
    seen: Counter[str] = Counter()
    per_rank = []
    for rank in range(world):
        stream = ShardStream(urls, ImageDecoder(8), batch, rank=rank, world_size=world, workers=workers)
        batches = [b for w in range(max(workers, 1)) for b in stream.batches(w)]
        assert len(batches) == len(stream)
        per_rank.append(len(batches))
        seen.update(c for b in batches for c in b["caption"])
        assert all(len(b["caption"]) <= batch for b in batches)
    assert len(set(per_rank)) == 1, per_rank
    assert seen == Counter(f"sample {n}" for n in range(sum(counts)))


def test_plan_rejects_too_little_data_for_the_world() -> None:
    with pytest.raises(ValueError, match="too few samples"):
        plan_epoch(["a.tar"], [3], world_size=4, workers=1, batch_size=2)


def _check_plan(counts: list[int], world: int, workers: int, batch: int, shuffle: str | None = None) -> None:
    plans = plan_epoch([f"s{i}" for i in range(len(counts))], counts, world, workers, batch, shuffle)
    read = Counter((part.url, i) for rank in plans for plan in rank for part in plan.parts for i in range(part.start, part.stop))
    assert read == Counter((f"s{s}", i) for s, n in enumerate(counts) for i in range(n))  # every sample exactly once
    steps = [[size for plan in rank for size in plan.sizes] for rank in plans]
    assert len({len(rank) for rank in steps}) == 1  # every rank yields the same number of batches
    for plan in (plan for rank in plans for plan in rank):
        assert plan.samples == sum(part.stop - part.start for part in plan.parts)
    sizes = [size for rank in steps for size in rank]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1  # so at every step ranks differ by at most one sample
    totals = [sum(rank) for rank in steps]
    assert max(totals) - min(totals) <= 1
    # batches never exceed batch_size, but for batch 1 when the ranks do not divide the samples (one batch of 2)
    assert max(sizes) <= batch or (batch == 1 and sum(counts) % world and max(sizes) == 2)


@pytest.mark.parametrize("counts,world,workers,batch", [
    ([20, 2, 9, 14, 5], 2, 2, 4),  # about as many shards as slots: rank 0 used to take the big shards (34 vs 16)
    ([30, 1, 1, 1], 2, 2, 4),  # used to refuse to start
    ([5], 2, 1, 1),  # batch 1, an odd count
])
def test_plan_balances_the_ranks_whatever_the_shard_sizes(counts, world, workers, batch) -> None:
    _check_plan(counts, world, workers, batch)


def test_plan_property_over_random_layouts() -> None:
    rng = random.Random(0)
    for trial in range(300):
        counts = [rng.choice([0, 1, 2, 3, 7, 16, 50]) for _ in range(rng.randint(1, 8))]
        world = rng.randint(1, 4)
        if sum(counts) < world:
            continue
        _check_plan(counts, world, rng.randint(0, 3), rng.randint(1, 8), shuffle=f"{trial}" if trial % 2 else None)


def test_resampled_mode_yields_epoch_length_per_rank(tmp_path: Path) -> None:
    urls = write_shards(tmp_path, [3, 2])
    stream = ShardStream(urls, ImageDecoder(8), 2, workers=2, resampled=True, epoch_length=5, shuffle_buffer=4)
    batches = [b for w in range(2) for b in stream.batches(w)]
    assert len(batches) == len(stream) == 5 and all(len(b["caption"]) == 2 for b in batches)


def test_epochs_reshuffle(tmp_path: Path) -> None:
    urls = write_shards(tmp_path, [10, 10])
    stream = ShardStream(urls, ImageDecoder(8), 20, shuffle_buffer=8)
    orders = []
    for epoch in (1, 2):
        stream.epoch = epoch
        orders.append(next(stream.batches(0))["caption"])
    assert sorted(orders[0]) == sorted(orders[1]) and orders[0] != orders[1]


def _corrupt_shard(path: Path) -> None:
    good = jpeg_bytes((200, 10, 10))
    with wds.TarWriter(str(path)) as sink:
        sink.write({"__key__": "ok1", "jpg": good, "txt": "fine"})
        sink.write({"__key__": "trunc", "jpg": good[: len(good) // 2], "txt": "truncated"})
        sink.write({"__key__": "text", "jpg": b"this is not an image", "txt": "not an image"})
        sink.write({"__key__": "nocap", "jpg": good})
        sink.write({"__key__": "ok2", "jpg": good, "json": b'{"caption": "from json"}'})


def test_corrupt_samples_are_skipped_and_counted(tmp_path: Path) -> None:
    _corrupt_shard(tmp_path / "bad.tar")
    dm = WebDataModule(val=str(tmp_path / "bad.tar"), batch_size=2, num_workers=0, resolution=8)
    dm.setup("validate")
    captions = []
    for batch in dm.val_dataloader():  # the loader takes the workers' counts out of the batches
        captions += batch["caption"]
        assert SKIPPED not in batch
    assert captions == ["fine", "from json"]
    assert sum(v for k, v in dm.skipped.items() if k.startswith("undecodable jpg")) == 2
    assert dm.skipped["no caption"] == 1 and sum(dm.skipped.values()) == 3


def test_skips_under_ddp_repeat_a_sample_to_keep_ranks_in_step(tmp_path: Path) -> None:
    _corrupt_shard(tmp_path / "bad.tar")
    urls = [str(tmp_path / "bad.tar")] * 2  # two ranks each read a share of the same samples
    counts = []
    for rank in range(2):
        stream = ShardStream(urls, ImageDecoder(8), 1, rank=rank, world_size=2)
        batches = list(stream.batches(0))
        counts.append(len(batches))
        assert len(batches) == len(stream)
    assert counts[0] == counts[1]


def test_truncated_tar_is_counted_not_fatal(tmp_path: Path) -> None:
    urls = write_shards(tmp_path, [6])
    data = Path(urls[0]).read_bytes()
    Path(urls[0]).write_bytes(data[: len(data) * 2 // 3])
    stream = ShardStream(urls, ImageDecoder(8), 2)
    batches = list(stream.batches(0))
    assert 1 <= len(batches) <= len(stream)
    assert any(k.startswith("unreadable tar") for b in batches for k in b[SKIPPED])


def test_missing_pattern_names_it(tmp_path: Path) -> None:
    pattern = str(tmp_path / "nothing-{0000..0003}.tar")
    with pytest.raises(FileNotFoundError, match="nothing-"):
        expand_shards(pattern)
    dm = WebDataModule(train=pattern, num_workers=0)
    with pytest.raises(FileNotFoundError, match=r"nothing-\{0000\.\.0003\}"):
        dm.setup("fit")


def test_shards_identify_by_the_file_they_resolve_to(tmp_path: Path) -> None:
    write_shards(tmp_path / "a", [2])
    write_shards(tmp_path / "b", [3])
    (tmp_path / "link").symlink_to(tmp_path / "a")
    direct, linked = (identify(expand_shards(str(tmp_path / d / "shard-*.tar"))) for d in ("a", "link"))
    assert linked == direct  # a worktree's data/ symlink reaches the same cache
    (tmp_path / "link").unlink()
    (tmp_path / "link").symlink_to(tmp_path / "b")
    assert identify(expand_shards(str(tmp_path / "link" / "shard-*.tar"))) != direct


def test_count_samples_reads_headers(tmp_path: Path) -> None:
    urls = write_shards(tmp_path, [3, 4])
    assert count_samples(urls) == [3, 4]
    with tarfile.open(urls[0]) as tar:
        assert len(tar.getnames()) == 3 * 4  # jpg, txt, cls, seg.png per sample


def test_shard_index_gives_counts_without_scanning(tmp_path: Path) -> None:
    from ldm.data.shards import INDEX_NAME, write_shard_index

    urls = write_shards(tmp_path, [3, 4])
    index = write_shard_index([Path(u) for u in urls])
    assert index.name == INDEX_NAME and count_samples(urls) == [3, 4]
    data = json.loads(index.read_text())
    data["shardlist"][0]["nsamples"] = 99  # the index, not the tar, is what is read
    index.write_text(json.dumps(data))
    assert count_samples(urls) == [99, 4]


def test_prediction_requests_decode_maps_as_their_extra_keys_declare(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "maps").mkdir()
    Image.new("L", (12, 10), 3).save(tmp_path / "maps" / "0.png")  # an 8-bit map: class ids or a picture, as declared
    (tmp_path / "requests.jsonl").write_text(json.dumps({"caption": "a", "seg": "maps/0.png", "edge": "maps/0.png"}) + "\n")
    dm = WebDataModule(predict=str(tmp_path / "requests.jsonl"), batch_size=1, resolution=8,
                       extra_keys={"seg.png": "class", "edge.png": "image"})
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["seg"].shape == (1, 1, 8, 8) and batch["seg"].dtype == torch.int64 and (batch["seg"] == 3).all()
    assert batch["edge"].shape == (1, 3, 8, 8) and torch.allclose(batch["edge"], torch.tensor(3 / 127.5 - 1))
    assert batch["caption"] == ["a"] and batch["target_size"].tolist() == [[8, 8]]


class CaptionsOnly(ShardFormat):
    """A shard format of a test: shards named captions-*.tar, read as their captions alone."""

    def recognises(self, urls) -> bool:
        return all(Path(url).name.startswith("captions-") for url in urls)

    def decoder(self, images: ImageDecoder):
        return lambda raw, rng: {"key": raw["__key__"], "caption": raw["txt"].decode()}


def test_shard_formats_are_injected_parts_that_recognise_their_shards(tmp_path: Path) -> None:
    """A format named in the data part (class_path) reads the shards it recognises; the others stay image shards."""
    write_shards(tmp_path / "a", [3])
    (tmp_path / "a" / "shard-0000.tar").rename(tmp_path / "a" / "captions-0000.tar")
    write_shards(tmp_path / "b", [3])
    config = {"class_path": "ldm.data.datamodule.WebDataModule", "init_args": {
        "train": str(tmp_path / "a" / "captions-0000.tar"), "val": str(tmp_path / "b" / "shard-0000.tar"),
        "batch_size": 3, "num_workers": 0, "resolution": 8, "formats": [{"class_path": "tests.test_data.CaptionsOnly"}]}}
    parser = ArgumentParser()
    parser.add_subclass_arguments(WebDataModule, "data")
    dm = parser.instantiate_classes(parser.parse_object({"data": config})).data
    dm.setup("fit")
    (train,), (val,) = list(dm.train_dataloader()), list(dm.val_dataloader())
    assert "image" not in train and sorted(train["caption"]) == sorted(val["caption"])
    assert val["image"].shape == (3, 3, 8, 8)
    assert isinstance(WebDataModule(num_workers=0).formats[0], LatentCache)  # the default: a latent cache
