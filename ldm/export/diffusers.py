"""A text-to-image LatentDiffusion as a diffusers ``StableDiffusionPipeline`` folder.

``DiffusionPipeline.from_pretrained(folder)`` loads it offline: ``unet/`` (UNet2DConditionModel), ``vae/``
(AutoencoderKL), ``text_encoder/`` and ``tokenizer/`` (transformers' CLIPTextModel and CLIPTokenizer),
``scheduler/`` and ``model_index.json``. Decisions where the formats differ:

- latents: diffusers scales them by one ``scaling_factor`` (its SD pipeline ignores ``shift_factor``).
  A codec with zero mean and one std for every channel (an SD autoencoder at ``scale``) keeps its
  weights with ``scaling_factor = 1 / std``; per-channel statistics are folded into the autoencoder's
  weights instead (``fold_latent_scale``), with ``scaling_factor = 1``. Either way the pipeline's
  latents are ours.
- text: the tower up to the layer the embedder reads becomes a CLIPTextModel (the penultimate layer's:
  one block fewer, as diffusers' SD 2 does); its final LayerNorm is the one applied to that layer.
  The tokenizer is open_clip's BPE vocabulary, padding as the embedder does (``!`` is token 0, SD 2's
  pad token: like SD 2's own diffusers tokenizer it also turns a literal ``!`` into token 0).
- scheduler: the one the sampler names (``Sampler.diffusers_scheduler``) with the objective's alphas and
  ``prediction_type`` (``Prediction.diffusers_name``), "trailing" timesteps (``trailing_timesteps``) and a
  last step to the clean end (``set_alpha_to_one`` / ``final_sigmas_type="zero"``), as our samplers; DDIM
  reproduces ours (tests/test_sd_interop.py), the others are diffusers' nearest. A sampler or prediction
  without a diffusers counterpart is refused. Steps and guidance are call arguments there, as
  ``sampler.steps`` and ``cfg_scale`` are ours.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from open_clip.tokenizer import SimpleTokenizer
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm.autoencoder.codec import LatentCodec
from ldm.backbones.unet import UNet
from ldm.conditioning.open_clip import text_state, uses_quick_gelu
from ldm.conditioning.text import OpenCLIPTextEmbedder
from ldm.convert.clip_text import BOS, EOS, hf_from_open_clip
from ldm.convert.unet import unet_to_diffusers
from ldm.convert.vae import fold_latent_scale
from ldm.diffusion.module import LatentDiffusion
from ldm.diffusion.objectives import DDPM
from ldm.diffusion.samplers import Sampler
from ldm.export.text_to_image import TextToImage, attention_heads, linear_projections
from ldm.weights.io import StateDict

_NAMED_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")  # diffusers' names of DDPM's schedules
_HF_SPECIAL = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # open_clip -> OpenAI names


def save_diffusers(model: LatentDiffusion, out: str | os.PathLike[str], image_size: int) -> None:
    """Write ``model`` (its backbone as it is: load the EMA weights first) as a StableDiffusionPipeline folder."""
    parts = TextToImage.of(model)
    sampling = scheduler(parts.objective, model.sampler)  # first: what diffusers lacks is refused before the costly parts
    pipeline = StableDiffusionPipeline(
        vae=diffusers_vae(parts.codec, image_size),
        text_encoder=clip_text_model(parts.text),
        tokenizer=clip_tokenizer(parts.text),
        unet=diffusers_unet(parts.unet, image_size // parts.codec.downsample_factor),
        scheduler=sampling,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(os.fspath(out))


def _assigned(cls: type[nn.Module], config: dict[str, Any], state: StateDict) -> nn.Module:
    """A diffusers model of ``config`` holding ``state`` (built on the meta device: nothing is initialised)."""
    with torch.device("meta"):
        model = cls(**config)
    model.load_state_dict({k: v.detach().cpu().contiguous() for k, v in state.items()}, strict=True, assign=True)
    return model.eval()


def unet_config(unet: UNet, sample_size: int) -> dict[str, Any]:
    """UNet2DConditionModel arguments of our UNet's architecture."""
    attention = [block.attentions is not None for block in unet.down_blocks]
    return {
        "sample_size": sample_size,
        "in_channels": unet.conv_in.in_channels,
        "out_channels": unet.conv_out.out_channels,
        "block_out_channels": [block.resnets[0].conv1.out_channels for block in unet.down_blocks],
        "layers_per_block": len(unet.down_blocks[0].resnets),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "cross_attention_dim": unet.context_dim,
        "attention_head_dim": attention_heads(unet),  # diffusers' name for the number of heads
        "transformer_layers_per_block": len(unet.mid_block.attentions[0].transformer_blocks),
        "norm_num_groups": unet.conv_norm_out.num_groups,
        "use_linear_projection": linear_projections(unet),
    }


def diffusers_unet(unet: UNet, sample_size: int) -> UNet2DConditionModel:
    """Our UNet as diffusers' UNet2DConditionModel (same weights)."""
    config = unet_config(unet, sample_size)
    return _assigned(UNet2DConditionModel, config, unet_to_diffusers(unet.state_dict(), config["use_linear_projection"]))


