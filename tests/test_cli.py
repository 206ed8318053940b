"""The `ldm` console script: help, config printing and composition, run folders, exit status, and refusals
that end in one line (the file or option and the fix) while bugs keep their traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from ldm.autoencoder.weights import save_vae_safetensors
from ldm.cli import _ComposeOnly, build_cli, instantiate, main, refusal
from ldm.data.synthetic import write_shapes
from ldm.training.nonfinite import NonFiniteGuard
from tests.processes import run_ldm
from tests.stage2 import cli_args, write_stage2_shards
from tools import export

ROOT = Path(__file__).resolve().parent.parent
LDM = shutil.which("ldm") or "ldm"
TXT2IMG = ROOT / "experiments" / "shapes" / "txt2img_unet.yaml"


def ldm(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([LDM, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=None if env is None else {**os.environ, **env})


def ldm_in_process(capsys: pytest.CaptureFixture, *args: str) -> str:
    """What `ldm <args>` prints before it exits with status 0 (--help, --print_config), run in this process: the
    console script itself is run by test_fit_exits_0_and_saves_config_and_last_checkpoint_twice."""
    with pytest.raises(SystemExit) as ended:
        main(list(args))
    assert not ended.value.code, capsys.readouterr().err[-2000:]
    return capsys.readouterr().out


def test_help_lists_the_subcommands_and_fit_help_the_components(capsys: pytest.CaptureFixture) -> None:
    top = ldm_in_process(capsys, "--help")
    assert all(c in top for c in ("fit", "validate", "test", "predict"))
    fit = ldm_in_process(capsys, "fit", "--help")
    assert "--model" in fit and "--data" in fit and "--checkpoint.save_last" in fit


def test_print_config_composes_configs_in_order_and_swaps_the_backbone(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the configs' relative paths, as a user in the project folder types them
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"trainer": {"max_steps": 7}, "data": {"init_args": {"resolution": 32}}}))
    config = yaml.safe_load(ldm_in_process(capsys, "fit", "--config", "experiments/shapes/txt2img_unet.yaml",
                                           "--config", str(overlay), "--model.backbone", "configs/backbone/dit-tiny.yaml",
                                           "--print_config"))
    assert config["trainer"]["max_steps"] == 7 and config["data"]["init_args"]["resolution"] == 32
    assert config["model"]["init_args"]["backbone"]["class_path"] == "ldm.backbones.dit.DiT"
    assert config["trainer"]["logger"]["init_args"]["save_dir"] == "runs"


def test_fit_exits_0_and_saves_config_and_last_checkpoint_twice(tmp_path: Path) -> None:
    write_shapes(tmp_path / "data", train=8, val=4, test=0, size=32)
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({
        "trainer": {"max_steps": 1, "val_check_interval": 1, "enable_progress_bar": False, "callbacks": [],
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(tmp_path / "runs"), "name": "ae", "version": "v"}}},
        "export": {"path": str(tmp_path / "autoencoder.safetensors")},
        "data": {"init_args": {"train": str(tmp_path / "data/train/shard-*.tar"), "val": str(tmp_path / "data/val/shard-*.tar"),
                               "resolution": 32, "num_workers": 0, "batch_size": 2}},
    }))
    args = ["fit", "--config", str(ROOT / "experiments/shapes/autoencoder.yaml"), "--config", str(overlay)]
    run = ldm(*args)
    assert run.returncode == 0, run.stderr[-3000:]
    main(args)  # a second run into the same folder (here in this process) must not fail on the existing config.yaml
    folder = tmp_path / "runs" / "ae" / "v"
    assert (folder / "config.yaml").is_file() and (folder / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "autoencoder.safetensors").is_file()  # the fit ends with its export
    assert list(folder.glob("events.out.tfevents.*"))


# --- refusals: one line, no traceback; bugs keep theirs ------------------------------------------------
def assert_refused(output: str, program: str, *says: str) -> None:
    """The output of a command that ended with status 1 ends in one line, ``<program>: error: ...`` saying each of
    ``says``, with no traceback."""
    last = output.strip().splitlines()[-1]
    assert last.startswith(f"{program}: error: ") and all(s in last for s in says), last
    assert "Traceback" not in output


@pytest.fixture(scope="module")
def stage2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Tiny shards, a stage-2 checkpoint (one step, a random-init codec) and the weights of another autoencoder."""
    root = tmp_path_factory.mktemp("stage2")
    shards = write_stage2_shards(root / "shards")
    args = cli_args(TXT2IMG, shards, root / "fit")
    with pytest.MonkeyPatch.context() as patch, pytest.warns():  # LightningCLI: pytest's own argv goes unread
        patch.setattr(sys, "argv", ["ldm"])
        build_cli(["fit", *args, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"])
        model, _ = instantiate(args)
    with torch.no_grad():
        next(model.codec.vae.parameters()).add_(0.1)
    save_vae_safetensors(model.codec.vae, root / "other-vae.safetensors")
    return shards, root / "fit" / "checkpoints" / "last.ckpt", root / "other-vae.safetensors"


def test_ldm_test_refuses_a_checkpoint_of_another_autoencoder_in_one_line(stage2, tmp_path: Path) -> None:
    shards, ckpt, other = stage2
    output = run_ldm(["test", *cli_args(TXT2IMG, shards, tmp_path, codec_weights=str(other)), "--ckpt_path", str(ckpt)],
                     ROOT, 300, status=1)
    assert_refused(output, "ldm", f"checkpoint {ckpt} was made with another autoencoder",
                   "set the codec's weights to the autoencoder it was made with")


def test_export_refuses_a_checkpoint_of_another_autoencoder_in_one_line(stage2, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """tools/export.py's main as `python tools/export.py` runs it: its refusal is a SystemExit whose message Python
    prints as the last line, with status 1."""
    _, ckpt, other = stage2
    overlay = tmp_path / "codec.yaml"
    overlay.write_text(yaml.safe_dump({"model": {"init_args": {"codec": {"init_args": {"weights": str(other)}}}}}))
    monkeypatch.setattr(sys, "argv", ["export.py"])
    with pytest.raises(SystemExit) as ended:
        export.main(["--config", str(TXT2IMG), "--config", str(overlay), "--ckpt", str(ckpt),
                     "--out", str(tmp_path / "diffusers")])
    assert isinstance(ended.value.code, str)  # printed by Python, status 1
    assert_refused(ended.value.code, "export.py", f"{ckpt} was made with another autoencoder")
    assert not (tmp_path / "diffusers").exists()


class _ParseOnly(_ComposeOnly):
    """Parses a command line with its subcommand (the checkpoint's hyper-parameters included) and stops."""

    def _run_subcommand(self, subcommand: str) -> None:
        pass


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_the_command_line_overrides_the_checkpoints_hyperparameters(stage2, tmp_path: Path) -> None:
    """Lightning puts a checkpoint's hyper-parameters over the whole config, so `--model.init_args.cfg_scale 6`
    beside --ckpt_path went unheard; in ldm the command line wins, and the checkpoint still wins over config files."""
    shards, ckpt, _ = stage2
    overlay = tmp_path / "cfg.yaml"
    overlay.write_text(yaml.safe_dump({"model": {"init_args": {"cfg_scale": 9.0}}}))

    def cfg_scale(*options: str) -> float:
        cli = _ParseOnly(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                         args=["predict", *cli_args(TXT2IMG, shards, tmp_path), *options, "--ckpt_path", str(ckpt)])
        return cli.config.predict.model.init_args.cfg_scale

    trained = torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]["cfg_scale"]
    assert cfg_scale("--config", str(overlay)) == trained != 9.0
    assert cfg_scale("--model.init_args.cfg_scale", "6.5") == cfg_scale("--model.init_args.cfg_scale=6.5") == 6.5


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_an_option_a_constructor_refuses_ends_in_its_own_line(stage2, tmp_path: Path) -> None:
    """jsonargparse wraps what a constructor raises in its own long error: the refusal under it is what ends the
    run (``SystemExit`` with a message: Python prints that one line and exits with status 1)."""
    shards, _, _ = stage2
    with pytest.raises(SystemExit) as ended:
        main(["fit", *cli_args(TXT2IMG, shards, tmp_path), "--model.init_args.max_nonfinite_steps", "0"])
    assert str(ended.value.code) == "ldm: error: max_nonfinite_steps must be at least 1, got 0"


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_a_bug_keeps_its_traceback(stage2, tmp_path: Path) -> None:
    """The same exception type raised by code that is not ldm's own refusals (here a test's callback) is a bug:
    it leaves ``main`` as it is, so Python prints its traceback."""
    shards, _, _ = stage2
    with pytest.raises(ValueError, match="a bug"):
        main(["fit", *cli_args(TXT2IMG, shards, tmp_path), "--trainer.max_steps", "1",
              "--trainer.callbacks+", "tests.test_cli.Broken"])


class Broken(L.Callback):
    """Raises at the start of training, as a bug would."""

    def on_train_start(self, trainer, pl_module) -> None:
        raise ValueError("a bug")


def _caught(call) -> BaseException:
    try:
        call()
    except Exception as error:
        return error
    raise AssertionError("nothing raised")


def _wrapped_by_a_library() -> None:
    try:
        NonFiniteGuard(0)
    except ValueError as error:
        raise RuntimeError("Does not validate against any of the Union subtypes") from error


def test_refusals_are_our_raise_statements_and_nothing_else() -> None:
    ours = _caught(lambda: NonFiniteGuard(0))  # `raise ValueError(...)` in ldm
    assert refusal(ours) is ours
    wrapped = _caught(_wrapped_by_a_library)  # as jsonargparse wraps a constructor's error
    assert str(refusal(wrapped)) == "max_nonfinite_steps must be at least 1, got 0"
    assert refusal(_caught(lambda: NonFiniteGuard("3"))) is None  # Python's TypeError ('<' on a str), in ldm
    assert refusal(_caught(lambda: torch.nn.Linear(2, 1)(torch.zeros(3)))) is None  # torch's
    assert refusal(_caught(lambda: int("x"))) is None  # Python's, here
    scope: dict = {}  # a failed assert in ldm's own code compiles to a raise statement too, yet is a bug
    exec(compile("def check():\n    assert False, 'an invariant'\n", str(ROOT / "ldm" / "invariant.py"), "exec"), scope)
    assert refusal(_caught(scope["check"])) is None
