"""Every part under configs/ composes into a run and trains one step (fast_dev_run).

The experiments' own smoke tests (tests/test_latent_diffusion.py, tests/test_autoencoder_module.py) run
every part an experiment names, and the latter every autoencoder config; this file runs the others by
swapping each into an experiment. Parts too large for a CPU step (e.g. DiT-XL/2) are built on the meta
device instead, and GPU trainer parts only compose.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from ldm.cli import build_cli, compose
from tests.stage2 import (
    MAX_BACKBONE_PARAMS,
    ROOT,
    backbone_params,
    cli_args,
    write_clip_shards,
    write_stage2_shards,
)

EXPERIMENTS = ROOT / "experiments"
TXT2IMG = EXPERIMENTS / "shapes" / "txt2img_unet.yaml"
TXT2VID = EXPERIMENTS / "shapes" / "txt2vid_dit.yaml"  # where a video backbone part trains its step
PARTS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name != "autoencoder")
BENCHMARKED = {"dit-XL-2-256.yaml": EXPERIMENTS / "cifar10" / "dit.yaml",  # a benchmark part -> the experiment it sets up
               "sd15-random.yaml": EXPERIMENTS / "sd" / "finetune_sd15.yaml"}
pytestmark = [pytest.mark.filterwarnings("ignore:LightningCLI's args parameter"), pytest.mark.usefixtures("one_thread")]


def references(path: Path, seen: set[Path] | None = None) -> set[Path]:
    """The config files a YAML file names (its `config:` include and every value ending in .yaml), recursively."""
    seen = set() if seen is None else seen

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, str) and value.endswith(".yaml"):
            target = (path.parent / value).resolve()
            if target.is_file() and target not in seen:
                seen.add(target)
                references(target, seen)

    walk(yaml.safe_load(path.read_text()))
    return seen


USED_BY_EXPERIMENTS = set().union(*(references(e) for e in EXPERIMENTS.rglob("*.yaml")))


def _run(args: list[str]) -> None:
    cli = build_cli(["fit", *args, "--trainer.fast_dev_run", "1"])
    assert cli.trainer.global_step == 1 and torch.isfinite(cli.trainer.callback_metrics["train/loss"])


def holds(composed: Any, written: Any) -> bool:
    """Does ``composed`` hold every value ``written`` states? (A class's init_args compose with their defaults.)"""
    if isinstance(written, dict):
        return isinstance(composed, dict) and all(k in composed and holds(composed[k], v) for k, v in written.items())
    if isinstance(written, list):
        return isinstance(composed, list) and len(composed) == len(written) and all(map(holds, composed, written))
    return composed == written


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_stage2_shards(tmp_path_factory.mktemp("shapes"))


def test_experiments_name_only_parts_that_exist() -> None:
    for experiment in EXPERIMENTS.rglob("*.yaml"):
        assert references(experiment), f"{experiment} composes no part"
        for value in yaml.safe_load(experiment.read_text()).values():
            assert not (isinstance(value, str) and value.endswith(".yaml") and not (experiment.parent / value).is_file())


@pytest.mark.parametrize("part", [p for p in PARTS if p.resolve() not in USED_BY_EXPERIMENTS],
                         ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_part_composes_and_trains_a_step(part: Path, shards: Path, tmp_path: Path,
                                        tmp_path_factory: pytest.TempPathFactory) -> None:
    kind, name = part.parent.name, str(part)
    if (kind == "backbone" and part.name.startswith("video-")) or "fps" in part.name:  # video backbones, clips' fps
        experiment, shards = TXT2VID, write_clip_shards(tmp_path_factory.mktemp("moving-shapes"))
    else:
        experiment = TXT2IMG
    swap = {"backbone": "--model.init_args.backbone", "conditioner": "--model.init_args.conditioner",
            "objective": "--model.init_args.objective", "sampler": "--model.init_args.sampler",
            "optimizer": "--model.init_args.optimizer"}
    if kind == "backbone":
        spec = compose(["--config", str(experiment), "--model.init_args.backbone", name])["model"]["init_args"]["backbone"]
        params = backbone_params(spec, context_dim=128)  # built on the meta device with the text context
        if params > MAX_BACKBONE_PARAMS:
            pytest.skip(f"{params / 1e6:.1f}M parameters (built on the meta device): too large for a CPU training step")
    if kind in swap:
        _run([*cli_args(experiment, shards, tmp_path), swap[kind], name, "--model.init_args.sampler.init_args.steps", "2"])
    elif kind == "embedder":
        overlay = tmp_path / "embedder.yaml"
        overlay.write_text(yaml.safe_dump({"model": {"init_args": {"conditioner": {
            "class_path": "ldm.conditioning.conditioner.Conditioner", "init_args": {"embedders": [name]}}}}}))
        _run([*cli_args(experiment, shards, tmp_path, parts=(str(overlay),))])
    elif kind == "data":
        _run(cli_args(TXT2IMG, shards, tmp_path, parts=(name,)))
    elif kind == "trainer":  # GPU settings: they compose here and run where CUDA is
        composed = compose(["--config", str(TXT2IMG), "--config", name])["trainer"]
        assert holds(composed, yaml.safe_load(part.read_text())["trainer"])
        if not torch.cuda.is_available():
            pytest.skip("a GPU trainer part: it composes here (checked above) and trains a step where CUDA is")
        _run(cli_args(TXT2IMG, shards, tmp_path, parts=(name,)))
    elif kind == "benchmark":  # a setup tools/benchmark.py and tools/gpu_check.py time: composes as written, random weights
        composed = compose(["--config", str(BENCHMARKED[part.name]), "--config", name])
        model, data = composed["model"]["init_args"], composed["data"]["init_args"]
        written = yaml.safe_load(part.read_text())
        assert model.get("init_weights") is None and model["codec"]["init_args"].get("weights") is None  # nothing to load
        assert model["codec"]["init_args"]["vae"]["init_args"]["base_channels"] == 128  # kl-f8
        if "model.init_args.backbone" in written:  # DiT-XL/2 at 256 px
            backbone = yaml.safe_load((part.parent / written["model.init_args.backbone"]).read_text())
            assert model["backbone"]["init_args"]["width"] == backbone["init_args"]["width"]
            assert data["resolution"] == written["data.init_args.resolution"] and data["batch_size"] == written["data.init_args.batch_size"]
        else:  # the SD-1.5 fine-tune: its text tower random too
            assert all(e["init_args"]["clip"]["random_init"] for e in model["conditioner"]["init_args"]["embedders"])
    elif kind == "callbacks":  # an evaluation setup for a CIFAR-10 experiment (tools/sampler_table.py): composes as written
        composed = compose(["--config", str(EXPERIMENTS / "cifar10" / "unet.yaml"), "--trainer.callbacks", name])
        written = yaml.safe_load(part.read_text())
        assert holds(composed["trainer"]["callbacks"], written)
    else:
        pytest.fail(f"no smoke test for the {kind} part {part}: add its kind here")
