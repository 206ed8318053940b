"""A raw sample's entry names (the img2dataset layout of WebDataset shards) and the kinds of extra map.

The one place these are spelled: the image and video decoders read them; tools/make_shards.py and the
synthetic dataset write them; tools/evaluate.py makes samples of image files and their sidecar captions with them.
A map kind is declared once, in ``MAP_KINDS``, with the rule it decodes by; ``resize_map`` brings decoded
maps to latent size for the latent cache and the spatial embedder alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch.nn.functional as F
from PIL import Image
from torch import Tensor

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # image entries; a sample's first one present is its image
PIL_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # a PIL image format -> the entry name it is stored as
TXT = "txt"  # the caption, UTF-8 text
CLS = "cls"  # the class index, decimal digits
JSON = "json"  # an object; its CAPTION and LABEL fields stand in for a missing txt / cls
CAPTION, LABEL = "caption", "label"  # the json's fields
WIDTH, HEIGHT = "width", "height"  # the json's fields: the image's size in pixels (img2dataset's names), read to plan buckets undecoded
VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "mov", "avi", "m4v")  # video entries: a container file's bytes as they are
FPS, NUM_FRAMES = "fps", "num_frames"  # the json's fields of a video: its frame rate (a frame sequence's only source) and count


def image_entry(path: str | Path) -> str | None:
    """The entry name of an image file (its suffix, lower case, without the dot), None for other files."""
    name = Path(path).suffix.lower().lstrip(".")
    return name if name in IMAGE_EXTENSIONS else None


def video_entry(path: str | Path) -> str | None:
    """The entry name of a video file (its suffix, lower case, without the dot), None for other files."""
    name = Path(path).suffix.lower().lstrip(".")
    return name if name in VIDEO_EXTENSIONS else None


def frame_entry(index: int, image: str) -> str:
    """The entry name of frame ``index`` of a frame sequence stored as ``image`` entries: 3, "png" -> "003.png".

    Its tar member is ``<key>.003.png``: webdataset cuts the key at the first dot, so a sample's frames are its
    entries of digits and an image extension, taken in numeric order."""
    return f"{index:03d}.{image}"


def frame_index(entry: str) -> int | None:
    """The frame number of a frame sequence's entry ("012.jpg" -> 12), None for any other entry."""
    number, _, extension = entry.partition(".")
    return int(number) if number.isdigit() and extension in IMAGE_EXTENSIONS else None


@dataclass(frozen=True)
class MapRule:
    """How an extra map of one kind decodes: the PIL modes it may have, and the tensor it becomes."""

    accepts: Callable[[str], bool]  # its PIL modes; a map of another mode is skipped
    expected: str  # what it is, in the skip reason of a map of another mode
    classes: bool  # integer ids: resampled nearest and kept integer (int64), so classes never blend
    convert: str | None = None  # PIL mode it is converted to before resizing
    levels: int = 255  # float maps: the value range [0, levels] mapped onto [-1, 1]

    @property
    def resample(self) -> Image.Resampling:
        """The filter it is resized with: nearest for class ids, bicubic (as the image) for values."""
        return Image.Resampling.NEAREST if self.classes else Image.Resampling.BICUBIC

    def to_tensor(self, pixels: Tensor) -> Tensor:
        """(C, H, W) integer pixels -> class ids (int64) or float values in [-1, 1]."""
        return pixels.long() if self.classes else pixels.float().div(self.levels / 2).sub(1.0)


MAP_KINDS: dict[str, MapRule] = {
    # class ids or masks, 8 or 16 bit, single channel -> (1, R, R) int64
    "class": MapRule(lambda mode: mode in ("1", "L", "P", "I", "I;16"), "a class map", classes=True),
    # a picture (edges, a low-res image) made RGB -> (3, R, R) in [-1, 1]; never a map of wide (I, F) values
    "image": MapRule(lambda mode: not mode.startswith(("I", "F")), "an image", classes=False, convert="RGB"),
    # 16-bit single-channel values (depth, height) -> (1, R, R) in [-1, 1]
    "depth16": MapRule(lambda mode: mode in ("I;16", "I"), "a 16-bit map", classes=False, levels=65535),
}
MapKind = Literal[tuple(MAP_KINDS)]  # the names above: a config states each extra map's kind, e.g. {seg.png: class}


def resize_map(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, C, H, W) maps -> (B, C, *size): class ids (an integer tensor) nearest, so classes never blend;
    float maps bilinear with antialiasing. How the latent cache and the spatial embedder bring a map to latent size."""
    if maps.is_floating_point():
        return F.interpolate(maps, size=size, mode="bilinear", antialias=True)
    return F.interpolate(maps.float(), size=size, mode="nearest-exact").to(maps.dtype)
