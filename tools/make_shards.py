"""Pack captioned images and videos into WebDataset tar shards, keeping each file's original encoded bytes.

Inputs, one reader each (a function returning an `Input`, which `make_shards` writes):

- `from_folder`: a folder of images or videos with sidecar captions (`a.jpg` + `a.txt`, `b.mp4` + `b.txt`,
  optional `a.cls` holding an integer label);
- `from_table`: a CSV / JSONL table of `path,caption[,label]` (relative paths are relative to the
  table's folder);
- `from_class_folders`, `--class-folders`: an ImageFolder tree, `root/<class>/**/image` (CIFAR-10 as JPEGs:
  `train/<class>/NNNN.jpg`). `cls` is the index of the class in the sorted folder names, as in
  torchvision's ImageFolder; the caption is `--caption-template` with `{class}` replaced by the
  folder name, underscores as spaces;
- `from_mnist`, `--mnist-labels LABELS`: the input is an MNIST idx3 images file and LABELS its idx1 labels file
  (each gzip'd or raw). Digits are written as grayscale PNGs (the data module reads them as RGB),
  `cls` is the digit, classes are "0".."9".

Images are decoded once to validate them; videos (ldm.data.entries.VIDEO_EXTENSIONS, stored as one entry named by
their suffix, read by ldm.data.video) have their header read and first frame decoded. Unusable samples are skipped
and counted by reason (`--list-skipped` names each file).
Shards are written by `webdataset.ShardWriter`: a shard closes once it holds
`--max-samples-per-shard` samples or its entries reach `--max-bytes-per-shard` bytes (whichever
comes first; the byte limit counts entry data, not tar headers, and is reached by the sample that
passes it). Next to the shards go `shardindex.json` (sample counts) and, for the class modes,
`classes.json`: `{"classes": [name, ...]}`, where a label is an index into that list. Every sample
carries a `json` entry `{"caption", ["label", "class",] "width", "height"}` (img2dataset's names):
the stored image's size, read from its header, so readers can plan aspect-ratio buckets without
decoding; "class" is set by the class modes; a video's json adds its "fps" and "num_frames" (from its container's
header, or its packets counted: no frame is decoded for them) and gives its frame size. Class folders (of videos too,
UCF-101's layout) come out class by class: pass
`--shuffle` for training shards.

    python tools/make_shards.py images/ --out shards/ --max-samples-per-shard 1000
    python tools/make_shards.py videos/ --out shards/clips --max-samples-per-shard 100 --shuffle
    python tools/make_shards.py captions.csv --out 'shards/part-%05d.tar' --shuffle --seed 0
    python tools/make_shards.py cifar10/train --class-folders --out shards/cifar10 --shuffle
    python tools/make_shards.py train-images-idx3-ubyte.gz --mnist-labels train-labels-idx1-ubyte.gz \
        --out shards/mnist --shuffle --limit 1000
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

import numpy as np
import webdataset as wds
from PIL import Image, UnidentifiedImageError

from ldm.data import entries as E
from ldm.data.decoder import SkipSample
from ldm.data.shards import write_shard_index
from ldm.data.video import check_video

CLASSES_NAME = "classes.json"  # {"classes": [...]} next to the shards of a class-labelled dataset
PHOTO_TEMPLATE = "a photo of a {class}"  # default caption of --class-folders
DIGIT_TEMPLATE = "a handwritten digit {class}"  # default caption of MNIST
DIGITS = [str(d) for d in range(10)]  # MNIST class names


@dataclass(frozen=True)
class SampleSpec:
    """A candidate sample: image or video file, caption (None when missing) and label text (None when absent)."""

    path: Path  # the image or video file; for in-memory `pixels`, the file and index they came from
    caption: str | None
    label: str | None = None  # as written in the sidecar or table; must parse as an int
    class_name: str | None = None  # set by the class modes: the sample also gets a `json` entry
    pixels: np.ndarray | None = field(default=None, compare=False, repr=False)  # (H, W) uint8, written as PNG


class Stored(NamedTuple):
    """An image or video as a sample stores it: its entry name, encoded bytes, size in pixels and any more json fields."""

    entry: str
    data: bytes
    size: tuple[int, int]  # (width, height)
    fields: Mapping[str, float | int] = MappingProxyType({})  # a video's fps and num_frames


class Input(NamedTuple):
    """What a reader found: the candidate samples and, for a class-labelled input, the class names its labels
    index (written to classes.json next to the shards)."""

    samples: list[SampleSpec]
    classes: list[str] | None = None


@dataclass
class Report:
    """What `make_shards` wrote and what it skipped, with the reason for each skip."""

    shards: list[Path] = field(default_factory=list)
    written: int = 0
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def summary(self) -> str:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(Counter(r for _, r in self.skipped).items()))
        return (f"wrote {self.written} samples in {len(self.shards)} shards; skipped {len(self.skipped)}"
                + (f": {reasons}" if reasons else ""))


def _sidecar(path: Path) -> str | None:
    return path.read_text(encoding="utf-8", errors="replace").strip() if path.is_file() else None


def _folder(path: str | Path) -> Path:
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"input folder not found: {root}")
    return root


def _media(root: Path) -> list[Path]:
    """Image and video files under `root`, recursively, sorted."""
    return sorted(p for p in root.rglob("*") if (E.image_entry(p) or E.video_entry(p)) and p.is_file())


def _no_media(where: str) -> ValueError:
    suffixes = ", ".join("." + name for name in E.IMAGE_EXTENSIONS + E.VIDEO_EXTENSIONS)
    return ValueError(f"no images or videos ({suffixes}) {where}")


def from_folder(path: str | Path) -> Input:
    """Images and videos under `path` (recursively, sorted) with their `.txt` caption and optional `.cls` label."""
    root = _folder(path)
    images = _media(root)
    if not images:
        raise _no_media(f"under {root}")
    return Input([SampleSpec(p, _sidecar(p.with_suffix(".txt")), _sidecar(p.with_suffix(".cls"))) for p in images])


def class_captions(template: str, classes: Sequence[str]) -> list[str]:
    """The caption of each class: `template` with `{class}` replaced by its name, underscores as spaces."""
    if "{class}" not in template:
        raise ValueError(f"caption template {template!r} has no {{class}}")
    return [template.replace("{class}", name.replace("_", " ")) for name in classes]


def from_class_folders(path: str | Path, template: str = PHOTO_TEMPLATE) -> Input:
    """ImageFolder layout `path/<class>/**/image`: samples class by class, labels indexing the sorted class names."""
    root = _folder(path)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())  # torchvision's order, so labels agree
    if not classes:
        raise ValueError(f"no class folders under {root}")
    captions = class_captions(template, classes)
    specs = [SampleSpec(image, captions[label], str(label), name)
             for label, name in enumerate(classes) for image in _media(root / name)]
    if not specs:
        raise _no_media(f"in the class folders under {root}")
    return Input(specs, classes)


def read_idx(path: str | Path, dims: int) -> np.ndarray:
    """The uint8 array of an IDX file with `dims` dimensions (gzip'd if named `.gz`); ValueError naming the file."""
    path = Path(path)
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    header = 4 * (1 + dims)  # big-endian uint32: magic, then the size of each dimension
    magic = 0x800 + dims  # unsigned bytes: 2049 for labels, 2051 for images
    if len(data) < header or int.from_bytes(data[:4], "big") != magic:
        raise ValueError(f"{path}: not an IDX file of {dims}-D unsigned bytes (magic {magic} expected)")
    shape = [int(n) for n in np.frombuffer(data, ">u4", dims, offset=4)]
    if len(data) - header != int(np.prod(shape)):
        raise ValueError(f"{path}: {len(data) - header} data bytes, its header says {' x '.join(map(str, shape))}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def from_mnist(images: str | Path, labels: str | Path, template: str = DIGIT_TEMPLATE) -> Input:
    """MNIST idx3 images and idx1 labels: samples in file order, classes "0".."9"."""
    pixels, digits = read_idx(images, 3), read_idx(labels, 1)  # (N, H, W), (N,)
    if len(pixels) != len(digits):
        raise ValueError(f"{images} holds {len(pixels)} images but {labels} holds {len(digits)} labels")
    if len(digits) and digits.max() >= len(DIGITS):
        raise ValueError(f"{labels}: label {digits.max()} is not a digit")
    captions = class_captions(template, DIGITS)
    return Input([SampleSpec(Path(f"{images}#{i}"), captions[d], str(d), DIGITS[d], pixels[i])
                  for i, d in enumerate(digits.tolist())], DIGITS)


def _table_rows(table: Path) -> list[list]:
    """[path, caption, label] rows of a `.jsonl` table or of a CSV with an optional `path,...` header."""
    lines = table.read_text(encoding="utf-8").splitlines()
    rows = []
    if table.suffix.lower() == ".jsonl":
        for number, line in enumerate(lines, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    rows.append([row["path"], row.get("caption"), row.get("label")])
                except (json.JSONDecodeError, KeyError, TypeError) as error:
                    raise ValueError(f"{table}: line {number} is not a JSON object with a 'path': {error}") from None
        return rows
    for number, row in enumerate(csv.reader(lines), 1):
        if not row or (number == 1 and row[0].strip().lower() == "path"):
            continue  # blank line or header
        if len(row) > 3:
            raise ValueError(f"{table}: row {number} has {len(row)} fields, expected path,caption[,label]")
        rows.append((row + [None, None])[:3])
    return rows


def from_table(path: str | Path) -> Input:
    """Samples listed in a CSV or JSONL file of path, caption and optional label."""
    table = Path(path)
    if not table.is_file():
        raise FileNotFoundError(f"input table not found: {table}")
    specs = []
    for image, caption, label in _table_rows(table):
        image_path = Path(str(image))
        specs.append(SampleSpec(
            image_path if image_path.is_absolute() else table.parent / image_path,
            None if caption is None else str(caption).strip(),
            None if label is None or str(label).strip() == "" else str(label).strip(),
        ))
    if not specs:
        raise ValueError(f"no samples in {table}")
    return Input(specs)


def _checked_image(data: bytes) -> Stored:
    """Encoded image bytes that decode fully, stored as they are; raise SkipSample otherwise."""
    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header: format and size
            image.verify()  # structure and checksums
            key, size = E.PIL_FORMATS.get(image.format), image.size
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # verify() does not decode: a truncated JPEG only fails here
    except UnidentifiedImageError:
        raise SkipSample("not an image") from None
    except Image.DecompressionBombError:
        raise SkipSample("image too large") from None
    except (OSError, SyntaxError, ValueError):
        raise SkipSample("corrupt or truncated image") from None
    if key is None:
        raise SkipSample("unsupported image format")
    return Stored(key, data, size)


def _checked_video(data: bytes, entry: str) -> Stored:
    """Encoded video bytes whose header gives a size, rate and frame count and whose first frame decodes, stored as
    they are; raise SkipSample otherwise."""
    info = check_video(data, entry)
    return Stored(entry, data, (info.width, info.height), {E.FPS: info.fps, E.NUM_FRAMES: info.num_frames})


def _png(pixels: np.ndarray) -> Stored:
    """An (H, W) uint8 array as a grayscale PNG: lossless, so pixels round-trip."""
    buffer = io.BytesIO()
    image = Image.fromarray(pixels)
    image.save(buffer, "PNG")
    return Stored(E.PIL_FORMATS["PNG"], buffer.getvalue(), image.size)


def load_sample(spec: SampleSpec) -> dict[str, bytes]:
    """The entries of one sample, original image or video bytes kept; raise SkipSample when it is unusable."""
    if spec.pixels is None and not spec.path.is_file():
        raise SkipSample("missing file")
    if not spec.caption:
        raise SkipSample("missing caption")
    if spec.pixels is not None:
        image = _png(spec.pixels)
    else:
        video = E.video_entry(spec.path)
        image = _checked_video(spec.path.read_bytes(), video) if video else _checked_image(spec.path.read_bytes())
    sample = {image.entry: image.data, E.TXT: spec.caption.encode()}
    meta: dict[str, str | int | float] = {E.CAPTION: spec.caption}
    if spec.label is not None:
        try:
            meta[E.LABEL] = int(spec.label)
        except ValueError:
            raise SkipSample("invalid label") from None
        sample[E.CLS] = str(meta[E.LABEL]).encode()
    if spec.class_name is not None:
        meta["class"] = spec.class_name
    meta[E.WIDTH], meta[E.HEIGHT] = image.size
    meta.update(image.fields)
    sample[E.JSON] = json.dumps(meta).encode()
    return sample


def _usable(specs: Iterable[SampleSpec], report: Report) -> Iterator[dict[str, bytes]]:
    """The loaded samples, keyed `%08d` in order; each skip is recorded in `report`."""
    for spec in specs:
        try:
            sample = load_sample(spec)
        except SkipSample as reason:
            report.skipped.append((spec.path, str(reason)))
            continue
        key, report.written = f"{report.written:08d}", report.written + 1
        yield {"__key__": key, **sample}


def shard_pattern(out: str | Path) -> str:
    """`out` itself when it holds a %-format (e.g. `dir/part-%05d.tar`), else `out/shard-%06d.tar`."""
    return str(out) if "%" in str(out) else str(Path(out) / "shard-%06d.tar")


def make_shards(
    source: Input,  # what a reader found, of any input kind
    out: str | Path,
    max_samples_per_shard: int = 10_000,
    max_bytes_per_shard: int = 1_000_000_000,
    shuffle: bool = False,
    seed: int = 0,
    limit: int | None = None,  # write at most this many samples (the first, after shuffling)
) -> Report:
    """Validate the samples of `source` and write the good ones, keyed `%08d` in written order, to shards at `out`,
    with their index and, for a class-labelled input, classes.json."""
    specs = list(source.samples)
    if shuffle:
        random.Random(seed).shuffle(specs)
    report = Report()
    usable = islice(_usable(specs, report), limit)
    first = next(usable, None)
    if first is None:  # ShardWriter opens its first shard at once: make none for nothing
        return report
    pattern = shard_pattern(out)
    Path(pattern).parent.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(pattern, maxcount=max_samples_per_shard, maxsize=max_bytes_per_shard, verbose=0,
                         post=lambda name: report.shards.append(Path(name)), encoder=False, mtime=0) as sink:
        for sample in chain([first], usable):  # original bytes, fixed mtime: same input, same shards
            sink.write(sample)
    write_shard_index(report.shards)  # sample counts for the readers' epoch plan
    if source.classes is not None:
        (report.shards[0].parent / CLASSES_NAME).write_text(json.dumps({"classes": source.classes}, indent=1) + "\n")
    return report


def read_input(args: argparse.Namespace) -> Input:
    """The input read by the reader of its kind: the mode options name it, else a file is a table, a folder a folder."""
    if args.mnist_labels is not None:
        return from_mnist(args.input, args.mnist_labels, args.caption_template or DIGIT_TEMPLATE)
    if args.class_folders:
        return from_class_folders(args.input, args.caption_template or PHOTO_TEMPLATE)
    if args.caption_template is not None:
        raise ValueError("--caption-template needs --class-folders or --mnist-labels")
    if "-idx3-ubyte" in args.input.name:
        raise ValueError(f"{args.input} looks like MNIST images: name its labels file with --mnist-labels")
    is_table = args.input.is_file() or args.input.suffix.lower() in (".csv", ".jsonl")
    return from_table(args.input) if is_table else from_folder(args.input)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", type=Path, help="image or video folder (.txt sidecars, or class sub-folders with "
                        "--class-folders), a .csv / .jsonl table, or MNIST idx3 images with --mnist-labels")
    parser.add_argument("--out", required=True, help="output folder, or a shard pattern such as dir/part-%%05d.tar")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--class-folders", action="store_true",
                      help="input holds one sub-folder per class (ImageFolder layout); label = sorted folder index")
    mode.add_argument("--mnist-labels", type=Path, metavar="LABELS",
                      help="input is an MNIST idx3 images file, LABELS its idx1 labels file (.gz or raw)")
    parser.add_argument("--caption-template", help="caption of each class, {class} replaced by its name "
                        f"(default: {PHOTO_TEMPLATE!r}; MNIST: {DIGIT_TEMPLATE!r})")
    parser.add_argument("--max-samples-per-shard", type=int, default=10_000)
    parser.add_argument("--max-bytes-per-shard", type=int, default=1_000_000_000)
    parser.add_argument("--shuffle", action="store_true", help="shuffle the samples before writing")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed")
    parser.add_argument("--limit", type=int, help="write at most N samples (the first, after any shuffle)")
    parser.add_argument("--list-skipped", action="store_true", help="print each skipped path and its reason")
    args = parser.parse_args(argv)
    try:
        source = read_input(args)
    except (OSError, ValueError) as error:  # missing files, bad gzip, malformed tables or idx files
        parser.error(str(error))
    report = make_shards(source, args.out, args.max_samples_per_shard, args.max_bytes_per_shard, args.shuffle,
                         args.seed, args.limit)
    if args.list_skipped:
        for path, reason in report.skipped:
            print(f"skipped {path}: {reason}")
    print(report.summary())
    if report.written == 0:
        raise SystemExit(f"no usable samples in {args.input}")
    if source.classes is not None:
        print(f"{len(source.classes)} classes listed in {report.shards[0].parent / CLASSES_NAME}")


if __name__ == "__main__":
    main()
