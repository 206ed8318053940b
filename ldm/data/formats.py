"""Which decoder a split's shards need: image shards (the img2dataset layout) unless a shard format recognises them.

Formats are injected parts: ``WebDataModule(formats=[...])`` lists the kinds of shards a run reads besides
images (by default a latent cache, which tools/cache_latents.py marks with the cache.json beside its shards).
Each recognises its own shards, so a split's files decide its decoder: training from a cache is just
`--data.init_args.train 'cache/*.tar'` while validation reads the image shards, and a config cannot disagree
with the files. A new format is one module with a ``ShardFormat`` and its decoder, named in the data part's list.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from ldm.data.decoder import SampleDecoder
from ldm.data.images import ImageDecoder


class ShardFormat(ABC):
    """A kind of shards besides image shards: recognised by its files, read by its own decoder."""

    @abstractmethod
    def recognises(self, urls: Sequence[str]) -> bool:
        """Whether a split's shards (their expanded URLs) are of this format."""

    @abstractmethod
    def decoder(self, images: ImageDecoder) -> SampleDecoder:
        """The decoder of these shards, given the split's image settings (crop, flips, required annotations)."""


def decoder_for(urls: Sequence[str], images: ImageDecoder, formats: Sequence[ShardFormat]) -> SampleDecoder:
    """The decoder of the first format that recognises ``urls``; else ``images`` (image shards)."""
    return next((f.decoder(images) for f in formats if f.recognises(urls)), images)
