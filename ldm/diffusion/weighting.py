"""Per-timestep loss weights, applied by the objective to the MSE on its prediction."""

from __future__ import annotations

import torch
from torch import Tensor


class LossWeighting:
    """Maps a batch's SNR to the weight on each sample's MSE.

    ``implicit`` is the weight that plain MSE on the objective's prediction already puts on the
    x0 error ||x0 - x0_hat||^2 (eps: snr, v: snr + 1, x0: 1; flow velocity: 1 / sigma^2), so a
    weighting defined on x0 errors in its paper becomes one multiplier on any prediction's MSE.
    """

    def __call__(self, snr: Tensor, implicit: Tensor) -> Tensor:  # (B,), (B,) -> (B,)
        raise NotImplementedError


class Uniform(LossWeighting):
    """Plain MSE on the prediction."""

    def __call__(self, snr: Tensor, implicit: Tensor) -> Tensor:
        return torch.ones_like(snr)


class MinSNR(LossWeighting):
    """Min-SNR-gamma: the x0 error weighted by min(snr, gamma) (Hang et al. 2023)."""

    def __init__(self, gamma: float = 5.0) -> None:
        self.gamma = gamma  # SNR above which steps stop gaining weight

    def __call__(self, snr: Tensor, implicit: Tensor) -> Tensor:
        return snr.clamp(max=self.gamma) / implicit  # eps: min(snr, g)/snr, v: min(snr, g)/(snr+1), x0: min(snr, g)
