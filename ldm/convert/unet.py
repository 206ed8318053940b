"""UNet weights between ldm's UNet and diffusers' ``UNet2DConditionModel`` (Stable Diffusion 1.x/2.x layout).

Our module names follow diffusers, so the conversion is a few renames plus the shape of the
transformers' in/out projections: linear maps here, 1x1 convolutions in SD-1.x-style diffusers configs
(``use_linear_projection=False``). Keys already in our naming pass ``unet_from_diffusers`` unchanged.
``ldm.diffusion.init_weights`` loads the files; ``ldm.convert.sd_unet`` continues to the original SD layout.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from ldm.weights.io import StateDict
from ldm.weights.rename import rename, table

# (ours, diffusers)
_RENAMES = table("""
    to_out.             to_out.0.               # to_out is Linear + Dropout there, Linear here
    ff.proj_in.         ff.net.0.proj.          # GEGLU's projection
    ff.proj_out.        ff.net.2.
    downsample.         downsamplers.0.conv.
    upsample.           upsamplers.0.
    vector_embedding.   class_embedding.        # class_embed_type="projection"
""")
_PROJECTION = re.compile(r"attentions\.\d+\.proj_(in|out)\.weight$")


def unet_from_diffusers(state_dict: Mapping[str, Tensor]) -> StateDict:
    """A diffusers UNet2DConditionModel state dict (or one of ours) with our UNet's keys and shapes."""
    out = {}
    for key, value in state_dict.items():
        key = rename(key, _RENAMES, to_theirs=False)
        if _PROJECTION.search(key) and value.ndim == 4:
            value = value.flatten(1)  # (C_out, C_in, 1, 1) conv -> (C_out, C_in) linear
        out[key] = value
    return out


def diffusers_name(key: str) -> str:
    """diffusers' name of one of our UNet's keys."""
    return rename(key, _RENAMES, to_theirs=True)


def unet_to_diffusers(state_dict: Mapping[str, Tensor], linear_projections: bool) -> StateDict:
    """Our UNet's state dict with diffusers' keys; projections as 1x1 convs unless ``linear_projections``."""
    out = {}
    for key, value in state_dict.items():
        if _PROJECTION.search(key) and not linear_projections:
            value = value[:, :, None, None]  # (C_out, C_in) linear -> (C_out, C_in, 1, 1) conv
        out[diffusers_name(key)] = value
    return out
