"""Does a text-to-image (or -video) model draw what the prompt names? Measure colour (and position, or motion) on
shapes samples.

Reads a folder written by `ldm predict` (`NNNNNN.png` plus `prompts.rank*.jsonl` lines
`{"index": i, "caption": ...}`). In each image, after a 3x3 median filter against speckle noise,
the shape is the set of pixels far (CIELAB distance) from the image's median colour, which is the
dark neutral background of the shapes dataset. Its colour is the median of its most distinct half,
classified to the nearest entry of `COLOURS`; its position is the cell of its centroid in the
image's 3x3 grid (thirds of each side, so on any aspect ratio). It is `cut` when it runs out of
the frame: a pixel of its most distinct half lies in the outermost row or column (a soft or
antialiased edge that merely grazes the frame does not count; mixed-aspect shapes data keeps every
shape inside, square shapes data runs out in about 4% of images at 64 px). The prompted
colour is the palette word in the caption. The report compares accuracy with chance: uniform
(1 / colours) and shuffled (prompts permuted across images, which discounts a model that ignores
its prompt but favours a few colours), with a permutation-test p-value, and gives the fraction of
found shapes that are cut.

Clips of the moving-shapes data (`--frames T`): each file `NNNNNN.gif` (an animated GIF of T frames) or
`NNNNNN.png` (a strip of T equal frames side by side, no gaps) is one clip. Each frame is measured as an
image; the clip's colour is its frames' most common one, its motion the travel of the shape's centroid over
the clip (the least-squares line through the frames that show it): `still` when it moves less than
`STILL_TRAVEL` of the frame's width and height, else the dominant axis's direction (up, down, left, right).
The prompted motion is read from the caption ("moving to the right", "moving up", "staying still"), and
both are scored as colour is for images (chance 1 / 5 for motion).

    python tools/measure_attributes.py --make-prompts prompts.jsonl --n 70
    python tools/measure_attributes.py --make-prompts wide.jsonl --n 70 --width 96 --height 48
    python tools/measure_attributes.py --make-prompts clips.txt --n 105 --frames 8
    ldm predict --config run.yaml --data.predict prompts.jsonl ...
    python tools/measure_attributes.py runs/.../predictions --position --out report.json
    python tools/measure_attributes.py runs/.../predictions --frames 8 --out report.json
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from ldm.data import batch as B
from ldm.data import entries as E
from ldm.data.synthetic import (
    COLOURS,
    MOTIONS,
    POSITIONS,
    SCALES,
    SHAPES,
    caption_for,
    clip_caption,
)
from ldm.data.video import clip_frames

NONE = "none"  # measured when no single shape stands out from the background
FOREGROUND_DELTA_E = 40.0  # Lab distance from the background median that marks a shape pixel
MIN_COVERAGE, MAX_COVERAGE = 0.002, 0.25  # shape pixels / image outside this: blank or not one shape
PERMUTATIONS = 2000  # shuffles in the permutation test
_RGB_TO_XYZ = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])  # sRGB, D65
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883])
_ROWS = {"top": 0, "bottom": 2}  # caption words -> grid row / column; absent means the middle
_COLUMNS = {"left": 0, "right": 2}
_POSITION_WORDS = {*_ROWS, *_COLUMNS, "center", "centre", "middle"}
STILL_TRAVEL = 0.1  # centroid travel over a clip (fraction of the frame's width / height) below which it is still
_STILL_WORDS = {"still", "static", "stationary", "motionless"}


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of sRGB values in [0, 255], shape (..., 3) -> (..., 3)."""
    c = np.asarray(rgb, np.float64) / 255
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)  # undo the sRGB transfer curve
    xyz = linear @ _RGB_TO_XYZ.T / _WHITE_D65  # (..., 3), relative to the white point
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


PALETTE_LAB = srgb_to_lab(np.array(list(COLOURS.values())))  # (K, 3)


@dataclass(frozen=True)
class Measurement:
    """What one image shows: the shape's palette colour and grid position, or NONE."""

    colour: str
    position: str
    delta_e: float | None  # Lab distance of the shape's colour to the chosen palette entry
    coverage: float  # fraction of pixels taken as the shape
    cut: bool = False  # the shape runs out of the frame (False where none is found)
    centroid: tuple[float, float] | None = None  # (x, y) of the shape's pixels, fractions of width and height


