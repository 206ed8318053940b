"""The training plumbing both stages' LightningModules share, so that each keeps only its own logic."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from safetensors.torch import save_file
from torch import Tensor, nn

from ldm.training.nonfinite import NonFiniteGuard, assert_finite_state
from ldm.training.speed import amp_scaler, clip_gradients

ParameterGroups = list[tuple[OptimizerCallable, Iterable[nn.Parameter]]]  # each optimizer with what it trains


class TrainingModule(L.LightningModule):
    """A LightningModule with the project's training plumbing; a subclass says what it trains
    (``optimizer_groups``), how a batch trains it (``training_step``) and what leaves the run (``export_state``).

    - Optimizers come from injected callables, one per group of ``optimizer_groups()``, each with its own
      ``lr_scheduler``, stepped after every step of that optimizer (a skipped one included).
    - A NaN/inf loss or gradient makes its optimizer step change nothing (``guard_step``); skipped steps
      are logged as ``train/nonfinite_steps``, and a run of ``max_nonfinite_steps`` stops training.
    - ``clip_gradients`` clips in true units, also for the fused optimizers under mixed precision (which
      Lightning refuses), so the trainer's ``gradient_clip_val`` works with them.
    - No checkpoint and no export is written with NaN/inf weights; ``export`` writes ``export_state()``.
    """

    def __init__(self, lr_scheduler: LRSchedulerCallable | None, max_nonfinite_steps: int) -> None:
        super().__init__()
        self.lr_scheduler = lr_scheduler
        self.guard = NonFiniteGuard(max_nonfinite_steps)

    def optimizer_groups(self) -> ParameterGroups:
        """Each optimizer callable with the parameters it trains (only those that require gradients are passed)."""
        raise NotImplementedError

    def export_state(self) -> tuple[dict[str, Tensor], dict[str, str] | None]:
        """The weights that leave the run, and the safetensors metadata to write with them."""
        raise NotImplementedError

    def configure_optimizers(self) -> Any:
        optimizers = [make([p for p in params if p.requires_grad]) for make, params in self.optimizer_groups()]
        if self.lr_scheduler is None:
            return optimizers
        return optimizers, [{"scheduler": self.lr_scheduler(o), "interval": "step"} for o in optimizers]

    def guard_step(self, loss: Tensor | None, optimizer: torch.optim.Optimizer) -> Tensor:
        """A device bool: are ``loss`` and ``optimizer``'s gradients finite? If not, its coming step changes nothing."""
        return self.guard.check(self.global_step, loss, optimizer, amp_scaler(self.trainer) is not None)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Log the count of skipped steps, once per batch."""
        self.log("train/nonfinite_steps", self.guard.skipped)

    def clip_gradients(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's ``clip_gradients`` (``norm`` by default), in true units for any optimizer and precision, and
        by the norm of every rank's shards under FSDP."""
        if gradient_clip_val:
            clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm or "norm", amp_scaler(self.trainer),
                           model=self.trainer.strategy.model)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        assert_finite_state(checkpoint["state_dict"], "a checkpoint", checkpoint.get("global_step"))

    def export(self, path: str, step: int | None = None) -> None:
        """Write ``export_state()`` as safetensors (what the `ldm` CLI does at the end of a fit); ``step``, the
        training step it was reached at, names it in a refusal."""
        write_weights(*self.export_state(), path, step)


def write_weights(state: dict[str, Tensor], metadata: dict[str, str], path: str | os.PathLike[str],
                  step: int | None = None) -> None:
    """Write an export (refused with NaN/inf weights, see ``assert_finite_state``) to ``<path>.tmp``, then rename
    it over ``path``: a crash leaves no torn file."""
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    assert_finite_state(state, os.fspath(path), step)
    partial = f"{os.fspath(path)}.tmp"
    save_file(state, partial, metadata=metadata)
    os.replace(partial, path)
