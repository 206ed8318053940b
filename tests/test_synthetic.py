"""The synthetic shapes dataset: balanced attributes, self-consistent samples, deterministic shards; moving-shapes clips."""

import io
import json
import random
from collections import Counter

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from ldm.data.images import ImageDecoder
from ldm.data.synthetic import (
    ASPECTS,
    CLIP_COMBINATIONS,
    CLIP_FPS,
    COLOURS,
    COMBINATIONS,
    MOTIONS,
    POSITIONS,
    SHAPES,
    aspect_of,
    attributes,
    canvas_size,
    clip_attributes,
    clip_caption,
    main,
    render_clip,
    render_sample,
    write_shapes,
)
from ldm.data.video import VideoDecoder


def _read(shards):
    return list(wds.WebDataset([str(p) for p in shards], shardshuffle=False))


def test_every_combination_appears_once_per_cycle():
    n = len(COMBINATIONS)
    assert len(SHAPES) >= 4 and len(COLOURS) >= 6 and len(POSITIONS) == 9
    for cycle in range(2):
        assert Counter(attributes(i, seed=0) for i in range(cycle * n, (cycle + 1) * n)) == Counter(COMBINATIONS)
    assert [attributes(i, 0) for i in range(20)] != [attributes(i, 1) for i in range(20)]


def test_rendered_sample_agrees_with_its_caption_and_seg():
    areas = {}
    for index in range(40):
        sample = render_sample(index, seed=0, size=64)
        pixels = np.asarray(sample.image, np.float64)  # (64, 64, 3)
        seg = np.asarray(sample.seg)  # (64, 64)
        assert sample.image.size == sample.seg.size == (64, 64)
        assert set(np.unique(seg)) == {0, 1 + sample.label}
        assert sample.label == SHAPES.index(sample.shape)
        assert sample.caption.startswith(f"a {sample.scale} {sample.colour} {sample.shape} ")
        assert sample.meta() == {"caption": sample.caption, "shape": sample.shape, "colour": sample.colour,
                                 "size": sample.scale, "position": sample.position, "label": sample.label,
                                 "width": 64, "height": 64}

        colour = np.asarray(COLOURS[sample.colour], np.float64)
        assert np.abs(np.median(pixels[seg > 0], axis=0) - colour).max() <= 3
        background = np.median(pixels[seg == 0], axis=0)
        assert np.ptp(background) <= 2 and background.max() < 90  # dark neutral grey
        # seg holds the pixels that are mostly shape: nearer the colour than the background, and no others
        distance = np.linalg.norm(pixels - colour, axis=-1) / np.linalg.norm(colour - background)  # (64, 64)
        assert distance[seg > 0].max() < 0.6 and distance[seg == 0].min() > 0.45

        ys, xs = np.nonzero(seg)
        assert divmod(POSITIONS.index(sample.position), 3) == (int(ys.mean() * 3 // 64), int(xs.mean() * 3 // 64))
        areas.setdefault(sample.shape, {}).setdefault(sample.scale, []).append(len(ys))
    for by_scale in areas.values():
        if len(by_scale) == 2:
            assert min(by_scale["large"]) > 1.5 * max(by_scale["small"])


def test_write_shapes_is_deterministic_and_consistent(tmp_path):
    shards = write_shapes(tmp_path / "a", train=5, val=2, test=3, size=64, seed=0, samples_per_shard=2)
    assert {split: len(paths) for split, paths in shards.items()} == {"train": 3, "val": 1, "test": 2}
    assert shards["train"][0] == tmp_path / "a" / "train" / "shard-000000.tar"
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["colours"] == {name: list(rgb) for name, rgb in COLOURS.items()} and meta["shapes"] == list(SHAPES)
    assert meta["aspect"] == "square" and meta["canvases"] == {"1:1": [64, 64]}

    write_shapes(tmp_path / "b", train=5, val=2, test=3, size=64, seed=0, samples_per_shard=2)
    write_shapes(tmp_path / "c", train=5, val=2, test=3, size=64, seed=1, samples_per_shard=2)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a/train/shard-000000.tar").read_bytes() != (tmp_path / "c/train/shard-000000.tar").read_bytes()

    keys = []
    for split, count in {"train": 5, "val": 2, "test": 3}.items():
        samples = _read(shards[split])
        assert len(samples) == count
        for raw in samples:
            keys.append(raw["__key__"])
            meta = json.loads(raw["json"])
            assert raw["txt"].decode() == meta["caption"] == render_sample(int(raw["__key__"]), 0, 64).caption
            assert int(raw["cls"]) == meta["label"] == SHAPES.index(meta["shape"])
            image = np.asarray(Image.open(io.BytesIO(raw["jpg"])).convert("RGB"), np.float64)
            seg = np.asarray(Image.open(io.BytesIO(raw["seg.png"])))
            assert image.shape == (64, 64, 3) and set(np.unique(seg)) == {0, 1 + meta["label"]}
            assert (meta["width"], meta["height"]) == (64, 64) and "aspect" not in meta
            dominant = np.median(image[seg > 0], axis=0)
            nearest = min(COLOURS, key=lambda name: np.linalg.norm(dominant - COLOURS[name]))
            assert nearest == meta["colour"] and np.abs(dominant - COLOURS[meta["colour"]]).max() <= 12
    assert len(set(keys)) == 10


def test_cli_png_is_lossless_and_test_split_ignores_train_count(tmp_path):
    main(["--out", str(tmp_path / "png"), "--train", "1", "--val", "1", "--test", "2", "--size", "32",
          "--format", "png", "--samples-per-shard", "500"])
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["meta.json", "test", "train", "val"]
    samples = _read(sorted((tmp_path / "png" / "test").glob("shard-*.tar")))
    assert [raw["__key__"] for raw in samples] == ["00000000", "00000001"]
    for raw in samples:
        assert "jpg" not in raw
        expected = render_sample(int(raw["__key__"]), seed=0, size=32)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(raw["png"]))), np.asarray(expected.image))

    more = write_shapes(tmp_path / "more", train=7, val=1, test=2, size=32, image_format="png")
    assert more["test"][0].read_bytes() == (tmp_path / "png" / "test" / "shard-000000.tar").read_bytes()


