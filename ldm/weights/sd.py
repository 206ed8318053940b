"""Stable Diffusion single-file checkpoints (the CompVis layout): which key belongs to which part.

An SD 1.x / 2.x ``.ckpt`` or ``.safetensors`` holds three parts, each loaded through its own option:

- ``model.diffusion_model.*``: the UNet (``ldm.convert.sd_unet``; ``LatentDiffusion.init_weights``),
- ``first_stage_model.*``: the autoencoder (``ldm.convert.vae``; the codec's ``weights``),
- ``cond_stage_model.*``: the text encoder (``ldm.convert.clip_text``; the embedder's ``clip.pretrained``):
  SD 1.x's transformers ``CLIPTextModel`` under ``transformer.``, SD 2.x's open_clip tower under ``model.``,

and keys that none of them needs, ignored by name (``IGNORED``). Any other key is unexpected: the UNet
loader, which reads the file first, names it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from safetensors import safe_open
from torch import Tensor

from ldm.weights.io import StateDict, WeightsError, error_line, read_state_dict

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
HF_PREFIX = "transformer."  # SD 1.x: transformers' CLIPTextModel, under TEXT_PREFIX
OPEN_CLIP_PREFIX = "model."  # SD 2.x: open_clip's CLIP without its image tower, under TEXT_PREFIX
PARTS = (UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX)
# The DDPM schedule as buffers of CompVis's LatentDiffusion: our objective computes its own.
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "lvlb_weights", "logvar",
)
IGNORED = {  # key prefix (ending in ".") or whole key -> why no loader reads it
    # full (non-"emaonly") files keep the UNet's EMA next to the trained weights; every SD tool, and a
    # fine-tune, starts from model.diffusion_model.* (the "emaonly" files store the EMA there)
    "model_ema.": "the EMA copy of the UNet",
    **{name: "the DDPM schedule, which the objective computes" for name in SCHEDULE_BUFFERS},
}


def is_sd_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether a weights file is an SD single-file checkpoint (reads only its key names where it can)."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        try:
            with safe_open(path, "pt") as f:
                keys: Iterable[str] = list(f.keys())
        except Exception as error:  # a truncated or foreign file, named as read_state_dict names it
            raise WeightsError(f"{path}: cannot read weights ({error_line(error)})") from error
    else:
        keys = read_state_dict(path)  # torch zip files are memory-mapped: nothing is read but the names
    return any(k.startswith(PARTS) for k in keys)


def unaccounted(state_dict: Mapping[str, Tensor]) -> StateDict:
    """The entries of an SD file that belong to no part and are not ignored by name."""
    return {k: v for k, v in state_dict.items() if not k.startswith(PARTS) and not any(
        k.startswith(name) if name.endswith(".") else k == name for name in IGNORED)}
