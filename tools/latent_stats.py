"""Estimate a trained autoencoder's per-channel latent mean/std and export it for stage 2.

    python tools/latent_stats.py --config experiments/shapes/autoencoder.yaml \
        --ckpt_path runs/shapes-autoencoder/version_0/checkpoints/last.ckpt \
        --batches 50 --out runs/shapes/autoencoder.safetensors

Builds the experiment's AutoencoderKL and data module from the same YAML files as `ldm fit`, loads
the checkpoint, encodes `--batches` batches of a split to posterior samples (seeded: the statistics
are reproducible), and stores the mean/std in the VAE's latent buffers. It then writes them into the
checkpoint (in place, or a copy at `--ckpt_out`), so `LatentCodec(weights=<ckpt>)` and resumed runs
see them, and exports the VAE with its statistics as safetensors for `LatentCodec(weights=<out>)`.
"""

from __future__ import annotations

import argparse
import itertools
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule

from ldm.autoencoder.module import AutoencoderKL
from ldm.cli import build_cli
from ldm.interop.autoencoder import STATS_KEYS


def build(configs: list[str]) -> tuple[AutoencoderKL, LightningDataModule]:
    """The model and data module `ldm fit --config ...` would train, without running anything."""
    args = [arg for config in configs for arg in ("--config", config)]
    with warnings.catch_warnings():  # LightningCLI warns that sys.argv (this tool's own options) goes unread
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = build_cli(args, run=False)
    if not isinstance(cli.model, AutoencoderKL):
        raise TypeError(f"{configs}: the model is a {type(cli.model).__name__}, not an AutoencoderKL")
    return cli.model, cli.datamodule


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", required=True, help="experiment YAML (repeatable, as ldm fit)")
    parser.add_argument("--ckpt_path", type=Path, required=True, help="AutoencoderKL Lightning checkpoint")
    parser.add_argument("--out", type=Path, required=True, help="exported VAE weights + statistics (.safetensors)")
    parser.add_argument("--ckpt_out", type=Path, help="write the updated checkpoint here (default: update ckpt_path)")
    parser.add_argument("--batches", type=int, default=50, help="batches to encode (fewer if the split ends first)")
    parser.add_argument("--split", choices=("train", "val"), default="train")
    parser.add_argument("--seed", type=int, default=0, help="seed of the posterior samples")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    model, data = build(args.config)
    checkpoint = torch.load(args.ckpt_path, map_location="cpu", weights_only=True)
    model.load_state_dict(checkpoint["state_dict"])
    model.to(args.device).eval()
    data.setup("fit" if args.split == "train" else "validate")
    loader = data.train_dataloader() if args.split == "train" else data.val_dataloader()

    used = 0

    def counted(batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        nonlocal used
        for batch in batches:
            used += 1
            yield batch

    batches = itertools.islice(loader, args.batches)  # starts the loader (it draws its seed) before seeding
    torch.manual_seed(args.seed)
    model.estimate_latent_stats(counted(batches))
    vae = model.vae
    print(f"latent statistics over {used} {args.split} batches:")
    for c, (mean, std) in enumerate(zip(vae.latent_mean.tolist(), vae.latent_std.tolist())):
        print(f"  channel {c}: mean {mean:+.4f}  std {std:.4f}")

    for key in STATS_KEYS:
        checkpoint["state_dict"][f"vae.{key}"] = getattr(vae, key).detach().cpu().clone()
    ckpt_out = args.ckpt_out or args.ckpt_path
    ckpt_out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, ckpt_out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model.export(str(args.out))
    print(f"wrote {ckpt_out} (checkpoint) and {args.out} (safetensors)")


if __name__ == "__main__":
    main()
