"""The WebDataModule train loader's images/s per DataLoader worker count, and image decoding per core.

The loader runs as training runs it (random crop, shuffle buffer on); the decode rate is the single-process
rate of the shards' own images. Without `--shards` it writes a temporary synthetic shapes dataset at 256 px
(mixed aspect ratios with `--buckets`). `--buckets MAX_RATIO MULTIPLE` also times the same shards in
aspect-ratio buckets, each worker count right after its square-crop timing.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from itertools import islice
from typing import Any

from PIL import Image
from webdataset.tariterators import tarfile_samples

from ldm.data import batch as B
from ldm.data.buckets import AspectBuckets
from ldm.data.datamodule import WebDataModule
from ldm.data.entries import IMAGE_EXTENSIONS
from ldm.data.shards import expand_shards
from ldm.data.synthetic import write_shapes

WARMUP_BATCHES = 3  # untimed: worker start-up and the first fill of the shuffle buffer
DECODE_IMAGES = 500  # images decoded for the per-core rate
SYNTHETIC_SAMPLES, SYNTHETIC_SIZE = 600, 256  # the temporary shapes dataset used without --shards


def benchmark_data(
    shards: str | None = None,  # shard pattern; None: a temporary synthetic shapes dataset
    resolution: int = 256,
    batch_size: int = 32,
    workers: tuple[int, ...] = (0, 1, 2),
    batches: int = 50,  # timed batches per worker count
    buckets: tuple[float, int] | None = None,  # (max_ratio, multiple): also time aspect-ratio buckets
) -> dict[str, Any]:
    """Train-loader images/s per worker count (square crops, and buckets if asked) and single-process image
    decode images/s."""
    with tempfile.TemporaryDirectory() as tmp:
        aspect = "square" if buckets is None else "mixed"
        source = shards or f"synthetic {'' if buckets is None else 'mixed-aspect '}shapes, {SYNTHETIC_SAMPLES} x {SYNTHETIC_SIZE} px"
        if shards is None:
            write_shapes(tmp, train=SYNTHETIC_SAMPLES, val=0, test=0, size=SYNTHETIC_SIZE, samples_per_shard=100, aspect=aspect)
            shards = f"{tmp}/train/shard-*.tar"
        modes = {"square": None} | ({} if buckets is None else {"buckets": AspectBuckets(*buckets)})
        loader: dict[str, dict[int, float]] = {mode: {} for mode in modes}
        for count in workers:
            for mode, setting in modes.items():
                loader[mode][count] = _loader_rate(shards, batch_size, count, resolution, batches, setting)

        samples = islice(tarfile_samples({"url": url} for url in expand_shards(shards)), DECODE_IMAGES)
        encoded = [(key, s[key]) for s in samples for key in IMAGE_EXTENSIONS if key in s]  # (format, bytes)
        start = time.perf_counter()
        for _, blob in encoded:
            Image.open(io.BytesIO(blob)).convert("RGB")  # convert() forces the full decode
        decode = len(encoded) / (time.perf_counter() - start)
    return {
        "benchmark": "data", "shards": source, "resolution": resolution, "batch_size": batch_size,
        "batches": batches, "loader_images_per_s": loader["square"],
        **({} if buckets is None else {"buckets": list(buckets), "loader_images_per_s_buckets": loader["buckets"],
                                       "buckets_over_square": {c: loader["buckets"][c] / loader["square"][c] for c in workers}}),
        "decode_format": sorted({key for key, _ in encoded}), "decode_images": len(encoded),
        "decode_images_per_s_per_core": decode,
    }


def _loader_rate(shards: str, batch_size: int, workers: int, resolution: int, batches: int,
                 buckets: AspectBuckets | None) -> float:
    """Images/s of the train loader after its warm-up batches."""
    # resampled: one endless stream, so no epoch end or worker restart falls inside the timing
    data = WebDataModule(train=shards, batch_size=batch_size, num_workers=workers, resolution=resolution, buckets=buckets,
                         crop="random", resampled=True, epoch_length=WARMUP_BATCHES + batches, pin_memory=False)
    data.setup("fit")
    stream = iter(data.train_dataloader())
    for _ in range(WARMUP_BATCHES):
        next(stream)
    start = time.perf_counter()
    images = sum(B.batch_size(next(stream)) for _ in range(batches))
    rate = images / (time.perf_counter() - start)
    del stream  # shut its workers down before the next count starts its own
    return rate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", help="shard pattern (default: a temporary synthetic shapes dataset)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts to time")
    parser.add_argument("--batches", type=int, default=50, help="timed batches per worker count")
    parser.add_argument("--buckets", nargs=2, type=float, metavar=("MAX_RATIO", "MULTIPLE"),
                        help="also time aspect-ratio buckets, e.g. --buckets 2 64")


def run(args: argparse.Namespace) -> None:
    buckets = None if args.buckets is None else (args.buckets[0], int(args.buckets[1]))
    result = benchmark_data(args.shards, args.resolution, args.batch_size, tuple(args.workers), args.batches, buckets)
    print(f"train loader: {result['shards']}; {args.resolution} px, batch {args.batch_size}, "
          f"{args.batches} timed batches after {WARMUP_BATCHES} warm-up")
    bucketed = result.get("loader_images_per_s_buckets")
    print(f"{'workers':>7}  {'images/s':>9}" + ("" if bucketed is None else f"  {'buckets':>9}  {'ratio':>5}"))
    for count, rate in result["loader_images_per_s"].items():
        print(f"{count:>7}  {rate:>9.1f}" + ("" if bucketed is None else f"  {bucketed[count]:>9.1f}  {bucketed[count] / rate:>5.2f}"))
    print(f"decode + RGB ({'/'.join(result['decode_format'])}, 1 process): "
          f"{result['decode_images_per_s_per_core']:.1f} images/s over {result['decode_images']} images")
    print(json.dumps(result))
