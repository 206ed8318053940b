"""Layers that mix the frames of a clip, shared by the video backbones (ldm.backbones.video_dit, video_unet).

A video backbone is an image backbone run on every frame, with these layers after its spatial ones. Each is
a residual branch whose last layer starts at zero, so that a video backbone built from an image backbone's
weights is that image backbone frame by frame (inflation, Blattmann et al. 2023 "Video LDM", Sec. 3.1;
AnimateDiff, Guo et al. 2024). ``temporal_names`` lists their tensors: the ones an image backbone's weights
leave at their initialisation (ldm.diffusion.init_weights).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ldm.backbones.dit import DiTBlock, sincos_embed
from ldm.backbones.unet_blocks import SpatialTransformer


class TemporalLayer(nn.Module):
    """A layer that mixes frames: its tensors are the ones a video backbone has beyond its image backbone's."""


def temporal_names(module: nn.Module) -> set[str]:
    """The state-dict keys of ``module``'s temporal layers."""
    return {f"{name}.{key}" for name, layer in module.named_modules() if isinstance(layer, TemporalLayer)
            for key in layer.state_dict()}


def check_frame_patch(frame_patch: int) -> int:
    """``frame_patch`` (the consecutive frames a video backbone's token or feature map covers), if at least 1."""
    if frame_patch < 1:
        raise ValueError(f"frame_patch must be at least 1, got {frame_patch}")
    return frame_patch


def check_clip(backbone: nn.Module, x: Tensor) -> None:
    """Raise a ValueError unless x is a latent clip (B, C, T, H, W) whose T divides by ``backbone.frame_patch``."""
    name = type(backbone).__name__
    if x.ndim != 5:
        raise ValueError(f"{name} takes latent clips (B, C, T, H, W), got shape {tuple(x.shape)}")
    if x.shape[2] % backbone.frame_patch:
        raise ValueError(f"{name} clip of {x.shape[2]} frames is not divisible by frame_patch {backbone.frame_patch}")


@functools.lru_cache(maxsize=16)
def frame_pos_embed(dim: int, frames: int, device: torch.device) -> Tensor:
    """Fixed 1D sin-cos embedding of the frame index -> (frames, dim), for any number of frames."""
    return sincos_embed(torch.arange(frames, dtype=torch.float64), dim).to(device, torch.float32)  # (T, D)


class TemporalConv(TemporalLayer):
    """Two GroupNorm-SiLU-convolutions over each position's frames (kernel 3 in time), as a residual
    (Video LDM's temporal ResBlock); VideoUNet.initialize_weights zeroes conv2.

    A (3, 1) convolution over (T, H*W) is the (3, 1, 1) one over (T, H, W), with 4-d weights (channels-last,
    oneDNN on CPU).
    """

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, (3, 1), padding=(1, 0))
        self.norm2 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, (3, 1), padding=(1, 0))

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x.flatten(3))))  # (B, C, T, H*W), norms over each clip
        h = self.conv2(F.silu(self.norm2(h)))  # (B, C, T, H*W)
        return x + h.view_as(x)  # (B, C, T, H, W)


class TemporalTransformer(SpatialTransformer, TemporalLayer):
    """The UNet's transformer over the frames at each position, with frame positions added after its input
    projection (AnimateDiff's motion module) and a cross-attention to the text when the UNet has one (SVD's
    temporal blocks: what moves where is in the caption); proj_out starts at zero as in the UNet."""

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """x: (B, C, T, H, W); context: (B, L, D_ctx) per clip, or None."""
        b, c, t, h, w = x.shape
        tokens = self.proj_in(rearrange(self.norm(x), "b c t h w -> (b h w) t c"))  # (B*H*W, T, C)
        tokens = tokens + frame_pos_embed(c, t, x.device).to(tokens.dtype)  # (B*H*W, T, C)
        context = None if context is None else context.repeat_interleave(h * w, dim=0)  # (B*H*W, L, D_ctx)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)  # (B*H*W, T, C)
        return x + rearrange(self.proj_out(tokens), "(b h w) t c -> b c t h w", h=h, w=w)  # (B, C, T, H, W)


class TemporalDiTBlock(DiTBlock, TemporalLayer):
    """A DiT block over the frames at each position, the frame positions added to its attention's input, its
    cross-attention reading the text as SVD's temporal blocks do; adaLN-Zero and the zeroed cross-attention
    output make it the identity at initialisation (Latte, Ma et al. 2024, Sec. 3.2).

    The frame positions also enter the residual stream before it, through a per-channel gate that starts at zero
    (Latte adds them to the tokens before its first temporal block): every later layer, spatial ones included,
    can tell which frame it draws, and an inflated model is still the image model frame by frame. On the CPU
    shapes runs this did not yet teach the motion's sign (README: Video).
    """

    def __init__(self, width: int, num_heads: int, mlp_ratio: float, context_dim: int | None) -> None:
        super().__init__(width, num_heads, mlp_ratio, context_dim)
        self.frame_gate = nn.Parameter(torch.zeros(width))

    def forward(self, x: Tensor, c: Tensor, context: Tensor | None, pos: Tensor | None = None) -> Tensor:
        """x: (B*L, T, D) the frames at each position; pos: (T, D) their sin-cos positions."""
        return super().forward(x if pos is None else x + self.frame_gate * pos, c, context, pos)
