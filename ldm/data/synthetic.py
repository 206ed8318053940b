"""A deterministic captioned "shapes" dataset, written as WebDataset shards.

Each sample is one coloured shape (SHAPES x COLOURS x SCALES x POSITIONS) on a dark neutral
background, with a caption naming all four attributes, the shape index as class label and a
semantic map. Attributes follow a seeded permutation of every combination, so each combination
appears exactly once per `len(COMBINATIONS)` consecutive indices. The key is the sample index:
`render_sample(int(key), seed, size, aspect)` rebuilds any sample. Test and val take the first
indices, so they stay the same when only `--train` changes.

Canvases are `size` x `size` (`--aspect square`) or, with `--aspect mixed`, one of the ASPECTS
(W:H from 2:1 to 1:2) of about `size`**2 pixels, each ratio once per 5 consecutive indices in a
seeded order. Positions are cells of the canvas's own 3x3 grid and radii fractions of its short
side, so a shape keeps its cell on any canvas; mixed canvases also keep every shape whole (at
least a pixel inside the frame). Each sample's json gives its image's width and height.

With `--frames T` the samples are clips instead (`render_clip`): one coloured shape (SHAPES x COLOURS x
MOTIONS, each combination once per `len(CLIP_COMBINATIONS)` indices) moving up, down, left or right across
the middle of a square canvas, or staying still, over T frames at CLIP_FPS, captioned "a red circle moving to
the right", "an orange square staying still". A clip is stored as an H.264 mp4 at 4:4:4 (`--format mp4`,
the default: colours survive at 32-64 px within a few levels, ~5 KB an 8-frame clip at 64 px) or as frame
images `000.png`, ... (`--format png` or `jpg`); its json adds motion, fps and num_frames. ldm.data.video
reads either.

    python -m ldm.data.synthetic --out data/shapes --train 2000 --val 200 --test 200 --size 64
    python -m ldm.data.synthetic --out data/shapes-mixed --aspect mixed
    python -m ldm.data.synthetic --out data/moving-shapes --frames 8
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw

from ldm.data import entries as E
from ldm.data.shards import write_shard_index
from ldm.data.video import encode_mp4

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 70),
    "blue": (50, 100, 235),
    "yellow": (240, 220, 50),
    "purple": (150, 70, 210),
    "orange": (250, 140, 30),
    "white": (240, 240, 240),
}
SCALES: dict[str, float] = {"small": 0.095, "large": 0.155}  # shape radius / the canvas's short side
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # row-major 3x3 grid
ASPECTS: dict[str, tuple[int, int]] = {"2:1": (2, 1), "3:2": (3, 2), "1:1": (1, 1), "2:3": (2, 3), "1:2": (1, 2)}  # W:H
ASPECT_MODES: dict[str, tuple[str, ...]] = {"square": ("1:1",), "mixed": tuple(ASPECTS)}  # mode -> its canvases' ratios
Aspect = Literal[tuple(ASPECT_MODES)]  # the names above
COMBINATIONS: tuple[tuple[str, str, str, str], ...] = tuple(itertools.product(SHAPES, COLOURS, SCALES, POSITIONS))
MOTIONS: dict[str, tuple[int, int]] = {"up": (0, -1), "down": (0, 1), "left": (-1, 0), "right": (1, 0), "still": (0, 0)}  # (dx, dy), y down
CLIP_COMBINATIONS: tuple[tuple[str, str, str], ...] = tuple(itertools.product(SHAPES, COLOURS, MOTIONS))
CLIP_FPS = 8  # frames per second a clip is stored at
CLIP_RADIUS = 0.14  # a clip's shape radius / the canvas side
TRAVEL = 0.4  # the distance a moving shape covers over its clip / the canvas side
SPLITS: tuple[str, ...] = ("test", "val", "train")  # order in which splits take consecutive indices
_PHRASES = {"top": "at the top", "bottom": "at the bottom", "left": "on the left", "right": "on the right"}
_MOTION_PHRASES = {"up": "moving up", "down": "moving down", "left": "moving to the left", "right": "moving to the right",
                   "still": "staying still"}
_SUPERSAMPLE = 4  # draw at 4x and box-filter down: antialiased edges
_ENCODERS = {E.PIL_FORMATS[codec]: (codec, options)  # entry name -> PIL codec; 4:4:4 keeps colours crisp
             for codec, options in (("JPEG", {"quality": 95, "subsampling": 0}), ("PNG", {}))}
SEG = "seg.png"  # the semantic map's entry; a config declares it as extra_keys: {seg.png: class}
CLIP_FORMATS = ("mp4", *_ENCODERS)  # a clip as one mp4 entry, or as frame images of one of the image encoders


def _radial(n: int, radii: tuple[float, ...]) -> tuple[tuple[float, float], ...]:
    """Polygon of n vertices clockwise from the top, alternating the given radii (unit scale)."""
    return tuple(
        (rad * math.sin(2 * math.pi * k / n), -rad * math.cos(2 * math.pi * k / n))
        for k, rad in zip(range(n), itertools.cycle(radii))
    )


_ARM = 0.33  # half-width of the cross's arms
_OUTLINES: dict[str, tuple[tuple[float, float], ...]] = {  # unit-radius outlines centred on (0, 0), y down
    "circle": _radial(64, (1.0,)),
    "square": ((-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)),
    "triangle": ((0.0, -0.9), (0.95, 0.8), (-0.95, 0.8)),
    "star": _radial(10, (1.0, 0.45)),
    "cross": (
        (-_ARM, -1), (_ARM, -1), (_ARM, -_ARM), (1, -_ARM), (1, _ARM), (_ARM, _ARM),
        (_ARM, 1), (-_ARM, 1), (-_ARM, _ARM), (-1, _ARM), (-1, -_ARM), (-_ARM, -_ARM),
    ),
    "diamond": ((0.0, -1.0), (0.7, 0.0), (0.0, 1.0), (-0.7, 0.0)),
}


def caption_for(shape: str, colour: str, scale: str, position: str) -> str:
    """E.g. "a large red circle in the top left", "a small blue star on the right"."""
    return f"a {scale} {colour} {shape} {_PHRASES.get(position, f'in the {position}')}"


def attributes(index: int, seed: int = 0) -> tuple[str, str, str, str]:
    """(shape, colour, scale, position) of sample `index`: a seeded permutation of COMBINATIONS per cycle."""
    cycle, offset = divmod(index, len(COMBINATIONS))
    order = np.random.default_rng([seed, 0, cycle]).permutation(len(COMBINATIONS))
    return COMBINATIONS[order[offset]]


def clip_caption(shape: str, colour: str, motion: str) -> str:
    """E.g. "a red circle moving to the right", "an orange square staying still"."""
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape} {_MOTION_PHRASES[motion]}"


def clip_attributes(index: int, seed: int = 0) -> tuple[str, str, str]:
    """(shape, colour, motion) of clip `index`: a seeded permutation of CLIP_COMBINATIONS per cycle."""
    cycle, offset = divmod(index, len(CLIP_COMBINATIONS))
    order = np.random.default_rng([seed, 3, cycle]).permutation(len(CLIP_COMBINATIONS))
    return CLIP_COMBINATIONS[order[offset]]


def aspect_of(index: int, seed: int = 0) -> str:
    """The ASPECTS ratio of sample `index` in the mixed mode: a seeded permutation of ASPECTS per cycle."""
    cycle, offset = divmod(index, len(ASPECTS))
    order = np.random.default_rng([seed, 2, cycle]).permutation(len(ASPECTS))
    return list(ASPECTS)[order[offset]]


def canvas_size(size: int, ratio: str = "1:1") -> tuple[int, int]:
    """(width, height) of a canvas of `ratio` with about `size`**2 pixels, in even sides: 64, "2:1" -> (90, 46)."""
    w, h = ASPECTS[ratio]
    return 2 * round(size * math.sqrt(w / h) / 2), 2 * round(size * math.sqrt(h / w) / 2)


@dataclass(frozen=True)
class ShapeSample:
    """One rendered sample and the attributes it was drawn from."""

    image: Image.Image  # RGB, width x height
    seg: Image.Image  # L, width x height: 0 background, 1 + label inside the shape
    shape: str
    colour: str
    scale: str  # "small" | "large"
    position: str
    aspect: str | None = None  # the ASPECTS ratio drawn in the mixed mode; None for square

    @property
    def label(self) -> int:
        return SHAPES.index(self.shape)

    @property
    def caption(self) -> str:
        return caption_for(self.shape, self.colour, self.scale, self.position)

    def meta(self) -> dict[str, str | int]:
        """The sample's `json` entry."""
        width, height = self.image.size
        return {E.CAPTION: self.caption, "shape": self.shape, "colour": self.colour, "size": self.scale,
                "position": self.position, E.LABEL: self.label, E.WIDTH: width, E.HEIGHT: height,
                **({} if self.aspect is None else {"aspect": self.aspect})}


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Dark neutral grey with a gentle vertical gradient and faint noise: far from every palette colour."""
    level, tilt = rng.uniform(25, 65), rng.uniform(-12, 12)
    ramp = np.linspace(-0.5, 0.5, height)[:, None, None]  # (H, 1, 1)
    return np.clip(level + tilt * ramp + rng.normal(0, 2.0, (height, width, 1)), 0, 255)  # (H, W, 1)


def _ratios(aspect: str) -> tuple[str, ...]:
    """The ratios of an aspect mode's canvases; ValueError for an unknown mode."""
    if aspect not in ASPECT_MODES:
        raise ValueError(f"aspect must be one of {list(ASPECT_MODES)}, got {aspect!r}")
    return ASPECT_MODES[aspect]


