"""Images per second of an experiment's `evaluation_images`, generation or reconstruction.

Generation for LatentDiffusion (its sampler; `--sampler-steps` sets its steps), reconstruction for
AutoencoderKL, on one fixed batch under the autocast dtype of `--precision`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch.utils.flop_counter import FlopCounterMode

from .device import clock
from .experiment import (
    AUTOCAST,
    add_experiment_arguments,
    build_experiment,
    measurements,
    report,
    start_timing,
)


@torch.no_grad()
def benchmark_sample(
    configs: list[str],  # experiment YAML files, in order
    ldm_options: Sequence[str] = (),  # further `ldm` CLI options
    batch_size: int | None = None,  # None: the experiment's
    device: str = "cpu",  # cpu or cuda
    precision: str = "32-true",  # a Lightning precision: sets the autocast dtype
    repeats: int = 3,  # timed calls
    warmup: int = 1,  # untimed calls before them (the first counts FLOPs)
) -> dict[str, Any]:
    """Images per second of `evaluation_images` (samples or reconstructions) on one fixed batch."""
    model, _, batch = build_experiment(configs, ldm_options, batch_size)
    target = torch.device(device)
    model, fixed = model.to(target).eval(), move_data_to_device(batch, target)
    dtype = AUTOCAST[precision]
    with torch.autocast(target.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        with FlopCounterMode(display=False) as counter:
            model.evaluation_images(fixed)  # also the first warm-up call
        for _ in range(warmup - 1):
            model.evaluation_images(fixed)
        start = start_timing(target)
        for _ in range(repeats):
            model.evaluation_images(fixed)
        seconds = clock(target) - start
    result = measurements(model, batch, target, precision, counter.get_total_flops(), seconds, repeats)
    sampler = getattr(model, "sampler", None)
    return {"benchmark": "sample", "configs": configs, "ldm_options": list(ldm_options), "precision": precision,
            "sampler": getattr(sampler, "kind", None), "sampler_steps": getattr(sampler, "steps", None),
            "repeats": repeats, **result}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_experiment_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3, help="timed evaluation_images calls")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first (the first counts FLOPs)")
    parser.add_argument("--sampler-steps", type=int, help="LatentDiffusion sampler steps (default: the experiment's)")


def run(args: argparse.Namespace) -> None:
    steps = ["--model.init_args.sampler.init_args.steps", str(args.sampler_steps)] if args.sampler_steps else []
    result = benchmark_sample(args.config, [*args.ldm_options, *steps], args.batch_size, args.device, args.precision,
                              args.repeats, args.warmup)
    sampler = f"{result['sampler']} x {result['sampler_steps']} steps, " if result["sampler"] else ""
    report(result, f"{sampler}{args.repeats} timed calls after {args.warmup} warm-up", "batch")
