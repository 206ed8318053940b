"""The `ldm` console script: LightningCLI with the project's defaults."""

from __future__ import annotations

import dis
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

# Idle OpenMP threads sleep instead of spinning: with DataLoader workers on a few CPU cores, spinning
# intra-op threads starve the workers (a CPU run here went 1.6x slower). Set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from jsonargparse import lazy_instance  # noqa: E402
from lightning.pytorch import LightningDataModule, LightningModule, Trainer  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from lightning.pytorch.plugins.io import CheckpointIO  # noqa: E402

from ldm.callbacks.export import ExportWeights  # noqa: E402
from ldm.callbacks.finite_metrics import FiniteMetrics  # noqa: E402
from ldm.training.preemption import Preemption  # noqa: E402
from ldm.training.resume import AtomicCheckpointIO, Checkpoint, EpochLength, RandomStates  # noqa: E402

if TYPE_CHECKING:
    from ldm.diffusion.module import LatentDiffusion

CHECKPOINT_EVERY = 500  # optimizer steps between checkpoints, by default
OWN_CODE = (Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent / "tools")  # where refusals come from
# Lightning's warnings that nobody can act on in an `ldm` run, each harmless here for the reason above it
HARMLESS_WARNINGS = (
    # our stream deals each rank and loader worker its own batches (ldm.data.stream): its length is exact
    r"Your `IterableDataset` has `__len__` defined",
    # Lightning's own pytree helper calls an API that torch deprecates: nothing of ours, nothing to change
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # the frozen autoencoder and text encoders stay in eval mode on purpose (ldm.nn.frozen)
    r"Found \d+ module\(s\) in eval mode at the start of training",
    # predict batches are whole batches of one size each (RequestBatches); the writer names files by each
    # request's own index, never by Lightning's batch indices
    r"Couldn't infer the batch indices fetched from your dataloader",
)


class LdmCLI(LightningCLI):
    """Any LightningModule / LightningDataModule is chosen by `class_path`; runs log to `runs/`.

    Every fit writes `last.ckpt` every 500 optimizer steps, at its end and when SIGTERM or SIGUSR1 stops it
    (`--checkpoint.*`, ldm.training.preemption), each file written whole or not at all, with every random
    state and the data stream's position, so `--ckpt_path <run>/checkpoints/last.ckpt` resumes exactly; and it
    ends by exporting the model's weights as safetensors (`--export.path`, default `<log dir>/export.safetensors`).
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.add_lightning_class_args(ExportWeights, "export")
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 0,  # last.ckpt alone; with a monitor, set save_top_k to keep the best too
                "checkpoint.every_n_train_steps": CHECKPOINT_EVERY,
                "trainer.logger": lazy_instance(TensorBoardLogger, save_dir="runs", name="ldm"),
            }
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        self._command_line = sys.argv[1:] if args is None else args
        super().parse_arguments(parser, args)
        self._check_checkpoint_module()

    def _parse_ckpt_path(self) -> None:
        """The checkpoint's model hyper-parameters over the config files (Lightning's rule), then the command
        line's own ``--model...`` options over those: ``ldm predict --ckpt_path c --model.init_args.cfg_scale 6``
        samples at 6, where Lightning alone would silently keep the checkpoint's value."""
        super()._parse_ckpt_path()
        subcommand = self.config.get("subcommand")
        options = model_options(self._command_line) if isinstance(self._command_line, list) else []
        if subcommand and options and self.config[subcommand].get("ckpt_path"):
            self.config[subcommand] = self._parser(subcommand).parse_args(options, namespace=self.config[subcommand])

    def _check_checkpoint_module(self) -> None:
        """Refuse a --ckpt_path written by another LightningModule than the one the config builds (naming both)."""
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else None
        ckpt_path = config.get("ckpt_path") if config is not None else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        saved = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True).get("hyper_parameters", {})
        written_by, builds = saved.get("_class_path"), config.model.class_path
        if written_by is not None and written_by != builds:
            self._parser(subcommand).error(
                f"--ckpt_path {ckpt_path} was written by {written_by}, but this config builds {builds}: "
                "pass a checkpoint of this experiment, or the experiment that wrote it"
            )

    def _check_resolution(self) -> None:
        """Refuse data whose sides the model cannot take (autoencoder downsampling x backbone multiple) before training."""
        multiple = getattr(self.model, "size_multiple", None)
        resolution = getattr(self.datamodule, "resolution", None)  # WebDataModule's image side
        if not multiple or not resolution:
            return
        needs = f"{type(self.model).__name__} needs (its autoencoder's downsampling times its backbone's multiple)"
        if resolution % multiple:
            below = resolution // multiple * multiple
            raise ValueError(f"data.init_args.resolution {resolution} is not a multiple of {multiple}, the side this "
                             f"{needs}: use {below or multiple} or {below + multiple}")
        odd = [f"{w}x{h}" for h, w in getattr(self.datamodule, "buckets", None) or () if h % multiple or w % multiple]
        if odd:
            raise ValueError(f"data.init_args.buckets: the buckets {odd} (width x height) have sides that are not "
                             f"multiples of {multiple}, which this {needs}: set buckets.multiple to a multiple of {multiple}")

    before_fit = before_validate = before_test = _check_resolution

    def before_predict(self) -> None:
        """Also refuse a request of a size the model cannot generate, naming its line, before any sampling."""
        self._check_resolution()
        multiple, prompts = getattr(self.model, "size_multiple", None), getattr(self.datamodule, "prompts", None)
        if multiple and prompts is not None:
            prompts().refuse_sizes(multiple)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer, with every rank's random states in its checkpoints, checkpoint files written
        atomically (unless the config names a CheckpointIO plugin of its own), each epoch's batch count read
        again (an elastic resume changes it), preemption signals handled, and a run whose validation or test
        metrics come out NaN/inf stopped before anything is written with them (FiniteMetrics)."""
        plugins = self._get(self.config_init, "trainer", default={}).get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        trainer = super().instantiate_trainer(plugins=plugins, **kwargs)
        trainer.callbacks += [RandomStates(), EpochLength(), Preemption()]
        trainer.callbacks.insert(0, FiniteMetrics())  # first: its on_test_end runs before EvaluationReport's
        return trainer


def model_options(args: list[str]) -> list[str]:
    """The ``--model`` options of a command line, each with its value: ``--model.x=v``, ``--model.x v``."""
    options: list[str] = []
    for i, arg in enumerate(args):
        name = arg.split("=", 1)[0]
        if name == "--model" or name.startswith("--model."):
            options += [arg] if "=" in arg or i + 1 == len(args) else [arg, args[i + 1]]
    return options


def build_cli(args: list[str] | None = None, run: bool = True) -> LdmCLI:
    """The `ldm` CLI on ``args``; with ``run=False`` it only builds the model and data module (tools)."""
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere+; no effect on CPU
    with warnings.catch_warnings():
        if args is not None:  # LightningCLI warns that the caller's own sys.argv (a tool's, a test's) goes unread
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
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


def instantiate(args: list[str]) -> tuple[LightningModule, LightningDataModule]:
    """The model and data module `ldm fit <args>` would build, without running anything (for tools)."""
    cli = build_cli(args, run=False)
    return cli.model, cli.datamodule


def instantiate_trained(args: list[str], ckpt: str | os.PathLike[str]) -> tuple[LatentDiffusion, LightningDataModule]:
    """The LatentDiffusion and data module `ldm fit <args>` would build, the model with a stage-2 checkpoint's or
    export's (EMA) weights, in eval mode (for tools that read a trained model)."""
    # imported here, not with the module: every `ldm` command would otherwise load stage 2 and open_clip at start-up
    from ldm.diffusion.module import LatentDiffusion
    from ldm.export.text_to_image import load_for_export

    # no EMA: the checkpoint's EMA weights load into the backbone itself
    model, data = instantiate([*args, "--model.init_args.init_weights", "null", "--model.init_args.ema_decay", "null"])
    if not isinstance(model, LatentDiffusion):
        raise TypeError(f"{args}: the model is a {type(model).__name__}, not a LatentDiffusion")
    return load_for_export(model, ckpt), data


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