def render_sample(index: int, seed: int = 0, size: int = 64, aspect: Aspect = "square") -> ShapeSample:
    """Draw sample `index` of the dataset for `seed` on a canvas of about `size` x `size` pixels (64 keeps
    small shapes crisp): square, or in the mixed mode of the ratio `aspect_of(index, seed)`."""
    _ratios(aspect)
    shape, colour, scale, position = attributes(index, seed)
    ratio = aspect_of(index, seed) if aspect == "mixed" else None
    width, height = canvas_size(size, ratio or "1:1")
    short = min(width, height)
    rng = np.random.default_rng([seed, 1, index])
    row, col = divmod(POSITIONS.index(position), 3)
    cx, cy = (col + 0.5) / 3 + rng.uniform(-0.015, 0.015), (row + 0.5) / 3 + rng.uniform(-0.015, 0.015)
    cx, cy = cx * (width / short), cy * (height / short)  # fractions of the grid -> of the short side
    radius = SCALES[scale] * rng.uniform(0.95, 1.05)  # of the short side
    if ratio is not None:  # whole shapes: every outline lies in the unit box, kept a pixel inside the frame
        inset = radius + 1 / short  # (square keeps its jitter unclamped: the same pixels as ever)
        cx, cy = np.clip(cx, inset, width / short - inset), np.clip(cy, inset, height / short - inset)

    pixels, alpha = _paint(_background(rng, width, height), shape, colour, cx, cy, radius)
    image = Image.fromarray(pixels, "RGB")  # (H, W, 3)
    seg = Image.fromarray(np.where(alpha >= 0.5, 1 + SHAPES.index(shape), 0).astype(np.uint8), "L")
    return ShapeSample(image, seg, shape, colour, scale, position, ratio)


