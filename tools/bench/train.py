"""Optimisation steps per second of an experiment (either stage), with FLOPs per step and MFU.

Steps run through a Lightning Trainer with the tool's own trainer options, not the experiment's, on one
fixed batch already on the device; `--loader N` times the experiment's own data loader with N workers
instead (decoding, and encoding unless the data is a latent cache), `--cached PATTERN` trains from a latent
cache (tools/cache_latents.py), `--compile` compiles the model. The FLOPs are those of the whole step,
forward and backward, frozen encoders included.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import LightningModule
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from .device import clock
from .experiment import (
    add_experiment_arguments,
    build_experiment,
    measurements,
    report,
    start_timing,
)


class StepTimer(L.Callback):
    """Counts the FLOPs of training batch 0 and times the batches from `warmup` on, device-synchronised."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.flops, self.seconds = warmup, 0, 0.0
        self._counter = FlopCounterMode(display=False)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            self._counter.__enter__()
        if batch_idx == self.warmup:
            self._start = start_timing(pl_module.device)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if batch_idx == 0:
            self._counter.__exit__(None, None, None)
            self.flops = self._counter.get_total_flops()

    def on_train_end(self, trainer: L.Trainer, pl_module: LightningModule) -> None:
        self.seconds = clock(pl_module.device) - self._start


def benchmark_train(
    configs: list[str],  # experiment YAML files, in order
    ldm_options: Sequence[str] = (),  # further `ldm` CLI options, e.g. ("--model.backbone", "<config>")
    batch_size: int | None = None,  # None: the experiment's
    device: str = "cpu",  # a Lightning accelerator: cpu or cuda
    precision: str = "32-true",  # a Lightning precision
    steps: int = 20,  # timed optimisation steps
    warmup: int = 3,  # untimed steps before them (at least 1: the first counts FLOPs)
    loader: int | None = None,  # None: one fixed batch; a worker count: the experiment's own data, read and decoded
    callbacks: Sequence[L.Callback] = (),  # more trainer callbacks, after the step timer (tools/gpu_check.py's sync probe)
) -> dict[str, Any]:
    """Optimisation steps per second of an experiment on one fixed batch, or on its data loader (decoding, and
    encoding unless the data is a latent cache, then count); FLOPs of one step (forward + backward)."""
    if warmup < 1:
        raise ValueError("train needs a warm-up step: the first step counts FLOPs and is not timed")
    model, data, batch = build_experiment(configs, ldm_options, batch_size, loader or 0)
    timer = StepTimer(warmup)
    trainer = L.Trainer(accelerator=device, devices=1, precision=precision, max_steps=warmup + steps,
                        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer, *callbacks])
    if loader is None:
        fixed = move_data_to_device(batch, trainer.strategy.root_device)  # no host-to-device copy inside the timing
        trainer.fit(model, DataLoader([fixed] * (warmup + steps), batch_size=None))
    else:
        trainer.fit(model, datamodule=data)
    result = measurements(model, batch, model.device, precision, timer.flops, timer.seconds, steps)
    return {"benchmark": "train", "configs": configs, "ldm_options": list(ldm_options), "precision": precision,
            "steps": steps, "warmup": warmup, "loader_workers": loader, **result}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_experiment_arguments(parser)
    parser.add_argument("--steps", type=int, default=20, help="timed optimisation steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first counts FLOPs)")
    parser.add_argument("--loader", type=int, metavar="WORKERS", help="time the experiment's data loader too, "
                        "with this many workers (default: one fixed batch, no data loading)")
    parser.add_argument("--cached", metavar="PATTERN", help="train from this latent cache (tools/cache_latents.py); "
                        "implies --loader (1 worker unless given)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (its compile option)")


def run(args: argparse.Namespace) -> None:
    options = [*args.ldm_options, *(["--model.init_args.compile", "true"] if args.compile else []),
               *(["--data.init_args.train", args.cached] if args.cached else [])]
    loader = args.loader if args.loader is not None else 1 if args.cached else None
    result = benchmark_train(args.config, options, args.batch_size, args.device, args.precision, args.steps,
                             args.warmup, loader)
    report(result, f"{args.steps} timed steps after {args.warmup} warm-up (forward + backward FLOPs)", "step")
