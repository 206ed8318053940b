"""Stage-2 experiments through the CLI on tiny data: shards, options that put every output under a
temporary folder, and the swap of an over-budget backbone for a tiny one of its class."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
import yaml

from ldm.cli import compose
from ldm.data.synthetic import write_shapes

ROOT = Path(__file__).resolve().parent.parent
RESOLUTION = 32
# An experiment's own backbone is what its smoke test checks; only one above this size is swapped for
# the tiny config of its class, so a large future experiment cannot slow the suite down.
MAX_BACKBONE_PARAMS = 40_000_000
TINY_BACKBONES = {"UNet": "configs/backbone/unet-tiny.yaml", "DiT": "configs/backbone/dit-tiny.yaml"}


def write_stage2_shards(root: Path) -> Path:
    write_shapes(root, train=8, val=4, test=4, size=RESOLUTION)
    return root


def write_clip_shards(root: Path) -> Path:
    """Moving-shapes clips of 8 frames, for the experiments that read clips."""
    write_shapes(root, train=4, val=2, test=2, size=RESOLUTION, frames=8)
    return root


def reads_clips(experiment: Path) -> bool:
    """Whether the experiment's data reads its shards as clips (ldm.data.video.VideoClips)."""
    formats = compose(["--config", str(experiment)])["data"]["init_args"].get("formats") or []
    return any(f["class_path"] == "ldm.data.video.VideoClips" for f in formats)


def backbone_params(spec: dict[str, Any], context_dim: int | None = None, vector_dim: int | None = None) -> int:
    """Parameters of a composed backbone spec, counted on the meta device (nothing allocated)."""
    module, name = spec["class_path"].rsplit(".", 1)
    with torch.device("meta"):
        backbone = getattr(importlib.import_module(module), name)(4, 4, context_dim, vector_dim, **spec.get("init_args", {}))
    return sum(p.numel() for p in backbone.parameters())


def backbone_override(experiment: Path) -> list[str]:
    """`--model.init_args.backbone <tiny config>` if the experiment's backbone is over budget, else nothing."""
    spec = compose(["--config", str(experiment)])["model"]["init_args"]["backbone"]
    if backbone_params(spec) <= MAX_BACKBONE_PARAMS:
        return []
    return ["--model.init_args.backbone", str(ROOT / TINY_BACKBONES[spec["class_path"].rsplit(".", 1)[1]])]


def text_override(experiment: Path) -> list[str]:
    """`--model.init_args.conditioner <tiny text>` if the experiment's text encoder loads pretrained weights
    (e.g. a user's Stable Diffusion checkpoint), which a test machine does not have."""
    conditioner = compose(["--config", str(experiment)])["model"]["init_args"].get("conditioner") or {}
    clips = [e["init_args"]["clip"] for e in conditioner.get("init_args", {}).get("embedders", [])
             if "clip" in e.get("init_args", {})]
    if all(clip.get("random_init") for clip in clips):
        return []
    return ["--model.init_args.conditioner", str(ROOT / "configs" / "conditioner" / "text-tiny.yaml")]


def cli_args(experiment: Path, shards: Path, out: Path, codec_weights: str | None = None,
             parts: tuple[str, ...] = ()) -> list[str]:
    """The experiment (with extra `--config` parts) on the tiny shards, everything written under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    overlay = {  # values that must be null or replace a whole component go in a YAML (see jsonargparse's 'None')
        "model": {"init_args": {
            "codec": {"init_args": {"weights": codec_weights}},
            "init_weights": None,  # a pretrained starting point (a user's SD checkpoint) is not on a test machine
            "sampler": {"class_path": "ldm.diffusion.samplers.DPMSolverPP2M", "init_args": {"steps": 2}},
        }},
        "trainer": {"logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(out / "runs"), "name": "test"}}},
    }
    (out / "overlay.yaml").write_text(yaml.safe_dump(overlay))
    data = {split: str(shards / split / "shard-*.tar") for split in ("train", "val", "test")}
    return [
        "--config", str(experiment), *(a for part in parts for a in ("--config", part)),
        "--config", str(out / "overlay.yaml"), *backbone_override(experiment), *text_override(experiment),
        *(arg for split, pattern in data.items() for arg in (f"--data.init_args.{split}", pattern)),
        "--data.init_args.resolution", str(RESOLUTION), "--data.init_args.batch_size", "2",
        "--data.init_args.num_workers", "0", "--data.init_args.pin_memory", "false",
        "--trainer.default_root_dir", str(out), "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.log_every_n_steps", "1",
        "--checkpoint.dirpath", str(out / "checkpoints"), "--export.path", str(out / "export.safetensors"),
    ]
