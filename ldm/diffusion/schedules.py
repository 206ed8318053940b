"""Noise schedules and sampling-time spacings as plain functions.

Schedules are computed in float64; objectives cast them where they use them. A spacing gives the
(steps + 1,) times a sampler runs through, from the noise end to the clean end.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor


def linear_betas(n: int, beta_start: float = 1e-4, beta_end: float = 2e-2) -> Tensor:
    """DDPM's betas, linear in the step (Ho et al. 2020, Sec. 4)."""
    return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)  # (n,)


def scaled_linear_betas(n: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """Stable Diffusion's betas: linear in sqrt(beta), then squared (Rombach et al. 2022)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2  # (n,)


def cosine_betas(n: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Betas of abar(t) = f(t) / f(0), f(t) = cos^2(pi/2 (t/n + s) / (1 + s)), clipped below 1."""
    f = torch.cos((torch.arange(n + 1, dtype=torch.float64) / n + s) / (1 + s) * math.pi / 2) ** 2  # (n+1,)
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)  # Nichol & Dhariwal 2021, Eq. 17 and the clip below it


def rescale_zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """Shift and scale sqrt(abar) so the last step has SNR exactly 0 and the first is kept (Lin et al. 2024, Alg. 1)."""
    a = alphas_cumprod.sqrt()  # (n,)
    first, last = a[0].clone(), a[-1].clone()
    return ((a - last) * first / (first - last)) ** 2  # (n,)


def shift_time(t: Tensor, shift: float) -> Tensor:
    """Resolution-dependent time shift of flow matching; shift > 1 spends more time at high noise.

    Esser et al. 2024, Eq. 23 with shift = sqrt(m / n) for m pixels against a base resolution's n.
    """
    return shift * t / (1 + (shift - 1) * t)


def draw_times(
    n: int,
    time_sampling: Literal["uniform", "logit_normal"],
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float = 1.0,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """(n,) training times in [0, 1], 1 the noise end: uniform or logit-normal (Esser et al. 2024, Sec. 3.1),
    then warped by ``shift_time``."""
    if time_sampling == "uniform":
        t = torch.rand(n, device=device, generator=generator)  # (n,)
    else:
        t = torch.sigmoid(logit_mean + logit_std * torch.randn(n, device=device, generator=generator))  # (n,)
    return shift_time(t, shift)


def trailing_timesteps(num_timesteps: int, steps: int) -> Tensor:
    """DDPM step indices N-1, ..., N/steps - 1 evenly "trailing" from the last, then -1, the clean end.

    Trailing spacing starts at the last training step whatever ``steps`` is (Lin et al. 2024, Sec. 3.3).
    """
    return torch.linspace(num_timesteps, 0, steps + 1).round() - 1  # (steps+1,)


def shifted_linear_times(steps: int, shift: float = 1.0) -> Tensor:
    """Flow times evenly spaced from 1 to 0, then warped by ``shift_time``."""
    return shift_time(torch.linspace(1, 0, steps + 1), shift)  # (steps+1,)
