"""A UNet over clips: the image UNet on each frame, a temporal layer after each of its spatial ones (Video LDM)."""

from __future__ import annotations

from typing import Any

from einops import rearrange
from torch import Tensor, nn

from ldm.backbones.temporal import TemporalConv, TemporalTransformer, check_clip, check_frame_patch
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
    per clip. The constructor arguments are the UNet's and ``frame_patch``.

    Its state dict is the UNet's plus ``...resnets.<j>.temporal.*`` and ``...attentions.<j>.temporal.*``: built
    from a UNet's weights (``LatentDiffusion.init_weights``, e.g. Stable Diffusion's, as AnimateDiff does),
    every temporal layer starts as the identity and it is that UNet frame by frame.

    With ``frame_patch`` k > 1 its feature maps cover k consecutive frames each (ViViT's tubelets, as in
    ``VideoDiT``): conv_in reads the k frames' channels stacked and conv_out writes them, so a clip costs T/k
    frames and the first layer sees the order of the frames it stacks. An image UNet's weights inflate it as I3D
    inflates 2-D filters (``inflate``): conv_in's weights split evenly over the k frames, conv_out's repeated for
    each, and it is that UNet on any clip that stands still over each run of k frames.
    """

    block_types = (SpatioTemporalResBlock, SpatioTemporalTransformer)
    resnet_type = SpatioTemporalResBlock
    transformer_type = SpatioTemporalTransformer
    downsample_type = FrameDownsample
    upsample_type = FrameUpsample

    def __init__(self, in_channels: int, out_channels: int, context_dim: int | None, vector_dim: int | None,
                 frame_patch: int = 1, **unet_options: Any) -> None:
        """``frame_patch``: the consecutive frames one feature map covers (1: the image UNet on every frame); the
        image UNet's knobs (model_channels, channel_mult, ...) otherwise."""
        k = check_frame_patch(frame_patch)
        super().__init__(in_channels * k, out_channels * k, context_dim, vector_dim, **unet_options)
        self.frame_patch = frame_patch

    def inflate(self, image_weights: dict[str, Tensor]) -> dict[str, Tensor]:
        """An image UNet's state dict made this model's (I3D's inflation, Carreira & Zisserman 2017, Sec. 2.2):
        conv_in's weights divided by k and tiled over the k stacked frames, conv_out's weights and bias tiled, so
        that k equal frames give the image model's prediction on each. The same values for k = 1.

        To conv_in it adds its own initialisation's differences between the k frames (its weights less their mean
        over the frames: zero on k equal frames). Tiled weights alone see a run's mean frame, and the change
        across it, the motion's sign included, would start at zero (a symmetric start whose gradient toward the
        sign is near zero; README: Video); a fresh tubelet embedding sees the change from the first step."""
        k = self.frame_patch
        own = rearrange(self.conv_in.weight.detach(), "o (k c) h w -> o k c h w", k=k)  # (C_0, k, C_in, 3, 3)
        change = rearrange(own - own.mean(1, keepdim=True), "o k c h w -> o (k c) h w")  # sums to 0 over the frames
        tile = {"conv_in.weight": lambda w: w.repeat(1, k, 1, 1) / k + change,  # (C_0, k*C_in, 3, 3), channels (k c)
                "conv_out.weight": lambda w: w.repeat(k, 1, 1, 1),  # (k*C_out, C_0, 3, 3), output channels (k c)
                "conv_out.bias": lambda w: w.repeat(k)}
        return {name: tile[name](w) if name in tile else w for name, w in image_weights.items()}

    def initialize_weights(self) -> None:
        """The UNet's (which zeroes the temporal transformers' proj_out too), each temporal conv's conv2 zero."""
        super().initialize_weights()
        for m in self.modules():
            if isinstance(m, TemporalConv):
                nn.init.zeros_(m.conv2.weight)
                nn.init.zeros_(m.conv2.bias)

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None, vector: Tensor | None = None) -> Tensor:
        """x: (B, C_in, T, H, W) -> (B, C_out, T, H, W)."""
        self._check(x, context, vector)
        x = rearrange(x, "b c (t k) h w -> b (k c) t h w", k=self.frame_patch)  # (B, k*C_in, T/k, H, W)
        h = self._levels(per_frame(self.conv_in, x), self._embedding(t, vector), context)  # (B, C_0, T/k, H, W)
        out = per_frame(self._output, h)  # (B, k*C_out, T/k, H, W)
        return rearrange(out, "b (k c) t h w -> b c (t k) h w", k=self.frame_patch)  # (B, C_out, T, H, W)

    def _check(self, x: Tensor, context: Tensor | None, vector: Tensor | None) -> None:
        """The UNet's checks on a latent clip whose frames divide into runs of frame_patch."""
        check_clip(self, x)
        super()._check(x, context, vector)
