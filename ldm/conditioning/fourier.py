"""Numbers as a global conditioning vector: sinusoidal (Fourier) features of each, as the timestep is embedded.

SDXL embeds image sizes and crop offsets this way (ldm.conditioning.size); Stable Video Diffusion a clip's frame
rate and motion amount (ldm.conditioning.scalars). The values go in unnormalised: the features span periods from
1 to 10,000, so small integers and image sides alike are told apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from ldm.conditioning.embedder import Embedder
from ldm.nn.layers import timestep_embedding


class FourierEmbedder(Embedder):
    """``features_per_value`` sinusoidal features of each of the ``values_per_sample`` numbers ``values`` reads of
    a batch, concatenated: a (B, values_per_sample * features_per_value) vector. The null value is zeros."""

    def __init__(self, keys: tuple[str, ...], values_per_sample: int, features_per_value: int, drop_rate: float) -> None:
        super().__init__(tuple(keys), "vector", values_per_sample * features_per_value, drop_rate)
        self.features_per_value = features_per_value
        self.register_buffer("anchor", torch.zeros(()), persistent=False)  # follows the module's device

    def values(self, batch: Mapping[str, Any]) -> Tensor:
        """(B, values_per_sample) numbers of the batch."""
        raise NotImplementedError

    def forward(self, batch: Mapping[str, Any], latent_size: tuple[int, int]) -> Tensor:
        values = self.values(batch)  # (B, N)
        features = timestep_embedding(values.flatten(), self.features_per_value)  # (B * N, F)
        return rearrange(features, "(b n) f -> b (n f)", b=values.shape[0])  # (B, N * F)

    def null(self, batch: Mapping[str, Any], latent_size: tuple[int, int]) -> Tensor:
        return torch.zeros_like(self(batch, latent_size))  # (B, D)

    def number(self, value: Any) -> Tensor:
        """A batch entry (or default) as float32 on the module's device."""
        return torch.as_tensor(value, dtype=torch.float32, device=self.anchor.device)
