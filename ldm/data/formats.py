"""Which decoder a split's shards need: the one place that tells the data formats apart.

Image shards (the img2dataset layout) are the default; a latent cache says what it is with the
cache.json that tools/cache_latents.py writes next to its shards. The shards decide, not an option:
training from a cache is just `--data.init_args.train 'cache/*.tar'`, and a config cannot disagree with them.
"""

from __future__ import annotations

from collections.abc import Sequence

from ldm.data.decoder import SampleDecoder
from ldm.data.images import ImageDecoder
from ldm.data.latents import LatentDecoder, is_cache


def decoder_for(urls: Sequence[str], images: ImageDecoder) -> SampleDecoder:
    """The decoder of these shards: a latent cache's ``LatentDecoder``, flipping and requiring as ``images``
    would, where they are a cache; else ``images`` itself."""
    if is_cache(urls):
        return LatentDecoder(hflip=images.hflip, require=images.require)
    return images
