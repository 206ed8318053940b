"""tools/make_shards.py: round trips from a folder (of images or videos), a table, class folders and MNIST idx files
(synthetic and, when ../shared/assets holds them, real), skip reasons, shard limits, bad inputs."""

import csv
import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from ldm.data.images import ImageDecoder
from ldm.data.stream import ShardStream
from ldm.data.video import VideoDecoder, encode_mp4
from tests.assets import ASSETS
from tests.video_samples import frames, webm, zero_frame_mp4
from tools import make_shards as ms


def _image_bytes(seed: int, fmt: str, size: int = 8, width: int | None = None) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, width or size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def _read(shards):
    return list(wds.WebDataset([str(p) for p in shards], shardshuffle=False))


def _check_sizes(samples: list[dict]) -> None:
    """Every sample's json gives its stored image's real (decoded) width and height."""
    for raw in samples:
        image = next(raw[key] for key in ("jpg", "png", "webp") if key in raw)
        meta = json.loads(raw["json"])
        assert (meta["width"], meta["height"]) == Image.open(io.BytesIO(image)).convert("RGB").size


@pytest.fixture
def folder(tmp_path):
    """Three good images (jpeg, png, webp; one with a label) and three bad ones."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    good = {"a.jpeg": ("JPEG", "a red apple", "3"), "sub/b.png": ("PNG", "a blue ball", None),
            "c.webp": ("WEBP", "a green cube", None)}
    for i, (name, (fmt, caption, label)) in enumerate(good.items()):
        (root / name).write_bytes(_image_bytes(i, fmt, size=8 + 2 * i, width=12 - 4 * i))  # 12x8, 8x10, 4x12
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
        meta = json.loads(raw["json"])
        assert meta == {"caption": caption, **({} if label is None else {"label": int(label)}),
                        "width": meta["width"], "height": meta["height"]}
    _check_sizes(list(by_caption.values()))


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_table_round_trip_with_relative_and_absolute_paths(tmp_path, kind):
    (tmp_path / "imgs").mkdir()
    rows = []
    for i in range(4):
        path = tmp_path / "imgs" / f"{i}.png"
        path.write_bytes(_image_bytes(i, "PNG", size=6, width=8 + i))
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
    _check_sizes(samples)

    shuffled = ms.make_shards(ms.from_table(table), tmp_path / "shuffled", shuffle=True, seed=1)
    captions = [raw["txt"].decode() for raw in _read(shuffled.shards)]
    assert sorted(captions) == [f"caption, number {i}" for i in range(4)] and captions != sorted(captions)


def test_shard_limits_whichever_comes_first(tmp_path):
    image = tmp_path / "same.png"
    image.write_bytes(_image_bytes(0, "PNG"))
    specs = [ms.SampleSpec(image, f"caption {i}") for i in range(7)]
    one = sum(map(len, ms.load_sample(specs[0]).values()))  # entry bytes: what ShardWriter's maxsize counts
    single = ms.make_shards(ms.Input(specs[:1]), tmp_path / "single")
    with tarfile.open(single.shards[0]) as tar:
        assert all(member.mtime == 0 for member in tar)

    def shard_sizes(**limits):
        report = ms.make_shards(ms.Input(specs), tmp_path / str(sorted(limits.items())), **limits)
        assert report.written == 7
        return [len(_read([shard])) for shard in report.shards]

    assert shard_sizes(max_samples_per_shard=3) == [3, 3, 1]
    assert shard_sizes(max_bytes_per_shard=2 * one) == [2, 2, 2, 1]
    assert shard_sizes(max_bytes_per_shard=2 * one + 1) == [3, 3, 1]  # ShardWriter: the sample that passes it closes
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


def test_folder_of_videos_keeps_bytes_and_records_rate_and_count(tmp_path, capsys):
    """Videos with sidecar captions are stored as they are, with their size, fps and frame count in the json (a webm
    records no count: its packets are counted); bad ones are skipped, named and counted; clips read back."""
    root = tmp_path / "videos"
    (root / "sub").mkdir(parents=True)
    good = {"a.mp4": (encode_mp4(frames(9), 8), "a clip", (24, 16, 9)),
            "sub/b.webm": (webm(frames(7, 16, 32)), "a wide clip", (32, 16, 7)),
            "c.MOV": (encode_mp4(frames(5, 8, 8), 8), "a mov", (8, 8, 5))}
    bad = {"broken.mp4": (b"no video here" * 9, "undecodable mp4: InvalidDataError"),
           "empty.mp4": (zero_frame_mp4(), "no video frames in mp4"),
           "nocaption.mp4": (encode_mp4(frames(4), 8), "missing caption")}
    for name, (data, caption, _) in good.items():
        (root / name).write_bytes(data)
        (root / name).with_suffix(".txt").write_text(caption)
    for name, (data, reason) in bad.items():
        (root / name).write_bytes(data)
        if reason != "missing caption":
            (root / name).with_suffix(".txt").write_text("a caption")
    ms.main([str(root), "--out", str(tmp_path / "out"), "--list-skipped"])
    printed = capsys.readouterr().out
    for name, (_, reason) in bad.items():
        assert f"skipped {root / name}: {reason}" in printed
    assert "wrote 3 samples in 1 shards; skipped 3: missing caption: 1, no video frames in mp4: 1, undecodable mp4" in printed

    shards = sorted((tmp_path / "out").glob("*.tar"))
    by_caption = {raw["txt"].decode(): raw for raw in _read(shards)}
    for name, (data, caption, (width, height, count)) in good.items():
        raw = by_caption[caption]
        entry = name.rsplit(".")[-1].lower()
        assert raw[entry] == data  # the file's bytes, no re-encode
        assert json.loads(raw["json"]) == {"caption": caption, "width": width, "height": height, "fps": 8.0,
                                           "num_frames": count}
    clips = list(ShardStream([str(p) for p in shards], VideoDecoder(ImageDecoder(8), frames=4), batch_size=1).batches(0))
    assert sorted((b["caption"][0], b["num_frames"].item()) for b in clips) == [("a clip", 9), ("a mov", 5), ("a wide clip", 7)]
    assert all(b["image"].shape == (1, 3, 4, 8, 8) for b in clips)


def _stream(shards, resolution: int) -> list[dict]:
    """Every sample of `shards` through the project's reader, one batch each."""
    stream = ShardStream([str(p) for p in shards], ImageDecoder(resolution), batch_size=1)
    return list(stream.batches(0))


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = np.array([magic, *array.shape], ">u4").tobytes()
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def _read_idx_gz(path: Path, header: int) -> np.ndarray:
    return np.frombuffer(gzip.decompress(path.read_bytes()), np.uint8, offset=header)


