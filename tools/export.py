"""Export a trained text-to-image model for diffusers or for Stable Diffusion tools.

    python tools/export.py --config experiments/sd/finetune_sd15.yaml \\
        --ckpt runs/sd15-finetune/version_0/checkpoints/last.ckpt --out exports/sd15        # diffusers folder
    python tools/export.py --config experiments/sd/finetune_sd15.yaml \\
        --ckpt runs/sd15-finetune/version_0/export.safetensors --format sd --out exports/sd15.safetensors

The model is built from the experiment's YAML files as `ldm fit` builds it, but without its init_weights:
the codec and the text encoder load from their own files, then the checkpoint's EMA backbone (a Lightning
checkpoint's, else its trained one; or our export's). A checkpoint trained in another latent space than the
configured codec's is refused. `--format diffusers` (default) writes a StableDiffusionPipeline folder that
`DiffusionPipeline.from_pretrained(DIR)` loads offline; `--format sd` one `.safetensors` in the original
layout (UNet, autoencoder at SD's 0.18215, text encoder), which diffusers' `from_single_file` and SD tools
read (give them the v config for a v-prediction model). See ldm.interop.diffusers_export for what maps how.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ldm.autoencoder.codec import check_same_codec
from ldm.cli import instantiate
from ldm.diffusion.module import CODEC_KEY, LatentDiffusion
from ldm.interop.denoiser import load_denoiser_weights
from ldm.interop.diffusers_export import save_diffusers
from ldm.interop.sd_export import save_sd_checkpoint


def recorded_codec(path: Path) -> dict[str, Any] | None:
    """The codec fingerprint a stage-2 checkpoint or export of ours records (None if it records none)."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            found = (f.metadata() or {}).get(CODEC_KEY)
        return json.loads(found) if found else None
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get(CODEC_KEY)


def load_model(configs: list[str], ckpt: Path) -> tuple[LatentDiffusion, int | None]:
    """The experiment's LatentDiffusion with the checkpoint's (EMA) weights, in eval mode, and its data resolution."""
    args = [arg for config in configs for arg in ("--config", config)]
    model, data = instantiate([*args, "--model.init_args.init_weights", "null"])
    if not isinstance(model, LatentDiffusion):
        raise TypeError(f"{configs}: the model is a {type(model).__name__}, not a LatentDiffusion")
    check_same_codec(recorded_codec(ckpt), model.codec, str(ckpt))
    load_denoiser_weights(model.backbone, model.conditioner, ckpt)
    return model.eval(), (getattr(data, "hparams", None) or {}).get("resolution")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", required=True, help="experiment YAML (repeatable, as ldm fit)")
    parser.add_argument("--ckpt", type=Path, required=True, help="stage-2 Lightning checkpoint or our export .safetensors")
    parser.add_argument("--out", type=Path, required=True, help="diffusers: a new folder; sd: a .safetensors file")
    parser.add_argument("--format", choices=("diffusers", "sd"), default="diffusers")
    parser.add_argument("--image-size", type=int, help="the pipeline's default image side (default: data resolution, else 512)")
    args = parser.parse_args(argv)
    if args.out.exists():
        parser.error(f"{args.out} exists: export to a new path")
    if args.format == "sd" and args.out.suffix != ".safetensors":
        parser.error("--format sd writes one .safetensors file: give --out a .safetensors path")

    model, resolution = load_model(args.config, args.ckpt)
    with torch.no_grad():
        if args.format == "sd":
            args.out.parent.mkdir(parents=True, exist_ok=True)
            save_sd_checkpoint(model, args.out)
        else:
            save_diffusers(model, args.out, args.image_size or resolution or 512)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
