"""Pack captioned images into WebDataset tar shards, keeping each image's original encoded bytes.

Input is either a folder of images with sidecar captions (`a.jpg` + `a.txt`, optional `a.cls`
holding an integer label) or a CSV / JSONL table of `path,caption[,label]` (relative paths are
relative to the table's folder). Every image is decoded once to validate it; unusable samples
are skipped and counted by reason. A shard closes before the next sample would pass either limit.

    python tools/make_shards.py images/ --out shards/ --max-samples-per-shard 1000
    python tools/make_shards.py captions.csv --out 'shards/part-%05d.tar' --shuffle --seed 0
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import tarfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds
from PIL import Image, UnidentifiedImageError

from ldm.data.shards import write_shard_index

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
FORMAT_KEYS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # PIL format -> WebDataset entry name


@dataclass(frozen=True)
class SampleSpec:
    """A candidate sample: image file, caption (None when missing) and label text (None when absent)."""

    path: Path
    caption: str | None
    label: str | None = None  # as written in the sidecar or table; must parse as an int


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


class SkipSample(Exception):
    """A sample that cannot be used; the message is the reason reported."""


def _sidecar(path: Path) -> str | None:
    return path.read_text(encoding="utf-8", errors="replace").strip() if path.is_file() else None


def from_folder(path: str | Path) -> list[SampleSpec]:
    """Images under `path` (recursively, sorted) with their `.txt` caption and optional `.cls` label."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"input folder not found: {root}")
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    return [SampleSpec(p, _sidecar(p.with_suffix(".txt")), _sidecar(p.with_suffix(".cls"))) for p in images]


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


def from_table(path: str | Path) -> list[SampleSpec]:
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
    return specs


def load_sample(spec: SampleSpec) -> dict[str, bytes]:
    """The entries of one sample, original image bytes kept; raise SkipSample when it is unusable."""
    if not spec.path.is_file():
        raise SkipSample("missing file")
    if not spec.caption:
        raise SkipSample("missing caption")
    data = spec.path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()  # structure and checksums
            key = FORMAT_KEYS.get(image.format)
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
    sample = {key: data, "txt": spec.caption.encode()}
    if spec.label is not None:
        try:
            sample["cls"] = str(int(spec.label)).encode()
        except ValueError:
            raise SkipSample("invalid label") from None
    return sample


def tar_bytes(sample: dict[str, bytes]) -> int:
    """Bytes the sample's members take in a tar: a 512-byte header each plus data padded to 512."""
    return sum(tarfile.BLOCKSIZE * (1 + -(-len(data) // tarfile.BLOCKSIZE)) for data in sample.values())


class _ShardSink:
    """Writes samples to `pattern % n` shards, opening the next before either limit would be passed."""

    def __init__(self, pattern: str, max_samples: int, max_bytes: int) -> None:
        self.pattern, self.max_samples, self.max_bytes = pattern, max_samples, max_bytes
        self.shards: list[Path] = []
        self.writer: wds.TarWriter | None = None
        self.count = self.size = 0

    def write(self, key: str, sample: dict[str, bytes]) -> None:
        size = tar_bytes(sample)
        if self.writer is None or self.count >= self.max_samples or self.size + size > self.max_bytes:
            self.close()
            self.shards.append(Path(self.pattern % len(self.shards)))
            self.writer = wds.TarWriter(str(self.shards[-1]), encoder=False, mtime=0)
            self.count = self.size = 0
        self.writer.write({"__key__": key, **sample})
        self.count, self.size = self.count + 1, self.size + size

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def shard_pattern(out: str | Path) -> str:
    """`out` itself when it holds a %-format (e.g. `dir/part-%05d.tar`), else `out/shard-%06d.tar`."""
    return str(out) if "%" in str(out) else str(Path(out) / "shard-%06d.tar")


def make_shards(
    samples: Iterable[SampleSpec],
    out: str | Path,
    max_samples_per_shard: int = 10_000,
    max_bytes_per_shard: int = 1_000_000_000,
    shuffle: bool = False,
    seed: int = 0,
) -> Report:
    """Validate `samples` and write the good ones, keyed `%08d` in written order, to shards at `out`."""
    specs = list(samples)
    if shuffle:
        random.Random(seed).shuffle(specs)
    pattern = shard_pattern(out)
    Path(pattern).parent.mkdir(parents=True, exist_ok=True)
    report = Report()
    sink = _ShardSink(pattern, max_samples_per_shard, max_bytes_per_shard)
    try:
        for spec in specs:
            try:
                sample = load_sample(spec)
            except SkipSample as reason:
                report.skipped.append((spec.path, str(reason)))
                continue
            sink.write(f"{report.written:08d}", sample)
            report.written += 1
    finally:
        sink.close()
    report.shards = sink.shards
    if report.shards:
        write_shard_index([Path(p) for p in report.shards])  # sample counts for the readers' epoch plan
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", type=Path, help="image folder with .txt sidecars, or a .csv / .jsonl table")
    parser.add_argument("--out", required=True, help="output folder, or a shard pattern such as dir/part-%%05d.tar")
    parser.add_argument("--max-samples-per-shard", type=int, default=10_000)
    parser.add_argument("--max-bytes-per-shard", type=int, default=1_000_000_000)
    parser.add_argument("--shuffle", action="store_true", help="shuffle the samples before writing")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed")
    parser.add_argument("--list-skipped", action="store_true", help="print each skipped path and its reason")
    args = parser.parse_args(argv)
    try:
        is_table = args.input.is_file() or args.input.suffix.lower() in (".csv", ".jsonl")
        specs = from_table(args.input) if is_table else from_folder(args.input)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    report = make_shards(specs, args.out, args.max_samples_per_shard, args.max_bytes_per_shard,
                         args.shuffle, args.seed)
    if args.list_skipped:
        for path, reason in report.skipped:
            print(f"skipped {path}: {reason}")
    print(report.summary())
    if report.written == 0:
        raise SystemExit(f"no usable samples in {args.input}")


if __name__ == "__main__":
    main()