def refusal(error: BaseException) -> BaseException | None:
    """The refusal that ``error`` is, or was raised from (``raise ... from``: jsonargparse wraps what a
    constructor raises), else None. A refusal is raised by a `raise` statement of ldm's or the tools' own
    code (a file, checkpoint or setting that cannot work, a run of non-finite steps): its message is
    written for the user. What a library raises, or Python itself in our code (a failed unpacking,
    ``int('x')``), an unimplemented method and a failed ``assert`` are bugs: they keep their traceback."""
    while error is not None and not _raised_by_us(error):
        error = error.__cause__
    return error


def _raised_by_us(error: BaseException) -> bool:
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next  # the frame that raised
    if tb is None or not isinstance(error, Exception) or isinstance(error, (NotImplementedError, AssertionError)):
        return False
    code = tb.tb_frame.f_code
    ours = any(Path(code.co_filename).resolve().is_relative_to(folder) for folder in OWN_CODE)
    return ours and code.co_code[tb.tb_lasti] == dis.opmap["RAISE_VARARGS"]


@contextmanager
def refusals(program: str) -> Iterator[None]:
    """End a refusal raised inside (see ``refusal``) in its one line, ``<program>: error: <message>``, and
    exit status 1, without a traceback; any other error propagates with its traceback."""
    try:
        yield
    except Exception as error:
        reason = refusal(error)
        if reason is None:
            raise
        raise SystemExit(f"{program}: error: {reason}") from None


def quiet_lightning() -> None:
    """Silence Lightning's messages that a user cannot act on (HARMLESS_WARNINGS, and its logger advertisement)."""
    for message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_not_an_advertisement)


def _not_an_advertisement(record: logging.LogRecord) -> bool:
    """Lightning's tip to install its cloud logger, printed by every run: nothing to do with ours."""
    return "litlogger" not in record.getMessage()


def main(args: list[str] | None = None) -> None:
    """Entry point of `ldm fit|validate|test|predict --config ...`: exit status 0 on success; a refusal
    ends in its one-line message and status 1."""
    # the process's logging, set once here: our one-line notices print as they are, rather than in the format of
    # whichever library first logs through the root logger (open_clip's tokenizer does, configuring it)
    logging.basicConfig(format="%(message)s")
    quiet_lightning()
    with refusals("ldm"):
        build_cli(args)


if __name__ == "__main__":
    main()
