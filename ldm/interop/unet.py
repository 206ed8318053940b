"""UNet weights from diffusers' ``UNet2DConditionModel`` (Stable Diffusion 1.x/2.x layout) into ldm's UNet.

Our module names follow diffusers, so the conversion is a few renames plus flattening SD-1.x's 1x1-conv
transformer projections into the linear maps they are. Keys already in our naming pass unchanged.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from ldm.backbones.unet import UNet

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


def _listed(keys: list[str], limit: int = 10) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_unet_weights(unet: UNet, path: str | os.PathLike) -> None:
    """Load a ``.safetensors`` or torch state-dict file, ours or diffusers', into ``unet``; every key must fit."""
    path = Path(path)
    if path.suffix == ".safetensors":
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    state = unet_from_diffusers(state)
    expected = unet.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                  if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        problems = [f"{name}: {_listed(keys)}" for name, keys in
                    (("missing", missing), ("unexpected", unexpected), ("shape (file vs model)", mismatched)) if keys]
        raise ValueError(f"{path} does not fit this UNet; " + "; ".join(problems))
    unet.load_state_dict(state)