def measure_image(image: Image.Image) -> Measurement:
    """Find the pixels that stand out from the background and classify their colour and centroid."""
    lab = srgb_to_lab(np.asarray(image.convert("RGB").filter(ImageFilter.MedianFilter(3))))  # (H, W, 3)
    distance = np.linalg.norm(lab - np.median(lab.reshape(-1, 3), axis=0), axis=-1)  # (H, W)
    mask = distance > FOREGROUND_DELTA_E
    coverage = float(mask.mean())
    if not MIN_COVERAGE <= coverage <= MAX_COVERAGE:
        return Measurement(NONE, NONE, None, coverage)
    core = mask & (distance >= np.median(distance[mask]))  # the most distinct half: no antialiased edge
    colour = np.median(lab[core], axis=0)  # (3,)
    gaps = np.linalg.norm(PALETTE_LAB - colour, axis=-1)  # (K,)
    rows, cols = np.nonzero(mask)
    row, col = min(int(3 * rows.mean() / mask.shape[0]), 2), min(int(3 * cols.mean() / mask.shape[1]), 2)
    cut = bool(core[[0, -1]].any() or core[:, [0, -1]].any())  # a solid shape pixel in the outermost row or column
    centroid = ((cols.mean() + 0.5) / mask.shape[1], (rows.mean() + 0.5) / mask.shape[0])  # pixel centres
    return Measurement(list(COLOURS)[int(gaps.argmin())], POSITIONS[3 * row + col], float(gaps.min()), coverage, cut,
                       centroid)


@dataclass(frozen=True)
class ClipMeasurement:
    """What one clip shows: the shape's colour in most frames and its motion, or NONE."""

    colour: str
    motion: str  # of MOTIONS; NONE when fewer than two frames show a shape
    travel: tuple[float, float] | None  # (dx, dy) of the centroid over the clip, in frame widths / heights, y down
    frames_found: int  # frames in which one shape stands out


def centroid_travel(centroids: Sequence[tuple[float, float] | None]) -> tuple[float, float] | None:
    """(dx, dy) from the first to the last frame along the least-squares line through the centroids found
    (None: no shape in that frame), so one stray frame does not decide; None with fewer than two found."""
    found = [i for i, c in enumerate(centroids) if c is not None]
    if len(found) < 2:
        return None
    slope = np.polyfit(found, np.array([centroids[i] for i in found]), 1)[0]  # (2,) per frame
    return float(slope[0] * (len(centroids) - 1)), float(slope[1] * (len(centroids) - 1))


def classify_motion(travel: tuple[float, float] | None) -> str:
    """`still` below `STILL_TRAVEL` on both axes, else the direction of the larger one (image y points down)."""
    if travel is None:
        return NONE
    dx, dy = travel
    if max(abs(dx), abs(dy)) < STILL_TRAVEL:
        return "still"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def measure_clip(frames: Sequence[Image.Image]) -> ClipMeasurement:
    """Measure each frame as an image; the clip's colour is the most common found, its motion the centroid's travel."""
    measured = [measure_image(frame) for frame in frames]
    colours = Counter(m.colour for m in measured if m.colour != NONE)
    travel = centroid_travel([m.centroid for m in measured])
    return ClipMeasurement(colours.most_common(1)[0][0] if colours else NONE, classify_motion(travel), travel,
                           sum(colours.values()))


def prompted_colour(caption: str) -> str | None:
    """The first palette colour word of a caption, or None when it names none."""
    return next((word for word in re.findall(r"[a-z]+", caption.lower()) if word in COLOURS), None)


def prompted_motion(caption: str) -> str | None:
    """The motion a caption names ("moving to the right", "moving up", "staying still"), or None."""
    words = re.findall(r"[a-z]+", caption.lower())
    if _STILL_WORDS & set(words):
        return "still"
    if "moving" in words:
        return next((word for word in words[words.index("moving") + 1:] if word in MOTIONS), None)
    return None


def prompted_position(caption: str) -> str | None:
    """The 3x3 grid cell a caption names ("in the top left", "on the right", "in the center"), or None."""
    words = set(re.findall(r"[a-z]+", caption.lower()))
    if not words & _POSITION_WORDS:
        return None
    row = next((r for word, r in _ROWS.items() if word in words), 1)
    col = next((c for word, c in _COLUMNS.items() if word in words), 1)
    return POSITIONS[3 * row + col]


def load_predictions(folder: str | Path) -> list[tuple[int, str, Path]]:
    """(index, caption, file) of every request in the folder's prompt logs whose `NNNNNN.png` (or `.gif`) exists."""
    root = Path(folder)
    captions: dict[int, str] = {}
    for log in sorted(root.glob("prompts.rank*.jsonl")):
        for line in log.read_text().splitlines():
            if line.strip():
                request = json.loads(line)
                captions[int(request[B.INDEX])] = request.get(B.CAPTION, "")
    if not captions:
        raise FileNotFoundError(f"{root}: no prompts.rank*.jsonl lines (is this an `ldm predict` output folder?)")
    found = [(i, captions[i], next((p for p in (root / f"{i:06d}{s}" for s in (".png", ".gif")) if p.is_file()), None))
             for i in sorted(captions)]
    return [entry for entry in found if entry[2] is not None]


