"""FID, sFID and KID: distances between the generated and the reference set's Inception features, computed by torch-fidelity.

torch-fidelity is the reference implementation these numbers are compared with, so the distances
themselves are its own (``fid_statistics_to_metric``, ``kid_features_to_metric``); ldm only streams
the statistics and features into them (``ldm.metrics.statistics``). Measured on real Inception
features of CIFAR-10 (256 and 600 cats vs trucks, tools in the closing note of the evaluation work):
torch-fidelity, torchmetrics' FID and an eigh-based square root agree to 2e-7 relative, so nothing
of ours is needed on top; torchmetrics' KID was not taken because it draws its subsets from the
global torch RNG, where torch-fidelity's seeded NumPy draw repeats exactly.
"""

from __future__ import annotations

from torch import Tensor
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
from torch_fidelity.metric_kid import (
    KEY_METRIC_KID_MEAN,
    KEY_METRIC_KID_STD,
    kid_features_to_metric,
)

from ldm.metrics.base import DistributionMetric
from ldm.metrics.statistics import FeatureSet


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) (Heusel et al. 2017, Eq. 6), in float64."""
    stats = [{"mu": mu.double().cpu().numpy(), "sigma": sigma.double().cpu().numpy()} for mu, sigma in ((mu1, sigma1), (mu2, sigma2))]
    return fid_statistics_to_metric(*stats, verbose=False)[KEY_METRIC_FID]


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


class FID(DistributionMetric):
    """Fréchet Inception Distance of the generated set to the reference (from their means and covariances)."""

    names = ("fid",)
    label = "FID"

    def compute(self, generated: FeatureSet, reference: FeatureSet) -> dict[str, float]:
        return {self.names[0]: frechet_distance(*generated.mu_sigma(), *reference.mu_sigma())}


class SFID(FID):
    """Spatial FID (Nash et al. 2021, as ADM's evaluator computes it): the Fréchet distance of Inception's
    ``mixed_6/conv`` features, first 7 channels (``ldm.metrics.features.spatial_features``), which see layout
    where pool3 sees content."""

    names = ("sfid",)
    label = "sFID"
    feature = "spatial"


class KID(DistributionMetric):
    """Kernel Inception Distance of the generated set to the reference: ``kid`` and its std over subsets ``kid_std``."""

    names = ("kid", "kid_std")
    label = "KID"
    keep = True  # every feature: 8 KiB per image and set

    def __init__(
        self,
        subsets: int = 100,  # random subsets (torch-fidelity's default)
        subset_size: int = 1000,  # their size, clipped to the smaller set
        seed: int = 0,  # of the NumPy draw of the subsets
    ) -> None:
        super().__init__()
        self.subsets, self.subset_size, self.seed = subsets, subset_size, seed

    def compute(self, generated: FeatureSet, reference: FeatureSet) -> dict[str, float]:
        values = kid(generated.features, reference.features, self.subsets, self.subset_size, self.seed)
        return dict(zip(self.names, values))
