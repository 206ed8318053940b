"""The latent cache's format: what tools/cache_latents.py writes and the data module reads, both through here.

A cache shard holds, per sample, ``latent.safetensors`` (the posterior's ``mean`` and ``std`` at latent
size, (C, h, w), or (C, T, h, w) for a clip, with ``flip.mean`` / ``flip.std`` for the mirrored image when training flips; each extra map at
latent size, ``<name>`` and ``flip.<name>``; the frozen text encoders' outputs ``embedding.<i>``) and
a ``json`` (caption, label, original size, crop, the pixel size it was encoded at as ``width``/``height``, its
bucket as ``target_size`` when bucketed, a clip's ``fps`` and ``num_frames``, and the fingerprint hashes of the codec and text
encoders that made it). ``cache.json`` next to the shards describes the whole cache and marks its
folder as one: ``LatentCache``, the data module's default shard format, recognises it by that file and
reads it with ``LatentDecoder``.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from ldm.data import batch as B
from ldm.data import entries as E
from ldm.data.buckets import Size
from ldm.data.decoder import SkipSample
from ldm.data.formats import ShardFormat
from ldm.data.images import ImageDecoder

CACHE_INFO = "cache.json"  # next to a cache's shards: what made it (codec, text encoders, source, resolution)
TENSORS, META = "latent.safetensors", E.JSON  # a cached sample's entries
MEAN, STD = "mean", "std"  # the posterior's moments among its tensors
FLIP = "flip."  # prefix of the mirrored image's tensors
CLASS_MAP_DTYPE = torch.int16  # class maps are stored as int16 ids
CLIP_FIELDS = {B.FPS: torch.float32, B.NUM_FRAMES: torch.int64}  # a clip's per-sample scalars (conditioning)


def is_cache(urls: Sequence[str]) -> bool:
    """True when the shards are a latent cache (its cache.json stands next to the first one)."""
    return bool(urls) and os.path.isfile(os.path.join(os.path.dirname(urls[0]), CACHE_INFO))


def write_info(folder: Path, info: Mapping[str, Any]) -> Path:
    """Write the cache's description next to its shards (which makes the folder a cache)."""
    path = folder / CACHE_INFO
    path.write_text(json.dumps(info, indent=1) + "\n")
    return path


def view_tensors(mean: Tensor, std: Tensor, maps: Mapping[str, Tensor], flipped: bool = False) -> dict[str, Tensor]:
    """One view of a batch as the cache stores it: the posterior's moments (B, C, h, w) and the maps
    (B, C', H, W) brought to latent size (class maps as int16), named for the mirrored image if ``flipped``."""
    prefix = FLIP if flipped else ""
    tensors = {prefix + MEAN: mean, prefix + STD: std}
    for name, pixels in maps.items():
        small = E.resize_map(pixels, tuple(mean.shape[-2:]))
        tensors[prefix + name] = small if small.is_floating_point() else small.to(CLASS_MAP_DTYPE)
    return tensors


def cached_samples(batch: Mapping[str, Any], tensors: Mapping[str, Tensor], codec_hash: str,
                   text_hash: str) -> Iterator[dict[str, Any]]:
    """The WebDataset samples of a batch's cache entries: each sample's slice of ``tensors`` and its
    annotations, size and crop fields, with the hashes of the codec and text encoders that made them."""
    height, width = batch[B.IMAGE].shape[-2:]
    for i, key in enumerate(batch[B.KEY]):
        meta = {B.CAPTION: batch[B.CAPTION][i], B.LABEL: int(batch[B.LABEL][i]) if B.LABEL in batch else None,
                B.ORIGINAL_SIZE: batch[B.ORIGINAL_SIZE][i].tolist(), B.CROP_COORDS: batch[B.CROP_COORDS][i].tolist(),
                E.WIDTH: width, E.HEIGHT: height, B.CACHE_CODEC: codec_hash, B.CACHE_TEXT: text_hash}
        if B.TARGET_SIZE in batch:  # bucketed: the bucket, which training batches by
            meta[B.TARGET_SIZE] = batch[B.TARGET_SIZE][i].tolist()
        meta |= {name: batch[name][i].item() for name in CLIP_FIELDS if name in batch}
        yield {"__key__": key, TENSORS: save_tensors({k: v[i].cpu().contiguous() for k, v in tensors.items()}),
               META: json.dumps(meta).encode()}


