"""Bad input: every corrupt sample or shard is skipped and counted, every unusable setting refused by name.

The corruption table below serves twice: each case on its own against the image decoder, and all of them
planted at random in shards read whole through WebDataModule (the fuzz test at the end).
"""

from __future__ import annotations

import io
import json
import logging
import random
import tarfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger
from PIL import Image

from ldm.data import batch as B
from ldm.data.collate import collate
from ldm.data.datamodule import WebDataModule
from ldm.data.decoder import SkipSample
from ldm.data.images import ImageDecoder
from ldm.data.shards import count_samples
from ldm.data.stream import MAX_SKIP_WARNINGS, SKIPPED, ShardStream
from tests.shardutil import png_bytes, sample, write_shards, write_tar

EXTRA = {"seg.png": "class"}
SEG = B.map_key("seg.png")
REQUIRE = (B.CAPTION, B.LABEL)
PREFIXES = ("undecodable jpg", "unreadable tar data", "unreadable shard")  # reasons that end in an error's name


def _reason(reason: str) -> str:
    """A reason as the tests compare it: its fixed prefix where the rest names a library's error."""
    return next((p for p in PREFIXES if reason.startswith(p)), reason)


def _json_only(raw: dict[str, Any], meta: Any) -> None:
    raw.pop("txt", None), raw.pop("cls", None)
    raw["json"] = json.dumps(meta).encode()


def _seg(raw: dict[str, Any], image: Image.Image) -> None:
    raw["seg.png"] = png_bytes(image)


def _size(raw: dict[str, Any]) -> tuple[int, int]:
    return Image.open(io.BytesIO(raw["jpg"])).size


