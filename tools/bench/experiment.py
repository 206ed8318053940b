"""What the train and sample benchmarks share: an experiment built as `ldm` builds it, their common options,
and the numbers both report, as a table and a JSON line.

Both time one fixed batch of the experiment's training data, so the loader is not timed (train's `--loader`
times it). Peak memory is CUDA's max allocated, or the process's peak RSS on CPU; FLOPs per sample are the
matmuls, convolutions and attention of one untimed call under FlopCounterMode; MFU divides them by the
peak FLOP/s of the device and the run's compute dtype where Lightning's `get_available_flops` knows it
(never on CPU).
"""

from __future__ import annotations

import argparse
import json
import resource
from collections.abc import Sequence
from typing import Any

import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch import LightningDataModule, LightningModule

from ldm.cli import instantiate
from ldm.data import batch as B

from .device import add_device_argument, clock

AUTOCAST = {"32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}  # precision: autocast dtype


def build_experiment(configs: list[str], ldm_options: Sequence[str], batch_size: int | None, workers: int = 0
                     ) -> tuple[LightningModule, LightningDataModule, dict]:
    """An experiment's model and data module, built as `ldm` builds them, and the first batch of its training data."""
    args = [arg for path in configs for arg in ("--config", path)]
    args += ["--data.init_args.batch_size", str(batch_size)] if batch_size else []
    model, data = instantiate([*args, "--data.init_args.num_workers", str(workers), "--trainer.logger", "false",
                               *ldm_options])
    data.setup("fit")
    return model, data, next(iter(data.train_dataloader()))


def start_timing(device: torch.device) -> float:
    """The clock where the timed calls start, with CUDA's peak-memory count restarted there."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return clock(device)


def measurements(model: LightningModule, batch: dict, device: torch.device, precision: str, flops: int,
                 seconds: float, calls: int) -> dict[str, Any]:
    """What train and sample both report, from the FLOPs of one call and the time of `calls` timed calls."""
    size = next(len(v) for v in batch.values() if isinstance(v, (torch.Tensor, list)))
    if device.type == "cuda":
        memory, memory_kind = torch.cuda.max_memory_allocated(device), "CUDA max allocated"
    else:
        memory, memory_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "CPU peak RSS"  # KiB on Linux
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = get_available_flops(device, AUTOCAST[precision] or torch.float32)  # None where Lightning has no figure
    return {
        "model": type(model).__name__,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "batch_size": size, "image_size": list(batch[B.IMAGE].shape[-2:]) if B.IMAGE in batch else None,
        "device": name, "samples_per_s": size * calls / seconds, "ms_per_call": 1000 * seconds / calls,
        "peak_memory_gib": memory / 2**30, "peak_memory_kind": memory_kind, "flops_per_sample": flops / size,
        "mfu": flops * calls / seconds / peak if peak else None,
    }


def add_experiment_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", action="append", required=True, help="experiment YAML (repeat to overlay more)")
    parser.add_argument("--batch-size", type=int, help="training batch size (default: the experiment's)")
    add_device_argument(parser)
    parser.add_argument("--precision", choices=list(AUTOCAST), default="32-true")
    parser.set_defaults(ldm_options=[])  # cli.main fills in the options it does not know: they are the ldm CLI's


def report(result: dict[str, Any], timed: str, unit: str) -> None:
    """The table of a train or sample result, then its JSON line."""
    shape = "x".join(map(str, result["image_size"] or [])) or "?"
    print(f"{result['benchmark']}: {result['model']} ({result['trainable_params'] / 1e6:.2f} M trainable parameters) "
          f"from {' + '.join(result['configs'])} {' '.join(result['ldm_options'])}".rstrip())
    print(f"batch {result['batch_size']} x {shape} px on {result['device']} ({result['precision']}), {timed}")
    mfu = "unknown (no peak FLOP/s known)" if result["mfu"] is None else f"{100 * result['mfu']:.1f} % of peak FLOP/s"
    rows = [("samples/s", f"{result['samples_per_s']:.2f}"), (f"ms/{unit}", f"{result['ms_per_call']:.1f}"),
            ("peak memory", f"{result['peak_memory_gib']:.2f} GiB ({result['peak_memory_kind']})"),
            ("GFLOP/sample", f"{result['flops_per_sample'] / 1e9:.3f}"), ("MFU", mfu)]
    for name, value in rows:
        print(f"  {name:<13} {value}")
    print(json.dumps(result))
