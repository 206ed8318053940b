"""tools/make_shards.py: round trips from a folder and a table, skip reasons, shard limits, bad inputs."""

import csv
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import make_shards as ms  # noqa: E402


def _image_bytes(seed: int, fmt: str, size: int = 8) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def _read(shards):
    return list(wds.WebDataset([str(p) for p in shards], shardshuffle=False))


@pytest.fixture
def folder(tmp_path):
    """Three good images (jpeg, png, webp; one with a label) and three bad ones."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    good = {"a.jpeg": ("JPEG", "a red apple", "3"), "sub/b.png": ("PNG", "a blue ball", None),
            "c.webp": ("WEBP", "a green cube", None)}
    for i, (name, (fmt, caption, label)) in enumerate(good.items()):
        (root / name).write_bytes(_image_bytes(i, fmt))
        (root / name).with_suffix(".txt").write_text(caption + "\n")
        if label is not None:
            (root / name).with_suffix(".cls").write_text(label)
    whole = _image_bytes(9, "JPEG", size=64)
    (root / "truncated.jpg").write_bytes(whole[: len(whole) // 2])  # header intact: only decoding fails
    (root / "truncated.txt").write_text("half a picture")
    (root / "fake.jpg").write_bytes(b"this is not a jpeg at all")
    (root / "fake.txt").write_text("text pretending")
    (root / "nocaption.png").write_bytes(_image_bytes(7, "PNG"))
    (root / "notes.md").write_text("ignored: not an image suffix")
    return root, good


def test_folder_round_trip_keeps_bytes_and_reports_skips(folder, tmp_path):
    root, good = folder
    report = ms.make_shards(ms.from_folder(root), tmp_path / "out")
    assert report.shards == [tmp_path / "out" / "shard-000000.tar"] and report.written == 3
    assert sorted((path.name, reason) for path, reason in report.skipped) == [
        ("fake.jpg", "not an image"), ("nocaption.png", "missing caption"),
        ("truncated.jpg", "corrupt or truncated image")]
    assert report.summary() == ("wrote 3 samples in 1 shards; skipped 3: corrupt or truncated image: 1, "
                                "missing caption: 1, not an image: 1")

    by_caption = {raw["txt"].decode(): raw for raw in _read(report.shards)}
    assert sorted(by_caption) == sorted(caption for _, caption, _ in good.values())
    for name, (fmt, caption, label) in good.items():
        raw = by_caption[caption]
        key = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
        assert raw[key] == (root / name).read_bytes()  # original bytes, .jpeg stored as jpg
        assert raw.get("cls") == (None if label is None else label.encode())


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_table_round_trip_with_relative_and_absolute_paths(tmp_path, kind):
    (tmp_path / "imgs").mkdir()
    rows = []
    for i in range(4):
        path = tmp_path / "imgs" / f"{i}.png"
        path.write_bytes(_image_bytes(i, "PNG"))
        rows.append((str(path) if i % 2 else f"imgs/{i}.png", f"caption, number {i}", i))
    rows.append(("imgs/missing.png", "gone", 0))
    table = tmp_path / f"list.{kind}"
    if kind == "csv":
        with table.open("w", newline="") as f:
            csv.writer(f).writerows([("path", "caption", "label"), *rows])
    else:
        table.write_text("".join(json.dumps({"path": p, "caption": c, "label": y}) + "\n" for p, c, y in rows))

    report = ms.make_shards(ms.from_table(table), tmp_path / "out" / "part-%03d.tar", max_samples_per_shard=3)
    assert [p.name for p in report.shards] == ["part-000.tar", "part-001.tar"]
    assert report.skipped == [(tmp_path / "imgs" / "missing.png", "missing file")]
    samples = _read(report.shards)
    assert [raw["__key__"] for raw in samples] == [f"{i:08d}" for i in range(4)]
    for i, raw in enumerate(samples):
        assert raw["png"] == (tmp_path / "imgs" / f"{i}.png").read_bytes()
        assert raw["txt"].decode() == f"caption, number {i}" and int(raw["cls"]) == i

    shuffled = ms.make_shards(ms.from_table(table), tmp_path / "shuffled", shuffle=True, seed=1)
    captions = [raw["txt"].decode() for raw in _read(shuffled.shards)]
    assert sorted(captions) == [f"caption, number {i}" for i in range(4)] and captions != sorted(captions)


def test_shard_limits_whichever_comes_first(tmp_path):
    image = tmp_path / "same.png"
    image.write_bytes(_image_bytes(0, "PNG"))
    specs = [ms.SampleSpec(image, f"caption {i}") for i in range(7)]
    one = ms.tar_bytes(ms.load_sample(specs[0]))
    single = ms.make_shards(specs[:1], tmp_path / "single")
    with tarfile.open(single.shards[0]) as tar:
        last = tar.getmembers()[-1]
        assert one == last.offset_data + 512 * -(-last.size // 512)  # where the end-of-archive blocks start
        assert all(member.mtime == 0 for member in tar)

    def shard_sizes(**limits):
        report = ms.make_shards(specs, tmp_path / str(sorted(limits.items())), **limits)
        assert report.written == 7
        return [len(_read([shard])) for shard in report.shards]

    assert shard_sizes(max_samples_per_shard=3) == [3, 3, 1]
    assert shard_sizes(max_bytes_per_shard=2 * one) == [2, 2, 2, 1]
    assert shard_sizes(max_bytes_per_shard=2 * one + one - 1) == [2, 2, 2, 1]  # a third would pass the limit
    assert shard_sizes(max_samples_per_shard=4, max_bytes_per_shard=3 * one) == [3, 3, 1]
    assert shard_sizes(max_samples_per_shard=2, max_bytes_per_shard=3 * one) == [2, 2, 2, 1]
    assert shard_sizes(max_bytes_per_shard=1) == [1] * 7  # an oversized sample still gets its own shard


def test_missing_or_empty_input_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        ms.from_folder(missing)
    with pytest.raises(FileNotFoundError, match=str(missing)):
        ms.from_table(missing)
    with pytest.raises(SystemExit) as exit_info:
        ms.main([str(missing / "list.csv"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code != 0 and str(missing / "list.csv") in capsys.readouterr().err

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ms.from_folder(tmp_path / "empty")
    (tmp_path / "empty.csv").write_text("path,caption\n")
    with pytest.raises(ValueError, match=f"no samples in {tmp_path / 'empty.csv'}"):
        ms.from_table(tmp_path / "empty.csv")
    (tmp_path / "wide.csv").write_text("a.png,a caption,1,extra\n")
    with pytest.raises(ValueError, match="wide.csv: row 1 has 4 fields"):
        ms.from_table(tmp_path / "wide.csv")


def test_cli_lists_skips_and_fails_when_nothing_is_usable(folder, tmp_path, capsys):
    root, _ = folder
    ms.main([str(root), "--out", str(tmp_path / "out"), "--list-skipped", "--max-samples-per-shard", "2"])
    out = capsys.readouterr().out
    assert f"skipped {root / 'fake.jpg'}: not an image" in out
    assert "wrote 3 samples in 2 shards; skipped 3" in out

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"nope")
    with pytest.raises(SystemExit) as exit_info:
        ms.main([str(bad), "--out", str(tmp_path / "bad_out")])
    assert exit_info.value.code != 0
    assert "wrote 0 samples in 0 shards; skipped 1: missing caption: 1" in capsys.readouterr().out
