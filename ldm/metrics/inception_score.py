"""Inception Score (Salimans et al. 2016) as ADM's evaluator computes it: the generated set alone, in
consecutive splits of 5,000 samples, the mean of exp(E_x KL(p(y|x) || p(y))) over the splits.

The class probabilities are the softmax of Inception's 1008 logits without the classifier's bias (ADM's
``softmax/logits/MatMul``, torch-fidelity's "logits_unbiased"). torch-fidelity's ISC gives the same figure
unshuffled with ``isc_splits = N / 5000`` (its default shuffles into 10 splits: the CIFAR-10 convention).
The shared pool3-only Inception file has no classifier: with it the metric is left out in one line.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ldm.metrics.base import DistributionMetric
from ldm.metrics.statistics import FeatureSet


def inception_score(logits: Tensor, split_size: int = 5000) -> float:
    """exp(mean_x KL(p(y|x) || mean_x p(y|x))) per consecutive split of ``split_size`` of (N, C) logits, averaged
    over the splits (the last one may be smaller), in float64."""
    if len(logits) < 1:
        raise ValueError("the Inception Score needs at least one sample")
    log_p = logits.double().log_softmax(dim=1)  # (N, C)
    scores = []
    for part in log_p.split(split_size):
        log_marginal = part.exp().mean(0).log()  # (C,) log p(y) of the split
        kl = (part.exp() * (part - log_marginal)).sum(1).mean()  # mean over x of KL(p(y|x) || p(y))
        scores.append(kl.exp())
    return float(torch.stack(scores).mean())


class InceptionScore(DistributionMetric):
    """``inception_score``: the Inception Score of the generated images (ADM's protocol: splits of 5,000)."""

    names = ("inception_score",)
    label = "Inception Score"
    feature = "logits"
    keep = True  # the splits are of samples: 4 KiB per image
    compares = False

    def __init__(self, split_size: int = 5000) -> None:  # samples per split (ADM's 5,000; 50k samples: 10 splits)
        super().__init__()
        self.split_size = split_size

    def compute(self, generated: FeatureSet, reference: FeatureSet | None) -> dict[str, float]:
        return {"inception_score": inception_score(generated.features, self.split_size)}