def test_mixed_canvases_balance_ratios_at_the_square_area():
    assert {ratio: canvas_size(64, ratio) for ratio in ASPECTS} == {
        "2:1": (90, 46), "3:2": (78, 52), "1:1": (64, 64), "2:3": (52, 78), "1:2": (46, 90)}
    for size in (16, 64, 256):
        for ratio, (w, h) in ASPECTS.items():  # the nearest even sides to an area of size**2
            width, height = canvas_size(size, ratio)
            assert width % 2 == height % 2 == 0
            assert abs(width - size * (w / h) ** 0.5) <= 1 and abs(height - size * (h / w) ** 0.5) <= 1
    n = len(ASPECTS)
    for cycle in range(3):  # every ratio once per cycle, in a seeded order
        assert sorted(aspect_of(i, seed=0) for i in range(cycle * n, (cycle + 1) * n)) == sorted(ASPECTS)
    assert [aspect_of(i, 0) for i in range(20)] != [aspect_of(i, 1) for i in range(20)]

    for index in range(10):
        sample = render_sample(index, seed=0, size=64, aspect="mixed")
        square = render_sample(index, seed=0, size=64)
        assert sample.aspect == aspect_of(index, 0) and square.aspect is None
        assert sample.image.size == sample.seg.size == canvas_size(64, sample.aspect)
        assert (sample.caption, sample.label) == (square.caption, square.label)  # attributes ignore the canvas
        assert sample.meta() == {**square.meta(), "width": sample.image.width, "height": sample.image.height,
                                 "aspect": sample.aspect}
        assert set(np.unique(np.asarray(sample.seg))) == {0, 1 + sample.label}


