"""LatentCodec: the one owner of stage 2's frozen autoencoder and of its latent normalisation."""

from __future__ import annotations

import hashlib
import json
import warnings
from typing import Any

import torch
from torch import Tensor

from ldm.autoencoder.posterior import sample_gaussian
from ldm.autoencoder.vae import VAE
from ldm.autoencoder.weights import load_vae_weights
from ldm.convert.vae import STATS_KEYS
from ldm.nn.frozen import StaysInEval
from ldm.nn.layers import per_frame
from ldm.weights.io import state_sha256


class LatentCodec(StaysInEval):
    """Images <-> normalised latents z' = (z - mean) / std, with a frozen VAE in fp32.

    The mean/std come from the VAE's stored statistics (estimated at the end of its stage-1 fit by
    the ``LatentStatistics`` callback and exported with its weights); weights without them (Stable
    Diffusion, diffusers) need ``scale`` (e.g. 0.18215 for SD 1.x): z' = z * scale.
    """

    def __init__(
        self,
        vae: VAE,  # architecture; weights come from `weights`
        weights: str | None = None,  # stage-1 checkpoint, exported safetensors, diffusers or SD file
        scale: float | None = None,  # fixed scalar scale instead of the stored statistics
        sample_posterior: bool = True,  # encode to a posterior sample (else its mean)
    ) -> None:
        super().__init__()
        self.vae = vae
        if weights is not None:
            load_vae_weights(self.vae, weights)
        self.vae.requires_grad_(False).eval()
        self.sample_posterior = sample_posterior
        self.weights = weights
        # hashed now and after every state-dict load (a checkpoint's weights): once a sharding strategy (FSDP) has
        # split the weights, no rank holds them whole
        self._weights_hash = state_sha256(self.vae, exclude=STATS_KEYS)
        self.register_load_state_dict_post_hook(_rehash)
        self._fingerprint: tuple[tuple[int, ...], dict[str, Any]] | None = None  # (statistics' versions, fingerprint)
        if scale is not None:
            mean, std = torch.zeros_like(vae.latent_mean), torch.full_like(vae.latent_std, 1 / scale)
        else:
            if not bool(vae.latent_stats_estimated):
                warnings.warn(
                    f"LatentCodec: the autoencoder ({weights or 'random init'}) has no latent statistics: "
                    "latents are used unnormalised; export it from a stage-1 fit with the LatentStatistics callback, "
                    "re-estimate them with tools/latent_stats.py, or set scale",
                    stacklevel=2,
                )
            mean, std = vae.latent_mean.clone(), vae.latent_std.clone()
        self.register_buffer("mean", mean.view(1, -1, 1, 1), persistent=False)  # (1, C, 1, 1)
        self.register_buffer("std", std.view(1, -1, 1, 1), persistent=False)  # (1, C, 1, 1)

    def fingerprint(self) -> dict[str, Any]:
        """The identity of this latent space: a hash of the VAE's weights and the normalisation applied.

        Stage-2 checkpoints and latent caches record it; latents from another codec or other
        statistics mean something else, so they are refused rather than silently decoded.
        """
        # read from the device once per value of the statistics (their version counters and storage): a latent-cache
        # step compares fingerprints, and must not wait for the device to do so
        key = (self.mean._version, self.std._version, self.mean.data_ptr(), self.std.data_ptr())
        if self._fingerprint is None or self._fingerprint[0] != key:
            self._fingerprint = (key, {"weights_sha256": self._weights_hash, "mean": self.mean.flatten().tolist(),
                                       "std": self.std.flatten().tolist()})
        return self._fingerprint[1]

    @property
    def latent_channels(self) -> int:
        return self.mean.shape[1]

    @property
    def downsample_factor(self) -> int:
        return self.vae.downsample_factor


    def fingerprint_hash(self) -> str:
        """A short hash of ``fingerprint()``: what a latent cache records with every sample."""
        return hashlib.sha256(json.dumps(self.fingerprint(), sort_keys=True).encode()).hexdigest()[:16]

    @torch.no_grad()
    def moments(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, H, W) in [-1, 1] -> the posterior's mean and std (B, C, H/f, W/f), unnormalised (fp32).
        A clip (B, 3, T, H, W) goes frame by frame (Video LDM, SVD): (B, C, T, H/f, W/f) each."""
        if images.ndim == 5:
            both = per_frame(lambda frames: torch.cat(self.moments(frames), dim=1), images)  # (B, 2C, T, h, w)
            return both.chunk(2, dim=1)
        with torch.autocast(images.device.type, enabled=False):
            posterior = self.vae.encode(images.float())
            return posterior.mean, posterior.std

    @torch.no_grad()
    def from_moments(self, mean: Tensor, std: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Normalised latents drawn from posterior moments (their mean if not ``sample_posterior``), as ``encode``
        draws them: the same noise from the same generator, so a latent cache trains like the images."""
        mean, std = mean.float(), std.float()
        z = sample_gaussian(mean, std, generator) if self.sample_posterior else mean
        shift, scale = self._statistics(z)
        return (z - shift) / scale

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, C, H/f, W/f) normalised latents."""
        return self.from_moments(*self.moments(images), generator)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """(B, C, h, w) normalised latents -> (B, 3, h*f, w*f) images in [-1, 1] (fp32); clips (B, C, T, h, w)
        frame by frame."""
        if latents.ndim == 5:
            return per_frame(self.decode, latents)
        with torch.autocast(latents.device.type, enabled=False):
            return self.vae.decode(latents.float() * self.std + self.mean).clamp(-1, 1)

    def _statistics(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """The latent mean and std shaped to broadcast over ``z``: (1, C, 1, 1), or (1, C, 1, 1, 1) for clips."""
        shape = (1, -1) + (1,) * (z.ndim - 2)
        return self.mean.view(shape), self.std.view(shape)


def check_same_codec(recorded: dict[str, Any] | None, codec: LatentCodec, source: str) -> None:
    """Refuse latents or a model made with another autoencoder or other latent statistics than ``codec``'s."""
    where = f"the configured codec (weights: {codec.weights or 'random init'})"
    if recorded is None:
        raise ValueError(f"{source} records no codec fingerprint, so its latent space cannot be checked against {where}")
    current = codec.fingerprint()
    if recorded["weights_sha256"] != current["weights_sha256"]:
        raise ValueError(
            f"{source} was made with another autoencoder (weights sha256 {recorded['weights_sha256'][:16]}) than "
            f"{where}, sha256 {current['weights_sha256'][:16]}: set the codec's weights to the autoencoder it was made with"
        )
    if recorded["mean"] != current["mean"] or recorded["std"] != current["std"]:
        raise ValueError(
            f"{source} was made with other latent statistics (mean {recorded['mean']}, std {recorded['std']}) than "
            f"{where} (mean {current['mean']}, std {current['std']}): load the autoencoder export it was made with"
        )


def _rehash(codec: LatentCodec, incompatible_keys: Any) -> None:
    """The loaded weights are the codec's now: hash them."""
    codec._weights_hash = state_sha256(codec.vae, exclude=STATS_KEYS)
