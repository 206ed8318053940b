"""The `ldm` console script: LightningCLI with the project's defaults."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from jsonargparse import lazy_instance


class LdmCLI(LightningCLI):
    """Any LightningModule / LightningDataModule is chosen by `class_path`; runs log to `runs/`."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "trainer.logger": lazy_instance(TensorBoardLogger, save_dir="runs", name="ldm"),
            }
        )


def main(args: list[str] | None = None) -> LdmCLI:
    """Entry point of `ldm fit|validate|test|predict --config ...`."""
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere+; no effect on CPU
    return LdmCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=args,
    )


if __name__ == "__main__":
    main()
