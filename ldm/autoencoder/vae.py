"""The KL-regularised autoencoder network (Rombach et al. 2022, Sec. 3) and its latent statistics."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from ldm.autoencoder.networks import Decoder, Encoder
from ldm.autoencoder.posterior import DiagonalGaussian


def latent_moments(z: Tensor) -> Tensor:
    """Per-channel (count, sum, sum of squares) of (B, C, ...) latents in float64, shaped (3, C).

    Moments add across batches and ranks, so any number of batches fits in memory and an
    all-reduce of the sums gives the statistics of every rank's latents together.
    """
    flat = z.detach().transpose(0, 1).reshape(z.shape[1], -1).double()  # (C, B * H * W)
    return torch.stack([torch.full_like(flat[:, 0], flat.shape[1]), flat.sum(1), flat.square().sum(1)])


def stats_from_moments(moments: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (population) std (C,) from summed ``latent_moments``."""
    count, total, total_sq = moments
    if not count.min() > 0:
        raise ValueError("latent statistics need at least one latent")
    mean = total / count  # (C,)
    var = (total_sq / count - mean.square()).clamp_min(0.0)  # (C,)
    return mean.float(), var.sqrt().float()


@torch.no_grad()
def estimate_latent_stats(
    vae: VAE,
    images: Iterable[Tensor],  # batches (B, 3, H, W) in [-1, 1], on the VAE's device
    generator: torch.Generator,  # draws the posterior samples: the estimate repeats exactly
    reduce: Callable[[Tensor], Tensor] = lambda t: t,  # sums across ranks (e.g. a strategy's reduce)
) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of posterior samples of ``images``, the latents stage 2 normalises."""
    moments = None
    for x in images:
        m = latent_moments(vae.encode(x).sample(generator))  # (3, C)
        moments = m if moments is None else moments + m
    if moments is None:
        raise ValueError("latent statistics need at least one batch of images")
    return stats_from_moments(reduce(moments))


class VAE(nn.Module):
    """Encoder, Gaussian posterior and decoder of the SD "kl-f8" autoencoder, plus the latent mean/std.

    Parameter names match diffusers' ``AutoencoderKL``. ``latent_mean``/``latent_std`` are buffers saved
    with the weights so the latent normalisation travels with the autoencoder that defines it.
    """

    channels_last_pays = False  # its training step measured no faster channels-last on CPU (README, Performance)

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
    def set_latent_stats(self, mean: Tensor, std: Tensor) -> None:
        """Store the per-channel mean/std (C,) of this autoencoder's latents (saved with its weights)."""
        self.latent_mean.copy_(mean)
        self.latent_std.copy_(std)
        self.latent_stats_estimated.fill_(True)
