"""FID and KID between two sets of features, as pure functions computed by torch-fidelity.

torch-fidelity is the reference implementation these numbers are compared with, so the distances
themselves are its own (``fid_statistics_to_metric``, ``kid_features_to_metric``); ldm only streams
the statistics and features into them (``ldm.metrics.statistics``). Measured on real Inception
features of CIFAR-10 (256 and 600 cats vs trucks, tools in the closing note of the evaluation work):
torch-fidelity, torchmetrics' FID and an eigh-based square root agree to 2e-7 relative, so nothing
of ours is needed on top; torchmetrics' KID was not taken because it draws its subsets from the
global torch RNG, where torch-fidelity's seeded NumPy draw repeats exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
from torch_fidelity.metric_kid import (
    KEY_METRIC_KID_MEAN,
    KEY_METRIC_KID_STD,
    kid_features_to_metric,
)


def feature_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features, in float64."""
    x = features.detach().to(torch.float64)  # (N, D)
    return x.mean(dim=0), torch.cov(x.T)  # (D,), (D, D)


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) (Heusel et al. 2017, Eq. 6), in float64."""
    stats = [{"mu": mu.double().cpu().numpy(), "sigma": sigma.double().cpu().numpy()} for mu, sigma in ((mu1, sigma1), (mu2, sigma2))]
    return fid_statistics_to_metric(*stats, verbose=False)[KEY_METRIC_FID]


def fid(x_feats: Tensor, y_feats: Tensor) -> float:
    """Fréchet distance between the Gaussians fitted to two (N, D) feature sets."""
    return frechet_distance(*feature_stats(x_feats), *feature_stats(y_feats))


def kid(x_feats: Tensor, y_feats: Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): mean and std of the unbiased MMD^2 with the
    cubic polynomial kernel over ``subsets`` random subsets, drawn from a NumPy ``RandomState(seed)``.

    The subset size is clipped to the smaller set, so small evaluations still get a value.
    """
    size = min(subset_size, len(x_feats), len(y_feats))
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(x_feats)} and {len(y_feats)}")
    out = kid_features_to_metric(x_feats.double().cpu(), y_feats.double().cpu(), kid_subsets=subsets,
                                 kid_subset_size=size, rng_seed=seed, verbose=False)
    return out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD]
