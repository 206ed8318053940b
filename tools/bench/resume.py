"""Start-up of a resumed epoch: from a fresh train loader restored from a checkpoint's state to its first batch.

An interrupted run's loader state is taken at fractions of an epoch (default 10% and 90%) of at least 20,000
samples; each is restored into a new data module and loader, as `ldm fit --ckpt_path` does, and the time to its
first batch is measured. With positions that reopen shards where the workers stood the times are equal; a loader
that replays the epoch's delivered batches grows with the fraction. Run it with PYTHONPATH pointing at another
checkout to time that checkout's loader on the same shards. The rest of a launch (model, trainer) does not depend
on the position.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from itertools import islice
from typing import Any

from ldm.data.datamodule import WebDataModule
from ldm.data.synthetic import write_shapes


def benchmark_resume(
    shards: str | None = None,  # shard pattern; None: a temporary synthetic shapes dataset of `samples`
    samples: int = 20_000,
    resolution: int = 64,
    batch_size: int = 32,
    workers: int = 2,
    shuffle_buffer: int = 1000,
    fractions: tuple[float, ...] = (0.1, 0.9),
    repeats: int = 3,
) -> dict[str, Any]:
    """Seconds from restoring a loader state taken at each fraction of an epoch to the first batch (median of ``repeats``)."""
    with tempfile.TemporaryDirectory() as tmp:
        source = shards or f"synthetic shapes, {samples} x {resolution} px"
        if shards is None:
            write_shapes(tmp, train=samples, val=0, test=0, size=resolution, samples_per_shard=1000)
            shards = f"{tmp}/train/shard-*.tar"

        def loader():
            data = WebDataModule(train=shards, batch_size=batch_size, num_workers=workers, resolution=resolution,
                                 shuffle_buffer=shuffle_buffer, pin_memory=False)
            data.setup("fit")
            return data.train_dataloader()

        length = len(loader())
        seconds = {}
        for fraction in fractions:
            interrupted = loader()
            batches = iter(interrupted)
            for _ in islice(batches, int(fraction * length)):
                pass
            state = interrupted.state_dict()
            del batches
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                resumed = loader()
                resumed.load_state_dict(state)
                next(iter(resumed))
                times.append(time.perf_counter() - start)
            seconds[fraction] = sorted(times)[len(times) // 2]
    return {"benchmark": "resume", "shards": source, "batches_per_epoch": length, "batch_size": batch_size,
            "workers": workers, "shuffle_buffer": shuffle_buffer, "seconds_to_first_batch": seconds}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", help="shard pattern (default: a temporary synthetic shapes dataset)")
    parser.add_argument("--samples", type=int, default=20_000, help="samples of the synthetic dataset")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shuffle-buffer", type=int, default=1000)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.9], help="positions in the epoch to resume at")
    parser.add_argument("--repeats", type=int, default=3)


def run(args: argparse.Namespace) -> None:
    result = benchmark_resume(args.shards, args.samples, args.resolution, args.batch_size, args.workers,
                              args.shuffle_buffer, tuple(args.fractions), args.repeats)
    print(f"resumed loader: {result['shards']}; {result['batches_per_epoch']} batches of {args.batch_size}, "
          f"{args.workers} workers, shuffle buffer {args.shuffle_buffer}")
    print(f"{'position':>8}  {'s to first batch':>16}")
    for fraction, seconds in result["seconds_to_first_batch"].items():
        print(f"{fraction:>8.0%}  {seconds:>16.2f}")
    print(json.dumps(result))
