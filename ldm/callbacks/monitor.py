"""Training telemetry for TensorBoard: gradient norm, throughput and accelerator memory."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch

from ldm.data import batch as B


class TrainingMonitor(L.Callback):
    """Logs `train/grad_norm` (per optimizer, before clipping), `train/samples_per_sec` (all ranks, from
    batch start to end: the step, not the data loading) and, on CUDA, `train/gpu_mem_gb` (peak allocated
    since the last log)."""

    def __init__(self) -> None:
        super().__init__()
        self._start = 0.0

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        index = next(i for i, o in enumerate(trainer.optimizers) if o is optimizer or getattr(o, "optimizer", None) is optimizer)
        pl_module.log("train/grad_norm" if len(trainer.optimizers) == 1 else f"train/grad_norm_{index}", norm)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        synchronize(pl_module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        synchronize(pl_module.device)
        seconds = time.perf_counter() - self._start
        size = B.batch_size(batch) if isinstance(batch, dict) else len(batch)
        pl_module.log("train/samples_per_sec", size * trainer.world_size / max(seconds, 1e-9))
        if pl_module.device.type == "cuda":
            pl_module.log("train/gpu_mem_gb", torch.cuda.max_memory_allocated(pl_module.device) / 2**30)
            torch.cuda.reset_peak_memory_stats(pl_module.device)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels: CUDA runs asynchronously, so a clock read alone times the launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
