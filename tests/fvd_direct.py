"""FVD computed directly (8-bit frames, I3D's options, NumPy/SciPy Fréchet distance) and the clips it is tested on:
the reference the FVD and video-metric tests compare ldm's evaluation with."""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.metrics.fvd import I3D_MIN_FRAMES


def clips(n: int, seed: int, frames: int = 8, shift: float = 0.0) -> Tensor:
    """(n, 3, T, 16, 20) clips in [-1, 1]: smooth random patterns, brighter by ``shift``."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, frames, 4, 5, generator=g), size=(frames, 16, 20), mode="trilinear")
    return (2 * x - 1 + shift).clamp(-1, 1)


def direct_features(net: nn.Module, x: Tensor) -> np.ndarray:
    """The features by hand: 8-bit levels, first and last frames repeated to I3D_MIN_FRAMES, I3D's options."""
    pixels = np.round((x.numpy() + 1) * 127.5).clip(0, 255) / 127.5 - 1  # (B, 3, T, H, W)
    missing = max(I3D_MIN_FRAMES - pixels.shape[2], 0)
    pixels = np.pad(pixels, [(0, 0), (0, 0), (missing // 2, missing - missing // 2), (0, 0), (0, 0)], mode="edge")
    with torch.no_grad():
        return net(torch.from_numpy(pixels).float(), rescale=False, resize=True, return_features=True).double().numpy()


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 sqrtm(S_a S_b)) with np.cov's unbiased covariances."""
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(sa @ sb).real
    return float(np.square(a.mean(0) - b.mean(0)).sum() + np.trace(sa + sb - 2 * root))
