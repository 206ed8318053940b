"""One image-grid callback for both stages: whatever the module's `log_images` returns, as grids (clips as rows
of their frames)."""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import lightning as L
from einops import rearrange
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torchvision.utils import make_grid, save_image

from ldm.data import batch as B
from ldm.training.fsdp import call_as_forward, sharded


def frame_strips(images: Tensor) -> Tensor:
    """Clips (B, 3, T, H, W) as strips of their frames side by side, (B, 3, H, T*W) with no gaps (a frames grid
    needs no video codec; tools/measure_attributes.py --frames T reads it back); images (B, 3, H, W) as they are."""
    return rearrange(images, "b c t h w -> b c h (t w)") if images.ndim == 5 else images


class ImageGrid(L.Callback):
    """At each validation, logs ``pl_module.log_images(first val batch)`` to TensorBoard and as PNGs.

    The first validation batch is the same every time (validation streams in a fixed order), so
    the grids of successive validations show the same inputs, prompts and seeds. With ``sizes`` a stage-2
    module also samples that batch's conditions at each (width, height), e.g. [[96, 48], [48, 96]]: one grid
    per aspect ratio, named ``<grid>_<W>x<H>``. Rank zero alone samples and logs, except under FSDP, where every
    rank samples its first batch (each backbone unit gathers its parameters collectively) and rank zero logs.
    """

    def __init__(self, every_n_epochs: int = 1, nrow: int = 8, save_png: bool = True,
                 sizes: list[tuple[int, int]] | None = None) -> None:
        super().__init__()
        self.every_n_epochs, self.nrow, self.save_png = every_n_epochs, nrow, save_png
        self.sizes = [tuple(size) for size in sizes or ()]

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if batch_idx or trainer.sanity_checking or trainer.current_epoch % self.every_n_epochs:
            return
        log_dir = trainer.log_dir  # a broadcast from rank 0: every rank must ask, or rank 0 waits forever
        if not (trainer.is_global_zero or sharded(trainer.strategy)):
            return
        log_images = partial(call_as_forward, trainer.strategy, pl_module, "log_images")
        grids = log_images(batch)
        for width, height in self.sizes:
            grids |= {f"{name}_{width}x{height}": images
                      for name, images in log_images(B.as_requests(batch, (height, width))).items()}
        if not trainer.is_global_zero:
            return
        for name, images in grids.items():
            nrow = 1 if images.ndim == 5 else self.nrow  # a clip a row
            grid = make_grid(((frame_strips(images).float() + 1) / 2).clamp(0, 1).cpu(), nrow=nrow)  # (3, H', W') in [0, 1]
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_image(f"images/{name}", grid, trainer.global_step)
            if self.save_png and log_dir:
                folder = os.path.join(log_dir, "images")
                os.makedirs(folder, exist_ok=True)
                save_image(grid, os.path.join(folder, f"{name}_step{trainer.global_step:07d}.png"))