def _paint(background: np.ndarray, shape: str, colour: str, cx: float, cy: float, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """(pixels (H, W, 3) uint8, coverage (H, W) in [0, 1]) of `shape` in `colour` over a (H, W, 1) background, centred
    at (cx, cy) with `radius`, all fractions of the canvas's short side."""
    height, width = background.shape[:2]
    big = min(width, height) * _SUPERSAMPLE
    mask = Image.new("L", (width * _SUPERSAMPLE, height * _SUPERSAMPLE), 0)
    outline = [(big * (cx + radius * x), big * (cy + radius * y)) for x, y in _OUTLINES[shape]]
    ImageDraw.Draw(mask).polygon(outline, fill=255)
    alpha = np.asarray(mask.resize((width, height), Image.Resampling.BOX), np.float64)[..., None] / 255  # (H, W, 1)
    pixels = background * (1 - alpha) + np.asarray(COLOURS[colour], np.float64) * alpha
    return np.round(pixels).astype(np.uint8), alpha[..., 0]


@dataclass(frozen=True)
class ClipSample:
    """One rendered clip and the attributes it was drawn from."""

    frames: np.ndarray  # (T, H, W, 3) uint8
    shape: str
    colour: str
    motion: str  # a MOTIONS name

    @property
    def label(self) -> int:
        return SHAPES.index(self.shape)

    @property
    def caption(self) -> str:
        return clip_caption(self.shape, self.colour, self.motion)

    def meta(self) -> dict[str, str | int]:
        """The clip's `json` entry."""
        count, height, width = self.frames.shape[:3]
        return {E.CAPTION: self.caption, "shape": self.shape, "colour": self.colour, "motion": self.motion,
                E.LABEL: self.label, E.FPS: CLIP_FPS, E.NUM_FRAMES: count, E.WIDTH: width, E.HEIGHT: height}


def render_clip(index: int, seed: int = 0, size: int = 64, frames: int = 8) -> ClipSample:
    """Draw clip `index` for `seed`: `frames` frames of `size` x `size` pixels, the shape crossing TRAVEL of the
    canvas along its motion, its path centred near the canvas's centre (or standing there), on a still background."""
    if frames < 2:
        raise ValueError(f"a moving-shapes clip needs at least 2 frames, got {frames}")
    shape, colour, motion = clip_attributes(index, seed)
    rng = np.random.default_rng([seed, 4, index])
    cx, cy = 0.5 + rng.uniform(-0.1, 0.1, 2)
    radius = CLIP_RADIUS * rng.uniform(0.95, 1.05)
    background = _background(rng, size, size)
    dx, dy = MOTIONS[motion]
    steps = TRAVEL * (np.arange(frames) / (frames - 1) - 0.5)  # (T,) offsets along the motion
    pixels = [_paint(background, shape, colour, cx + dx * step, cy + dy * step, radius)[0] for step in steps]
    return ClipSample(np.stack(pixels), shape, colour, motion)  # (T, H, W, 3)


def _encode(image: Image.Image, image_format: str) -> bytes:
    codec, options = _ENCODERS[image_format]
    buffer = io.BytesIO()
    image.save(buffer, codec, **options)
    return buffer.getvalue()


def sample_entries(sample: ShapeSample, image_format: Literal["jpg", "png"] = "jpg") -> dict[str, bytes]:
    """The WebDataset entries of one sample: image, txt, cls, json and seg.png."""
    return {
        image_format: _encode(sample.image, image_format),
        E.TXT: sample.caption.encode(),
        E.CLS: str(sample.label).encode(),
        E.JSON: json.dumps(sample.meta()).encode(),
        SEG: _encode(sample.seg, E.PIL_FORMATS["PNG"]),
    }


def clip_entries(sample: ClipSample, clip_format: Literal["mp4", "jpg", "png"] = "mp4") -> dict[str, bytes]:
    """The WebDataset entries of one clip: an mp4, or frame images 000.<format>, ...; txt, cls and json."""
    if clip_format == "mp4":
        media = {"mp4": encode_mp4(sample.frames, CLIP_FPS)}
    else:
        media = {E.frame_entry(t, clip_format): _encode(Image.fromarray(frame), clip_format) for t, frame in enumerate(sample.frames)}
    return {**media, E.TXT: sample.caption.encode(), E.CLS: str(sample.label).encode(), E.JSON: json.dumps(sample.meta()).encode()}


def _write_split(directory: Path, indices: range, samples_per_shard: int, entries: Callable[[int], dict[str, bytes]]) -> list[Path]:
    """Shards of the samples ``indices``, each sample's entries made by ``entries(index)``."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("shard-*.tar"):  # a smaller rewrite must not leave old shards behind
        stale.unlink()
    shards: list[Path] = []
    if not indices:
        return shards
    with wds.ShardWriter(str(directory / "shard-%06d.tar"), maxcount=samples_per_shard, verbose=0,
                         post=lambda name: shards.append(Path(name)), encoder=False, mtime=0) as sink:
        for index in indices:  # fixed mtime, user and mode: same arguments, same bytes
            sink.write({"__key__": f"{index:08d}", **entries(index)})
    return shards


def write_shapes(
    out: str | Path,
    train: int,
    val: int,
    test: int,
    size: int = 64,
    seed: int = 0,
    samples_per_shard: int = 500,
    image_format: Literal["jpg", "png", "mp4"] | None = None,  # None: jpg images, or mp4 clips
    aspect: Aspect = "square",
    frames: int | None = None,  # clips of this many frames (moving shapes); None: images
) -> dict[str, list[Path]]:
    """Write `<out>/{train,val,test}/shard-%06d.tar` and `<out>/meta.json`; return the shards per split."""
    formats = sorted(_ENCODERS) if frames is None else list(CLIP_FORMATS)
    image_format = image_format or ("jpg" if frames is None else "mp4")
    if image_format not in formats:
        raise ValueError(f"image_format must be one of {formats} for {'images' if frames is None else 'clips'}, "
                         f"got {image_format!r}")
    if frames is None:
        canvases = {ratio: list(canvas_size(size, ratio)) for ratio in _ratios(aspect)}  # ratio -> [width, height]

        def entries(index: int) -> dict[str, bytes]:
            return sample_entries(render_sample(index, seed, size, aspect), image_format)

        kind = {"sizes": list(SCALES), "positions": list(POSITIONS),
                "label": "index into shapes; seg.png holds 0 for background and 1 + label inside the shape",
                "aspect": aspect, "canvases": canvases}
    else:
        if aspect != "square":
            raise ValueError(f"moving-shapes clips are square: aspect {aspect!r} needs frames None")
        render_clip(0, seed, size, frames)  # refuses too few frames before any file is written

        def entries(index: int) -> dict[str, bytes]:
            return clip_entries(render_clip(index, seed, size, frames), image_format)

        kind = {"motions": list(MOTIONS), "label": "index into shapes", "frames": frames, "fps": CLIP_FPS}
    root = Path(out)
    counts = {"train": train, "val": val, "test": test}
    shards: dict[str, list[Path]] = {}
    start = 0
    for split in SPLITS:
        indices = range(start, start + counts[split])
        shards[split] = _write_split(root / split, indices, samples_per_shard, entries)
        if shards[split]:
            write_shard_index(shards[split])  # sample counts: readers plan epochs without scanning the tars
        start = indices.stop
    meta = {"shapes": list(SHAPES), "colours": {name: list(rgb) for name, rgb in COLOURS.items()}, **kind,
            "counts": counts, "image_size": size, "image_format": image_format, "seed": seed}
    (root / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return {split: shards[split] for split in counts}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--train", type=int, default=2000, help="training samples")
    parser.add_argument("--val", type=int, default=200, help="validation samples")
    parser.add_argument("--test", type=int, default=200, help="test samples")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (mixed: of the same area)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples-per-shard", type=int, default=500)
    parser.add_argument("--format", dest="image_format", choices=sorted(_ENCODERS) + ["mp4"],
                        help="images: jpg (default) or png; clips: mp4 (default), or jpg / png frame images")
    parser.add_argument("--aspect", choices=list(ASPECT_MODES), default="square",
                        help=f"square canvases, or mixed: each of {', '.join(ASPECTS)} (W:H) in turn")
    parser.add_argument("--frames", type=int, help="write moving-shapes clips of this many frames (e.g. 8) instead of images")
    args = parser.parse_args(argv)
    try:
        shards = write_shapes(args.out, args.train, args.val, args.test, args.size, args.seed,
                              args.samples_per_shard, args.image_format, args.aspect, args.frames)
    except ValueError as error:
        parser.error(str(error))
    for split, paths in shards.items():
        print(f"{split}: {getattr(args, split)} samples in {len(paths)} shards under {args.out / split}")


if __name__ == "__main__":
    main()
