"""ImageDecoder: one raw sample of image shards into tensors; image and maps resized, cropped and flipped alike.

Anything a sample cannot be used for raises `SkipSample` with the reason that gets counted: an image
that does not decode, a caption that is not UTF-8 text, a label that is not a class index, a json that
is not an object, a required annotation missing, an extra map of another size or kind than declared.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from ldm.data import batch as B
from ldm.data import entries as E
from ldm.data.buckets import Size, nearest
from ldm.data.decoder import SkipSample
from ldm.data.entries import MAP_KINDS, MapKind

ANNOTATIONS = (B.CAPTION, B.LABEL)  # batch keys a sample may lack; `require` names those it must carry


@dataclass(frozen=True)
class ImageDecoder:
    """Decodes a sample of the img2dataset layout (SDXL's size and crop micro-conditioning kept).

    Square by default: the short side resized to ``resolution``, a square crop. With ``buckets`` each image
    goes to the bucket nearest its aspect ratio (ldm.data.buckets), resized to cover it and cropped; its
    batch entry then carries the bucket as ``target_size``, which the stream batches by.
    """

    resolution: int = 256  # output side (square crop)
    crop: Literal["center", "random"] = "center"
    hflip: bool = False  # random horizontal flip, p = 0.5
    extra_keys: Mapping[str, MapKind] = field(default_factory=dict)  # maps every sample carries, e.g. {"seg.png": "class"}
    require: tuple[str, ...] = (B.CAPTION,)  # ANNOTATIONS a sample must carry (a caption: a non-empty one)
    buckets: tuple[Size, ...] | None = None  # (H, W) of each bucket; None: square crops

    def __call__(self, raw: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        image_key = next((k for k in E.IMAGE_EXTENSIONS if k in raw), None)
        if image_key is None:
            raise SkipSample("no image entry")
        out: dict[str, Any] = {B.KEY: raw.get("__key__", ""), **sample_annotations(raw)}
        for key in self.require:
            if out.get(key) in (None, ""):
                raise SkipSample(f"no {key}")
        largest = self.resolution if self.buckets is None else max(map(max, self.buckets))  # covers any target
        image, original = open_image(raw[image_key], image_key, "RGB", largest)
        target = self.target(original)
        out[B.ORIGINAL_SIZE] = torch.tensor(original)
        crop = self.crop_for(image.size, target, rng)
        out[B.CROP_COORDS] = torch.tensor([crop.top, crop.left])
        out[B.IMAGE] = map_tensor(image, crop, "image")  # (3, H, W)
        if self.buckets is not None:
            out[B.TARGET_SIZE] = torch.tensor(target)
        for key, kind in self.extra_keys.items():
            out[B.map_key(key)] = map_tensor(_open_map(raw, key, kind, original), crop, kind)
        return out

    def target(self, original: Size) -> Size:
        """The (H, W) an image of ``original`` (H, W) size comes out at: its bucket, or the square."""
        return (self.resolution,) * 2 if self.buckets is None else self.buckets[nearest(self.buckets, original)]

    def crop_for(self, image_size: tuple[int, int], target: Size, rng: random.Random) -> Crop:
        """Resize to cover the target, then a center or random crop of it, maybe flipped."""
        crop = Crop.center(image_size, target)
        if self.crop == "random":
            dx, dy = crop.size[0] - crop.width, crop.size[1] - crop.height
            crop = replace(crop, top=rng.randint(0, dy), left=rng.randint(0, dx))
        return replace(crop, flip=self.hflip and rng.random() < 0.5)


@dataclass(frozen=True)
class Crop:
    """The geometry shared by an image and its maps: resize to `size` (W, H), a `height` x `width` crop at
    (top, left), flip."""

    size: tuple[int, int]
    top: int
    left: int
    height: int
    width: int
    flip: bool = False

    @classmethod
    def center(cls, image_size: tuple[int, int], target: Size) -> Crop:
        """An image of PIL ``image_size`` (W, H) resized to just cover ``target`` (H, W), its center kept
        (evaluation and prediction inputs): the short side, for a square target."""
        height, width = target
        scale = max(width / image_size[0], height / image_size[1])
        size = (max(width, round(image_size[0] * scale)), max(height, round(image_size[1] * scale)))
        return cls(size, (size[1] - height) // 2, (size[0] - width) // 2, height, width)

    def apply(self, img: Image.Image, resample: int) -> torch.Tensor:
        """(C, height, width) tensor of the image's dtype (uint8, or int32/uint16 for integer maps)."""
        img = img.resize(self.size, resample, reducing_gap=None if resample == Image.NEAREST else 3.0)
        img = img.crop((self.left, self.top, self.left + self.width, self.top + self.height))
        if self.flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        array = np.asarray(img)
        array = array[:, :, None] if array.ndim == 2 else array
        return torch.from_numpy(array.astype(np.int64) if array.dtype == np.uint16 else array.copy()).permute(2, 0, 1)


def map_tensor(img: Image.Image, crop: Crop, kind: MapKind) -> torch.Tensor:
    """A map under the image's crop, as its kind's rule (ldm.data.entries.MAP_KINDS) decodes it: class ids
    (1, H, W) int64 resized nearest, or float values in [-1, 1] (an image map RGB (3, H, W))."""
    rule = MAP_KINDS[kind]
    if rule.convert is not None and img.mode != rule.convert:
        img = img.convert(rule.convert)
    return rule.to_tensor(crop.apply(img, rule.resample))


def _open_map(raw: dict[str, Any], key: str, kind: MapKind, image_size: tuple[int, int]) -> Image.Image:
    """Decode extra map `key`, which must match its image's (H, W) and be of its declared kind."""
    if key not in raw:
        raise SkipSample(f"no {key!r} entry")
    img, size = open_image(raw[key], key, None)
    if size != image_size:
        raise SkipSample(f"{key} {size[1]}x{size[0]}, image {image_size[1]}x{image_size[0]}")
    rule = MAP_KINDS[kind]
    if not rule.accepts(img.mode):
        raise SkipSample(f"{key} is {img.mode}, expected {rule.expected}")
    return img


def open_image(data: bytes, key: str, mode: str | None, min_side: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
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


def sample_annotations(raw: dict[str, Any]) -> dict[str, Any]:
    """Caption ("" where none) and label (where there is one), from `txt` / `cls` or else the json's fields."""
    meta = read_json(raw)
    if E.TXT in raw:
        try:
            caption = raw[E.TXT].decode("utf-8")
        except UnicodeDecodeError:
            raise SkipSample("caption not UTF-8") from None
    else:
        caption = "" if meta.get(E.CAPTION) is None else meta[E.CAPTION]  # null: none
        if not isinstance(caption, str):
            raise SkipSample(f"json caption is a {type(caption).__name__}, not a string")
    out: dict[str, Any] = {B.CAPTION: caption.strip()}
    if E.CLS in raw:
        out[B.LABEL] = _class_index(raw[E.CLS], "cls")
    elif meta.get(E.LABEL) is not None:  # null: none
        out[B.LABEL] = _class_index(meta[E.LABEL], "json label")
    return out


def _class_index(value: Any, source: str) -> int:
    """A label as a class index (an integer >= 0; `cls` bytes: its decimal digits); anything else skips."""
    if isinstance(value, bytes):
        value = int(value) if value.strip().isdigit() else None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SkipSample(f"{source} not a class index")
    return value


def read_json(raw: dict[str, Any]) -> dict[str, Any]:
    if E.JSON not in raw:
        return {}
    try:
        meta = json.loads(raw[E.JSON])
    except ValueError:  # UnicodeDecodeError included
        raise SkipSample("invalid json") from None
    if not isinstance(meta, dict):
        raise SkipSample(f"json is a {type(meta).__name__}, not an object")
    return meta
