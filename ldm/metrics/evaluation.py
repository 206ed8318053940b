"""One evaluation of a list of metrics: what the SampleMetrics callback and tools/evaluate.py both run.

``load_metrics`` builds what the metrics need (the shared feature extractor, each metric's own networks)
and leaves out, with one log line each, those whose weights cannot be had. An ``Evaluation`` then takes
batches of generated images (with their real originals and captions) and real reference images, extracts
each feature kind once per batch for every distribution metric that reads it, sums the per-sample metrics,
and at the end merges everything over the ranks and reports each metric under its names.

Clips (B, 3, T, H, W) go through the same metrics: those reading clips (FVD) see each clip whole, the others
every frame, as Video LDM reports per-frame FID: image features (FID, KID, ...) of all B * T frames, per-sample
metrics of each frame with its clip's caption (CLIP score: CLIPSIM, the mean over frames) or real frame (PSNR,
SSIM, LPIPS). The number of samples counts clips.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ldm.metrics.base import (
    DistributionMetric,
    PairedMetric,
    PerSampleMetric,
    SampleMetric,
)
from ldm.metrics.features import (
    FeatureExtractors,
    FeaturesUnavailable,
    InceptionFeatures,
    frames_of,
    reads_clips,
)
from ldm.metrics.fvd import I3DFeatures
from ldm.metrics.statistics import FeatureSet, Gather, Reduce, ReferenceCache
from ldm.weights.io import WeightsUnavailable

log = logging.getLogger(__name__)


def feature_kinds(metrics: Sequence[SampleMetric], compared: bool = False) -> dict[str, bool]:
    """The feature kinds the distribution metrics read (with ``compared``, those they read of the reference too),
    each with whether its features are kept (any reader's ``keep``)."""
    kinds: dict[str, bool] = {}
    for metric in metrics:
        if isinstance(metric, DistributionMetric) and (metric.compares or not compared):
            kinds[metric.feature] = kinds.get(metric.feature, False) or metric.keep
    return kinds


def _of_images(metrics: Sequence[SampleMetric]) -> list[SampleMetric]:
    """The metrics but those reading clips whole (FVD)."""
    return [m for m in metrics if not reads_clips(m)]


def _of_clips(metrics: Sequence[SampleMetric]) -> list[SampleMetric]:
    """The metrics reading clips whole (FVD)."""
    return [m for m in metrics if reads_clips(m)]


def inception_for(metrics: Sequence[SampleMetric], weights: str | None = None) -> InceptionFeatures | None:
    """The Inception-v3 extracting every image feature kind the metrics read (all but the clips' of FVD), or None
    when they read none."""
    kinds = feature_kinds(_of_images(metrics))
    return InceptionFeatures(weights, sorted(kinds)) if kinds else None


def load_metrics(
    metrics: Sequence[SampleMetric], extractor: nn.Module | None = None, inception_weights: str | None = None,
    i3d_weights: str | None = None,
) -> tuple[list[SampleMetric], nn.Module | None]:
    """The metrics that can run, loaded, and the feature extractor they share: for the features of images (and of
    every frame of a clip) ``extractor``, else Inception; for those of whole clips (FVD) I3D (``i3d_weights``);
    both in one ``FeatureExtractors`` where the metrics read both.

    Where weights cannot be had (``WeightsUnavailable``: not on the machine, no download), the metrics
    needing them are left out with one log line saying what to set, and the rest run; where the Inception
    file lacks some feature kinds (``FeaturesUnavailable``: no classifier for the Inception Score), only the
    metrics reading those are.
    """
    if extractor is None and feature_kinds(_of_images(metrics)):
        try:
            extractor = inception_for(metrics, inception_weights)
        except FeaturesUnavailable as err:
            metrics = _leave_out(metrics, err.kinds, err)
            extractor = inception_for(metrics, inception_weights)
        except WeightsUnavailable as err:
            metrics = _leave_out(metrics, feature_kinds(_of_images(metrics)), err)
    parts = [extractor] if extractor is not None and feature_kinds(_of_images(metrics)) else []
    clip_kinds = feature_kinds(_of_clips(metrics))
    if clip_kinds:
        try:
            parts.append(I3DFeatures(i3d_weights))
        except WeightsUnavailable as err:
            metrics = _leave_out(metrics, clip_kinds, err)
    ready = []
    for metric in metrics:
        try:
            metric.load()
        except WeightsUnavailable as err:
            log.warning("%s disabled: %s", metric.label, err)
        else:
            ready.append(metric)
    if not feature_kinds(ready):
        return ready, None
    return ready, parts[0] if len(parts) == 1 else FeatureExtractors(*parts)


def _leave_out(metrics: Sequence[SampleMetric], kinds: Iterable[str], err: Exception) -> list[SampleMetric]:
    """The metrics but the distribution metrics reading ``kinds``, which are named in one log line with ``err``."""
    kinds = set(kinds)
    readers = [m for m in metrics if isinstance(m, DistributionMetric) and m.feature in kinds]
    log.warning("%s disabled: %s", ", ".join(m.label for m in readers), err)
    return [m for m in metrics if m not in readers]


def _one_rank(t: Tensor) -> Tensor:
    """A reduction over a world of one."""
    return t


def frame_order(order: Tensor, frames: int) -> Tensor:
    """Order keys (B * T,) of the frames of clips with keys ``order`` (B,): o * T + t for frame t of the clip keyed o,
    distinct, and sorting alike however the clips were dealt to batches and ranks."""
    return (order[:, None] * frames + torch.arange(frames, device=order.device)).flatten()


class Evaluation:
    """The running state of one evaluation of ``metrics`` (loaded) on one rank.

    Per feature kind, a ``FeatureSet`` of the generated images and one of the reference (of the kinds a
    metric compares), unless ``reference`` is set (e.g. from ``cached_reference``); per per-sample metric, the
    sum and count of its values. ``compute`` merges them over the ranks with ``reduce`` (sum) and ``gather``.
    Published statistics of the reference (``use_statistics``) replace those computed of its images. Either set
    may be images (B, 3, H, W) or clips (B, 3, T, H, W) (see the module's docstring), the metrics reading clips
    (FVD) refusing images.
    """

    def __init__(self, metrics: Sequence[SampleMetric], extractor: nn.Module | None = None) -> None:
        names = [name for metric in metrics for name in metric.names]
        if len(set(names)) < len(names):
            raise ValueError(f"metrics report a name twice: {names}")
        self.distribution = [m for m in metrics if isinstance(m, DistributionMetric)]
        self.per_sample = [m for m in metrics if isinstance(m, PerSampleMetric)]
        self.kinds = feature_kinds(metrics)  # feature kind -> kept
        if self.kinds and extractor is None:
            raise ValueError(f"{', '.join(m.label for m in self.distribution)} need a feature extractor")
        if extractor is not None and not isinstance(extractor, FeatureExtractors):
            extractor = FeatureExtractors(extractor)  # an extractor of images gets a clip's frames, I3D whole clips
        self.extractor = extractor
        self.clip_kinds = set(feature_kinds(_of_clips(self.distribution)))  # one row per clip
        self.generated = {kind: FeatureSet(keep) for kind, keep in self.kinds.items()}
        self.compared = feature_kinds(metrics, compared=True)  # the kinds read of the reference -> kept
        self.real = {kind: FeatureSet(keep) for kind, keep in self.compared.items()}
        self.reference: Mapping[str, FeatureSet] | None = None  # merged (or cached) reference sets, by kind
        self.statistics: dict[str, tuple[Tensor, Tensor]] = {}  # published (mu, sigma) of the reference, by kind
        self.samples = 0  # generated images (or clips), over every rank once computed
        self._totals = torch.zeros(1 + 2 * len(self.per_sample), dtype=torch.float64)  # [samples, (sum, count) each]

    @property
    def paired(self) -> bool:
        """Whether a metric compares generated images with their real originals."""
        return any(isinstance(m, PairedMetric) for m in self.per_sample)

    @property
    def needs_reference(self) -> bool:
        """Whether real reference images must still be added (the distribution metrics have no reference yet)."""
        return bool(self.compared) and self.reference is None

    def use_statistics(self, statistics: Mapping[str, tuple[Tensor, Tensor]], count: int) -> None:
        """Take the reference's mean and covariance of some kinds as given (an ADM reference batch's, read as they
        are, so figures compare with published ones) over those of its ``count`` images. Where they are all the
        reference metrics read, its images are not needed at all."""
        self.statistics = {kind: stats for kind, stats in statistics.items() if kind in self.compared}
        if self.reference is None and all(k in self.statistics and not keep for k, keep in self.compared.items()):
            self.reference = {kind: FeatureSet.from_statistics(*self.statistics[kind], count) for kind in self.compared}

    def _key(self, key: Mapping[str, object], kind: str) -> dict[str, object]:
        return {**key, "feature": kind}

    def cached_reference(self, cache: ReferenceCache, key: Mapping[str, object]) -> dict[str, FeatureSet] | None:
        """The reference sets cached under ``key`` (naming the reference's content and the extractor), if all are."""
        sets = {kind: cache.load(self._key(key, kind), keep) for kind, keep in self.compared.items()}
        return sets if all(s is not None for s in sets.values()) else None

    def save_reference(self, cache: ReferenceCache, key: Mapping[str, object]) -> None:
        """Cache the computed reference sets under ``key``."""
        for kind, features in (self.reference or {}).items():
            cache.save(self._key(key, kind), features)

    def _add(self, sets: Mapping[str, FeatureSet], x: Tensor, order: Tensor | None) -> None:
        """The features of each kind of ``sets`` of (B, 3, H, W) images or (B, 3, T, H, W) clips, added to its set:
        a row per clip for the clip kinds, per image or frame for the others (ordered by ``frame_order``)."""
        if x.ndim != 5 and self.clip_kinds & set(sets):
            readers = ", ".join(m.label for m in self.distribution if m.feature in self.clip_kinds)
            raise ValueError(f"{readers} reads clips (B, 3, T, H, W), not images of shape {tuple(x.shape)}")
        features = self.extractor(x)
        frames = x.shape[2] if x.ndim == 5 else 1
        for kind, feature_set in sets.items():
            rows = 1 if kind in self.clip_kinds else frames  # features per sample of x
            if len(features[kind]) != rows * len(x):
                raise ValueError(f"feature kind {kind!r}: {len(features[kind])} rows for {len(x)} samples of "
                                 f"{frames} frames, expected {rows} each")
            feature_set.add(features[kind], order if order is None or rows == 1 else frame_order(order, rows))

    @torch.no_grad()
    def add_reference(self, images: Tensor, order: Tensor | None = None) -> None:
        """Real (B, 3, H, W) images or (B, 3, T, H, W) clips in [-1, 1] of the reference set; ``order`` (B,) sorts
        kept features."""
        self._add(self.real, images, order)

    @torch.no_grad()
    def add_generated(self, images: Tensor, real: Tensor | None = None, captions: Sequence[str] | None = None,
                      order: Tensor | None = None) -> None:
        """Generated (B, 3, H, W) images or (B, 3, T, H, W) clips in [-1, 1], with the real ones they were made
        from (for paired metrics) and their captions (for text metrics; "" for none); ``order`` (B,) sorts kept
        features."""
        if self.kinds:
            self._add(self.generated, images, order)
        totals = [float(len(images))]  # samples: images or clips
        if images.ndim == 5:  # per-sample metrics score every frame, with its clip's caption or its real frame
            frames = images.shape[2]
            images, real = frames_of(images), None if real is None else frames_of(real)
            captions = None if captions is None else [text for text in captions for _ in range(frames)]
        for metric in self.per_sample:
            values = metric.score(images, real, captions)  # (N,)
            totals += [float(values.double().sum()), float(len(values))]
        self._totals += torch.tensor(totals, dtype=torch.float64)

    def compute(self, reduce: Reduce = _one_rank, gather: Gather | None = None) -> dict[str, float]:
        """Every metric's values by name, over every rank; a per-sample metric that scored nothing is left out."""
        values: dict[str, float] = {}
        if self.kinds:
            generated = {kind: s.merged(reduce, gather) for kind, s in self.generated.items()}
            if self.reference is None:
                self.reference = {kind: s.merged(reduce, gather) for kind, s in self.real.items()}
            reference = {kind: s.with_statistics(*self.statistics[kind]) if kind in self.statistics else s
                         for kind, s in self.reference.items()}
            for metric in self.distribution:
                values |= metric.compute(generated[metric.feature], reference[metric.feature] if metric.compares else None)
        images, *sums = reduce(self._totals).tolist()
        self.samples = int(images)
        for metric, total, count in zip(self.per_sample, sums[::2], sums[1::2]):
            if count:
                values[metric.names[0]] = metric.finish(total / count)
        return values