def _check_class_shards(out: Path, classes: list[str], expected: dict[str, tuple[int, str]]) -> dict[str, dict]:
    """Check classes.json and each sample's cls/txt/json against `expected` (key -> label, caption); raw by key."""
    assert json.loads((out / ms.CLASSES_NAME).read_text()) == {"classes": classes}
    raw = {sample["__key__"]: sample for sample in _read(sorted(out.glob("*.tar")))}
    assert sorted(raw) == sorted(expected)
    for key, (label, caption) in expected.items():
        assert int(raw[key]["cls"]) == label and raw[key]["txt"].decode() == caption
        meta = json.loads(raw[key]["json"])
        assert meta == {"caption": caption, "label": label, "class": classes[label],
                        "width": meta["width"], "height": meta["height"]}
    _check_sizes(list(raw.values()))
    read = {batch["key"][0]: batch for batch in _stream(sorted(out.glob("*.tar")), 8)}
    assert {key: (int(b["label"]), b["caption"][0]) for key, b in read.items()} == expected
    return raw


def test_class_folders_label_by_sorted_folder_and_caption_from_template(tmp_path, capsys):
    root = tmp_path / "train"
    files = {}
    for seed, name in enumerate(["sea_lion/x/deep.jpg", "dog/1.jpg", "cat/b.png", "cat/a.jpg", "dog/0.png"]):
        files[name] = _image_bytes(seed, "PNG" if name.endswith("png") else "JPEG", width=6 + seed)
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(files[name])
    (root / "stray.jpg").write_bytes(files["cat/a.jpg"])  # not in a class folder: ignored
    ms.main([str(root), "--class-folders", "--out", str(tmp_path / "out")])
    assert "3 classes listed in" in capsys.readouterr().out

    order = ["cat/a.jpg", "cat/b.png", "dog/0.png", "dog/1.jpg", "sea_lion/x/deep.jpg"]  # class by class, sorted
    captions = ["a photo of a cat", "a photo of a dog", "a photo of a sea lion"]
    labels = [0, 0, 1, 1, 2]
    expected = {f"{i:08d}": (label, captions[label]) for i, label in enumerate(labels)}
    raw = _check_class_shards(tmp_path / "out", ["cat", "dog", "sea_lion"], expected)
    for i, name in enumerate(order):
        assert raw[f"{i:08d}"][name.rsplit(".")[-1]] == files[name]  # original bytes

    specs, _ = ms.from_class_folders(root, "{class}, a pet")
    assert [s.caption for s in specs][::2] == ["cat, a pet", "dog, a pet", "sea lion, a pet"]
    with pytest.raises(ValueError, match="has no {class}"):
        ms.from_class_folders(root, "a photo")
    with pytest.raises(ValueError, match="no class folders"):
        ms.from_class_folders(root / "cat")


