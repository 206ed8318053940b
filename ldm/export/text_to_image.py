"""What a text-to-image model is in Stable Diffusion's formats, shared by the diffusers and SD exporters.

``TextToImage`` picks the parts those formats hold out of a LatentDiffusion (or says why it cannot);
``attention_heads`` and ``linear_projections`` read how a UNet's attention is laid out there; and
``load_for_export`` builds an experiment's model with a stage-2 checkpoint's weights (a Lightning ``.ckpt``,
a sharded FSDP checkpoint folder or our export), refusing one trained in another latent space (what
``tools/export.py`` runs before writing).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ldm.autoencoder.codec import LatentCodec, check_same_codec
from ldm.backbones.unet import UNet
from ldm.conditioning.text import OpenCLIPTextEmbedder
from ldm.diffusion.init_weights import load_init_weights
from ldm.diffusion.module import CODEC_KEY, LatentDiffusion
from ldm.diffusion.objectives import DDPM
from ldm.training.fsdp import load_sharded_checkpoint


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
            *([] if type(model.backbone) is UNet else [f"the backbone is a {type(model.backbone).__name__}, not a "
                                                       "UNet (a DiT or a video backbone has no Stable Diffusion layout)"]),
            *([] if isinstance(text, OpenCLIPTextEmbedder) and text.output == "tokens" else
              [f"the conditioner has {[type(e).__name__ for e in embedders]}, not one OpenCLIPTextEmbedder of tokens"]),
            *([] if isinstance(model.objective, DDPM) else [f"the objective is {type(model.objective).__name__}, not DDPM"]),
            *(["the UNet takes a vector (class or pooled) input"] if getattr(model.backbone, "vector_dim", None) else []),
        ]
        if problems:
            raise ValueError("Stable Diffusion's formats hold a text-to-image UNet model only: " + "; ".join(problems))
        return cls(model.backbone, model.codec, text, model.objective)




def attention_heads(unet: UNet) -> int | list[int]:
    """The UNet's heads as diffusers' ``attention_head_dim`` states them.

    One number when every transformer has the same heads (SD 1.x fixes the number); else heads per
    level for a fixed head width (SD 2.x, SDXL), levels without attention counted at that width too.
    """
    mid = unet.mid_block.attentions[0].transformer_blocks[0].attn1.heads
    levels = [b.attentions[0].transformer_blocks[0].attn1.heads for b in unet.down_blocks if b.attentions is not None]
    if set(levels) <= {mid}:
        return mid
    widths = [block.resnets[0].conv1.out_channels for block in unet.down_blocks]
    head_width = widths[-1] // mid
    return [width // head_width for width in widths]


def linear_projections(unet: UNet) -> bool:
    """How Stable Diffusion stores this UNet's transformer projections: linear (SD 2.x, SDXL) or 1x1 convs.

    SD 1.x configs fix the number of heads and use convolutions; SD 2.x and SDXL fix the head width
    (``use_linear_in_transformer``). Our UNet is the same function either way: the choice only names
    the layout of the files it is written to, decided by the heads (one number: SD 1.x).
    """
    return isinstance(attention_heads(unet), list)


def recorded_codec(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The codec fingerprint a stage-2 checkpoint or export of ours records (None if it records none)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            found = (f.metadata() or {}).get(CODEC_KEY)
        return json.loads(found) if found else None
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get(CODEC_KEY)


def load_for_export(model: LatentDiffusion, ckpt: str | os.PathLike[str]) -> LatentDiffusion:
    """``model`` (built without init weights) with a stage-2 checkpoint's or export's (EMA) weights, in eval mode.

    ``ckpt`` may be a sharded FSDP checkpoint folder: it is read whole and loaded as the ``.ckpt`` it
    amounts to. A checkpoint trained in another latent space than ``model``'s codec is refused naming it.
    """
    if not os.path.isdir(ckpt):
        check_same_codec(recorded_codec(ckpt), model.codec, os.fspath(ckpt))
        load_init_weights(model.backbone, model.conditioner, ckpt)
        return model.eval()
    checkpoint = load_sharded_checkpoint(ckpt)
    check_same_codec(checkpoint.get(CODEC_KEY), model.codec, os.fspath(ckpt))
    with tempfile.TemporaryDirectory() as folder:  # the one weights reader reads files
        consolidated = Path(folder) / "consolidated.ckpt"
        torch.save(checkpoint, consolidated)
        load_init_weights(model.backbone, model.conditioner, consolidated)
    return model.eval()
