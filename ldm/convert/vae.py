"""Autoencoder state dicts between ours, diffusers' AutoencoderKL and original Stable Diffusion (CompVis).

Our parameter names are diffusers' names plus the latent statistics buffers, so diffusers needs only a
key filter; the CompVis names are translated by the rename table below. ``ldm.autoencoder.weights``
reads the files.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

from ldm.weights.io import StateDict, WeightsError, under
from ldm.weights.rename import rename, table
from ldm.weights.sd import VAE_PREFIX

Layout = Literal["auto", "ldm", "diffusers", "sd"]

STATS_KEYS = ("latent_mean", "latent_std", "latent_stats_estimated")

# (our / diffusers name piece, CompVis name piece). {i} and {j} copy an index; {r} is a decoder level,
# which diffusers counts from the coarsest resolution and CompVis from the finest.
_SD_RENAMES = table("""
    down_blocks.{i}.resnets.{j}.            down.{i}.block.{j}.
    down_blocks.{i}.downsamplers.0.         down.{i}.downsample.
    up_blocks.{r}.resnets.{j}.              up.{r}.block.{j}.
    up_blocks.{r}.upsamplers.0.             up.{r}.upsample.
    mid_block.resnets.0.                    mid.block_1.
    mid_block.resnets.1.                    mid.block_2.
    mid_block.attentions.0.group_norm.      mid.attn_1.norm.
    mid_block.attentions.0.to_q.            mid.attn_1.q.
    mid_block.attentions.0.to_k.            mid.attn_1.k.
    mid_block.attentions.0.to_v.            mid.attn_1.v.
    mid_block.attentions.0.to_out.0.        mid.attn_1.proj_out.
    conv_shortcut.                          nin_shortcut.
    conv_norm_out.                          norm_out.
""")
# (our name piece, the attention name piece of diffusers checkpoints written before diffusers 0.14)
_LEGACY_DIFFUSERS_RENAMES = table("""
    attentions.0.to_q.      attentions.0.query.
    attentions.0.to_k.      attentions.0.key.
    attentions.0.to_v.      attentions.0.value.
    attentions.0.to_out.0.  attentions.0.proj_attn.
""")
_ATTN_WEIGHT = re.compile(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")
_DECODER_LEVEL = re.compile(r"^decoder\.(?:up_blocks|up)\.(\d+)\.")


def _sd_rename(key: str, to_sd: bool, levels: int) -> str:
    """A key between our names and CompVis's; ``levels`` flips the decoder level {r}."""

    def flip(fields: dict[str, int]) -> dict[str, int]:
        return {**fields, "r": levels - 1 - fields["r"]} if "r" in fields else fields

    return rename(key, _SD_RENAMES, to_sd, flip)


def _decoder_levels(state_dict: StateDict) -> int:
    levels = {int(m.group(1)) for k in state_dict if (m := _DECODER_LEVEL.match(k))}
    return max(levels) + 1 if levels else 0


def _attn_as_linear(state_dict: StateDict) -> StateDict:
    """Attention projections stored as 1x1 conv weights (C, C, 1, 1) -> linear weights (C, C)."""
    return {k: v[:, :, 0, 0] if _ATTN_WEIGHT.search(k) and v.ndim == 4 else v for k, v in state_dict.items()}


def _with_default_stats(state_dict: StateDict) -> StateDict:
    """Add unestimated latent statistics (mean 0, std 1) where a foreign checkpoint has none."""
    if "latent_mean" in state_dict:
        return state_dict
    channels = state_dict["decoder.conv_in.weight"].shape[1]
    defaults = {
        "latent_mean": torch.zeros(channels),
        "latent_std": torch.ones(channels),
        "latent_stats_estimated": torch.tensor(False),
    }
    return {**state_dict, **defaults}


def vae_from_diffusers(state_dict: StateDict) -> StateDict:
    """diffusers ``AutoencoderKL`` state dict -> ours (legacy attention names and 1x1-conv weights converted)."""
    renamed = {rename(k, _LEGACY_DIFFUSERS_RENAMES, False): v for k, v in state_dict.items()}
    return _with_default_stats(_attn_as_linear(renamed))


