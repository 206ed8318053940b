"""Encoder and decoder of the Stable Diffusion "kl-f8" autoencoder (Rombach et al. 2022, App. G).

Each resolution level has ``num_res_blocks`` ResnetBlocks (the decoder one more) and all levels but
the last change the resolution by 2, so the downsampling factor is 2 ** (len(channel_mult) - 1).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ldm.autoencoder.blocks import Level, MidBlock, group_norm


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> latent moments (B, latent_channels * (2 if double_z else 1), H/f, W/f)."""

    def __init__(
        self,
        in_channels: int,  # image channels
        base_channels: int,  # width of the first level
        channel_mult: tuple[int, ...],  # width of level i is base_channels * channel_mult[i]
        num_res_blocks: int,  # ResnetBlocks per level
        latent_channels: int,  # channels of the latent z
        double_z: bool,  # emit mean and log-variance (2 * latent_channels) instead of z alone
        attn_bottleneck: bool,  # self-attention in the mid block
        dropout: float,  # dropout inside ResnetBlocks
        norm_groups: int,  # GroupNorm groups
    ) -> None:
        super().__init__()
        widths = [base_channels * m for m in channel_mult]
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            Level(c_in, c_out, num_res_blocks, "down" if i < len(widths) - 1 else None, dropout, norm_groups)
            for i, (c_in, c_out) in enumerate(zip([widths[0], *widths[:-1]], widths))
        )
        self.mid_block = MidBlock(widths[-1], attn_bottleneck, dropout, norm_groups)
        self.conv_norm_out = group_norm(widths[-1], norm_groups)
        self.conv_out = nn.Conv2d(widths[-1], latent_channels * (2 if double_z else 1), 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # (B, C_0, H, W)
        for block in self.down_blocks:
            h = block(h)  # (B, C_i, H', W'), halved by every level but the last
        h = self.mid_block(h)  # (B, C_last, H/f, W/f)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, Z, H/f, W/f)


class Decoder(nn.Module):
    """Latent (B, latent_channels, h, w) -> image (B, out_channels, h * f, w * f); levels run from coarse to fine."""

    def __init__(
        self,
        out_channels: int,  # image channels
        base_channels: int,  # width of the finest level
        channel_mult: tuple[int, ...],  # width of level i is base_channels * channel_mult[i] (fine to coarse)
        num_res_blocks: int,  # the decoder has num_res_blocks + 1 ResnetBlocks per level
        latent_channels: int,  # channels of the latent z
        attn_bottleneck: bool,  # self-attention in the mid block
        dropout: float,  # dropout inside ResnetBlocks
        norm_groups: int,  # GroupNorm groups
    ) -> None:
        super().__init__()
        widths = [base_channels * m for m in reversed(channel_mult)]
        self.conv_in = nn.Conv2d(latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], attn_bottleneck, dropout, norm_groups)
        self.up_blocks = nn.ModuleList(
            Level(c_in, c_out, num_res_blocks + 1, "up" if i < len(widths) - 1 else None, dropout, norm_groups)
            for i, (c_in, c_out) in enumerate(zip([widths[0], *widths[:-1]], widths))
        )
        self.conv_norm_out = group_norm(widths[-1], norm_groups)
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid_block(self.conv_in(z))  # (B, C_last, h, w)
        for block in self.up_blocks:
            h = block(h)  # (B, C_i, h', w'), doubled by every level but the last
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, out_channels, h * f, w * f)
