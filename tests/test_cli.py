"""The `ldm` console script: help, config printing and composition, run folders, exit status."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from ldm.data.synthetic import write_shapes

ROOT = Path(__file__).resolve().parent.parent
LDM = shutil.which("ldm") or "ldm"


def ldm(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([LDM, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_help_lists_the_subcommands_and_fit_help_the_components() -> None:
    top = ldm("--help")
    assert top.returncode == 0 and all(c in top.stdout for c in ("fit", "validate", "test", "predict"))
    fit = ldm("fit", "--help")
    assert fit.returncode == 0 and "--model" in fit.stdout and "--data" in fit.stdout and "--checkpoint.save_last" in fit.stdout


def test_print_config_composes_configs_in_order_and_swaps_the_backbone(tmp_path: Path) -> None:
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"trainer": {"max_steps": 7}, "data": {"init_args": {"resolution": 32}}}))
    out = ldm("fit", "--config", "experiments/shapes/txt2img_unet.yaml", "--config", str(overlay),
              "--model.backbone", "configs/backbone/dit-tiny.yaml", "--print_config")
    assert out.returncode == 0, out.stderr[-2000:]
    config = yaml.safe_load(out.stdout)
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
    for _ in range(2):  # a second run into the same folder must not fail on the existing config.yaml
        run = ldm("fit", "--config", "experiments/shapes/autoencoder.yaml", "--config", str(overlay))
        assert run.returncode == 0, run.stderr[-3000:]
    folder = tmp_path / "runs" / "ae" / "v"
    assert (folder / "config.yaml").is_file() and (folder / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "autoencoder.safetensors").is_file()  # the fit ends with its export
    assert list(folder.glob("events.out.tfevents.*"))
