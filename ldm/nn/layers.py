"""Layers shared by the UNet and the transformer backbones; ``per_frame`` runs an image layer on a clip's frames
(video backbones, the autoencoder on clips)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ldm.nn.rotary import rotate


def per_frame(fn: Callable[..., Tensor], x: Tensor, *per_clip: Tensor | None) -> Tensor:
    """``fn`` on every frame of ``x`` (B, C, T, H, W) at once, the frames folded into the batch; each per-clip
    argument (B, ...) is repeated for the clip's frames. Returns (B, C', T, H', W')."""
    frames = x.shape[2]
    repeated = (None if a is None else a.repeat_interleave(frames, dim=0) for a in per_clip)  # (B*T, ...) each
    out = fn(rearrange(x, "b c t h w -> (b t) c h w"), *repeated)  # (B*T, C', H', W')
    return rearrange(out, "(b t) c h w -> b c t h w", t=frames)


def timestep_embedding(
    t: Tensor, dim: int, max_period: float = 10000.0, flip_sin_to_cos: bool = True, downscale_freq_shift: float = 0.0
) -> Tensor:
    """Sinusoidal features of (B,) timesteps -> (B, dim) (Vaswani et al. 2017, Sec. 3.5).

    ``downscale_freq_shift=1`` spaces the frequencies as diffusers' DiT does (exponent / (half - 1)).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)  # (half,)
    freqs = torch.exp(exponent / (half - downscale_freq_shift))
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)], -1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoidal features followed by a two-layer MLP (names follow diffusers' TimestepEmbedding)."""

    def __init__(self, freq_dim: int, dim: int, flip_sin_to_cos: bool = True, downscale_freq_shift: float = 0.0) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift
        self.linear_1 = nn.Linear(freq_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t: Tensor) -> Tensor:
        emb = timestep_embedding(
            t, self.freq_dim, flip_sin_to_cos=self.flip_sin_to_cos, downscale_freq_shift=self.downscale_freq_shift
        )
        return self.linear_2(F.silu(self.linear_1(emb.to(self.linear_1.weight.dtype))))


class Attention(nn.Module):
    """Multi-head self- or cross-attention on ``F.scaled_dot_product_attention``.

    Parameter names (to_q, to_k, to_v, to_out) follow diffusers so weights convert by name.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None, qkv_bias: bool = False) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=qkv_bias)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: Tensor, context: Tensor | None = None, rotary: Tensor | None = None) -> Tensor:
        """``rotary`` (L, head_dim / 2): self-attention's RoPE angles per token (ldm.nn.rotary), rotating q and k."""
        ctx = x if context is None else context
        q, k, v = (rearrange(p, "b l (h d) -> b h l d", h=self.heads) for p in (self.to_q(x), self.to_k(ctx), self.to_v(ctx)))
        if rotary is not None:
            q, k = rotate(q, rotary), rotate(k, rotary)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, L, head_dim)
        return self.to_out(rearrange(out, "b h l d -> b l (h d)"))


class FeedForward(nn.Module):
    """Transformer MLP: GEGLU (SD UNet) or GELU-tanh (DiT)."""

    def __init__(self, dim: int, mult: float = 4.0, activation: str = "geglu") -> None:
        super().__init__()
        hidden = int(dim * mult)
        self.activation = activation
        self.proj_in = nn.Linear(dim, hidden * 2 if activation == "geglu" else hidden)
        self.proj_out = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.proj_in(x)
        if self.activation == "geglu":
            h, gate = h.chunk(2, dim=-1)
            h = h * F.gelu(gate)
        else:
            h = F.gelu(h, approximate="tanh")
        return self.proj_out(h)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv (UNet and VAE decoder alike)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)