def vae_from_sd(state_dict: StateDict) -> StateDict:
    """Original Stable Diffusion (CompVis) autoencoder weights -> ours.

    Takes a full SD checkpoint (only its ``first_stage_model.*`` keys are used) or a standalone VAE
    checkpoint (its training-loss ``loss.*`` weights are dropped).
    """
    if any(k.startswith(VAE_PREFIX) for k in state_dict):
        state_dict = under(state_dict, VAE_PREFIX)
    else:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("loss.")}
    levels = _decoder_levels(state_dict)
    renamed = {_sd_rename(k, False, levels): v for k, v in state_dict.items()}
    return _with_default_stats(_attn_as_linear(renamed))


def vae_to_sd(state_dict: StateDict, prefix: str = VAE_PREFIX) -> StateDict:
    """Our state dict -> CompVis names under ``prefix`` (attention as 1x1 convs, latent statistics dropped)."""
    levels = _decoder_levels(state_dict)
    out = {}
    for key, value in state_dict.items():
        if key in STATS_KEYS:
            continue
        if _ATTN_WEIGHT.search(key):
            value = value[:, :, None, None]  # (C, C) -> (C, C, 1, 1)
        out[prefix + _sd_rename(key, True, levels)] = value
    return out


def fold_latent_scale(state_dict: Mapping[str, Tensor], mean: Tensor, std: Tensor, scale: float) -> StateDict:
    """Our VAE's weights (no statistics) changed so that its latents times ``scale`` are (z - mean) / std.

    For formats with one scalar scale (diffusers' ``scaling_factor``, SD's 0.18215) where our latents are
    normalised per channel: the affine map is folded, exactly, into the 1x1 convolutions on either side
    of the latent (quant_conv's mean rows and log-variance biases, post_quant_conv's input columns). The
    weights stay as they are where mean is 0 and std * scale is 1 up to float32 rounding, e.g. an SD
    autoencoder kept at its own 0.18215 (whose codec std is the float32 1 / 0.18215).
    """
    state = {k: v.detach().clone() for k, v in state_dict.items() if k not in STATS_KEYS}
    mean, a = mean.flatten().double(), std.flatten().double() * scale  # (C,), (C,): z_new = (z - mean) / a
    if not mean.any() and bool(((a - 1).abs() < 1e-6).all()):
        return state
    channels = mean.numel()
    weight, bias = state["quant_conv.weight"].double(), state["quant_conv.bias"].double()  # (M, M, 1, 1), (M,)
    weight[:channels] /= a[:, None, None, None]
    bias[:channels] = (bias[:channels] - mean) / a
    bias[channels:] -= 2 * a.log()  # log-variance rows, present when the posterior is Gaussian (M = 2C)
    post_weight, post_bias = state["post_quant_conv.weight"].double(), state["post_quant_conv.bias"].double()
    post_bias += post_weight[:, :, 0, 0] @ mean  # decoding z = a z_new + mean
    post_weight *= a[None, :, None, None]
    folded = {"quant_conv.weight": weight, "quant_conv.bias": bias,
              "post_quant_conv.weight": post_weight, "post_quant_conv.bias": post_bias}
    return {**state, **{k: v.to(state[k].dtype) for k, v in folded.items()}}


def detect_layout(state_dict: Mapping[str, Tensor], path: str) -> Literal["ldm", "diffusers", "sd"]:
    if "latent_mean" in state_dict:
        return "ldm"
    if any(k.startswith((VAE_PREFIX, "encoder.down.", "decoder.up.")) for k in state_dict):
        return "sd"
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in state_dict):
        return "diffusers"
    raise WeightsError(f"{path}: no autoencoder weights found (first keys: {sorted(state_dict)[:5]})")


def vae_from(layout: Literal["ldm", "diffusers", "sd"], state_dict: StateDict) -> StateDict:
    """Our autoencoder's state dict from one in ``layout`` (a KeyError names what the layout lacks)."""
    return {"ldm": dict, "diffusers": vae_from_diffusers, "sd": vae_from_sd}[layout](state_dict)
