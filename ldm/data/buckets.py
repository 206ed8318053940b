"""Aspect-ratio buckets: the image sizes a bucketed run trains at, which one each image goes to, and how a
worker's samples of each bucket become batches.

The scheme of NovelAI and SDXL (Podell et al. 2023, Sec. 2.3 "multi-aspect training"): sizes of about one area
(resolution²) whose sides are multiples of what the codec and backbone need, up to a largest aspect ratio. An
image goes to the bucket nearest its aspect ratio (in log ratio), is resized to cover it and cropped, so it
keeps close to all its content; a batch holds one bucket.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

Size = tuple[int, int]  # (height, width) in pixels, the batch schema's order (original_size, target_size)


@dataclass(frozen=True)
class AspectBuckets:
    """The bucket set of a data module: its ``resolution`` fixes the area, these fix the shapes."""

    max_ratio: float = 2.0  # long side / short side of the most elongated bucket
    multiple: int = 64  # every side a multiple of this: the codec's downsampling x the backbone's size multiple

    def sizes(self, resolution: int) -> tuple[Size, ...]:
        """(H, W) of every bucket for about ``resolution``² pixels, from the tallest to the widest; each
        width w gets the height nearest resolution² / w, and each bucket's transpose is a bucket too."""
        m = self.multiple
        if self.max_ratio < 1 or m < 1 or resolution < m:
            raise ValueError(f"data.init_args.buckets: max_ratio {self.max_ratio} must be at least 1 and multiple "
                             f"{m} at least 1 and at most the resolution {resolution}")
        found: set[Size] = set()
        for width in range(m, int(resolution * math.sqrt(self.max_ratio)) + 2 * m, m):
            height = max(m, round(resolution * resolution / width / m) * m)
            if max(width, height) <= self.max_ratio * min(width, height):
                found |= {(height, width), (width, height)}
        return tuple(sorted(found, key=lambda s: (s[1] / s[0], s[1])))


def nearest(sizes: tuple[Size, ...], size: Size) -> int:
    """Index of the bucket whose aspect ratio is nearest (in log ratio) to that of an image of ``size`` (H, W)."""
    ratio = math.log(size[1] / size[0])
    return min(range(len(sizes)), key=lambda i: abs(math.log(sizes[i][1] / sizes[i][0]) - ratio))


Batches = list[tuple[int, int]]  # (bucket, batch size), in the order a worker fills them


def bucket_batches(buckets: Counter[int], batch_size: int, count: int) -> Batches:
    """A worker's batches for ``buckets`` ({bucket: samples}), at least ``count`` of them.

    Each bucket makes full batches and one smaller batch of its leftovers: every sample once, no batch
    mixing buckets (a rare bucket is never dropped, as it would be every epoch if leftovers were). To reach
    ``count`` (the same number on every rank, see ``bucket_quota``) the largest batch is halved, again and
    again: only the batch sizes change, never which samples an epoch reads. A worker with fewer samples
    than ``count`` gets empty batches (bucket -1, size 0) to make it up: the stream repeats a sample there,
    as a DistributedSampler pads, to keep the ranks in step.
    """
    batches: Batches = []
    for bucket in sorted(buckets):
        full, rest = divmod(buckets[bucket], batch_size)
        batches += [(bucket, batch_size)] * full + ([(bucket, rest)] if rest else [])
    while len(batches) < count:
        i = max(range(len(batches)), key=lambda j: batches[j][1], default=None)
        if i is None or batches[i][1] < 2:
            return batches + [(-1, 0)] * (count - len(batches))
        bucket, size = batches[i]
        batches[i : i + 1] = [(bucket, size - size // 2), (bucket, size // 2)]
    return batches


def bucket_quota(natural: list[int], workers: int) -> int:
    """The fewest batches Q a rank can yield when its worker w has at least ``natural[w]`` batches: the
    DataLoader takes batch i from worker i % workers, so worker w yields Q // workers + (w < Q % workers)."""
    quota = sum(natural)
    while any(n > quota // workers + (w < quota % workers) for w, n in enumerate(natural)):
        quota += 1
    return quota
