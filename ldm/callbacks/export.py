"""Writes a fitted model's weights as safetensors at the end of every `ldm fit` (the `--export.*` options)."""

from __future__ import annotations

import os

import lightning as L

from ldm.training.fsdp import full_weights


class ExportWeights(L.Callback):
    """Calls ``pl_module.export(path)`` on rank zero when a fit ends (modules without ``export`` are left alone).

    AutoencoderKL writes its VAE with the latent statistics (what stage 2's codec loads);
    LatentDiffusion writes its EMA backbone and trained conditioning with the codec's fingerprint.
    Runs after ``on_train_end`` callbacks such as LatentStatistics, so their results are included.
    Under FSDP every rank takes part in gathering the weights (``full_weights``); rank zero alone writes them.
    """

    def __init__(self, path: str | None = None) -> None:  # default: <log dir>/export.safetensors
        super().__init__()
        self.path = path

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = trainer.log_dir or trainer.default_root_dir  # a broadcast: every rank must ask
        if not hasattr(pl_module, "export") or trainer.interrupted:
            return
        with full_weights(trainer.strategy.model):  # a collective under FSDP: every rank enters
            if not trainer.is_global_zero:
                return
            path = self.path or os.path.join(folder, "export.safetensors")
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            pl_module.export(path, step=trainer.global_step)
        print(f"exported weights: {path}")