def diffusers_vae(codec: LatentCodec, image_size: int) -> AutoencoderKL:
    """The codec's autoencoder as diffusers' AutoencoderKL whose latents times ``scaling_factor`` are ours."""
    vae, mean, std = codec.vae, codec.mean.flatten(), codec.std.flatten()
    if not vae.double_z:
        raise ValueError("diffusers' AutoencoderKL has a Gaussian posterior: this autoencoder has double_z=False")
    scaling = (1 / std[0].double()).item() if not mean.any() and bool((std == std[0]).all()) else 1.0
    levels = vae.encoder.down_blocks
    config = {
        "in_channels": vae.encoder.conv_in.in_channels,
        "out_channels": vae.decoder.conv_out.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": [level.resnets[0].conv1.out_channels for level in levels],
        "layers_per_block": len(levels[0].resnets),
        "latent_channels": vae.post_quant_conv.in_channels,
        "norm_num_groups": vae.encoder.conv_norm_out.num_groups,
        "sample_size": image_size,
        "scaling_factor": scaling,
        "mid_block_add_attention": len(vae.encoder.mid_block.attentions) > 0,
    }
    return _assigned(AutoencoderKL, config, fold_latent_scale(vae.state_dict(), mean, std, scaling))


def clip_text_model(text: OpenCLIPTextEmbedder) -> CLIPTextModel:
    """The embedder's tower up to the layer it reads, as transformers' CLIPTextModel."""
    layers = len(text.clip.transformer.resblocks) + 1 + text.layer_index  # last: all; penultimate: one fewer
    model = CLIPTextModel(CLIPTextConfig(**hf_text_config(text.clip, layers)))
    weights = hf_from_open_clip(text_state(text.clip), layers)
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel's names
        weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    model.load_state_dict(weights, strict=True)
    return model.eval()


def hf_text_config(clip: nn.Module, layers: int) -> dict[str, object]:
    """``CLIPTextConfig`` arguments for the first ``layers`` blocks of an open_clip text tower."""
    block = clip.transformer.resblocks[0]
    return {
        "vocab_size": clip.token_embedding.num_embeddings,
        "hidden_size": clip.token_embedding.embedding_dim,
        "intermediate_size": block.mlp.c_fc.out_features,
        "num_hidden_layers": layers,
        "num_attention_heads": block.attn.num_heads,
        "max_position_embeddings": clip.positional_embedding.shape[0],
        "hidden_act": "quick_gelu" if uses_quick_gelu(clip) else "gelu",
        "layer_norm_eps": clip.ln_final.eps,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
    }


def clip_tokenizer(text: OpenCLIPTextEmbedder) -> CLIPTokenizer:
    """open_clip's BPE tokenizer as transformers' CLIPTokenizer, padding as the embedder does."""
    bpe = text.tokenizer
    if not isinstance(bpe, SimpleTokenizer):
        raise ValueError(f"the text embedder's tokenizer is a {type(bpe).__name__}, not CLIP's BPE tokenizer")
    vocab = {_HF_SPECIAL.get(token, token): index for token, index in bpe.encoder.items()}
    merges = [pair for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda item: item[1])]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=bpe.context_length,
                         pad_token="<|endoftext|>" if text.pad == "end_of_text" else "!")


def _schedule(objective: DDPM) -> dict[str, Any]:
    """The objective's betas as diffusers states them: a named schedule when one reproduces them, else listed."""
    abar = objective.alpha_sigma(torch.arange(objective.num_timesteps).double())[0].double() ** 2  # (N,)
    betas = 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])  # (N,)
    ends = {"beta_start": float(f"{betas[0]:.4g}"), "beta_end": float(f"{betas[-1]:.4g}")}
    for name in _NAMED_SCHEDULES:
        named = DDPMScheduler(num_train_timesteps=objective.num_timesteps, beta_schedule=name, **ends)
        if torch.allclose(named.alphas_cumprod.double(), abar, rtol=1e-4, atol=0):
            return {"beta_schedule": name, **ends}
    return {"trained_betas": betas.tolist()}  # e.g. a zero-terminal-SNR schedule, as its betas


def scheduler(objective: DDPM, sampler: Sampler) -> SchedulerMixin:
    """The diffusers scheduler the sampler names, on the objective's schedule and prediction; a ValueError
    saying which part has no diffusers counterpart."""
    mapping, prediction = sampler.diffusers_scheduler(), objective.prediction.diffusers_name
    if mapping is None:
        raise ValueError(f"the sampler {type(sampler).__name__} has no diffusers scheduler: export the model with "
                         "a sampler that has one, e.g. DDIM or DPMSolverPP2M (configs/sampler/)")
    if prediction is None:
        raise ValueError(f"the prediction {objective.prediction.name!r} has no diffusers prediction_type to export: "
                         "diffusers' schedulers take eps, v or x0")
    cls, settings = mapping
    return cls(num_train_timesteps=objective.num_timesteps, prediction_type=prediction, timestep_spacing="trailing",
               steps_offset=1, **_schedule(objective), **settings)  # trailing: as trailing_timesteps; offset: "leading" only
