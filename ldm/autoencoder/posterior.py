"""Diagonal Gaussian posterior q(z|x) of the KL autoencoder (Kingma & Welling 2014)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sample_gaussian(mean: Tensor, std: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """mean + std * eps with eps ~ N(0, I) shaped like mean: the one draw of a posterior sample."""
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + std * eps


class DiagonalGaussian:
    """N(mean, diag(exp(logvar))) from encoder moments (B, 2C, H, W) split on channels; computed in fp32.

    With ``deterministic=True`` the parameters are the mean alone (B, C, H, W) and the variance is zero:
    sampling returns the mean and the KL term vanishes (an autoencoder without the KL bottleneck).
    """

    def __init__(self, parameters: Tensor, deterministic: bool = False) -> None:
        self.deterministic = deterministic
        if deterministic:
            self.mean = parameters.float()  # (B, C, H, W)
            self.logvar = torch.full_like(self.mean, -math.inf)
        else:
            mean, logvar = parameters.float().chunk(2, dim=1)
            self.mean = mean  # (B, C, H, W)
            self.logvar = logvar.clamp(-30.0, 20.0)  # (B, C, H, W)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """Reparameterised draw z = mean + std * eps, eps ~ N(0, I)."""
        return sample_gaussian(self.mean, self.std, generator)

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per sample (B,), summed over C, H, W (Kingma & Welling 2014, App. B)."""
        if self.deterministic:
            return self.mean.new_zeros(self.mean.shape[0])
        return 0.5 * (self.mean.square() + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)