# name -> (plant it in a good sample (with an rng), the reason it is skipped with: {w}, {h} the image's size)
CORRUPTIONS: dict[str, tuple[Callable[[dict[str, Any], random.Random], Any], str]] = {
    "random bytes for the jpg": (lambda r, g: r.update(jpg=g.randbytes(len(r["jpg"]))), "undecodable jpg"),
    "truncated jpg": (lambda r, g: r.update(jpg=r["jpg"][: len(r["jpg"]) // 2]), "undecodable jpg"),
    "no image entry": (lambda r, g: r.pop("jpg"), "no image entry"),
    "no caption": (lambda r, g: r.pop("txt"), "no caption"),
    "blank caption": (lambda r, g: r.update(txt=b" \n"), "no caption"),
    "caption not UTF-8": (lambda r, g: r.update(txt=b"\xff\xfe bad"), "caption not UTF-8"),
    "invalid json": (lambda r, g: r.update(json=b'{"caption": '), "invalid json"),
    "json not UTF-8": (lambda r, g: r.update(json=b'{"caption": "\xff"}'), "invalid json"),
    "json a list": (lambda r, g: _json_only(r, ["a caption"]), "json is a list, not an object"),
    "json caption a list": (lambda r, g: _json_only(r, {"caption": ["a", "b"], "label": 1}),
                            "json caption is a list, not a string"),
    "json label not an integer": (lambda r, g: _json_only(r, {"caption": "c", "label": g.choice(["3", 1.5, True, -1])}),
                                  "json label not a class index"),
    "cls not an integer": (lambda r, g: r.update(cls=g.choice([b"cat", b"", b"1.5", b"-2", b"\xff"])), "cls not a class index"),
    "no label": (lambda r, g: r.pop("cls"), "no label"),
    "seg map of another size": (lambda r, g: _seg(r, Image.new("L", (_size(r)[0] + 3, _size(r)[1]), 1)),
                                "seg.png {wider}x{h}, image {w}x{h}"),
    "seg map in RGB": (lambda r, g: _seg(r, Image.new("RGB", _size(r), (1, 1, 1))), "seg.png is RGB, expected a class map"),
    "no seg map": (lambda r, g: r.pop("seg.png"), "no 'seg.png' entry"),
}


def _corrupt(raw: dict[str, Any], name: str, rng: random.Random) -> str:
    """Plant corruption `name` in a good sample -> the reason it should be skipped with."""
    plant, reason = CORRUPTIONS[name]
    w, h = _size(raw)
    plant(raw, rng)
    return reason.format(w=w, h=h, wider=w + 3)


def _raw(n: int = 7, size: tuple[int, int] = (12, 10)) -> dict[str, Any]:
    """A good sample as the shard reader hands it over: every entry as bytes."""
    return {k: v.encode() if isinstance(v, str) and k != "__key__" else v for k, v in sample(n, size).items()}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_each_corruption_skips_with_its_reason(name: str) -> None:
    raw = _raw()
    expected = _corrupt(raw, name, random.Random(0))
    with pytest.raises(SkipSample) as err:
        ImageDecoder(8, extra_keys=EXTRA, require=REQUIRE)(raw, random.Random(0))
    assert _reason(str(err.value)) == expected


def test_annotations_from_txt_cls_or_json() -> None:
    decoder = ImageDecoder(8, require=REQUIRE)
    raw = _raw(3)
    raw["cls"] = b" 4\n"
    out = decoder(raw, random.Random(0))
    assert out[B.CAPTION] == "sample 3" and out[B.LABEL] == 4
    _json_only(raw, {"caption": " from json ", "label": 0})
    out = decoder(raw, random.Random(0))
    assert out[B.CAPTION] == "from json" and out[B.LABEL] == 0
    _json_only(raw, {"caption": None})  # null: no caption, fine where none is required
    out = ImageDecoder(8, require=())(raw, random.Random(0))
    assert out[B.CAPTION] == "" and B.LABEL not in out


def test_map_kinds_decode_as_declared() -> None:
    raw = _raw(size=(12, 10))
    _seg(raw, Image.new("L", (12, 10), 200))  # a grey picture, say an edge map
    image = ImageDecoder(8, extra_keys={"seg.png": "image"}, require=())(raw, random.Random(0))[SEG]
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32 and torch.allclose(image, torch.tensor(200 / 127.5 - 1))
    _seg(raw, Image.new("I;16", (12, 10), 1000))  # 16-bit class ids: a class map, never a picture
    classes = ImageDecoder(8, extra_keys=EXTRA, require=())(raw, random.Random(0))[SEG]
    assert classes.shape == (1, 8, 8) and classes.dtype == torch.int64 and (classes == 1000).all()
    with pytest.raises(SkipSample, match=r"seg.png is I(;16)?, expected an image"):
        ImageDecoder(8, extra_keys={"seg.png": "image"}, require=())(raw, random.Random(0))
    depth = ImageDecoder(8, extra_keys={"seg.png": "depth16"}, require=())(raw, random.Random(0))[SEG]  # 16-bit values
    assert depth.shape == (1, 8, 8) and depth.dtype == torch.float32 and torch.allclose(depth, torch.tensor(1000 / 32767.5 - 1))
    _seg(raw, Image.new("L", (12, 10), 200))
    with pytest.raises(SkipSample, match=r"seg.png is L, expected a 16-bit map"):
        ImageDecoder(8, extra_keys={"seg.png": "depth16"}, require=())(raw, random.Random(0))


def test_collate_drops_an_optional_key_only_some_samples_carry() -> None:
    samples = [{B.CAPTION: "a", B.LABEL: 1}, {B.CAPTION: "b"}, {B.CAPTION: "c", B.LABEL: 2}]
    batch, dropped = collate(samples)
    assert batch == {B.CAPTION: ["a", "b", "c"]}
    assert dropped == Counter({"label missing in part of a batch: dropped": 2})
    batch, dropped = collate([samples[0], samples[2]])
    assert batch[B.LABEL].tolist() == [1, 2] and not dropped


def test_label_in_some_samples_optional_or_required(tmp_path: Path) -> None:
    samples = [sample(n, (12, 10)) for n in range(6)]
    for n in (1, 4):
        del samples[n]["cls"]
    pattern = write_tar(tmp_path / "a.tar", samples)
    optional = WebDataModule(val=pattern, batch_size=3, num_workers=0, resolution=8)
    optional.setup("validate")
    batches = list(optional.val_dataloader())
    assert [len(b[B.CAPTION]) for b in batches] == [3, 3] and all(B.LABEL not in b for b in batches)
    assert optional.skipped == Counter({"label missing in part of a batch: dropped": 4})
    required = WebDataModule(val=pattern, batch_size=2, num_workers=0, resolution=8, require=REQUIRE)
    required.setup("validate")
    batches = list(required.val_dataloader())
    assert [b[B.LABEL].tolist() for b in batches] == [[0, 2], [3, 0]]
    assert required.skipped == Counter({"no label": 2})


class _Scalars(Logger):
    """Keeps the scalars a run logs: {name: [(step, value), ...]}."""

    name, version = "scalars", 0

    def __init__(self) -> None:
        super().__init__()
        self.scalars: dict[str, list[tuple[int, float]]] = {}

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for name, value in metrics.items():
            self.scalars.setdefault(name, []).append((step, value))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


class _Steps(L.LightningModule):
    """One parameter, a loss from the batch's images: a fit that only streams the data."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return (self.weight * batch[B.IMAGE].mean()) ** 2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_skips_are_logged_as_data_skipped_and_warned_naming_key_and_shard(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """README "Bad data": counted by reason, the `data/skipped` scalar, a warning naming the key and the shard."""
    samples = [sample(n, (12, 10)) for n in range(7)]
    samples[1]["jpg"] = b"not an image"
    samples[4]["txt"] = ""
    shard = write_tar(tmp_path / "a.tar", samples)
    data = WebDataModule(train=shard, batch_size=2, num_workers=0, resolution=8, shuffle_buffer=0)
    logger = _Scalars()
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=logger, log_every_n_steps=1, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with caplog.at_level(logging.WARNING, logger="ldm.data"):
        trainer.fit(_Steps(), datamodule=data)
    assert Counter(_reason(r) for r in data.skipped.elements()) == Counter({"undecodable jpg": 1, "no caption": 1})
    assert logger.scalars["data/skipped"][-1][1] == 2  # logged when the count grows (the loader reads ahead)
    warned = [r.getMessage() for r in caplog.records if r.name == "ldm.data.stream"]
    assert warned == [f"skipped sample 000001 in {shard}: undecodable jpg: UnidentifiedImageError",
                      f"skipped sample 000004 in {shard}: no caption"]


def test_skip_warnings_stop_after_ten_per_worker_and_epoch(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    samples = [sample(n, (12, 10)) for n in range(40)]
    for raw in samples[::2]:
        raw["txt"] = ""
    stream = ShardStream([write_tar(tmp_path / "a.tar", samples)], ImageDecoder(8), 2)
    with caplog.at_level(logging.WARNING, logger="ldm.data.stream"):
        batches = list(stream.batches(0))
    assert sum(n for batch in batches for n in batch[SKIPPED].values()) == 20  # every skip counted
    assert len([r for r in caplog.records if r.name == "ldm.data.stream"]) == MAX_SKIP_WARNINGS


def test_unreadable_shards_are_left_out_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_shards(tmp_path, [3, 2], size=(12, 10))
    (tmp_path / "shard-0002.tar").write_bytes(b"")
    (tmp_path / "shard-0003.tar").write_text("a caption file, not a tar")
    dm = WebDataModule(train=str(tmp_path / "shard-*.tar"), batch_size=2, num_workers=0, resolution=8)
    with caplog.at_level(logging.WARNING, logger="ldm.data.datamodule"):
        dm.setup("fit")
    warnings = [r.getMessage().split("/")[-1] for r in caplog.records if r.name == "ldm.data.datamodule"]
    assert warnings == ["shard-0002.tar: empty file",
                                                                      "shard-0003.tar: not a tar archive"]
    assert sorted(b for batch in dm.train_dataloader() for b in batch[B.CAPTION]) == [f"sample {n}" for n in range(5)]
    assert Counter(_reason(r) for r in dm.skipped.elements()) == Counter({"unreadable shard": 2})
    assert all(str(tmp_path) in r for r in dm.skipped)


def test_no_readable_shard_refuses_naming_pattern_and_file(tmp_path: Path) -> None:
    (tmp_path / "shard-0000.tar").write_bytes(b"")
    (tmp_path / "shard-0001.tar").write_bytes(b"")
    pattern = str(tmp_path / "shard-{0000..0001}.tar")
    with pytest.raises(ValueError, match=r"data.init_args.val: .*shard-\{0000\.\.0001\}.*shard-0000.tar: empty file"):
        WebDataModule(val=pattern, num_workers=0).setup("validate")
    with pytest.raises(ValueError, match="shard-0000.tar: empty file"):  # a ShardStream built directly (tools)
        count_samples([str(tmp_path / "shard-0000.tar")])


@pytest.mark.parametrize("options,name", [
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": -2}, "batch_size"),
    ({"eval_batch_size": 0}, "eval_batch_size"),
    ({"num_workers": -1}, "num_workers"),
    ({"resolution": 0}, "resolution"),
    ({"shuffle_buffer": -1}, "shuffle_buffer"),
    ({"epoch_length": 0}, "epoch_length"),
    ({"resampled": True}, "epoch_length"),
    ({"require": ("labels",)}, "require"),
    ({"extra_keys": ("seg.png",)}, "extra_keys"),
    ({"extra_keys": {"seg.png": "mask"}}, "extra_keys"),
])
def test_unusable_options_are_refused_by_name(options: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=rf"data\.init_args\.{name}\b"):
        WebDataModule(**options)


def _plant(folder: Path, seed: int) -> tuple[str, Counter[str], Counter[str]]:
    """Shards with corruptions planted at random by `seed`, a truncated tail and a zero-byte shard
    -> (their pattern, the keys of the good samples, the skip reasons expected)."""
    rng = random.Random(seed)
    good: Counter[str] = Counter()
    expected: Counter[str] = Counter({"unreadable shard": 1})  # the truncated tail: see the test
    folder.mkdir()
    n, deck = 0, []
    for shard in range(3):
        samples, reasons = [], []
        for _ in range(rng.randint(8, 14)):
            raw, reason = _raw(n, (rng.randint(8, 16), rng.randint(8, 16))), None
            if rng.random() < 0.6:
                deck = deck or rng.sample(list(CORRUPTIONS), len(CORRUPTIONS))  # every kind before any twice
                reason = _corrupt(raw, deck.pop(), rng)
            samples.append(raw)
            reasons.append(reason)
            n += 1
        cut = rng.randint(1, len(samples) - 1) if shard == 2 else len(samples)  # the last shard loses its tail
        good.update(raw["__key__"] for raw, reason in zip(samples[:cut], reasons[:cut]) if reason is None)
        expected.update(reason for reason in reasons[:cut] if reason is not None)
        path = write_tar(folder / f"shard-{shard:04d}.tar", samples)
        if cut < len(samples):
            _truncate(path, samples[cut]["__key__"])
    (folder / "shard-0003.tar").write_bytes(b"")
    return str(folder / "shard-*.tar"), good, expected


def _truncate(path: str, key: str) -> None:
    """Cut the tar in the middle of the data of sample `key`'s first member."""
    with tarfile.open(path) as tar:
        first = min((m for m in tar.getmembers() if m.name.startswith(key)), key=lambda m: m.offset)
    Path(path).write_bytes(Path(path).read_bytes()[: first.offset_data + first.size // 2])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fuzz_every_good_sample_once_and_every_bad_one_counted(tmp_path: Path, seed: int) -> None:
    pattern, good, expected = _plant(tmp_path / "shards", seed)
    for workers in (0, 2):
        for batch_size in (1, 3):
            dm = WebDataModule(train=pattern, batch_size=batch_size, num_workers=workers, resolution=8,
                               extra_keys=EXTRA, require=REQUIRE, shuffle_buffer=5, seed=seed)
            dm.setup("fit")
            seen = Counter(key for batch in dm.train_dataloader() for key in batch[B.KEY])
            assert seen == good, (workers, batch_size)
            skipped = Counter(_reason(r) for r in dm.skipped.elements())
            assert skipped.pop("unreadable tar data") == 1  # the truncated tail, counted once
            assert skipped == expected, (workers, batch_size)
