"""Throughput benchmarks of the ldm platform, one subcommand each.

    python tools/benchmark.py data --shards 'data/train/shard-{000000..000009}.tar' --workers 0 1 2 4

`data` times the WebDataModule train loader (random crop, shuffle buffer on) per DataLoader worker
count and the single-process decode rate of the shards' images. Without `--shards` it writes a
temporary synthetic shapes dataset at 256 px. It prints a table and a final JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from collections.abc import Callable
from itertools import islice
from typing import Any

from PIL import Image
from webdataset.tariterators import tarfile_samples

from ldm.data.datamodule import WebDataModule
from ldm.data.shards import expand_shards
from ldm.data.synthetic import write_shapes
from ldm.data.transforms import IMAGE_KEYS

WARMUP_BATCHES = 3  # untimed: worker start-up and the first fill of the shuffle buffer
DECODE_IMAGES = 500  # images decoded for the per-core rate
SYNTHETIC_SAMPLES, SYNTHETIC_SIZE = 600, 256  # the temporary shapes dataset used without --shards


def benchmark_data(
    shards: str | None = None,  # shard pattern; None: a temporary synthetic shapes dataset
    resolution: int = 256,
    batch_size: int = 32,
    workers: tuple[int, ...] = (0, 1, 2),
    batches: int = 50,  # timed batches per worker count
) -> dict[str, Any]:
    """Train-loader images/s per worker count and single-process image decode images/s."""
    with tempfile.TemporaryDirectory() as tmp:
        source = shards or f"synthetic shapes, {SYNTHETIC_SAMPLES} x {SYNTHETIC_SIZE} px"
        if shards is None:
            write_shapes(tmp, train=SYNTHETIC_SAMPLES, val=0, test=0, size=SYNTHETIC_SIZE, samples_per_shard=100)
            shards = f"{tmp}/train/shard-*.tar"
        loader = {}
        for count in workers:
            # resampled: one endless stream, so no epoch end or worker restart falls inside the timing
            data = WebDataModule(train=shards, batch_size=batch_size, num_workers=count, resolution=resolution,
                                 crop="random", resampled=True, epoch_length=WARMUP_BATCHES + batches,
                                 pin_memory=False)
            data.setup("fit")
            stream = iter(data.train_dataloader())
            for _ in range(WARMUP_BATCHES):
                next(stream)
            start = time.perf_counter()
            images = sum(len(next(stream)["caption"]) for _ in range(batches))
            loader[count] = images / (time.perf_counter() - start)
            del stream  # shut its workers down before the next count starts its own

        samples = islice(tarfile_samples({"url": url} for url in expand_shards(shards)), DECODE_IMAGES)
        encoded = [(key, s[key]) for s in samples for key in IMAGE_KEYS if key in s]  # (format, bytes)
        start = time.perf_counter()
        for _, blob in encoded:
            Image.open(io.BytesIO(blob)).convert("RGB")  # convert() forces the full decode
        decode = len(encoded) / (time.perf_counter() - start)
    return {
        "benchmark": "data", "shards": source, "resolution": resolution, "batch_size": batch_size,
        "batches": batches, "loader_images_per_s": loader,
        "decode_format": sorted({key for key, _ in encoded}), "decode_images": len(encoded),
        "decode_images_per_s_per_core": decode,
    }


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", help="shard pattern (default: a temporary synthetic shapes dataset)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts to time")
    parser.add_argument("--batches", type=int, default=50, help="timed batches per worker count")


def _data_command(args: argparse.Namespace) -> None:
    result = benchmark_data(args.shards, args.resolution, args.batch_size, tuple(args.workers), args.batches)
    print(f"train loader: {result['shards']}; {args.resolution} px, batch {args.batch_size}, "
          f"{args.batches} timed batches after {WARMUP_BATCHES} warm-up")
    print(f"{'workers':>7}  {'images/s':>9}")
    for count, rate in result["loader_images_per_s"].items():
        print(f"{count:>7}  {rate:>9.1f}")
    print(f"decode + RGB ({'/'.join(result['decode_format'])}, 1 process): "
          f"{result['decode_images_per_s_per_core']:.1f} images/s over {result['decode_images']} images")
    print(json.dumps(result))


COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], None]]] = {
    "data": (_data_arguments, _data_command),  # name: (add its arguments, run it)
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, _) in COMMANDS.items():
        add_arguments(commands.add_parser(name, help=f"{name} throughput"))
    args = parser.parse_args(argv)
    COMMANDS[args.command][1](args)


if __name__ == "__main__":
    main()