def score(prompted: list[str | None], measured: list[str], classes: tuple[str, ...], seed: int = 0) -> dict:
    """Accuracy of `measured` against `prompted` (None prompts are left out), chance levels and confusion."""
    pairs = [(p, m) for p, m in zip(prompted, measured) if p is not None]
    want = np.array([p for p, _ in pairs], dtype=object)
    got = np.array([m for _, m in pairs], dtype=object)
    n = len(pairs)
    hits = int((want == got).sum())
    want_counts, got_counts = Counter(want.tolist()), Counter(got.tolist())
    rng = np.random.default_rng(seed)
    shuffled = [int((rng.permutation(want) == got).sum()) for _ in range(PERMUTATIONS if n else 0)]
    return {
        "n": n,
        "accuracy": hits / n if n else 0.0,
        "chance_uniform": 1 / len(classes),
        # expected accuracy when each image gets a prompt drawn at random: sum_c P(prompt c) P(measured c)
        "chance_shuffled": sum(want_counts[c] * got_counts[c] for c in classes) / n**2 if n else 0.0,
        "p_value": (1 + sum(s >= hits for s in shuffled)) / (1 + len(shuffled)),  # one-sided permutation test
        "prompted": {c: want_counts[c] for c in classes},
        "measured": {c: got_counts[c] for c in (*classes, NONE)},
        "correct": {c: int(((want == c) & (got == c)).sum()) for c in classes},
        "confusion": {p: {m: int(((want == p) & (got == m)).sum()) for m in (*classes, NONE)} for p in classes},
    }


def cut_fraction(measured: list[Measurement]) -> dict:
    """How many of the found shapes (colour not NONE) are cut by the frame, and their fraction."""
    found = [m for m in measured if m.colour != NONE]
    cut = sum(m.cut for m in found)
    return {"found": len(found), "cut": cut, "cut_fraction": cut / len(found) if found else 0.0}


def measure_folder(folder: str | Path, position: bool = False, seed: int = 0) -> dict:
    """Measure every image of an `ldm predict` folder: colour (and position) scored against its prompt,
    and how many shapes the frame cuts."""
    entries = load_predictions(folder)
    measured = [measure_image(Image.open(path)) for _, _, path in entries]
    colours = [prompted_colour(caption) for _, caption, _ in entries]
    report = {"folder": str(folder), "images": len(entries), **cut_fraction(measured),
              "colour": score(colours, [m.colour for m in measured], tuple(COLOURS), seed)}
    positions = [prompted_position(caption) for _, caption, _ in entries]
    if position:
        report["position"] = score(positions, [m.position for m in measured], POSITIONS, seed)
    report["per_image"] = [
        {"index": index, "caption": caption, "prompted_colour": colour, "prompted_position": where, **asdict(m)}
        for (index, caption, _), colour, where, m in zip(entries, colours, positions, measured)
    ]
    return report


def measure_clips(folder: str | Path, frames: int, seed: int = 0) -> dict:
    """Measure every clip of an `ldm predict` folder (`read_clip`): colour and motion scored against its prompt."""
    entries = load_predictions(folder)
    measured = [measure_clip(clip_frames(path, frames)) for _, _, path in entries]
    colours = [prompted_colour(caption) for _, caption, _ in entries]
    motions = [prompted_motion(caption) for _, caption, _ in entries]
    return {
        "folder": str(folder), "clips": len(entries), "frames": frames,
        "colour": score(colours, [m.colour for m in measured], tuple(COLOURS), seed),
        "motion": score(motions, [m.motion for m in measured], tuple(MOTIONS), seed),
        "per_clip": [{"index": index, "caption": caption, "prompted_colour": colour, "prompted_motion": motion,
                      **asdict(m)}
                     for (index, caption, _), colour, motion, m in zip(entries, colours, motions, measured)],
    }


def format_score(name: str, result: dict) -> str:
    """A readable block: accuracy against chance, per-class counts and the confusion table."""
    classes, columns = list(result["prompted"]), list(result["measured"])
    width = max(len(c) for c in columns) + 1
    lines = [
        f"{name}: accuracy {result['accuracy']:.3f} over {result['n']} prompts "
        f"(chance: uniform {result['chance_uniform']:.3f}, shuffled {result['chance_shuffled']:.3f}; "
        f"permutation p = {result['p_value']:.4f})",
        f"{'':<{width}} {'prompted':>8} {'measured':>8} {'correct':>8} {'recall':>7}",
    ]
    for c in classes:
        recall = f"{result['correct'][c] / result['prompted'][c]:.2f}" if result["prompted"][c] else "-"
        lines.append(f"{c:<{width}} {result['prompted'][c]:>8} {result['measured'][c]:>8} "
                     f"{result['correct'][c]:>8} {recall:>7}")
    short = ["".join(w[0] for w in c.split()) if " " in c else c for c in columns]  # "top left" -> "tl"
    lines.append(f"confusion (rows prompted, columns measured)\n{'':<{width}}" + "".join(f"{c:>7}" for c in short))
    lines += [f"{p:<{width}}" + "".join(f"{result['confusion'][p][m]:>7}" for m in columns) for p in classes]
    return "\n".join(lines)


