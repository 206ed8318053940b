"""Building blocks of the Stable Diffusion UNet.

Module and parameter names follow diffusers' ``UNet2DConditionModel`` (resnets, attentions,
transformer_blocks, attn1/attn2, time_emb_proj, ...) so its weights convert by a few renames
(``ldm/convert/unet.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ldm.nn.layers import Attention, FeedForward


class ResBlock(nn.Module):
    """Two GroupNorm-SiLU-conv layers with the time embedding added in between (Ho et al. 2020, App. B)."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(emb_dim, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]  # (B, C_out, H, W)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))  # (B, C_out, H, W)
        return self.conv_shortcut(x) + h  # (B, C_out, H, W)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention to the context tokens, GEGLU MLP.

    Without a context (``context_dim`` None) the cross-attention is left out.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        if context_dim is not None:
            self.norm2 = nn.LayerNorm(dim)
            self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, activation="geglu")

    def forward(self, x: Tensor, context: Tensor | None) -> Tensor:
        x = x + self.attn1(self.norm1(x))  # (B, L, D)
        if context is not None:
            x = x + self.attn2(self.norm2(x), context)  # (B, L, D)
        return x + self.ff(self.norm3(x))  # (B, L, D)


class SpatialTransformer(nn.Module):
    """Feature map -> tokens -> transformer blocks -> feature map, as a residual (Rombach et al. 2022, Sec. 3.3).

    The in/out projections are per-token linear maps; SD-1.x's 1x1 convolutions are the same map and
    convert to them (``ldm/convert/unet.py``).
    """

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int | None, groups: int) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels do not split into {heads} attention heads")
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(channels, heads, channels // heads, context_dim) for _ in range(depth)
        )
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: Tensor, context: Tensor | None) -> Tensor:
        h = self.proj_in(rearrange(self.norm(x), "b c h w -> b (h w) c"))  # (B, H*W, C)
        for block in self.transformer_blocks:
            h = block(h, context)  # (B, H*W, C)
        h = rearrange(self.proj_out(h), "b (h w) c -> b c h w", h=x.shape[-2])  # (B, C, H, W)
        return x + h  # (B, C, H, W)


class VectorEmbedder(nn.Module):
    """Global conditioning into the time-embedding space, where it is added (SDXL's label embedding)."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, vector: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(vector)))  # (B, D_emb)


class Downsample(nn.Conv2d):
    """A stride-2 3x3 convolution that halves the sides (the UNet encoder's last step per level)."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, 3, stride=2, padding=1)


MakeResBlock = Callable[[int, int], ResBlock]  # (in_channels, out_channels) -> ResBlock
MakeTransformer = Callable[[int], SpatialTransformer]  # channels -> SpatialTransformer
MakeResampler = Callable[[int], nn.Module]  # channels -> a 2x down- or upsampler


class _Level(nn.Module):
    """A stack of ResBlocks, each followed by a SpatialTransformer when the level has attention."""

    def __init__(
        self, in_channels: list[int], out_channels: int, resnet: MakeResBlock, attention: MakeTransformer | None
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(resnet(c, out_channels) for c in in_channels)
        self.attentions = nn.ModuleList(attention(out_channels) for _ in in_channels) if attention else None

    def res_attn(self, i: int, x: Tensor, emb: Tensor, context: Tensor | None) -> Tensor:
        x = self.resnets[i](x, emb)  # (B, C_out, H, W)
        return x if self.attentions is None else self.attentions[i](x, context)  # (B, C_out, H, W)


class DownBlock(_Level):
    """One encoder level: ``num_res`` res(+attention) steps, then an optional downsampler.

    Returns the features and every intermediate output, which the decoder takes as skips.
    """

    def __init__(self, in_channels: int, out_channels: int, num_res: int, resnet: MakeResBlock,
                 attention: MakeTransformer | None, downsample: MakeResampler | None) -> None:
        super().__init__([in_channels] + [out_channels] * (num_res - 1), out_channels, resnet, attention)
        self.downsample = downsample(out_channels) if downsample else None

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for i in range(len(self.resnets)):
            x = self.res_attn(i, x, emb, context)  # (B, C_out, H, W)
            skips.append(x)
        if self.downsample is not None:
            x = self.downsample(x)  # (B, C_out, H/2, W/2)
            skips.append(x)
        return x, skips


class UpBlock(_Level):
    """One decoder level: res(+attention) steps on the features joined with the level's skips, then 2x up (optional).

    ``skip_channels`` lists the skips' widths in the order they are joined (the encoder's, reversed).
    """

    def __init__(self, in_channels: int, out_channels: int, skip_channels: list[int], resnet: MakeResBlock,
                 attention: MakeTransformer | None, upsample: MakeResampler | None) -> None:
        ins = [c + s for c, s in zip([in_channels] + [out_channels] * (len(skip_channels) - 1), skip_channels)]
        super().__init__(ins, out_channels, resnet, attention)
        self.upsample = upsample(out_channels) if upsample else None

    def forward(self, x: Tensor, skips: list[Tensor], emb: Tensor, context: Tensor | None) -> Tensor:
        """``skips`` in the order the encoder made them; the last one is joined first."""
        for i, skip in enumerate(reversed(skips)):
            x = self.res_attn(i, torch.cat([x, skip], dim=1), emb, context)  # (B, C_out, H, W)
        return x if self.upsample is None else self.upsample(x)  # (B, C_out, 2H, 2W)


class MidBlock(nn.Module):
    """ResBlock, SpatialTransformer, ResBlock at the lowest resolution."""

    def __init__(self, channels: int, resnet: MakeResBlock, attention: MakeTransformer) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([resnet(channels, channels), resnet(channels, channels)])
        self.attentions = nn.ModuleList([attention(channels)])

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None) -> Tensor:
        x = self.resnets[0](x, emb)  # (B, C, H, W)
        x = self.attentions[0](x, context)  # (B, C, H, W)
        return self.resnets[1](x, emb)  # (B, C, H, W)
