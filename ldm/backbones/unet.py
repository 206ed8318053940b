"""The Stable Diffusion UNet (Rombach et al. 2022) as a Backbone."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldm.backbones.base import Backbone
from ldm.backbones.unet_blocks import (
    DownBlock,
    Downsample,
    MidBlock,
    ResBlock,
    SpatialTransformer,
    UpBlock,
    VectorEmbedder,
)
from ldm.nn.layers import TimestepEmbedder, Upsample


class UNet(Backbone):
    """Convolutional encoder-decoder with skips, time-conditioned ResBlocks and cross-attention transformers.

    Level ``i`` works at ``model_channels * channel_mult[i]`` channels and ``1 / 2**i`` resolution; the
    levels in ``attention_levels`` (and the middle) add a SpatialTransformer after each ResBlock.
    Attention heads are either ``num_heads`` everywhere (SD-1.x) or ``channels // head_dim`` (SD-2, SDXL).
    ``vector`` goes through an MLP and is added to the time embedding. Latent sides must be multiples
    of ``2 ** (len(channel_mult) - 1)``.
    """

    block_types = (ResBlock, SpatialTransformer)
    # the classes __init__ builds its layers from; the video UNet extends each to work on clips
    resnet_type: type[ResBlock] = ResBlock
    transformer_type: type[SpatialTransformer] = SpatialTransformer
    downsample_type: type[nn.Module] = Downsample
    upsample_type: type[nn.Module] = Upsample

    def __init__(
        self,
        in_channels: int,  # latent channels plus concat-conditioning channels
        out_channels: int,  # channels of the prediction
        context_dim: int | None,  # width of the cross-attention tokens; None: no cross-attention
        vector_dim: int | None,  # width of the global conditioning vector; None: none
        model_channels: int = 320,  # width of the first level
        channel_mult: tuple[int, ...] = (1, 2, 4, 4),  # width of each level, in multiples of model_channels
        num_res_blocks: int = 2,  # ResBlocks per encoder level (the decoder has one more)
        attention_levels: tuple[int, ...] = (0, 1, 2),  # indices of the levels with transformers
        head_dim: int | None = None,  # fixed width per head; None: use num_heads
        num_heads: int = 8,  # fixed number of heads, used when head_dim is None
        transformer_depth: int = 1,  # transformer blocks per SpatialTransformer
        dropout: float = 0.0,  # dropout inside the ResBlocks
        norm_groups: int = 32,  # GroupNorm groups
        gradient_checkpointing: bool = False,  # recompute each level's activations in the backward pass
    ) -> None:
        super().__init__()
        self.context_dim = context_dim
        self.vector_dim = vector_dim
        self.gradient_checkpointing = gradient_checkpointing
        self.size_multiple = 2 ** (len(channel_mult) - 1)
        widths = [model_channels * m for m in channel_mult]
        emb_dim = 4 * model_channels

        def attention(channels: int) -> SpatialTransformer:
            if head_dim is not None and channels % head_dim:
                raise ValueError(f"{channels} channels do not split into heads of width {head_dim}")
            heads = num_heads if head_dim is None else channels // head_dim
            return self.transformer_type(channels, heads, transformer_depth, context_dim, norm_groups)

        resnet = partial(self.resnet_type, emb_dim=emb_dim, dropout=dropout, groups=norm_groups)
        last = len(widths) - 1

        self.time_embedding = TimestepEmbedder(model_channels, emb_dim)
        self.vector_embedding = VectorEmbedder(vector_dim, emb_dim) if vector_dim is not None else None
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        level_attention = [attention if i in attention_levels else None for i in range(len(widths))]
        self.down_blocks = nn.ModuleList(
            DownBlock(widths[max(i - 1, 0)], w, num_res_blocks, resnet, level_attention[i],
                      self.downsample_type if i < last else None)
            for i, w in enumerate(widths)
        )
        self.mid_block = MidBlock(widths[-1], resnet, attention)
        # the encoder's outputs the decoder joins: conv_in's, then every ResBlock's and downsampler's
        skip_channels = [widths[0]] + [w for i, w in enumerate(widths) for _ in range(num_res_blocks + (i < last))]
        self.up_blocks = nn.ModuleList()
        for i in reversed(range(len(widths))):
            skips = [skip_channels.pop() for _ in range(num_res_blocks + 1)]  # in the order joined
            self.up_blocks.append(
                UpBlock(widths[min(i + 1, last)], widths[i], skips, resnet, level_attention[i],
                        self.upsample_type if i > 0 else None)
            )
        self.conv_norm_out = nn.GroupNorm(norm_groups, widths[0])
        self.conv_out = nn.Conv2d(widths[0], out_channels, 3, padding=1)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """PyTorch's defaults, but the last layer of every residual branch and the output conv are zero.

        Each ResBlock and SpatialTransformer then starts as the identity and the UNet predicts 0, as in
        the Stable Diffusion code (``zero_module``).
        """
        zeroed = [self.conv_out]
        for m in self.modules():
            if isinstance(m, ResBlock):
                zeroed.append(m.conv2)
            elif isinstance(m, SpatialTransformer):
                zeroed.append(m.proj_out)
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _run(self, block: nn.Module, *args: Tensor | list[Tensor] | None) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Call a level block, through activation checkpointing when enabled and training."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None, vector: Tensor | None = None) -> Tensor:
        self._check(x, context, vector)
        h = self._levels(self.conv_in(x), self._embedding(t, vector), context)  # (B, C_0, H, W)
        return self._output(h)  # (B, C_out, H, W)

    def _check(self, x: Tensor, context: Tensor | None, vector: Tensor | None) -> None:
        """Raise a ValueError unless the conditioning fits the model and the latent's sides its size_multiple."""
        if (context is None) != (self.context_dim is None) or (vector is None) != (self.vector_dim is None):
            got = {name: None if v is None else tuple(v.shape) for name, v in (("context", context), ("vector", vector))}
            raise ValueError(f"this {type(self).__name__} takes context_dim={self.context_dim}, "
                             f"vector_dim={self.vector_dim}; got {got}")
        if x.shape[-2] % self.size_multiple or x.shape[-1] % self.size_multiple:
            raise ValueError(f"latent sides {tuple(x.shape[-2:])} must be multiples of {self.size_multiple}")

    def _embedding(self, t: Tensor, vector: Tensor | None) -> Tensor:
        """What every ResBlock receives: the timestep embedding plus the embedded ``vector``, (B, D_emb)."""
        emb = self.time_embedding(t)  # (B, D_emb)
        return emb if self.vector_embedding is None else emb + self.vector_embedding(vector)  # (B, D_emb)

    def _levels(self, h: Tensor, emb: Tensor, context: Tensor | None) -> Tensor:
        """The encoder, middle and decoder levels on conv_in's features h (B, C_0, ...), with their skips."""
        skips = [h]
        for block in self.down_blocks:
            h, level_skips = self._run(block, h, emb, context)  # (B, C_i, H_i, W_i), sides halved below the last level
            skips += level_skips
        h = self._run(self.mid_block, h, emb, context)  # (B, C_last, H / m, W / m), m = size_multiple
        for block in self.up_blocks:
            n = len(block.resnets)
            h = self._run(block, h, skips[-n:], emb, context)  # (B, C_i, H_i, W_i), sides doubled above level 0
            del skips[-n:]
        return h  # (B, C_0, H, W)

    def _output(self, h: Tensor) -> Tensor:
        """The last features (B, C_0, H, W) to the prediction (B, C_out, H, W)."""
        return self.conv_out(F.silu(self.conv_norm_out(h)))
