"""Export a trained text-to-image model for diffusers or for Stable Diffusion tools, or as our own weights file.

    python tools/export.py --config experiments/sd/finetune_sd15.yaml \\
        --ckpt runs/sd15-finetune/version_0/checkpoints/last.ckpt --out exports/sd15        # diffusers folder
    python tools/export.py --config experiments/sd/finetune_sd15.yaml \\
        --ckpt runs/sd15-finetune/version_0/export.safetensors --format sd --out exports/sd15.safetensors
    python tools/export.py --config experiments/sd/finetune_sd15.yaml \\
        --ckpt runs/sd15-finetune/version_0/checkpoints/last.ckpt --format ldm --out exports/sd15-ldm.safetensors

The model is built from the experiment's YAML files as `ldm fit` builds it, but without its init_weights:
the codec and the text encoder load from their own files, then the checkpoint's EMA backbone (a Lightning
checkpoint's, else its trained one; or our export's); a sharded checkpoint (the folder configs/trainer/fsdp.yaml
writes) is read whole in this one process. A checkpoint trained in another latent space than the configured
codec's is refused. `--format diffusers` (default) writes a StableDiffusionPipeline folder that
`DiffusionPipeline.from_pretrained(DIR)` loads offline; `--format sd` one `.safetensors` in the original
layout (UNet, autoencoder at SD's 0.18215, text encoder), which diffusers' `from_single_file` and SD tools
read (give them the v config for a v-prediction model); `--format ldm` the `.safetensors` that `ldm fit` writes at
its end (EMA backbone, trained conditioning, codec fingerprint), for any backbone. See ldm.export.diffusers for
what maps how.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ldm.cli import instantiate_trained, refusals
from ldm.export.diffusers import save_diffusers
from ldm.export.sd import save_sd_checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", required=True, help="experiment YAML (repeatable, as ldm fit)")
    parser.add_argument("--ckpt", type=Path, required=True, help="stage-2 Lightning checkpoint (sharded: its folder) or our export .safetensors")
    parser.add_argument("--out", type=Path, required=True, help="diffusers: a new folder; sd, ldm: a .safetensors file")
    parser.add_argument("--format", choices=("diffusers", "sd", "ldm"), default="diffusers")
    parser.add_argument("--image-size", type=int, help="the pipeline's default image side (default: data resolution, else 512)")
    args = parser.parse_args(argv)
    if args.out.exists():
        parser.error(f"{args.out} exists: export to a new path")
    if args.format != "diffusers" and args.out.suffix != ".safetensors":
        parser.error(f"--format {args.format} writes one .safetensors file: give --out a .safetensors path")

    with refusals(parser.prog), torch.no_grad():  # a checkpoint or model that cannot be exported: one line
        model, data = instantiate_trained([arg for config in args.config for arg in ("--config", config)], args.ckpt)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if args.format == "diffusers":
            save_diffusers(model, args.out, args.image_size or getattr(data, "resolution", None) or 512)
        elif args.format == "sd":
            save_sd_checkpoint(model, args.out)
        else:
            model.export(str(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
