"""UNet weights in the original Stable Diffusion (CompVis ``openaimodel``) layout, both ways.

The original UNet numbers its blocks flat: ``input_blocks.0`` is conv_in, then each level's
``num_res_blocks`` [ResBlock, transformer] pairs and its downsampler (``input_blocks.N.0.op``);
``middle_block.0/1/2`` are ResBlock, transformer, ResBlock; ``output_blocks`` hold each level's
``num_res_blocks + 1`` [ResBlock, transformer] pairs with the upsampler as their last module (index 1
without a transformer, 2 with one). Inside the transformers the names are diffusers' own, so we go
through diffusers' names (``ldm.convert.unet``) and only renumber the blocks and rename the ResBlocks.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping

from torch import Tensor

from ldm.convert.unet import diffusers_name, unet_from_diffusers, unet_to_diffusers
from ldm.weights.io import StateDict
from ldm.weights.rename import rename, table

_TOP_LEVEL = {  # diffusers prefix -> original prefix
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "class_embedding.linear_1.": "label_emb.0.0.",  # SDXL's vector (adm) embedding
    "class_embedding.linear_2.": "label_emb.0.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
    "mid_block.resnets.0.": "middle_block.0.",
    "mid_block.attentions.0.": "middle_block.1.",
    "mid_block.resnets.1.": "middle_block.2.",
}
# (diffusers, original) inside a ResBlock
_RESNET = table("""
    norm1.          in_layers.0.
    conv1.          in_layers.2.
    time_emb_proj.  emb_layers.1.
    norm2.          out_layers.0.
    conv2.          out_layers.3.
    conv_shortcut.  skip_connection.
""")
_LEVEL = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")
_ATTENTION_LEVEL = re.compile(r"up_blocks\.(\d+)\.attentions\.")


def _original_name(key: str, per_level: int, up_attention: Collection[int]) -> str:
    """The original name of a diffusers UNet key; ``per_level`` = num_res_blocks + 1 blocks a level."""
    for prefix, original in _TOP_LEVEL.items():
        if key.startswith(prefix):
            rest = key.removeprefix(prefix)
            return original + (rename(rest, _RESNET, True) if "resnets" in prefix else rest)
    m = _LEVEL.fullmatch(key)
    if m is None:
        return key  # not a UNet key: left for check_keys to report
    side, level, kind, index, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
    if kind == "downsamplers":
        return f"input_blocks.{(level + 1) * per_level}.0.op.{rest.removeprefix('conv.')}"
    if kind == "upsamplers":
        return f"output_blocks.{(level + 1) * per_level - 1}.{2 if level in up_attention else 1}.{rest}"
    block = 1 + level * per_level + index if side == "down" else level * per_level + index
    module = f"{'input' if side == 'down' else 'output'}_blocks.{block}.{0 if kind == 'resnets' else 1}."
    return module + (rename(rest, _RESNET, True) if kind == "resnets" else rest)


def original_names(diffusers_keys: Iterable[str]) -> dict[str, str]:
    """The original name of each diffusers key of one UNet (its block counts read from the keys)."""
    keys = list(diffusers_keys)
    num_res_blocks = len({k.split(".")[3] for k in keys if k.startswith("down_blocks.0.resnets.")})
    up_attention = {int(m[1]) for k in keys if (m := _ATTENTION_LEVEL.match(k))}
    return {k: _original_name(k, num_res_blocks + 1, up_attention) for k in keys}


def unet_to_sd(state_dict: Mapping[str, Tensor], linear_projections: bool) -> StateDict:
    """Our UNet's state dict in the original layout (no prefix); projections linear or as 1x1 convs."""
    diffusers = unet_to_diffusers(state_dict, linear_projections)
    names = original_names(diffusers)
    return {names[k]: v for k, v in diffusers.items()}


def unet_from_sd(state_dict: Mapping[str, Tensor], our_keys: Iterable[str]) -> StateDict:
    """Original-layout UNet weights (no prefix) renamed to ``our_keys``, the keys of the receiving UNet.

    Keys that no key of ours maps to keep their original names, so ``check_keys`` names them as the
    file does; 1x1-conv projections (SD 1.x) become linear.
    """
    ours = {diffusers_name(k): k for k in our_keys}
    to_ours = {original: ours[d] for d, original in original_names(ours).items()}
    known = unet_from_diffusers({to_ours[k]: v for k, v in state_dict.items() if k in to_ours})
    return {**known, **{k: v for k, v in state_dict.items() if k not in to_ours}}
