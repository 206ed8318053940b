"""Tiny stand-ins for pretrained evaluation networks, and crash makers, nameable by class_path from YAML in CLI tests."""

from __future__ import annotations

import io
import json
import os
import signal
from pathlib import Path

import torch
from lightning.pytorch import Callback
from torch import Tensor, nn

from ldm.training.resume import AtomicCheckpointIO


class TinyFeatures(nn.Module):
    """A small random conv net standing in for Inception: (B, 3, H, W) -> {"pool3": (B, 8)}; counts the images it sees."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.images_seen = 0

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        self.images_seen += len(images)
        return {"pool3": self.net(images)}  # (B, 8)


class KillAt(Callback):
    """SIGKILLs the run (its whole process group: every rank and loader worker) when a training step ends."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.killpg(os.getpgid(0), signal.SIGKILL)


class SignalAt(Callback):
    """Sends signal ``name`` to its own process on ``rank`` when a training step ends, as a cluster tells a job to stop."""

    def __init__(self, step: int, name: str = "SIGTERM", rank: int = 0) -> None:
        self.step, self.name, self.rank = step, name, rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), getattr(signal, self.name))


class RecordKeys(Callback):
    """Appends each training batch's sample keys, with its epoch and step, to ``<folder>/keys-rank<r>.jsonl``."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"keys-rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps({"epoch": trainer.current_epoch, "step": trainer.global_step, "keys": list(batch["key"])}) + "\n")


class KilledDuringSave(AtomicCheckpointIO):
    """Atomic checkpoint writing that SIGKILLs the run in the middle of the save at ``step``: the new file is
    half written to its temporary name and never renamed, as when a crash hits a save."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if checkpoint["global_step"] == self.step:
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            with open(f"{path}.tmp", "wb") as f:
                f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            os.killpg(os.getpgid(0), signal.SIGKILL)
        super().save_checkpoint(checkpoint, path, storage_options)
