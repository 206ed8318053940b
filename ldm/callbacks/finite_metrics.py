"""Ends a run whose validation or test metrics come out NaN/inf, before anything is written with them."""

from __future__ import annotations

import lightning as L

from ldm.training.nonfinite import diverged


class FiniteMetrics(L.Callback):
    """At the end of every validation and test, checks the split's metrics (``val/*``, ``test/*``: the module's
    and SampleMetrics') and raises NonFiniteTraining, naming the step and the metrics, if any is NaN or inf.

    Its ``on_*_end`` runs after the metrics are reduced and before the checkpoint callbacks (Lightning runs
    those last) and any callback listed after it, such as EvaluationReport: no checkpoint, report or export
    follows a non-finite metric. The metrics are synced across ranks, so every rank stops at once.
    """

    def _check(self, trainer: L.Trainer, split: str) -> None:
        if trainer.sanity_checking:  # the sanity check logs no metrics
            return
        bad = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(f"{split}/") and not v.isfinite().all()}
        if bad:
            raise diverged(f"at step {trainer.global_step} the {split} metrics {bad} are not finite")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer, "val")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer, "test")
