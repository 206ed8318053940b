"""A text-to-image LatentDiffusion as a Stable Diffusion single file (the original CompVis layout).

The file holds the UNet (``model.diffusion_model.*``), the autoencoder (``first_stage_model.*``) and the
text encoder (``cond_stage_model.*``), as SD 1.x / 2.x checkpoints do. SD tools scale latents by a fixed
0.18215, so the codec's normalisation is folded into the autoencoder's weights (a no-op for an SD
autoencoder used at 0.18215). Nothing in the file says eps or v: load a v model with SD's v config.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from safetensors.torch import save_file

from ldm.autoencoder.codec import LatentCodec
from ldm.backbones.unet import UNet
from ldm.conditioning.text import OpenCLIPTextEmbedder
from ldm.diffusion.module import LatentDiffusion
from ldm.diffusion.objectives import DDPM
from ldm.interop.autoencoder import vae_to_sd, vae_with_latent_scale
from ldm.interop.clip_text import HF_PREFIX, OPEN_CLIP_PREFIX, TEXT_PREFIX, hf_from_open_clip, text_state, uses_quick_gelu
from ldm.interop.io import StateDict
from ldm.interop.sd_checkpoint import UNET_PREFIX
from ldm.interop.sd_unet import unet_to_sd
from ldm.interop.unet import linear_projections

SD_LATENT_SCALE = 0.18215  # the scale_factor of every SD 1.x / 2.x config


@dataclass(frozen=True)
class TextToImage:
    """The parts of a LatentDiffusion that Stable Diffusion's formats hold."""

    unet: UNet
    codec: LatentCodec
    text: OpenCLIPTextEmbedder
    objective: DDPM

    @classmethod
    def of(cls, model: LatentDiffusion) -> TextToImage:
        """The parts of ``model``, or a ValueError saying what SD's formats cannot hold."""
        embedders = list(model.conditioner.embedders)
        text = embedders[0] if len(embedders) == 1 else None
        problems = [
            *([] if isinstance(model.backbone, UNet) else [f"the backbone is a {type(model.backbone).__name__}, "
                                                           "not a UNet (a DiT has no Stable Diffusion layout)"]),
            *([] if isinstance(text, OpenCLIPTextEmbedder) and text.output == "tokens" else
              [f"the conditioner has {[type(e).__name__ for e in embedders]}, not one OpenCLIPTextEmbedder of tokens"]),
            *([] if isinstance(model.objective, DDPM) else [f"the objective is {type(model.objective).__name__}, not DDPM"]),
            *(["the UNet takes a vector (class or pooled) input"] if getattr(model.backbone, "vector_dim", None) else []),
        ]
        if problems:
            raise ValueError("Stable Diffusion's formats hold a text-to-image UNet model only: " + "; ".join(problems))
        return cls(model.backbone, model.codec, text, model.objective)


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
    vae = vae_with_latent_scale(parts.codec.vae, parts.codec.mean, parts.codec.std, SD_LATENT_SCALE)
    return {**{UNET_PREFIX + k: v for k, v in unet.items()}, **vae_to_sd(vae), **text_to_sd(parts.text)}


def save_sd_checkpoint(model: LatentDiffusion, path: str | os.PathLike[str]) -> None:
    """Write ``sd_state_dict(model)`` as a ``.safetensors`` file."""
    save_file({k: v.detach().cpu().contiguous() for k, v in sd_state_dict(model).items()}, os.fspath(path))
