"""Fréchet and kernel distances between two sets of features (FID, KID), as pure tensor functions.

Statistics are float64 throughout (as in torch-fidelity and pytorch-fid): a 2048-d covariance
estimated from a few thousand samples is badly conditioned.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def feature_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features, in float64."""
    x = features.detach().to(torch.float64)  # (N, D)
    return x.mean(dim=0), torch.cov(x.T)  # (D,), (D, D)


def _psd_factor(sigma: Tensor) -> Tensor:
    """(D, R) factor L with L @ L.T = sigma, keeping the R eigenvalues above round-off level."""
    eigvals, eigvecs = torch.linalg.eigh((sigma + sigma.T) / 2)
    keep = eigvals > eigvals.max() * sigma.shape[0] * torch.finfo(sigma.dtype).eps
    return eigvecs[:, keep] * eigvals[keep].sqrt()  # (D, R)


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) (Heusel et al. 2017, eq. 6).

    With S1 = L1 L1.T and S2 = L2 L2.T, the eigenvalues of S1 S2 are the squared singular values
    of L1.T L2, so tr((S1 S2)^1/2) is the nuclear norm of L1.T L2. Singular values carry an
    absolute error of eps * norm, whereas the square roots of the near-zero eigenvalues that
    ``sqrtm`` or ``eigvals(S1 @ S2)`` (torch-fidelity, pytorch-fid) produce turn round-off into
    errors of sqrt(eps) * norm each. Their sum is visible when the covariances are singular
    (fewer samples than dimensions, low-rank features). Symmetric ``eigh`` needs no eps * I
    retry either. The factors drop eigenvalues below D * eps * max, which are round-off.
    """
    mu1, mu2, sigma1, sigma2 = (t.to(torch.float64) for t in (mu1, mu2, sigma1, sigma2))
    cross = _psd_factor(sigma1).T @ _psd_factor(sigma2)  # (R1, R2)
    tr_covmean = torch.linalg.svdvals(cross).sum()
    diff = mu1 - mu2  # (D,)
    return float(diff @ diff + sigma1.trace() + sigma2.trace() - 2 * tr_covmean)


def fid(x_feats: Tensor, y_feats: Tensor) -> float:
    """Fréchet distance between the Gaussians fitted to two (N, D) feature sets."""
    return frechet_distance(*feature_stats(x_feats), *feature_stats(y_feats))


def _polynomial_kernel(x: Tensor, y: Tensor) -> Tensor:
    """k(x, y) = (x.y / D + 1)^3, the KID kernel (Binkowski et al. 2018, sec. 3)."""
    return (x @ y.T / x.shape[1] + 1) ** 3  # (M, M)


def _mmd2_unbiased(x: Tensor, y: Tensor) -> Tensor:
    """Unbiased MMD^2 estimate between two equally sized samples (Gretton et al. 2012, eq. 3)."""
    m = x.shape[0]
    k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return within - 2 * k_xy.sum() / (m * m)


def kid(
    x_feats: Tensor, y_feats: Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance: mean and std of the unbiased MMD^2 over random subsets.

    The subset size is clipped to the smaller set. Subsets are drawn without replacement by
    NumPy's legacy ``RandomState(seed)``, in the order torch-fidelity and the reference MMD-GAN code
    draw them, so the same seed gives the same subsets and the same value.
    """
    x, y = x_feats.detach().to(torch.float64), y_feats.detach().to(torch.float64)  # (N1, D), (N2, D)
    size = min(subset_size, len(x), len(y))
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(x)} and {len(y)}")
    rng = np.random.RandomState(seed)
    mmds = []
    for _ in range(subsets):
        ix = torch.from_numpy(rng.choice(len(x), size, replace=False)).to(x.device)
        iy = torch.from_numpy(rng.choice(len(y), size, replace=False)).to(y.device)
        mmds.append(_mmd2_unbiased(x[ix], y[iy]))
    values = torch.stack(mmds)  # (subsets,)
    return float(values.mean()), float(values.std(unbiased=False))
