"""Preemption: a fit told to stop (SIGTERM from a spot instance or Kubernetes, SIGUSR1 from SLURM's
``--signal``) finishes its optimizer step, writes ``last.ckpt`` and exits with one line saying where to resume.

Lightning's own SIGTERM handling stops a rank at once, without a checkpoint, and only follows rank 0's signal
under DDP; this callback replaces it for the training loop. The `ldm` CLI adds it to every fit.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from types import FrameType
from typing import Any

import lightning as L

log = logging.getLogger(__name__)
SIGNALS = ("SIGTERM", "SIGUSR1")


class Preempted(RuntimeError):
    """The fit stopped at a step boundary on a signal; the message names the checkpoint to resume from."""


class Preemption(L.Callback):
    """Stops a fit cleanly on ``signals``: every rank at the end of the same optimizer step (a signal to any
    rank counts: the flag is all-reduced after each step), ``last.ckpt`` written (atomically, as every
    checkpoint), no export (the run is not finished). Under SLURM (``SLURM_JOB_ID`` set) with ``requeue``,
    rank 0 requeues the job; relaunched with `--ckpt_path last`, it resumes from that file."""

    def __init__(self, signals: tuple[str, ...] = SIGNALS, requeue: bool = True) -> None:
        super().__init__()
        self.signals, self.requeue = signals, requeue
        self.received: str | None = None
        self._stopped: Preempted | None = None
        self._previous: dict[int, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python takes signal handlers on the main thread only
        for name in self.signals:  # after Lightning registered its own (when the fit started): replace them
            number = getattr(signal, name)
            self._previous[number] = signal.signal(number, self._receive)

    def _receive(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum).name
        log.warning("received %s: stopping after this optimizer step", self.received)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        checkpoint = trainer.checkpoint_callback
        folder = checkpoint.dirpath if checkpoint is not None and checkpoint.dirpath else trainer.default_root_dir
        path = os.path.join(folder, "last.ckpt")
        trainer.save_checkpoint(path)  # every rank takes part (random states, sharded strategies); rank 0 writes
        requeued = self._requeue() if trainer.is_global_zero else ""
        trainer.strategy.barrier("preempted")  # no rank exits (a launcher then kills the rest) before the file and requeue
        self._stopped = Preempted(f"stopped by {self.received or 'a signal to another rank'} after step "
                                  f"{trainer.global_step}; {path} holds it: resume with --ckpt_path {path}{requeued}")

    def _stop(self, *hook_args: Any) -> None:
        """The stop, at the first hook after the step's end: Lightning has logged the step by then, and nothing
        else has run (the next batch, a validation, the epoch's end). A stop at the run's last step lets it end."""
        if self._stopped is not None:
            raise self._stopped

    on_train_batch_start = on_validation_start = on_train_epoch_end = _stop

    def _requeue(self) -> str:
        """Requeue this SLURM job (``scontrol requeue``); what happened, for the last line."""
        job = os.environ.get("SLURM_JOB_ID")
        if not self.requeue or job is None:
            return ""
        array = os.environ.get("SLURM_ARRAY_JOB_ID")
        job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else job
        try:
            done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True).returncode == 0
        except FileNotFoundError:
            done = False
        return f" (SLURM job {job} requeued)" if done else f" (requeueing SLURM job {job} failed: requeue it yourself)"

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()