def test_mnist_idx_round_trip_with_pixel_equality(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (5, 6, 5), dtype=np.uint8)  # 5 digits, 6 rows x 5 columns
    digits = np.array([3, 0, 9, 3, 7])
    _write_idx(tmp_path / "img-idx3-ubyte.gz", pixels, 2051)
    _write_idx(tmp_path / "lab-idx1-ubyte.gz", digits, 2049)
    ms.main([str(tmp_path / "img-idx3-ubyte.gz"), "--mnist-labels", str(tmp_path / "lab-idx1-ubyte.gz"),
             "--out", str(tmp_path / "out"), "--max-samples-per-shard", "2"])

    expected = {f"{i:08d}": (int(d), f"a handwritten digit {d}") for i, d in enumerate(digits)}
    raw = _check_class_shards(tmp_path / "out", ms.DIGITS, expected)
    for i in range(5):
        image = Image.open(io.BytesIO(raw[f"{i:08d}"]["png"]))
        assert image.mode == "L" and np.array_equal(np.asarray(image), pixels[i])
    read = _stream(sorted((tmp_path / "out").glob("*.tar")), 5)  # short side 5: no resize, top rows kept
    for i, batch in enumerate(read):
        gray = pixels[i, :5].astype(np.float32) / 127.5 - 1
        assert np.array_equal(batch["image"][0].numpy(), np.stack([gray] * 3))  # RGB from grayscale

    (tmp_path / "raw-idx1-ubyte").write_bytes(gzip.decompress((tmp_path / "lab-idx1-ubyte.gz").read_bytes()))
    assert ms.read_idx(tmp_path / "raw-idx1-ubyte", 1).tolist() == digits.tolist()  # not gzip'd


def test_bad_mnist_files_are_clear_errors(tmp_path, capsys):
    _write_idx(tmp_path / "images.gz", np.zeros((3, 4, 4)), 2051)
    _write_idx(tmp_path / "labels.gz", np.zeros(2), 2049)
    (tmp_path / "short.gz").write_bytes(gzip.compress(np.array([2049, 5], ">u4").tobytes() + bytes(3)))
    with pytest.raises(ValueError, match="labels.gz: not an IDX file of 3-D unsigned bytes"):
        ms.read_idx(tmp_path / "labels.gz", 3)
    with pytest.raises(ValueError, match="short.gz: 3 data bytes, its header says 5"):
        ms.read_idx(tmp_path / "short.gz", 1)
    with pytest.raises(ValueError, match="images.gz holds 3 images but .*labels.gz holds 2 labels"):
        ms.from_mnist(tmp_path / "images.gz", tmp_path / "labels.gz")
    _write_idx(tmp_path / "labels.gz", np.array([1, 2, 10]), 2049)
    with pytest.raises(ValueError, match="label 10 is not a digit"):
        ms.from_mnist(tmp_path / "images.gz", tmp_path / "labels.gz")

    for argv, message in [(["t10k-images-idx3-ubyte.gz"], "name its labels file with --mnist-labels"),
                          ([str(tmp_path), "--caption-template", "{class}"], "--caption-template needs"),
                          ([str(tmp_path / "images.gz"), "--mnist-labels", "nowhere.gz"], "nowhere.gz")]:
        with pytest.raises(SystemExit):
            ms.main([*argv, "--out", str(tmp_path / "out")])
        assert message in capsys.readouterr().err


@pytest.mark.skipif(not (ASSETS / "mnist").is_dir(), reason=f"real MNIST files not found in {ASSETS / 'mnist'}")
def test_real_mnist_first_hundred(tmp_path):
    images, labels = ASSETS / "mnist" / "t10k-images-idx3-ubyte.gz", ASSETS / "mnist" / "t10k-labels-idx1-ubyte.gz"
    ms.main([str(images), "--mnist-labels", str(labels), "--out", str(tmp_path), "--limit", "100"])
    samples = _read(sorted(tmp_path.glob("*.tar")))
    assert len(samples) == 100
    assert [int(s["cls"]) for s in samples[:10]] == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the well-known t10k start
    assert [int(s["cls"]) for s in samples] == _read_idx_gz(labels, 8)[:100].tolist()
    pixels = _read_idx_gz(images, 16)[: 100 * 28 * 28].reshape(100, 28, 28)
    for sample, digit in zip(samples, pixels):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["png"]))), digit)
    assert samples[0]["txt"] == b"a handwritten digit 7"


CIFAR = ASSETS / "cifar10" / "cifar10-jpg.tar.gz"


@pytest.mark.skipif(not CIFAR.is_file(), reason=f"CIFAR-10 JPEG archive not found at {CIFAR}")
def test_real_cifar10_jpegs_as_class_folders(tmp_path):
    root, wanted = tmp_path / "train", ("airplane", "automobile", "bird")
    with tarfile.open(CIFAR) as archive:  # the first two images of the first three classes
        for member in archive:
            parts = member.name.split("/")
            if member.isfile() and parts[0] == "train" and parts[1] in wanted and parts[2] in ("0000.jpg", "0001.jpg"):
                (root / parts[1]).mkdir(parents=True, exist_ok=True)
                (root / parts[1] / parts[2]).write_bytes(archive.extractfile(member).read())
                if parts[1:] == ["bird", "0001.jpg"]:
                    break
    ms.main([str(root), "--class-folders", "--out", str(tmp_path / "out")])
    expected = {f"{i:08d}": (i // 2, f"a photo of a {wanted[i // 2]}") for i in range(6)}
    raw = _check_class_shards(tmp_path / "out", list(wanted), expected)
    assert raw["00000005"]["jpg"] == (root / "bird" / "0001.jpg").read_bytes()
