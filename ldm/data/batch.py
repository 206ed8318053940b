"""The batch schema: every key a batch may carry, with its type and shape, in one place.

Data modules produce these keys, modules and callbacks read them; nothing else spells a key as a
string literal. Extra maps named in ``WebDataModule(extra_keys=...)`` add one key each
(``map_key("seg.png") == "seg"``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

KEY = "key"  # list[str]: the sample's key in its shard; per-sample seeds derive from it
IMAGE = "image"  # (B, 3, H, W) float in [-1, 1]
LATENT_MEAN = "latent_mean"  # (B, C, h, w) posterior mean of a latent cache's sample (unnormalised)
LATENT_STD = "latent_std"  # (B, C, h, w) its posterior std; with LATENT_MEAN a batch brings latents, not images
CACHE_CODEC = "cache_codec"  # list[str]: fingerprint hash of the codec a cached sample was encoded with
CACHE_TEXT = "cache_text"  # list[str]: fingerprint hash of the text encoders whose outputs it carries ("" if none)
CAPTION = "caption"  # list[str]; "" where a sample has none
LABEL = "label"  # (B,) int64 class index
ORIGINAL_SIZE = "original_size"  # (B, 2) int64 (H, W) of the source image before resizing
CROP_COORDS = "crop_coords"  # (B, 2) int64 (top, left) of the crop, in resized pixels
TARGET_SIZE = "target_size"  # (B, 2) int64 (H, W) of the image to generate (prediction requests)
FPS = "fps"  # (B,) float32: a clip's frame rate, its source's fps / the frame stride it was sampled at
NUM_FRAMES = "num_frames"  # (B,) int64: the frame count of a clip's source video
INDEX = "index"  # (B,) int64: a prediction request's line number; its sample seed derives from it
GENERATED = "images"  # in a predict_step's output: the generated images (B, 3, H, W) in [-1, 1]


def map_key(entry: str) -> str:
    """The batch key of an extra map entry: its name before the first dot ("seg.png" -> "seg")."""
    return entry.split(".")[0]


def cached_embedding(index: int) -> str:
    """The batch key of the conditioner's embedder ``index``'s output, as a latent cache stores it."""
    return f"embedding.{index}"


def batch_size(batch: Mapping[str, Any]) -> int:
    """Number of samples in a batch: the length of its first tensor or list."""
    return len(next(v for v in batch.values() if isinstance(v, (Tensor, list, tuple))))


def as_requests(batch: Mapping[str, Any], size: tuple[int, int]) -> dict[str, Any]:
    """The batch's conditions as generation requests for images of ``size`` (H, W): its images, latents and
    size and crop fields left out, so sampling conditions on the requested size, uncropped."""
    drop = {IMAGE, LATENT_MEAN, LATENT_STD, ORIGINAL_SIZE, CROP_COORDS, TARGET_SIZE}
    out = {k: v for k, v in batch.items() if k not in drop}
    out[TARGET_SIZE] = torch.tensor([size] * batch_size(batch))
    return out


def head(batch: Mapping[str, Any], n: int) -> dict[str, Any]:
    """The first ``n`` samples of a batch (its per-sample entries only)."""
    return {k: v[:n] for k, v in batch.items() if isinstance(v, (Tensor, list, tuple))}
