"""A text-to-image LatentDiffusion as a Stable Diffusion single file (the original CompVis layout).

The file holds the UNet (``model.diffusion_model.*``), the autoencoder (``first_stage_model.*``) and the
text encoder (``cond_stage_model.*``), as SD 1.x / 2.x checkpoints do. SD tools scale latents by a fixed
0.18215, so the codec's normalisation is folded into the autoencoder's weights (a no-op for an SD
autoencoder used at 0.18215). Nothing in the file says eps or v: load a v model with SD's v config.
"""

from __future__ import annotations

import os

from safetensors.torch import save_file

from ldm.conditioning.open_clip import text_state, uses_quick_gelu
from ldm.conditioning.text import OpenCLIPTextEmbedder
from ldm.convert.clip_text import hf_from_open_clip
from ldm.convert.sd_unet import unet_to_sd
from ldm.convert.vae import fold_latent_scale, vae_to_sd
from ldm.diffusion.module import LatentDiffusion
from ldm.export.text_to_image import TextToImage, linear_projections
from ldm.weights.io import StateDict
from ldm.weights.sd import HF_PREFIX, OPEN_CLIP_PREFIX, TEXT_PREFIX, UNET_PREFIX

SD_LATENT_SCALE = 0.18215  # the scale_factor of every SD 1.x / 2.x config


def text_to_sd(text: OpenCLIPTextEmbedder) -> StateDict:
    """The text tower under ``cond_stage_model.``: SD 1.x's transformers layout or SD 2.x's open_clip one.

    Each is read the way SD reads it, so the embedder must match one of them: SD 1.x takes the last layer
    of a quick-GELU tower with captions padded by the end-of-text token, SD 2.x the penultimate layer of
    a GELU tower with zero padding.
    """
    tower = text_state(text.clip)
    sd1 = {"layer": text.layer_index == -1, "quick GELU": uses_quick_gelu(text.clip), "end_of_text pad": text.pad == "end_of_text"}
    if all(sd1.values()):
        layers = len(text.clip.transformer.resblocks)
        return {TEXT_PREFIX + HF_PREFIX + k: v for k, v in hf_from_open_clip(tower, layers).items()}
    if not any(sd1.values()):
        return {TEXT_PREFIX + OPEN_CLIP_PREFIX + k: v for k, v in tower.items()}
    raise ValueError("the text embedder matches neither SD 1.x (last layer, quick GELU, end_of_text padding) nor "
                     f"SD 2.x (penultimate layer, GELU, zero padding): SD 1.x-like in {sd1}")


def sd_state_dict(model: LatentDiffusion) -> StateDict:
    """``model``'s weights as a Stable Diffusion single file: UNet, autoencoder at 0.18215, text encoder."""
    parts = TextToImage.of(model)
    unet = unet_to_sd(parts.unet.state_dict(), linear_projections(parts.unet))
    vae = fold_latent_scale(parts.codec.vae.state_dict(), parts.codec.mean, parts.codec.std, SD_LATENT_SCALE)
    return {**{UNET_PREFIX + k: v for k, v in unet.items()}, **vae_to_sd(vae), **text_to_sd(parts.text)}


def save_sd_checkpoint(model: LatentDiffusion, path: str | os.PathLike[str]) -> None:
    """Write ``sd_state_dict(model)`` as a ``.safetensors`` file."""
    save_file({k: v.detach().cpu().contiguous() for k, v in sd_state_dict(model).items()}, os.fspath(path))
