"""The features of an image set, streamed batch by batch on any number of ranks, and their on-disk cache.

One pipeline for every distribution metric in ldm (FID, KID, ...): an evaluation (``ldm.metrics.evaluation``,
run by the SampleMetrics callback and tools/evaluate.py) fills a ``FeatureSet`` per image set (generated,
reference) and feature kind, merges it across ranks, and hands it to the metrics. Reference sets are
cached under a key naming their content.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

Gather = Callable[[Tensor], Tensor]  # (n, ...) on this rank -> (world, n, ...) from every rank
Reduce = Callable[[Tensor], Tensor]  # a tensor -> its sum over ranks


class FeatureSet:
    """Count, sum and sum of outer products of (B, D) features in float64, which is all FID needs, and
    with ``keep`` the features themselves (for KID), each with the order key of its sample.

    The sums add across batches and ranks whatever each rank's count; kept features are ordered by their
    keys after a merge, so KID's random subsets do not depend on how samples were dealt to ranks.
    """

    def __init__(self, keep: bool = False) -> None:
        self.keep = keep
        self.count, self.sum, self.outer = 0, None, None  # (), (D,), (D, D)
        self._features: list[Tensor] = []  # [(B, D)] float32
        self._order: list[Tensor] = []  # [(B,)] int64

    def add(self, features: Tensor, order: Tensor | None = None) -> None:
        """Add a batch of (B, D) features; ``order`` (B,) sorts kept features (default: arrival)."""
        f = features.detach().double()  # (B, D)
        self.count += f.shape[0]
        self.sum = f.sum(0) if self.sum is None else self.sum + f.sum(0)
        self.outer = f.T @ f if self.outer is None else self.outer + f.T @ f
        if self.keep:
            start = self.count - f.shape[0]
            self._features.append(features.detach().float())
            self._order.append(torch.arange(start, self.count) if order is None else order.detach().long().cpu())

    def merged(self, reduce: Reduce, gather: Gather | None = None) -> FeatureSet:
        """This set over every rank: sums reduced, kept features gathered (with ``gather``) and sorted."""
        if self.sum is None:
            raise ValueError("no features to merge: every rank must add at least one batch")
        out = FeatureSet(self.keep)
        out.count = int(reduce(torch.tensor(float(self.count), dtype=torch.float64, device=self.sum.device)))
        out.sum, out.outer = reduce(self.sum), reduce(self.outer)
        if self.keep:
            features, order = torch.cat(self._features), torch.cat(self._order).to(self.sum.device)
            if gather is not None:
                features, order = _gather_uneven(features, gather), _gather_uneven(order, gather)
            out._features, out._order = [features[order.argsort(stable=True)].cpu()], [order.sort().values.cpu()]
        return out

    @property
    def features(self) -> Tensor:
        """(N, D) kept features in order."""
        if not self.keep:
            raise ValueError("features were not kept (FeatureSet(keep=True))")
        return torch.cat(self._features)

    def mu_sigma(self) -> tuple[Tensor, Tensor]:
        """Mean (D,) and unbiased covariance (D, D), in float64 on the CPU."""
        if self.count < 2:
            raise ValueError(f"FID statistics need at least 2 features, got {self.count}")
        mu = self.sum / self.count
        sigma = (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)  # as np.cov
        return mu.cpu(), sigma.cpu()

    @classmethod
    def from_statistics(cls, mu: Tensor, sigma: Tensor, count: int) -> FeatureSet:
        """A set of ``count`` samples with the mean (D,) and unbiased covariance (D, D) given (a published
        reference's, read as they are): ``mu_sigma`` gives them back."""
        if count < 2:
            raise ValueError(f"statistics need at least 2 samples, got {count}")
        mu, sigma = torch.as_tensor(mu, dtype=torch.float64), torch.as_tensor(sigma, dtype=torch.float64)
        out = cls()
        out.count, out.sum = count, count * mu
        out.outer = (count - 1) * sigma + count * torch.outer(mu, mu)
        return out

    def with_statistics(self, mu: Tensor, sigma: Tensor) -> FeatureSet:
        """This set, its kept features included, with the mean and covariance given in place of its own."""
        out = FeatureSet.from_statistics(mu, sigma, self.count)
        out.keep, out._features, out._order = self.keep, self._features, self._order
        return out

    def save(self, path: Path, key: Mapping[str, object]) -> None:
        """Write the set atomically (a reader never sees a torn file), with the key it was made for."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"count": torch.tensor(self.count), "sum": self.sum.cpu(), "outer": self.outer.cpu()}
        if self.keep:
            tensors |= {"features": self.features.contiguous(), "order": torch.cat(self._order)}
        partial = path.with_suffix(f".partial{os.getpid()}")
        save_file(tensors, partial, metadata={"key": json.dumps(key, sort_keys=True, default=str)})
        os.replace(partial, path)

    @classmethod
    def load(cls, path: Path) -> FeatureSet:
        stored = load_file(path)
        out = cls(keep="features" in stored)
        out.count, out.sum, out.outer = int(stored["count"]), stored["sum"], stored["outer"]
        if out.keep:
            out._features, out._order = [stored["features"]], [stored["order"]]
        return out


def _gather_uneven(x: Tensor, gather: Gather) -> Tensor:
    """Concatenate every rank's (n_r, ...) tensor in rank order, the n_r differing."""
    counts = gather(torch.tensor(len(x), device=x.device)).flatten().tolist()  # (world,)
    padded = x.new_zeros(max(counts), *x.shape[1:])
    padded[: len(x)] = x
    everything = gather(padded)  # (world, max n, ...)
    return torch.cat([everything[r, :n] for r, n in enumerate(counts)])


class ReferenceCache:
    """Reference feature sets on disk, one file per key; the key must name everything the set depends on
    (the files' identities, resolution, sample cap, extractor) so edited data never reuses stale numbers."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(os.path.expanduser(folder))

    def path(self, key: Mapping[str, object]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
        return self.folder / f"refstats-{digest}.safetensors"

    def load(self, key: Mapping[str, object], keep: bool = False) -> FeatureSet | None:
        """The cached set for ``key`` (one that kept its features, if ``keep``), or None."""
        path = self.path(key)
        if not path.is_file():
            return None
        cached = FeatureSet.load(path)
        return cached if cached.keep or not keep else None

    def save(self, key: Mapping[str, object], features: FeatureSet) -> None:
        features.save(self.path(key), key)
