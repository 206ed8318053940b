"""What an exact resume needs beyond Lightning's own checkpoint: every random state, and checkpoint
files that a crash cannot tear. The `ldm` CLI adds both to every run.

Lightning already saves the weights, optimizer and scheduler states, the loops' progress and the
train loader's position (EpochLoader); this module adds the RNG states of Python, NumPy and torch
(CPU and CUDA) of every rank, and writes each checkpoint to a temporary file in its folder that is
renamed over the old one, so `last.ckpt` is always the previous or the new complete file.
"""

from __future__ import annotations

import hashlib
import logging
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
from lightning.pytorch.utilities.data import sized_len

log = logging.getLogger(__name__)


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
    (after the sanity check), which is where the uninterrupted run would draw next. On another number of
    ranks (an elastic resume) every rank is seeded anew from the step and its rank instead.
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
        if len(self._restored) == trainer.world_size:
            _set_rng_states(self._restored[trainer.global_rank])
        else:  # an elastic resume: the old ranks' streams do not map onto the new ones; each rank starts its own
            seed = int.from_bytes(hashlib.sha256(f"{trainer.global_step}/{trainer.global_rank}".encode()).digest()[:4], "little")
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            if trainer.global_rank == 0:
                log.warning("resuming a checkpoint of %d ranks on %d: weights, optimizer, EMA, schedule and the epoch's "
                            "remaining samples continue; the random streams (noise, timesteps) start anew",
                            len(self._restored), trainer.world_size)
        self._restored = None


class EpochLength(L.Callback):
    """Gives each epoch the trainer's batch count from the train loader's length at its start.

    Lightning reads the loader's length once per fit; an elastic resume's first epoch (the batches already
    delivered plus this layout's share of the rest) differs from the epochs after it, so the count is
    read again whenever an epoch starts (unless ``limit_train_batches`` or ``fast_dev_run`` sets it)."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        length = sized_len(trainer.train_dataloader)
        limit = trainer.limit_train_batches  # 1.0, all batches, unless set (an int 1 is one batch: fast_dev_run)
        if length is not None and isinstance(limit, float) and limit == 1.0 and length != trainer.fit_loop.max_batches:
            trainer.fit_loop.max_batches = length
            if isinstance(trainer.val_check_interval, float):  # a fraction of the epoch, as Lightning computes it
                trainer.val_check_batch = max(1, int(length * trainer.val_check_interval))


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
