"""What the shard stream calls on every raw sample: a SampleDecoder, and the SkipSample it raises.

Two decoders exist: ``ImageDecoder`` (ldm.data.images: image shards) and ``LatentDecoder``
(ldm.data.latents: a latent cache's shards); ``ldm.data.formats.decoder_for`` says which a split needs.
"""

from __future__ import annotations

import random
from typing import Any, Protocol


class SkipSample(Exception):
    """A sample that cannot be used; the message is the reason that gets counted."""


class SampleDecoder(Protocol):
    """Decodes one raw sample ({"__key__", "__url__", entry name: bytes}) into a batch entry (keys of
    ldm.data.batch), drawing any randomness (crops, flips) from ``rng``; raises SkipSample when it cannot.
    ``buckets`` are the sizes (H, W) its entries come at, each carrying its own as ``target_size`` (None: one
    size): the stream batches by them (ldm.data.buckets)."""

    buckets: tuple[tuple[int, int], ...] | None

    def __call__(self, raw: dict[str, Any], rng: random.Random) -> dict[str, Any]: ...
