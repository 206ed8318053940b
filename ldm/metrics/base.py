"""The SampleMetric protocol: a metric of generated images says what it reads and how it reduces.

Three kinds, by what a metric reduces over:

- ``DistributionMetric``: the generated set against a reference set, through features of one kind
  (``feature``: Inception's "pool3", "spatial", "logits"). The evaluation extracts each kind once per batch and
  shares it among the metrics that read it (FID, KID, precision and recall all read pool3), and caches the
  reference's. One that does not ``compare`` (the Inception Score) reads the generated set alone.
- ``PairedMetric``: each generated image against the real image it was made from (PSNR, SSIM, LPIPS of
  an autoencoder's reconstructions).
- ``TextMetric``: each generated image against its caption (CLIP score).

Paired and text metrics report a function (``finish``) of the mean of a per-sample value, so they add up
across batches and ranks. A metric's ``names`` are what it reports: logged as ``<split>/<name>`` by the
SampleMetrics callback, written by EvaluationReport and printed by tools/evaluate.py. Pretrained parts are
built in ``load`` (not in ``__init__``), so a config that names a metric parses on a machine without its
weights, and the metric is left out with one log line instead (``ldm.metrics.evaluation.load_metrics``).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from abc import ABCMeta, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from torch import Tensor

from ldm.metrics.statistics import FeatureSet
from ldm.nn.frozen import StaysInEval


class SampleMetric(StaysInEval, metaclass=ABCMeta):
    """Base of every metric; a module (its networks follow the device) that stays in eval mode."""

    names: ClassVar[tuple[str, ...]]  # what it reports, e.g. ("kid", "kid_std")
    label: ClassVar[str]  # how messages call it, e.g. "CLIP score disabled: ..."

    def load(self) -> None:
        """Build the pretrained parts; raises ``WeightsUnavailable`` when their weights cannot be had."""


class DistributionMetric(SampleMetric):
    """A distance between the generated and the reference set's features of kind ``feature``."""

    feature: ClassVar[str] = "pool3"  # the feature kind it reads (ldm.metrics.features.INCEPTION_LAYERS, or "i3d")
    reads_clips: ClassVar[bool] = False  # reads (B, 3, T, H, W) clips whole (FVD); else images, of a clip every frame
    keep: ClassVar[bool] = False  # needs the features themselves, not only their count, mean and covariance
    compares: ClassVar[bool] = True  # reads the reference set; False: a function of the generated set alone (IS)

    @abstractmethod
    def compute(self, generated: FeatureSet, reference: FeatureSet | None) -> dict[str, float]:
        """Its ``names`` with their values, from both sets merged over every rank (``reference`` None unless
        it ``compares``)."""


class PerSampleMetric(SampleMetric):
    """A value per generated sample (``score``), reported under its one name as ``finish`` of the mean."""

    @abstractmethod
    def score(self, images: Tensor, real: Tensor | None, captions: Sequence[str] | None) -> Tensor:
        """(N,) values of the samples of a (B, 3, H, W) batch that it scores, given their real originals
        (B, 3, H, W) and captions where the evaluation has them."""

    def finish(self, mean: float) -> float:
        """The reported value from the mean of the per-sample values (default: the mean itself)."""
        return mean


class PairedMetric(PerSampleMetric):
    """Compares each generated image with the real image it was made from."""

    @abstractmethod
    def forward(self, generated: Tensor, real: Tensor) -> Tensor:
        """(B,) values of (B, 3, H, W) generated and real images in [-1, 1]."""

    def score(self, images: Tensor, real: Tensor | None, captions: Sequence[str] | None) -> Tensor:
        if real is None:
            raise ValueError(f"{self.label} compares each generated image with its original: none given")
        return self(images, real)


class TextMetric(PerSampleMetric):
    """Compares each generated image with its caption; samples without one ("") are not scored."""

    @abstractmethod
    def forward(self, images: Tensor, captions: list[str]) -> Tensor:
        """(B,) values of (B, 3, H, W) images in [-1, 1] and their B captions."""

    def score(self, images: Tensor, real: Tensor | None, captions: Sequence[str] | None) -> Tensor:
        scored = [i for i, text in enumerate(captions or ()) if text]
        return self(images[scored], [captions[i] for i in scored]) if scored else images.new_zeros(0)


def metric_classes() -> dict[str, type[SampleMetric]]:
    """Every concrete metric class by its first name: ldm's own (each module of ``ldm.metrics``) and any other
    imported one, so a metric is one module with nothing to register. A subclass of a metric keeps its
    parent's name and leaves the parent in place."""
    package = importlib.import_module("ldm.metrics")
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")
    found: dict[str, type[SampleMetric]] = {}
    pending: list[type[SampleMetric]] = [SampleMetric]
    while pending:  # breadth first: parents before their subclasses
        cls = pending.pop(0)
        pending.extend(cls.__subclasses__())
        if inspect.isabstract(cls) or not hasattr(cls, "names"):
            continue
        first = found.setdefault(cls.names[0], cls)
        if not issubclass(cls, first):
            raise ValueError(f"two metrics are named {cls.names[0]!r}: {first.__qualname__} and {cls.__qualname__}")
    return found
