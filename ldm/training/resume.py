"""What an exact resume needs beyond Lightning's own checkpoint: every random state, and checkpoint
files that a crash cannot tear. The `ldm` CLI adds both to every run.

Lightning already saves the weights, optimizer and scheduler states, the loops' progress and the
train loader's position (EpochLoader); this module adds the RNG states of Python, NumPy and torch
(CPU and CUDA) of every rank, and writes each checkpoint to a temporary file in its folder that is
renamed over the old one, so `last.ckpt` is always the previous or the new complete file.
"""

from __future__ import annotations

import os
import random
import warnings
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO


def _rng_states() -> dict[str, Any]:
    """This process's RNG states as tensors and plain numbers, which a ``weights_only`` load accepts."""
    version, python, gauss = random.getstate()
    kind, numpy, position, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, torch.tensor(python, dtype=torch.int64), gauss],
        "numpy": [kind, torch.from_numpy(numpy.astype(np.int64)), position, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_states(states: dict[str, Any]) -> None:
    version, python, gauss = states["python"]
    random.setstate((version, tuple(python.tolist()), gauss))
    kind, numpy, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, numpy.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RandomStates(L.Callback):
    """Saves every rank's Python, NumPy and torch RNG states with each checkpoint and restores them
    when training resumes from it, so random timesteps, noise and dropout continue as they would have.

    The states are taken when the checkpoint is written and put back when training starts again
    (after the sanity check), which is where the uninterrupted run would draw next.
    """

    def __init__(self) -> None:
        super().__init__()
        self._restored: list[dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        """Every rank's states, gathered to the rank that writes the checkpoint (a collective)."""
        own = _rng_states()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            everyone: list[dict[str, Any] | None] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(everyone, own)
            return {"ranks": everyone}
        return {"ranks": [own]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict["ranks"]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._restored is None:
            return
        if len(self._restored) != trainer.world_size:
            raise ValueError(f"the checkpoint holds the random states of {len(self._restored)} ranks, this run has "
                             f"{trainer.world_size}: resume with the same number of devices for an exact continuation")
        _set_rng_states(self._restored[trainer.global_rank])
        self._restored = None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to ``<path>.tmp`` in the same folder, flushes it to disk and renames it over
    ``path``: a crash during the save leaves the previous file whole."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        path = os.fspath(path)
        partial = f"{path}.tmp"
        super().save_checkpoint(checkpoint, partial, storage_options)
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        os.replace(partial, path)
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(folder)  # the rename itself reaches the disk
        finally:
            os.close(folder)


class Checkpoint(ModelCheckpoint):
    """ModelCheckpoint writing ``last.ckpt`` every ``every_n_train_steps`` optimizer steps (the `ldm` CLI's
    default: 500) and once more when training ends, so a crash loses at most that many steps."""

    _stage: str | None = None  # what the trainer runs: fit, validate, test or predict

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._stage = stage

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        with warnings.catch_warnings():
            # Lightning warns that under manual optimization (AutoencoderKL) the file holds the weights after
            # the batch's optimizer steps: the state that its step count, RNG states and data position describe
            warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        with warnings.catch_warnings():
            if self._stage != "fit":  # `ldm test` / `predict` write no checkpoint: their new run folder is no news
                warnings.filterwarnings("ignore", message="The dirpath has changed")
            super().load_state_dict(state_dict)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and trainer.global_step != self._last_global_step_saved and not trainer.fast_dev_run:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
