"""The batch schema: every key a batch may carry, with its type and shape, in one place.

Data modules produce these keys, modules and callbacks read them; nothing else spells a key as a
string literal. Extra maps named in ``WebDataModule(extra_keys=...)`` add one key each
(``map_key("seg.png") == "seg"``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict

from torch import Tensor

KEY = "key"  # list[str]: the sample's key in its shard; per-sample seeds derive from it
IMAGE = "image"  # (B, 3, H, W) float in [-1, 1]
LATENT = "latent"  # (B, C, h, w) normalised latents, when a batch brings them instead of images
CAPTION = "caption"  # list[str]; "" where a sample has none
LABEL = "label"  # (B,) int64 class index
ORIGINAL_SIZE = "original_size"  # (B, 2) int64 (H, W) of the source image before resizing
CROP_COORDS = "crop_coords"  # (B, 2) int64 (top, left) of the crop, in resized pixels
TARGET_SIZE = "target_size"  # (B, 2) int64 (H, W) of the image to generate (prediction requests)
INDEX = "index"  # (B,) int64: a prediction request's line number; its sample seed derives from it
GENERATED = "images"  # in a predict_step's output: the generated images (B, 3, H, W) in [-1, 1]


class Batch(TypedDict, total=False):
    """What a training, evaluation or prediction batch holds (every key optional)."""

    key: list[str]
    image: Tensor
    latent: Tensor
    caption: list[str]
    label: Tensor
    original_size: Tensor
    crop_coords: Tensor
    target_size: Tensor
    index: Tensor


def map_key(entry: str) -> str:
    """The batch key of an extra map entry: its name before the first dot ("seg.png" -> "seg")."""
    return entry.split(".")[0]


def batch_size(batch: Mapping[str, Any]) -> int:
    """Number of samples in a batch: the length of its first tensor or list."""
    return len(next(v for v in batch.values() if isinstance(v, (Tensor, list, tuple))))


def head(batch: Mapping[str, Any], n: int) -> dict[str, Any]:
    """The first ``n`` samples of a batch (its per-sample entries only)."""
    return {k: v[:n] for k, v in batch.items() if isinstance(v, (Tensor, list, tuple))}
