"""Writes `ldm predict` outputs as PNG files named by request index, with their prompts (a clip: a strip of its frames)."""

from __future__ import annotations

import json
import os
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from torchvision.utils import save_image

from ldm.callbacks.images import frame_strips
from ldm.data import batch as B


class PredictionWriter(BasePredictionWriter):
    """Saves each predicted image as ``<output_dir>/<index>.png`` and appends its request to ``prompts.jsonl``."""

    def __init__(self, output_dir: str | None = None) -> None:  # default: <log dir>/predictions
        super().__init__(write_interval="batch")
        self.output_dir = output_dir

    def folder(self, trainer: L.Trainer) -> str:
        return self.output_dir or os.path.join(trainer.log_dir or ".", "predictions")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start this rank's prompt log afresh: a repeated run overwrites its images, not appends."""
        folder = self.folder(trainer)
        os.makedirs(folder, exist_ok=True)
        open(self._log_path(folder, trainer), "w").close()

    @staticmethod
    def _log_path(folder: str, trainer: L.Trainer) -> str:
        return os.path.join(folder, f"prompts.rank{trainer.global_rank}.jsonl")

    def write_on_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: dict[str, Any], batch_indices: Any,
        batch: Any, batch_idx: int, dataloader_idx: int = 0,
    ) -> None:
        folder = self.folder(trainer)
        images = ((frame_strips(prediction[B.GENERATED]).float() + 1) / 2).clamp(0, 1).cpu()  # (B, 3, H, W[*T])
        with open(self._log_path(folder, trainer), "a") as log:
            for i, image in enumerate(images):
                index = int(prediction[B.INDEX][i])
                save_image(image, os.path.join(folder, f"{index:06d}.png"))
                request = {k: prediction[k][i] for k in (B.CAPTION, B.LABEL) if k in prediction}
                log.write(json.dumps({B.INDEX: index, **{k: v if isinstance(v, str) else int(v) for k, v in request.items()}}) + "\n")