def test_mixed_shapes_keep_their_cell_and_stay_inside_the_frame():
    wide = tall = 0
    for index in range(60):
        sample = render_sample(index, seed=0, size=64, aspect="mixed")
        seg = np.asarray(sample.seg)  # (H, W)
        height, width = seg.shape
        ys, xs = np.nonzero(seg)
        assert divmod(POSITIONS.index(sample.position), 3) == (int(3 * ys.mean() // height), int(3 * xs.mean() // width))
        assert xs.min() > 0 and ys.min() > 0 and xs.max() < width - 1 and ys.max() < height - 1  # none on the frame
        wide, tall = wide + (width > height), tall + (width < height)
    assert wide == tall == 24


def test_mixed_cli_writes_sizes_in_json_and_meta(tmp_path):
    main(["--out", str(tmp_path), "--train", "0", "--val", "0", "--test", "5", "--aspect", "mixed", "--format", "png"])
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["aspect"] == "mixed" and meta["canvases"] == {r: list(canvas_size(64, r)) for r in ASPECTS}
    samples = _read(sorted((tmp_path / "test").glob("shard-*.tar")))
    assert sorted(json.loads(raw["json"])["aspect"] for raw in samples) == sorted(ASPECTS)
    for raw in samples:
        fields = json.loads(raw["json"])
        image, seg = Image.open(io.BytesIO(raw["png"])), Image.open(io.BytesIO(raw["seg.png"]))
        assert image.size == seg.size == (fields["width"], fields["height"]) == canvas_size(64, fields["aspect"])
        expected = render_sample(int(raw["__key__"]), seed=0, size=64, aspect="mixed")
        assert np.array_equal(np.asarray(image), np.asarray(expected.image))


def test_clips_balance_motions_and_colours_per_cycle():
    n = len(CLIP_COMBINATIONS)
    assert n == len(SHAPES) * len(COLOURS) * len(MOTIONS) and set(MOTIONS) == {"up", "down", "left", "right", "still"}
    for cycle in range(2):
        drawn = [clip_attributes(i, seed=0) for i in range(cycle * n, (cycle + 1) * n)]
        assert Counter(drawn) == Counter(CLIP_COMBINATIONS)
        assert set(Counter((colour, motion) for _, colour, motion in drawn).values()) == {len(SHAPES)}
    assert [clip_attributes(i, 0) for i in range(20)] != [clip_attributes(i, 1) for i in range(20)]
    assert clip_caption("circle", "red", "right") == "a red circle moving to the right"
    assert clip_caption("square", "orange", "still") == "an orange square staying still"
    assert clip_caption("star", "blue", "up") == "a blue star moving up"
    assert render_clip(3, 0, 32, 8).caption == clip_caption(*clip_attributes(3))


def _centroids(clip: np.ndarray, colour: str) -> np.ndarray:
    """(T, 2) row and column of the pixels nearest the shape's colour in each frame of a (T, H, W, 3) clip."""
    near = np.linalg.norm(clip.astype(np.float64) - COLOURS[colour], axis=-1) < 60  # (T, H, W)
    assert near.sum((1, 2)).min() > 10  # the shape is in every frame
    return np.array([np.argwhere(frame).mean(0) for frame in near])


@pytest.mark.parametrize("clip_format", ["mp4", "png"])
def test_moving_shapes_move_as_captioned_through_the_video_decoder(tmp_path, clip_format):
    """Written clips decode (ldm.data.video) to the shape of the captioned colour, its centroid moving the
    captioned way by TRAVEL of the canvas, or standing still; the same arguments write the same bytes."""
    main(["--out", str(tmp_path / "a"), "--train", "0", "--val", "0", "--test", "12", "--size", "32", "--frames", "8",
          "--format", clip_format])
    write_shapes(tmp_path / "b", train=0, val=0, test=12, size=32, frames=8, image_format=clip_format)
    shard = tmp_path / "a" / "test" / "shard-000000.tar"
    assert shard.read_bytes() == (tmp_path / "b" / "test" / "shard-000000.tar").read_bytes()
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["motions"] == list(MOTIONS) and meta["frames"] == 8 and meta["fps"] == CLIP_FPS
    decoder = VideoDecoder(ImageDecoder(32, crop="center"), frames=8)
    motions = Counter()
    for raw in _read([shard]):
        fields = json.loads(raw["json"])
        expected = render_clip(int(raw["__key__"]), seed=0, size=32, frames=8)
        assert raw["txt"].decode() == fields["caption"] == expected.caption and int(raw["cls"]) == expected.label
        assert fields == {**expected.meta(), "fps": CLIP_FPS, "num_frames": 8, "width": 32, "height": 32}
        assert (clip_format in raw) == (clip_format == "mp4") and ("007.png" in raw) == (clip_format == "png")
        out = decoder(raw, random.Random(0))
        clip = np.round((out["image"].permute(1, 2, 3, 0).numpy() + 1) * 127.5)  # (T, H, W, 3)
        if clip_format == "png":
            assert np.array_equal(clip, expected.frames)  # lossless
        path = _centroids(clip, fields["colour"])  # (T, 2) row, column
        dx, dy = MOTIONS[fields["motion"]]
        moved = path[-1] - path[0]
        assert np.allclose(moved, 0.4 * 32 * np.array([dy, dx]), atol=1.5), (fields["caption"], moved)
        assert (np.diff(path, axis=0) @ np.array([dy, dx]) > 0).all() or (dx, dy) == (0, 0)  # at every frame
        shape = (np.linalg.norm(clip - COLOURS[fields["colour"]], axis=-1) < 60)[0]
        assert np.abs(np.median(clip[0][shape], axis=0) - COLOURS[fields["colour"]]).max() <= 6  # colours survive
        motions[fields["motion"]] += 1
    assert set(motions) == set(MOTIONS)


def test_clip_options_are_checked(tmp_path, capsys):
    with pytest.raises(ValueError, match="at least 2 frames"):
        write_shapes(tmp_path, train=1, val=0, test=0, frames=1)
    with pytest.raises(ValueError, match="image_format must be one of"):
        write_shapes(tmp_path, train=1, val=0, test=0, image_format="mp4")
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--frames", "8", "--aspect", "mixed"])
    assert "moving-shapes clips are square" in capsys.readouterr().err
