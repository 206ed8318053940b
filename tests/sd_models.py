"""Stable Diffusion's architecture at reduced width, random or read from an SD file: shared by the SD interop and
SD experiment tests."""

from __future__ import annotations

from functools import partial

import torch

from ldm.autoencoder.codec import LatentCodec
from ldm.autoencoder.vae import VAE
from ldm.backbones.unet import UNet
from ldm.conditioning.conditioner import Conditioner
from ldm.conditioning.open_clip import OpenCLIP
from ldm.conditioning.text import OpenCLIPTextEmbedder
from ldm.diffusion.module import LatentDiffusion
from ldm.diffusion.objectives import DDPM
from ldm.diffusion.samplers import DDIM
from tests.backbones import randomize

SIZE = 64  # image side: 8x8 latents, 1x1 at the UNet's last level
REDUCED = {  # the SD block layouts at reduced width
    "sd1": {"unet": {"model_channels": 32, "num_heads": 8}, "vae": {"base_channels": 32},
            "text": {"width": 64, "heads": 2, "layers": 3}},
    "sd2": {"unet": {"model_channels": 32, "head_dim": 16}, "vae": {"base_channels": 32},
            "text": {"width": 64, "heads": 2, "layers": 3}},
}
VERSION = {  # what tells SD 1.x and 2.x apart besides the UNet's heads
    "sd1": {"clip": "ViT-L-14-quickgelu", "layer": "last", "pad": "end_of_text", "prediction": "eps"},
    "sd2": {"clip": "ViT-H-14", "layer": "penultimate", "pad": "zeros", "prediction": "v"},
}


def sd_model(version: str, sizes: dict, weights: str | None = None, seed: int = 0) -> LatentDiffusion:
    """A text-to-image LatentDiffusion of SD's architecture: random (seeded) weights, or all three parts from an SD file."""
    v = VERSION[version]
    torch.manual_seed(seed)
    vae = VAE(channel_mult=(1, 2, 4, 4), num_res_blocks=2, **sizes["vae"])  # kl-f8's layout
    clip = OpenCLIP(v["clip"], weights, random_init=weights is None, seed=seed, text_cfg=sizes["text"])
    text = OpenCLIPTextEmbedder(clip, layer=v["layer"], pad=v["pad"])
    model = LatentDiffusion(partial(UNet, **sizes["unet"]), LatentCodec(vae, weights, scale=0.18215), Conditioner([text]),
                            DDPM(v["prediction"]), DDIM(20), ema_decay=None, cfg_scale=5.0, init_weights=weights)
    if weights is None:  # the UNet's zero-initialised output layers would make every prediction 0
        randomize(model.backbone, seed + 1, std=0.05)
    return model.eval()
