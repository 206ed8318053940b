"""Building blocks of the Stable Diffusion "kl-f8" encoder and decoder.

Module and parameter names follow diffusers' ``AutoencoderKL`` (resnets, downsamplers, upsamplers,
attentions, to_out.0, ...) so its state dicts load by name.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ldm.nn.layers import Upsample


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with the eps used throughout the SD autoencoder."""
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, conv) twice, 1x1 conv shortcut on a width change."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))  # (B, C_out, H, W)
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero-padding right and bottom only, as in SD (H, W even -> H/2, W/2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over all H*W positions with a residual connection.

    ``to_out`` is (Linear, Dropout) so its weights are named ``to_out.0`` as in diffusers.
    """

    def __init__(self, channels: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.group_norm = group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Sequential(nn.Linear(channels, channels), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        tokens = rearrange(self.group_norm(x), "b c h w -> b (h w) c")  # (B, HW, C)
        q, k, v = (proj(tokens)[:, None] for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        out = F.scaled_dot_product_attention(q, k, v)[:, 0]  # (B, HW, C)
        return x + rearrange(self.to_out(out), "b (h w) c -> b c h w", h=h, w=w)


def resnet_stack(in_channels: int, out_channels: int, num_layers: int, dropout: float, groups: int) -> nn.ModuleList:
    """``num_layers`` ResnetBlocks, the first one changing the width from in_channels to out_channels."""
    widths = [in_channels] + [out_channels] * num_layers
    return nn.ModuleList(ResnetBlock(c_in, out_channels, dropout, groups) for c_in in widths[:-1])


class Level(nn.Module):
    """One resolution level of the encoder or decoder: ResnetBlocks, then an optional 2x resampler.

    The resampler sits in a list named ``downsamplers`` or ``upsamplers``, as diffusers names it, so
    weights load by name.
    """

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, resample: Literal["down", "up"] | None,
                 dropout: float, groups: int) -> None:
        super().__init__()
        self.resnets = resnet_stack(in_channels, out_channels, num_layers, dropout, groups)
        self.resample = resample
        if resample is not None:
            sampler = Downsample(out_channels) if resample == "down" else Upsample(out_channels)
            self.add_module(f"{resample}samplers", nn.ModuleList([sampler]))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.resnets:
            x = block(x)
        return x if self.resample is None else self.get_submodule(f"{self.resample}samplers")[0](x)


class MidBlock(nn.Module):
    """Bottleneck: ResnetBlock, optional self-attention, ResnetBlock."""

    def __init__(self, channels: int, attention: bool, dropout: float, groups: int) -> None:
        super().__init__()
        self.resnets = resnet_stack(channels, channels, 2, dropout, groups)
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, dropout, groups)] if attention else [])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)
