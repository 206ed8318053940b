"""Re-estimate a trained autoencoder's per-channel latent mean/std into a new export file.

    python tools/latent_stats.py --config experiments/shapes/autoencoder.yaml \
        --ckpt_path runs/shapes-autoencoder/version_0/checkpoints/last.ckpt \
        --batches 200 --out runs/shapes/autoencoder-200.safetensors

A stage-1 fit already ends by estimating the statistics (the LatentStatistics callback) and exporting
the VAE with them; this tool is for another estimate (more batches, another split, an older run).
It builds the experiment's AutoencoderKL and data module from the same YAML files as `ldm fit`,
loads the checkpoint, encodes `--batches` batches to posterior samples drawn from a generator of its
own (seeded: the estimate repeats exactly) and writes a new safetensors export. It never rewrites the
checkpoint, and it refuses to overwrite an existing export: stage-2 models trained on one record its
statistics and would be refused by a codec loading the changed file.
"""

from __future__ import annotations

import argparse
from itertools import islice
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule

from ldm.autoencoder.module import AutoencoderKL
from ldm.autoencoder.vae import estimate_latent_stats
from ldm.cli import instantiate
from ldm.data import batch as B
from ldm.weights.io import read_state_dict


def build(configs: list[str]) -> tuple[AutoencoderKL, LightningDataModule]:
    """The model and data module `ldm fit --config ...` would train, without running anything."""
    model, data = instantiate([arg for config in configs for arg in ("--config", config)])
    if not isinstance(model, AutoencoderKL):
        raise TypeError(f"{configs}: the model is a {type(model).__name__}, not an AutoencoderKL")
    return model, data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", required=True, help="experiment YAML (repeatable, as ldm fit)")
    parser.add_argument("--ckpt_path", type=Path, required=True, help="AutoencoderKL Lightning checkpoint")
    parser.add_argument("--out", type=Path, required=True, help="new VAE export with the statistics (.safetensors)")
    parser.add_argument("--batches", type=int, default=50, help="batches to encode (fewer if the split ends first)")
    parser.add_argument("--split", choices=("train", "val"), default="train")
    parser.add_argument("--seed", type=int, default=0, help="seed of the posterior samples")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.out.exists():
        parser.error(f"{args.out} exists: write the new estimate to a new file")

    model, data = build(args.config)
    model.load_state_dict(read_state_dict(args.ckpt_path))
    model.to(args.device).eval()
    data.setup("fit" if args.split == "train" else "validate")
    loader = data.train_dataloader() if args.split == "train" else data.val_dataloader()
    generator = torch.Generator(args.device).manual_seed(args.seed)
    images = (batch[B.IMAGE].to(args.device) for batch in islice(loader, args.batches))
    mean, std = estimate_latent_stats(model.vae, images, generator)
    model.vae.set_latent_stats(mean, std)
    print(f"latent statistics over up to {args.batches} {args.split} batches:")
    for c, (m, s) in enumerate(zip(mean.tolist(), std.tolist())):
        print(f"  channel {c}: mean {m:+.4f}  std {s:.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model.export(str(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
