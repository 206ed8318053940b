"""Improved precision and recall (Kynkäänniemi et al. 2019) as ADM's evaluator computes them: each set's
manifold is the union of balls around its samples reaching their k-th nearest neighbour (k = 3, the sample
itself not counted); precision is the share of generated samples inside the reference's manifold, recall the
share of reference samples inside the generated one. Distances are squared Euclidean between pool3 features,
a sample on a ball's surface counts as inside.

ADM casts the features to float16 for the distances (falling back to float32 where that overflows); here
they are float32 throughout, so a sample within float16 rounding of a ball's surface may count differently.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ldm.metrics.base import DistributionMetric
from ldm.metrics.statistics import FeatureSet


def squared_distances(x: Tensor, y: Tensor) -> Tensor:
    """(N, M) squared Euclidean distances of (N, D) and (M, D) features, as |x|^2 - 2 x.y + |y|^2 clamped at 0."""
    return (x.square().sum(1, keepdim=True) - 2 * x @ y.T + y.square().sum(1)).clamp(min=0)


def manifold_radii(features: Tensor, k: int = 3, block: int = 1024) -> Tensor:
    """(N,) squared distance of each of (N, D) features to its k-th nearest other sample, ``block`` rows at a time."""
    if len(features) <= k:
        raise ValueError(f"precision and recall with k = {k} need more than {k} samples per set, got {len(features)}")
    return torch.cat([squared_distances(rows, features).kthvalue(k + 1, dim=1).values  # self at distance 0 first
                      for rows in features.split(block)])


def coverage(features: Tensor, centres: Tensor, radii: Tensor, block: int = 1024) -> float:
    """The share of (N, D) features within some ball of (M, D) ``centres`` and (M,) squared ``radii``."""
    inside = [(squared_distances(rows, centres) <= radii).any(1) for rows in features.split(block)]
    return float(torch.cat(inside).double().mean())


def precision_recall(generated: Tensor, reference: Tensor, k: int = 3, block: int = 1024) -> tuple[float, float]:
    """(precision, recall) of (N, D) generated features against (M, D) reference features, in float32."""
    generated, reference = generated.float(), reference.float()
    precision = coverage(generated, reference, manifold_radii(reference, k, block), block)
    recall = coverage(reference, generated, manifold_radii(generated, k, block), block)
    return precision, recall


class PrecisionRecall(DistributionMetric):
    """``precision`` and ``recall`` of the generated set against the reference, on pool3 features (k = 3)."""

    names = ("precision", "recall")
    label = "Precision and recall"
    keep = True  # every feature: 8 KiB per image and set

    def __init__(
        self,
        k: int = 3,  # the neighbour whose distance is a sample's radius (ADM's 3)
        block: int = 1024,  # rows of a distance block (memory: a few times block x set size floats)
    ) -> None:
        super().__init__()
        self.k, self.block = k, block

    def compute(self, generated: FeatureSet, reference: FeatureSet) -> dict[str, float]:
        return dict(zip(self.names, precision_recall(generated.features, reference.features, self.k, self.block)))
