"""A UNet over clips: the image UNet on each frame, a temporal layer after each of its spatial ones (Video LDM)."""

from __future__ import annotations

from torch import Tensor, nn

from ldm.backbones.temporal import TemporalConv, TemporalTransformer
from ldm.backbones.unet import UNet
from ldm.backbones.unet_blocks import Downsample, ResBlock, SpatialTransformer
from ldm.nn.layers import Upsample, per_frame


class SpatioTemporalResBlock(ResBlock):
    """The image ResBlock on each frame (its weights, its names), then a temporal convolution."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float, groups: int) -> None:
        super().__init__(in_channels, out_channels, emb_dim, dropout, groups)
        self.temporal = TemporalConv(out_channels, groups)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x: (B, C_in, T, H, W); emb: (B, D_emb) per clip. Returns (B, C_out, T, H, W)."""
        return self.temporal(per_frame(super().forward, x, emb))


class SpatioTemporalTransformer(SpatialTransformer):
    """The image SpatialTransformer on each frame (its weights, its names), then a temporal transformer."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int | None, groups: int) -> None:
        super().__init__(channels, heads, depth, context_dim, groups)
        self.temporal = TemporalTransformer(channels, heads, depth, context_dim, groups)

    def forward(self, x: Tensor, context: Tensor | None) -> Tensor:
        """x: (B, C, T, H, W); context: (B, L, D_ctx) per clip, or None. Returns (B, C, T, H, W)."""
        return self.temporal(per_frame(super().forward, x, context), context)


class FrameDownsample(Downsample):
    """The image UNet's downsampler on each frame: (B, C, T, H, W) -> (B, C, T, H/2, W/2)."""

    def forward(self, x: Tensor) -> Tensor:
        return per_frame(super().forward, x)


class FrameUpsample(Upsample):
    """The image UNet's upsampler on each frame: (B, C, T, H, W) -> (B, C, T, 2H, 2W)."""

    def forward(self, x: Tensor) -> Tensor:
        return per_frame(super().forward, x)


class VideoUNet(UNet):
    """The UNet on latent clips (B, C, T, H, W): its layers run on each frame, and a temporal convolution
    follows each ResBlock and a temporal transformer each SpatialTransformer (Blattmann et al. 2023, Sec. 3.1;
    AnimateDiff's motion modules). Any number of frames; the time embedding, ``vector`` and ``context`` are
    per clip. The constructor arguments are the UNet's.

    Its state dict is the UNet's plus ``...resnets.<j>.temporal.*`` and ``...attentions.<j>.temporal.*``: built
    from a UNet's weights (``LatentDiffusion.init_weights``, e.g. Stable Diffusion's, as AnimateDiff does),
    every temporal layer starts as the identity and it is that UNet frame by frame.
    """

    block_types = (SpatioTemporalResBlock, SpatioTemporalTransformer)
    resnet_type = SpatioTemporalResBlock
    transformer_type = SpatioTemporalTransformer
    downsample_type = FrameDownsample
    upsample_type = FrameUpsample

    def initialize_weights(self) -> None:
        """The UNet's (which zeroes the temporal transformers' proj_out too), each temporal conv's conv2 zero."""
        super().initialize_weights()
        for m in self.modules():
            if isinstance(m, TemporalConv):
                nn.init.zeros_(m.conv2.weight)
                nn.init.zeros_(m.conv2.bias)

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None, vector: Tensor | None = None) -> Tensor:
        """x: (B, C_in, T, H, W) -> (B, C_out, T, H, W)."""
        if x.ndim != 5:
            raise ValueError(f"VideoUNet takes latent clips (B, C, T, H, W), got shape {tuple(x.shape)}")
        self._check(x, context, vector)
        h = self._levels(per_frame(self.conv_in, x), self._embedding(t, vector), context)  # (B, C_0, T, H, W)
        return per_frame(self._output, h)  # (B, C_out, T, H, W)
