"""Decode one raw WebDataset sample into tensors: resize, crop and flip image and maps alike."""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from ldm.data import batch as B

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CLASS_MAP_MODES = ("1", "L", "P", "I", "I;16")  # single-channel integer maps: class ids, masks


class SkipSample(Exception):
    """A sample that cannot be used; the message is the reason that gets counted."""


@dataclass(frozen=True)
class SampleTransform:
    """Image-side transform of the img2dataset layout (SDXL's size and crop micro-conditioning kept)."""

    resolution: int = 256  # output side (square crop)
    crop: Literal["center", "random"] = "center"
    hflip: bool = False  # random horizontal flip, p = 0.5
    extra_keys: tuple[str, ...] = ()  # other image entries, e.g. "seg.png": same resize/crop/flip
    require_caption: bool = True

    def __call__(self, raw: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        image_key = next((k for k in IMAGE_KEYS if k in raw), None)
        if image_key is None:
            raise SkipSample("no image entry")
        image, original = _open(raw[image_key], image_key, "RGB", self.resolution)
        meta = _json(raw)
        caption = raw["txt"].decode("utf-8").strip() if "txt" in raw else meta.get("caption")
        if self.require_caption and not caption:
            raise SkipSample("no caption")
        out: dict[str, Any] = {B.KEY: raw.get("__key__", ""), B.CAPTION: caption or "", B.ORIGINAL_SIZE: torch.tensor(original)}
        if "cls" in raw:
            out[B.LABEL] = int(raw["cls"].decode().strip())
        elif "label" in meta:
            out[B.LABEL] = int(meta["label"])

        crop = self._crop(image.size, rng)
        out[B.CROP_COORDS] = torch.tensor([crop.top, crop.left])
        out[B.IMAGE] = crop.apply(image, Image.BICUBIC).float().div(127.5).sub(1.0)  # (3, R, R)
        for key in self.extra_keys:
            if key not in raw:
                raise SkipSample(f"no {key!r} entry")
            out[B.map_key(key)] = map_tensor(_open(raw[key], key, None)[0], crop)
        return out

    def _crop(self, image_size: tuple[int, int], rng: random.Random) -> Crop:
        """Resize the short side to the resolution, then a center or random square crop, maybe flipped."""
        crop = Crop.center(image_size, self.resolution)
        if self.crop == "random":
            dx, dy = crop.size[0] - self.resolution, crop.size[1] - self.resolution
            crop = replace(crop, top=rng.randint(0, dy), left=rng.randint(0, dx))
        return replace(crop, flip=self.hflip and rng.random() < 0.5)


@dataclass(frozen=True)
class Crop:
    """The geometry shared by an image and its maps: resize to `size` (W, H), a `side` square at (top, left), flip."""

    size: tuple[int, int]
    top: int
    left: int
    side: int
    flip: bool = False

    @classmethod
    def center(cls, image_size: tuple[int, int], side: int) -> Crop:
        """Short side resized to `side`, the center square kept (evaluation and prediction inputs)."""
        scale = side / min(image_size)
        size = (max(side, round(image_size[0] * scale)), max(side, round(image_size[1] * scale)))
        return cls(size, (size[1] - side) // 2, (size[0] - side) // 2, side)

    def apply(self, img: Image.Image, resample: int) -> torch.Tensor:
        """(C, side, side) tensor of the image's dtype (uint8, or int32/uint16 for integer maps)."""
        img = img.resize(self.size, resample, reducing_gap=None if resample == Image.NEAREST else 3.0)
        img = img.crop((self.left, self.top, self.left + self.side, self.top + self.side))
        if self.flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        array = np.asarray(img)
        array = array[:, :, None] if array.ndim == 2 else array
        return torch.from_numpy(array.astype(np.int64) if array.dtype == np.uint16 else array.copy()).permute(2, 0, 1)


def map_tensor(img: Image.Image, crop: Crop) -> torch.Tensor:
    """An extra map under the image's crop: integer maps (class ids, masks; 8 or 16 bit) stay integers,
    resized nearest so classes never blend -> (1, R, R) int64; anything else -> RGB (3, R, R) in [-1, 1]."""
    if img.mode in CLASS_MAP_MODES:
        return crop.apply(img, Image.NEAREST).long()
    return crop.apply(img.convert("RGB"), Image.BICUBIC).float().div(127.5).sub(1.0)


def _open(data: bytes, key: str, mode: str | None, min_side: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Fully decode image bytes -> (image, original (H, W)); bad data raises SkipSample.

    With `min_side`, a JPEG decodes at the smallest DCT scale that keeps its short side >= min_side,
    several times faster for large photos.
    """
    try:
        img = Image.open(io.BytesIO(data))
        original = (img.height, img.width)
        if min_side and img.format == "JPEG":
            scale = min_side / min(img.size)
            img.draft("RGB", (round(img.width * scale), round(img.height * scale)))
        img.load()
        return (img.convert(mode) if mode else img), original
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... on bad data
        raise SkipSample(f"undecodable {key}: {type(err).__name__}") from None


def _json(raw: dict[str, Any]) -> dict[str, Any]:
    if "json" not in raw:
        return {}
    try:
        return json.loads(raw["json"])
    except ValueError:
        raise SkipSample("invalid json") from None