def format_cut(report: dict) -> str:
    """One line: how many of the found shapes run out of the frame."""
    return (f"cut: {report['cut']} of {report['found']} found shapes run out of the frame "
            f"(cut_fraction {report['cut_fraction']:.3f})")


def write_prompts(path: str | Path, n: int, seed: int = 0, width: int | None = None,
                  height: int | None = None, clips: bool = False) -> list[str]:
    """Write n shapes-style captions naming each colour (and position, shape, size) equally often; with
    ``clips``, moving-shapes captions naming each colour, shape and motion equally often.

    `.jsonl` lines carry the shape index as `label` too (for class-conditional models) and, when given,
    the `width` and `height` to generate; any other suffix gets one caption per line (no size: ValueError).
    Returns the captions in file order.
    """
    size = {} if width is None and height is None else {E.WIDTH: width, E.HEIGHT: height}
    if size and not all(isinstance(side, int) and side > 0 for side in size.values()):
        raise ValueError(f"width and height go together, as positive pixel counts: got {size}")
    if size and Path(path).suffix != ".jsonl":
        raise ValueError(f"{path}: a size needs a .jsonl prompt file (a .txt one holds captions only)")
    rng = np.random.default_rng(seed)

    def balanced(options: tuple[str, ...]) -> list[str]:  # counts differ by at most one, in random order
        return [options[i] for i in rng.permutation(np.resize(np.arange(len(options)), n))]

    if clips:
        rows = list(zip(balanced(SHAPES), balanced(tuple(COLOURS)), balanced(tuple(MOTIONS))))
        captions = [clip_caption(*row) for row in rows]
    else:
        rows = list(zip(balanced(SHAPES), balanced(tuple(COLOURS)), balanced(tuple(SCALES)), balanced(POSITIONS)))
        captions = [caption_for(*row) for row in rows]
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    if file.suffix == ".jsonl":
        lines = [json.dumps({"caption": c, "label": SHAPES.index(row[0]), **size}) for c, row in zip(captions, rows)]
    else:
        lines = captions
    file.write_text("\n".join(lines) + "\n")
    return captions


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", type=Path, help="an `ldm predict` output folder to measure")
    parser.add_argument("--position", action="store_true", help="also score the shape's 3x3 grid cell")
    parser.add_argument("--frames", type=int, metavar="T", help="measure clips of T frames (NNNNNN.gif, or NNNNNN.png "
                        "strips of T frames in a row): colour and motion")
    parser.add_argument("--out", type=Path, help="write the full report (with per-image results) as JSON")
    parser.add_argument("--seed", type=int, default=0, help="seed of the permutation test / prompt sampling")
    parser.add_argument("--make-prompts", type=Path, metavar="FILE", help="write a balanced .jsonl/.txt prompt file "
                        "(with --frames: of moving shapes)")
    parser.add_argument("--n", type=int, default=70, help="prompts to write with --make-prompts")
    parser.add_argument("--width", type=int, help="with --make-prompts FILE.jsonl: the width to generate, in pixels")
    parser.add_argument("--height", type=int, help="with --make-prompts FILE.jsonl: the height to generate")
    args = parser.parse_args(argv)
    if args.make_prompts is None and args.folder is None:
        parser.error("give a predictions folder to measure, or --make-prompts FILE")
    if args.make_prompts is None and (args.width, args.height) != (None, None):
        parser.error("--width and --height go with --make-prompts")
    if args.frames is not None and (args.position or args.frames < 2):
        parser.error("--frames T takes clips of T >= 2 frames, whose position is not scored (no --position)")
    if args.make_prompts is not None:
        try:
            write_prompts(args.make_prompts, args.n, args.seed, args.width, args.height, clips=args.frames is not None)
        except ValueError as error:
            parser.error(str(error))
        print(f"wrote {args.n} prompts to {args.make_prompts}")
    if args.folder is not None and args.frames is not None:
        report = measure_clips(args.folder, args.frames, args.seed)
        print(f"{report['clips']} clips of {args.frames} frames in {report['folder']}")
        print(format_score("colour", report["colour"]))
        print(format_score("motion", report["motion"]))
    elif args.folder is not None:
        report = measure_folder(args.folder, args.position, args.seed)
        print(f"{report['images']} images in {report['folder']}")
        print(format_cut(report))
        print(format_score("colour", report["colour"]))
        if args.position:
            print(format_score("position", report["position"]))
    if args.folder is not None and args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
