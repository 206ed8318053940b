"""Decode one raw WebDataset sample into tensors: resize, crop and flip image and maps alike."""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


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
        out: dict[str, Any] = {"key": raw.get("__key__", ""), "caption": caption or "", "original_size": torch.tensor(original)}
        if "cls" in raw:
            out["label"] = int(raw["cls"].decode().strip())
        elif "label" in meta:
            out["label"] = int(meta["label"])

        scale = self.resolution / min(image.size)
        size = (max(self.resolution, round(image.width * scale)), max(self.resolution, round(image.height * scale)))
        top, left = self._crop_origin(size, rng)
        flip = self.hflip and rng.random() < 0.5
        out["crop_coords"] = torch.tensor([top, left])
        out["image"] = self._apply(image, size, top, left, flip, Image.BICUBIC).float().div(127.5).sub(1.0)  # (3, R, R)
        for key in self.extra_keys:
            if key not in raw:
                raise SkipSample(f"no {key!r} entry")
            name = key.split(".")[0]
            extra = _open(raw[key], key, None)[0]
            if extra.mode in ("L", "P", "I", "I;16"):  # class / mask map: integers, nearest resize
                out[name] = self._apply(extra, size, top, left, flip, Image.NEAREST).long()  # (1, R, R)
            else:
                extra = extra.convert("RGB")
                out[name] = self._apply(extra, size, top, left, flip, Image.BICUBIC).float().div(127.5).sub(1.0)
        return out

    def _crop_origin(self, size: tuple[int, int], rng: random.Random) -> tuple[int, int]:
        dx, dy = size[0] - self.resolution, size[1] - self.resolution
        if self.crop == "center":
            return dy // 2, dx // 2
        return rng.randint(0, dy), rng.randint(0, dx)

    def _apply(self, img: Image.Image, size: tuple[int, int], top: int, left: int, flip: bool, resample: int) -> torch.Tensor:
        img = img.resize(size, resample, reducing_gap=None if resample == Image.NEAREST else 3.0)
        img = img.crop((left, top, left + self.resolution, top + self.resolution))
        if flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        array = np.asarray(img)
        array = array[:, :, None] if array.ndim == 2 else array
        return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (C, R, R) uint8


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
