"""The KL-regularised autoencoder network (Rombach et al. 2022, Sec. 3) and its latent statistics."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ldm.autoencoder.networks import Decoder, Encoder
from ldm.autoencoder.posterior import DiagonalGaussian


def latent_stats(batches: Iterable[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (population) std of (B, C, ...) latents over all batches.

    Streams float64 sums of z and z^2 so any number of batches fits in memory.
    """
    count, total, total_sq = 0, None, None
    for z in batches:
        flat = z.detach().transpose(0, 1).reshape(z.shape[1], -1).double()  # (C, B * H * W)
        total = flat.sum(1) if total is None else total + flat.sum(1)
        total_sq = flat.square().sum(1) if total_sq is None else total_sq + flat.square().sum(1)
        count += flat.shape[1]
    if total is None:
        raise ValueError("latent_stats needs at least one batch")
    mean = total / count  # (C,)
    var = (total_sq / count - mean.square()).clamp_min(0.0)  # (C,)
    return mean.float(), var.sqrt().float()


class VAE(nn.Module):
    """Encoder, Gaussian posterior and decoder of the SD "kl-f8" autoencoder, plus the latent mean/std.

    Parameter names match diffusers' ``AutoencoderKL``. ``latent_mean``/``latent_std`` are buffers saved
    with the weights so the latent normalisation travels with the autoencoder that defines it.
    """

    def __init__(
        self,
        in_channels: int = 3,  # image channels in
        out_channels: int = 3,  # image channels out
        base_channels: int = 128,  # width of the first (finest) level
        channel_mult: tuple[int, ...] = (1, 2, 4, 4),  # per-level width multipliers; f = 2 ** (len - 1)
        num_res_blocks: int = 2,  # ResnetBlocks per encoder level (decoder: one more)
        latent_channels: int = 4,  # channels of the latent z
        double_z: bool = True,  # Gaussian posterior (mean, logvar); False = deterministic z
        attn_bottleneck: bool = True,  # self-attention in encoder and decoder mid blocks
        dropout: float = 0.0,  # dropout inside ResnetBlocks and attention
        norm_groups: int = 32,  # GroupNorm groups
    ) -> None:
        super().__init__()
        channel_mult = tuple(channel_mult)
        self.channel_mult = channel_mult
        self.double_z = double_z
        moments = latent_channels * (2 if double_z else 1)
        shared = dict(
            base_channels=base_channels,
            channel_mult=channel_mult,
            num_res_blocks=num_res_blocks,
            latent_channels=latent_channels,
            attn_bottleneck=attn_bottleneck,
            dropout=dropout,
            norm_groups=norm_groups,
        )
        self.encoder = Encoder(in_channels=in_channels, double_z=double_z, **shared)
        self.decoder = Decoder(out_channels=out_channels, **shared)
        self.quant_conv = nn.Conv2d(moments, moments, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        self.register_buffer("latent_mean", torch.zeros(latent_channels))
        self.register_buffer("latent_std", torch.ones(latent_channels))
        self.register_buffer("latent_stats_estimated", torch.tensor(False))

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def last_layer(self) -> Tensor:
        """Weight of the decoder's output conv, for the adaptive GAN weight (Esser et al. 2021, Eq. 7)."""
        return self.decoder.conv_out.weight

    def encode(self, x: Tensor) -> DiagonalGaussian:
        moments = self.quant_conv(self.encoder(x))  # (B, 2Z or Z, H/f, W/f)
        return DiagonalGaussian(moments, deterministic=not self.double_z)

    def decode(self, z: Tensor) -> Tensor:
        z = z.to(self.post_quant_conv.weight.dtype)
        return self.decoder(self.post_quant_conv(z))  # (B, out_channels, H, W)

    def forward(
        self, x: Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruct ``x`` from a posterior sample (or its mean with ``sample=False``)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()  # (B, Z, H/f, W/f)
        return self.decode(z), posterior

    @torch.no_grad()
    def estimate_latent_stats(self, latents: Iterable[Tensor]) -> None:
        """Store the per-channel mean/std of ``latents`` (B, Z, h, w batches, e.g. posterior samples)."""
        mean, std = latent_stats(latents)
        self.latent_mean.copy_(mean)
        self.latent_std.copy_(std)
        self.latent_stats_estimated.fill_(True)
