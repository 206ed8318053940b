"""UNet weights from diffusers' ``UNet2DConditionModel`` (Stable Diffusion 1.x/2.x layout) into ldm's UNet.

Our module names follow diffusers, so the conversion is a few renames plus flattening SD-1.x's 1x1-conv
transformer projections into the linear maps they are. Keys already in our naming pass unchanged.
``ldm.interop.denoiser`` loads the files.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

_RENAMES = (  # (diffusers pattern, ours)
    (r"\.to_out\.0\.", ".to_out."),  # to_out is Linear + Dropout there, Linear here
    (r"\.ff\.net\.0\.proj\.", ".ff.proj_in."),  # GEGLU's projection
    (r"\.ff\.net\.2\.", ".ff.proj_out."),
    (r"\.downsamplers\.0\.conv\.", ".downsample."),
    (r"\.upsamplers\.0\.", ".upsample."),
    (r"^class_embedding\.", "vector_embedding."),  # class_embed_type="projection"
)
_PROJECTION = re.compile(r"attentions\.\d+\.proj_(in|out)\.weight$")


def unet_from_diffusers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers UNet2DConditionModel state dict (or one of ours) with our UNet's keys and shapes."""
    out = {}
    for key, value in state_dict.items():
        for pattern, replacement in _RENAMES:
            key = re.sub(pattern, replacement, key)
        if _PROJECTION.search(key) and value.ndim == 4:
            value = value.flatten(1)  # (C_out, C_in, 1, 1) conv -> (C_out, C_in) linear
        out[key] = value
    return out