@dataclass(frozen=True)
class LatentDecoder:
    """Decodes one cached sample into a batch entry: posterior moments (float32), annotations, maps at latent
    size and cached text embeddings; with ``hflip`` the mirrored image's tensors half of the time. A cache
    made with buckets (its samples record their bucket) serves only a run with those buckets."""

    hflip: bool = False
    require: tuple[str, ...] = (B.CAPTION,)
    buckets: tuple[Size, ...] | None = None

    def __call__(self, raw: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        if TENSORS not in raw or META not in raw:
            raise SkipSample(f"no {TENSORS if TENSORS not in raw else META} entry")
        try:
            tensors, meta = load_tensors(raw[TENSORS]), json.loads(raw[META])
        except Exception as error:  # a damaged cache entry: counted like any undecodable sample
            raise SkipSample(f"undecodable cached sample: {type(error).__name__}") from None
        out: dict[str, Any] = {B.KEY: raw.get("__key__", ""), B.CAPTION: meta.get(B.CAPTION) or ""}
        if meta.get(B.LABEL) is not None:
            out[B.LABEL] = meta[B.LABEL]
        for key in self.require:
            if out.get(key) in (None, ""):
                raise SkipSample(f"no {key}")
        flip = FLIP if self.hflip and FLIP + MEAN in tensors and rng.random() < 0.5 else ""
        out[B.LATENT_MEAN], out[B.LATENT_STD] = tensors[flip + MEAN].float(), tensors[flip + STD].float()
        for name, value in tensors.items():
            if not name.startswith(FLIP) and name not in (MEAN, STD):
                value = tensors.get(flip + name, value)  # maps have a mirrored copy, embeddings do not
                out[name] = value.float() if value.is_floating_point() else value
        out[B.ORIGINAL_SIZE], out[B.CROP_COORDS] = torch.tensor(meta[B.ORIGINAL_SIZE]), torch.tensor(meta[B.CROP_COORDS])
        out[B.CACHE_CODEC], out[B.CACHE_TEXT] = meta[B.CACHE_CODEC], meta.get(B.CACHE_TEXT) or ""
        out |= {name: torch.tensor(meta[name], dtype=dtype) for name, dtype in CLIP_FIELDS.items() if name in meta}
        target = meta.get(B.TARGET_SIZE)
        if (target is None) != (self.buckets is None) or (target is not None and tuple(target) not in self.buckets):
            stored = "square" if target is None else f"at bucket {target} (H, W)"
            wanted = f"the buckets {list(self.buckets)}" if self.buckets else "no buckets"
            raise ValueError(f"latent cache sample {out[B.KEY]} is {stored}, but this run's data has {wanted}: "
                             f"rebuild the cache with tools/cache_latents.py for this configuration")
        if target is not None:
            out[B.TARGET_SIZE] = torch.tensor(target)
        return out


def check_cache(batch: Mapping[str, Any], expected: str, key: str, what: str) -> None:
    """Refuse a batch from a cache made with another ``what`` (its samples' fingerprint hashes under ``key``)."""
    found = set(batch[key])
    if found != {expected}:
        raise ValueError(
            f"latent cache samples {batch[B.KEY][:3]} were made with another {what} (fingerprint {sorted(found)}) "
            f"than this model's ({expected}): rebuild the cache with tools/cache_latents.py for this configuration"
        )


class LatentCache(ShardFormat):
    """The latent cache's shards: recognised by the cache.json beside them, read with a ``LatentDecoder`` that
    flips and requires annotations as the split's image decoder would."""

    def recognises(self, urls: Sequence[str]) -> bool:
        return is_cache(urls)

    def decoder(self, images: ImageDecoder) -> LatentDecoder:
        return LatentDecoder(hflip=images.hflip, require=images.require, buckets=images.buckets)
