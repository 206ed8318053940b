"""The `ldm` console script: LightningCLI with the project's defaults."""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

# Idle OpenMP threads sleep instead of spinning: with DataLoader workers on a few CPU cores, spinning
# intra-op threads starve the workers (a CPU run here went 1.6x slower). Set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from lightning.pytorch import LightningDataModule, LightningModule  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from jsonargparse import lazy_instance  # noqa: E402

from ldm.callbacks.export import ExportWeights  # noqa: E402


class LdmCLI(LightningCLI):
    """Any LightningModule / LightningDataModule is chosen by `class_path`; runs log to `runs/`.

    Every fit checkpoints (`--checkpoint.*`, `last.ckpt` always) and ends by exporting the model's
    weights as safetensors (`--export.path`, default `<log dir>/export.safetensors`).
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(ExportWeights, "export")
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "trainer.logger": lazy_instance(TensorBoardLogger, save_dir="runs", name="ldm"),
            }
        )


def build_cli(args: list[str] | None = None, run: bool = True) -> LdmCLI:
    """The `ldm` CLI on ``args``; with ``run=False`` it only builds the model and data module (tools)."""
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere+; no effect on CPU
    return LdmCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )


class _ComposeOnly(LdmCLI):
    """Parses and composes, but builds nothing."""

    def instantiate_classes(self) -> None:
        pass


def compose(args: list[str]) -> dict[str, Any]:
    """The configuration `ldm fit <args>` would build (every --config and option applied), as a plain dict."""
    with warnings.catch_warnings():  # LightningCLI warns when the caller's own sys.argv goes unread
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = _ComposeOnly(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                           auto_configure_optimizers=False, args=args, run=False)
    return json.loads(cli.parser.dump(cli.config, format="json", skip_check=True))


def main(args: list[str] | None = None) -> None:
    """Entry point of `ldm fit|validate|test|predict --config ...` (exit status 0 on success)."""
    build_cli(args)


if __name__ == "__main__":
    main()
