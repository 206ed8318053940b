"""tools/measure_attributes.py: ground-truth shapes score ~1 on any canvas, mismatched prompts score chance,
blanks measure none, shapes run out of the frame measure cut; clips' colour and motion direction likewise."""

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from ldm.data.prompts import PromptDataset
from ldm.data.synthetic import (
    ASPECTS,
    COLOURS,
    POSITIONS,
    SHAPES,
    caption_for,
    render_sample,
)
from ldm.data.video import clip_frames

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import measure_attributes as ma  # noqa: E402

N_SAMPLES = 35  # covers every colour and position of the seed-0 dataset
N_MIXED = 140  # covers every ratio x position of the seed-0 mixed-aspect dataset


def _write_predictions(folder: Path, images: list[Image.Image], captions: list[str]) -> Path:
    """The `ldm predict` layout: NNNNNN.png plus request logs, split over two ranks as under DDP."""
    folder.mkdir(parents=True, exist_ok=True)
    for rank in (0, 1):
        lines = [json.dumps({"index": i, "caption": captions[i], "label": 0}) for i in range(rank, len(images), 2)]
        (folder / f"prompts.rank{rank}.jsonl").write_text("\n".join(lines) + "\n")
    for i, image in enumerate(images):
        if isinstance(image, list):  # a clip's frames: an animated GIF
            image[0].save(folder / f"{i:06d}.gif", save_all=True, append_images=image[1:], duration=125, loop=0)
        else:
            image.save(folder / f"{i:06d}.png")
    return folder


@pytest.fixture(scope="module")
def samples():
    return [render_sample(i, seed=0, size=64) for i in range(N_SAMPLES)]


@pytest.fixture(scope="module")
def mixed():
    return [render_sample(i, seed=0, size=64, aspect="mixed") for i in range(N_MIXED)]


def _noisy(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A soft, grainy copy, as a generator might draw it (this noise defeats a measure without median filter)."""
    noise = rng.normal(0, 20, (image.height, image.width, 3))
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(1.0)), np.float64) + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def test_caption_parsing_round_trips_every_colour_and_position():
    for colour in COLOURS:
        for position in POSITIONS:
            caption = caption_for("star", colour, "small", position)
            assert (ma.prompted_colour(caption), ma.prompted_position(caption)) == (colour, position)
    assert ma.prompted_colour("A Blue cat, then a red one") == "blue"
    assert ma.prompted_colour("a photo of a cat") is None and ma.prompted_position("a cat") is None


def test_soft_edges_do_not_dilute_the_colour():
    yy, xx = np.mgrid[:64, :64]
    alpha = np.clip((10 - np.hypot(yy - 20.5, xx - 44.5)) / 6, 0, 1)[..., None]  # (64, 64, 1): solid to r=4, ramp to 10
    for name, rgb in COLOURS.items():
        image = Image.fromarray(np.round(40 * (1 - alpha) + np.array(rgb) * alpha).astype(np.uint8))
        measured = ma.measure_image(image)
        assert (measured.colour, measured.position) == (name, "top right")
        assert measured.delta_e < 5  # the core's colour, not a blend with the background


@pytest.mark.parametrize("noisy", [False, True])
def test_ground_truth_renders_match_their_captions(tmp_path, samples, noisy):
    rng = np.random.default_rng(0)
    images = [_noisy(s.image, rng) if noisy else s.image for s in samples]
    assert {s.colour for s in samples} == set(COLOURS) and {s.position for s in samples} == set(POSITIONS)
    folder = _write_predictions(tmp_path / "pred", images, [s.caption for s in samples])
    report = ma.measure_folder(folder, position=True)
    colour, position = report["colour"], report["position"]
    assert report["images"] == colour["n"] == N_SAMPLES
    assert colour["accuracy"] >= 0.95 and position["accuracy"] >= 0.95
    assert colour["p_value"] < 0.01 and colour["accuracy"] > 3 * colour["chance_shuffled"]
    assert colour["chance_uniform"] == pytest.approx(1 / len(COLOURS))
    assert colour["prompted"] == {c: sum(s.colour == c for s in samples) for c in COLOURS}
    assert sum(colour["confusion"][c][c] for c in COLOURS) == sum(colour["correct"].values())
    assert [r["index"] for r in report["per_image"]] == list(range(N_SAMPLES))


@pytest.mark.parametrize("noisy", [False, True])
def test_mixed_aspect_renders_match_their_captions_and_are_whole(tmp_path, mixed, noisy):
    assert {(s.aspect, s.position) for s in mixed} == {(a, p) for a in ASPECTS for p in POSITIONS}
    rng = np.random.default_rng(0)
    images = [_noisy(s.image, rng) if noisy else s.image for s in mixed]
    report = ma.measure_folder(_write_predictions(tmp_path / "pred", images, [s.caption for s in mixed]), True)
    wrong = [(s.aspect, s.position, r["position"], s.colour, r["colour"]) for s, r in zip(mixed, report["per_image"])
             if (r["position"], r["colour"]) != (s.position, s.colour)]
    assert not wrong  # the cell of the canvas's own 3x3 grid, on wide and tall canvases alike
    assert report["found"] == N_MIXED and report["cut"] == 0 and report["cut_fraction"] == 0.0


def test_a_shape_running_out_of_the_frame_is_cut_and_a_grazing_one_is_not():
    width, height, radius = 90, 46, 9.0
    yy, xx = np.mgrid[:height, :width] + 0.5  # pixel centres

    def disc(cx: float, cy: float, soft: float = 0.5) -> Image.Image:  # an antialiased red disc on dark grey
        alpha = np.clip((radius - np.hypot(xx - cx, yy - cy)) / (2 * soft) + 0.5, 0, 1)[..., None]  # (H, W, 1)
        return Image.fromarray(np.round(40 * (1 - alpha) + np.array(COLOURS["red"]) * alpha).astype(np.uint8))

    def at(edge: str, gap: float, soft: float = 0.5) -> Image.Image:  # the disc `gap` px inside `edge` (< 0: past it)
        away = radius + gap
        return disc(*{"left": (away, 23), "right": (width - away, 23), "top": (45, away),
                      "bottom": (45, height - away)}[edge], soft)

    background = ma.srgb_to_lab(np.array([40, 40, 40]))
    for edge in ("left", "right", "top", "bottom"):
        half, whole, grazing = at(edge, -radius), at(edge, 3), at(edge, 0.5, soft=1.5)  # centred on it; in; soft edge
        lab = ma.srgb_to_lab(np.asarray(grazing))  # (H, W, 3)
        frame = np.concatenate([lab[[0, -1]].reshape(-1, 3), lab[:, [0, -1]].reshape(-1, 3)])
        assert np.linalg.norm(frame - background, axis=-1).max() > ma.FOREGROUND_DELTA_E  # its soft edge is found
        assert [ma.measure_image(image).cut for image in (half, whole, grazing)] == [True, False, False], edge
        assert ma.measure_image(half).colour == "red"
    measured = [ma.measure_image(disc(*centre)) for centre in [(0, 23), (45, 23), (80, 40)]]
    assert ma.cut_fraction([*measured, ma.Measurement(ma.NONE, ma.NONE, None, 0.0)]) == {
        "found": 3, "cut": 2, "cut_fraction": 2 / 3}


def test_mismatched_colour_words_score_at_chance(tmp_path, samples):
    names = list(COLOURS)
    wrong = [caption_for(s.shape, names[(names.index(s.colour) + 1) % len(names)], s.scale, s.position)
             for s in samples]  # every prompt names the next palette colour
    report = ma.measure_folder(_write_predictions(tmp_path / "wrong", [s.image for s in samples], wrong))
    colour = report["colour"]
    assert colour["accuracy"] == 0.0 and colour["p_value"] > 0.5
    assert all(colour["confusion"][names[(names.index(s.colour) + 1) % len(names)]][s.colour] > 0 for s in samples)

    order = np.random.default_rng(1).permutation(N_SAMPLES)  # captions shuffled across images
    shuffled = [samples[j].caption for j in order]
    folder = _write_predictions(tmp_path / "shuffled", [s.image for s in samples], shuffled)
    colour = ma.measure_folder(folder)["colour"]
    expected = sum(samples[j].colour == s.colour for j, s in zip(order, samples)) / N_SAMPLES
    assert colour["accuracy"] == pytest.approx(expected) and colour["accuracy"] < 0.4


def test_blank_and_noise_images_measure_none(tmp_path):
    rng = np.random.default_rng(0)
    images = [Image.new("RGB", (64, 64), grey) for grey in (0, 40, 128, 255)]
    images += [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(4)]
    captions = [caption_for("circle", c, "large", "center") for c in list(COLOURS)[:7]] + ["an empty picture"]
    report = ma.measure_folder(_write_predictions(tmp_path / "blank", images, captions), position=True)
    assert [r["colour"] for r in report["per_image"]] == [ma.NONE] * 8
    assert report["colour"]["n"] == 7 and report["colour"]["accuracy"] == 0.0  # the colourless caption is left out
    assert report["colour"]["measured"][ma.NONE] == 7 and report["position"]["accuracy"] == 0.0
    assert report["found"] == 0 and report["cut_fraction"] == 0.0
    json.dumps(report)  # serialisable as written by --out


def test_write_prompts_is_balanced_deterministic_and_readable(tmp_path):
    captions = ma.write_prompts(tmp_path / "a.jsonl", 70, seed=3)
    assert Counter(map(ma.prompted_colour, captions)) == {c: 10 for c in COLOURS}
    assert max(Counter(map(ma.prompted_position, captions)).values()) <= 8  # 70 / 9 rounded up
    requests = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["caption"] for r in requests] == captions
    assert all(SHAPES[r["label"]] in r["caption"].split() for r in requests)
    assert len(PromptDataset(str(tmp_path / "a.jsonl"), size=(64, 64))) == 70

    ma.write_prompts(tmp_path / "b.jsonl", 70, seed=3)
    ma.write_prompts(tmp_path / "c.jsonl", 70, seed=4)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert (tmp_path / "a.jsonl").read_bytes() != (tmp_path / "c.jsonl").read_bytes()

    text = ma.write_prompts(tmp_path / "d.txt", 10, seed=0)
    assert (tmp_path / "d.txt").read_text().splitlines() == text
    assert max(Counter(map(ma.prompted_colour, text)).values()) == 2 and len(set(map(ma.prompted_colour, text))) == 7

    assert ma.write_prompts(tmp_path / "wide.jsonl", 70, seed=3, width=96, height=48) == captions
    wide = [json.loads(line) for line in (tmp_path / "wide.jsonl").read_text().splitlines()]
    assert wide == [{**r, "width": 96, "height": 48} for r in requests]
    assert PromptDataset(str(tmp_path / "wide.jsonl"), size=(64, 64))[0]["target_size"].tolist() == [48, 96]  # (H, W)
    for path, size in [("e.txt", {"width": 96, "height": 48}), ("f.jsonl", {"width": 96}), ("g.jsonl", {"height": 0})]:
        with pytest.raises(ValueError):
            ma.write_prompts(tmp_path / path, 5, **size)
        assert not (tmp_path / path).exists()


def test_cli_prints_tables_and_writes_json(tmp_path, samples, capsys):
    folder = _write_predictions(tmp_path / "pred", [s.image for s in samples[:14]], [s.caption for s in samples[:14]])
    ma.main([str(folder), "--position", "--out", str(tmp_path / "report.json")])
    printed = capsys.readouterr().out
    assert "colour: accuracy 1.000 over 14 prompts" in printed and "position: accuracy" in printed
    assert "cut: 0 of 14 found shapes run out of the frame (cut_fraction 0.000)" in printed
    assert "confusion (rows prompted, columns measured)" in printed
    assert json.loads((tmp_path / "report.json").read_text())["colour"]["accuracy"] == 1.0

    ma.main(["--make-prompts", str(tmp_path / "p.txt"), "--n", "14"])
    assert len((tmp_path / "p.txt").read_text().splitlines()) == 14
    ma.main(["--make-prompts", str(tmp_path / "p.jsonl"), "--n", "3", "--width", "52", "--height", "78"])
    assert [json.loads(line)["width"] for line in (tmp_path / "p.jsonl").read_text().splitlines()] == [52] * 3
    for argv in ([], ["--make-prompts", str(tmp_path / "q.txt"), "--width", "52", "--height", "78"],
                 ["--make-prompts", str(tmp_path / "q.jsonl"), "--width", "52"], [str(folder), "--height", "78"]):
        with pytest.raises(SystemExit):
            ma.main(argv)
    assert not (tmp_path / "q.txt").exists() and not (tmp_path / "q.jsonl").exists()


# --- clips: colour and motion -----------------------------------------------------------------------------------

CLIP_SIDE, CLIP_FRAMES = 48, 8
_STEPS = {"up": (0, -1), "down": (0, 1), "left": (-1, 0), "right": (1, 0), "still": (0, 0)}  # (dx, dy), y down
_PHRASES = {"up": "moving up", "down": "moving down", "left": "moving to the left", "right": "moving to the right",
            "still": "staying still"}  # as the moving-shapes data captions them


def _clip(rgb: tuple[int, int, int], motion: str, travel: float = 0.4, frames: int = CLIP_FRAMES,
          side: int = CLIP_SIDE, radius: float = 6.0) -> list[Image.Image]:
    """An antialiased disc on dark grey crossing the middle of the frame by `travel` of its side in direction `motion`."""
    yy, xx = np.mgrid[:side, :side] + 0.5  # pixel centres
    dx, dy = _STEPS[motion]
    out = []
    for t in range(frames):
        step = travel * (t / (frames - 1) - 0.5)
        alpha = np.clip(radius + 0.5 - np.hypot(xx - side * (0.5 + dx * step), yy - side * (0.5 + dy * step)), 0, 1)
        out.append(Image.fromarray(np.round(40 * (1 - alpha[..., None]) + np.array(rgb) * alpha[..., None]).astype(np.uint8)))
    return out


def _strip(frames: list[Image.Image]) -> Image.Image:
    """The frames side by side: the PNG strip `--frames T` reads."""
    return Image.fromarray(np.concatenate([np.asarray(f) for f in frames], axis=1))


@pytest.fixture(scope="module")
def moving():
    """Every colour x motion once: (colour, motion, frames, caption)."""
    return [(c, m, _clip(rgb, m), f"a {c} circle {_PHRASES[m]}") for c, rgb in COLOURS.items() for m in _STEPS]


def test_clip_prompts_name_every_colour_shape_and_motion_equally_often(tmp_path: Path) -> None:
    """--make-prompts with --frames: moving-shapes captions the tool reads back, balanced over what it scores."""
    ma.main(["--make-prompts", str(tmp_path / "clips.txt"), "--n", "70", "--frames", "8"])
    captions = (tmp_path / "clips.txt").read_text().splitlines()
    assert Counter(map(ma.prompted_motion, captions)) == {motion: 14 for motion in ma.MOTIONS}
    assert Counter(map(ma.prompted_colour, captions)) == {colour: 10 for colour in COLOURS}
    shapes = Counter(next(s for s in SHAPES if s in c) for c in captions)
    assert set(shapes) == set(SHAPES) and max(shapes.values()) - min(shapes.values()) <= 1


def test_caption_parsing_finds_the_motion():
    for motion, phrase in _PHRASES.items():
        caption = f"a blue square {phrase}"
        assert (ma.prompted_motion(caption), ma.prompted_colour(caption)) == (motion, "blue")
    assert set(_PHRASES) == set(ma.MOTIONS)
    assert ma.prompted_motion("A red circle, Moving Upwards") is None  # no motion word it knows: left out of the score
    assert ma.prompted_motion("a red circle in the top right") is None and ma.prompted_motion("a still life") == "still"


@pytest.mark.parametrize("kind", ["gif", "noisy png strip"])
def test_clips_moving_every_way_in_every_colour_are_measured_right(tmp_path, moving, kind):
    rng = np.random.default_rng(0)
    if kind == "gif":
        files = [frames for _, _, frames, _ in moving]
    else:  # soft and grainy frames (noise that defeats a measure without median filter), side by side
        files = [_strip([_noisy(frame, rng) for frame in frames]) for _, _, frames, _ in moving]
    report = ma.measure_clips(_write_predictions(tmp_path / "pred", files, [c for *_, c in moving]), CLIP_FRAMES)
    wrong = [(c, m, r["colour"], r["motion"]) for (c, m, _, _), r in zip(moving, report["per_clip"])
             if (r["colour"], r["motion"]) != (c, m)]
    assert not wrong
    assert report["clips"] == report["motion"]["n"] == len(COLOURS) * len(ma.MOTIONS)
    assert report["motion"]["accuracy"] == report["colour"]["accuracy"] == 1.0
    assert report["motion"]["chance_uniform"] == pytest.approx(0.2)
    moved = {m: r["travel"] for (_, m, _, _), r in zip(moving, report["per_clip"]) if r["colour"] == "red"}
    assert moved["right"][0] == pytest.approx(0.4, abs=0.03) and abs(moved["right"][1]) < 0.03  # the drawn travel
    assert moved["up"][1] == pytest.approx(-0.4, abs=0.03) and max(map(abs, moved["still"])) < 0.03
    assert all(r["frames_found"] == CLIP_FRAMES for r in report["per_clip"])


def test_motion_has_a_still_threshold_and_survives_a_lost_frame():
    red = COLOURS["red"]
    small, clear = 0.5 * ma.STILL_TRAVEL, 2 * ma.STILL_TRAVEL
    assert ma.measure_clip(_clip(red, "left", travel=small)).motion == "still"  # jitter, not motion
    assert ma.measure_clip(_clip(red, "left", travel=clear)).motion == "left"
    assert ma.measure_clip(_clip(red, "down", travel=0.4, side=64)).motion == "down"  # relative to the frame's size
    frames = _clip(red, "up")
    frames[3] = Image.new("RGB", frames[3].size, (40, 40, 40))  # the shape lost in one frame
    lost = ma.measure_clip(frames)
    assert (lost.colour, lost.motion, lost.frames_found) == ("red", "up", CLIP_FRAMES - 1)
    blank = [Image.new("RGB", (CLIP_SIDE, CLIP_SIDE), (40, 40, 40))] * CLIP_FRAMES
    assert ma.measure_clip(blank) == ma.ClipMeasurement(ma.NONE, ma.NONE, None, 0)
    assert ma.measure_clip([frames[0], *blank[1:]]).motion == ma.NONE  # one frame shows no motion
    assert ma.centroid_travel([(0.2, 0.5), None, (0.4, 0.45), (0.5, 0.425)]) == pytest.approx((0.3, -0.075))
    assert ma.classify_motion((0.3, -0.2)) == "right" and ma.classify_motion((0.1, -0.3)) == "up"


def test_clip_accuracy_counts_the_clips_whose_motion_matches_its_prompt(tmp_path, moving):
    names = list(ma.MOTIONS)
    off = [i % 4 == 0 for i in range(len(moving))]  # every fourth prompt names the next motion
    captions = [f"a {c} circle {_PHRASES[names[(names.index(m) + 1) % 5] if o else m]}"
                for (c, m, _, _), o in zip(moving, off)]
    captions[1] = "a green circle"  # no motion named: left out of the motion score, not of the colour score
    report = ma.measure_clips(_write_predictions(tmp_path / "pred", [_strip(f) for _, _, f, _ in moving], captions),
                              CLIP_FRAMES)
    motion = report["motion"]
    scored = [o for i, o in enumerate(off) if i != 1]
    assert motion["n"] == len(moving) - 1 and report["colour"]["n"] == len(moving)
    assert motion["accuracy"] == pytest.approx(scored.count(False) / len(scored))
    assert sum(motion["correct"].values()) == scored.count(False)
    for (c, m, _, _), o, caption in zip(moving, off, captions):
        if o:
            assert motion["confusion"][ma.prompted_motion(caption)][m] >= 1
    assert motion["prompted"] == dict(Counter(filter(None, map(ma.prompted_motion, captions))))
    json.dumps(report)  # serialisable as written by --out


def test_cli_measures_clips_and_refuses_what_it_cannot_read(tmp_path, moving, capsys):
    folder = _write_predictions(tmp_path / "pred", [_strip(f) for _, _, f, _ in moving[:10]], [c for *_, c in moving[:10]])
    ma.main([str(folder), "--frames", str(CLIP_FRAMES), "--out", str(tmp_path / "report.json")])
    printed = capsys.readouterr().out
    assert f"10 clips of {CLIP_FRAMES} frames in" in printed
    assert "motion: accuracy 1.000 over 10 prompts (chance: uniform 0.200" in printed and "colour: accuracy 1.000" in printed
    assert json.loads((tmp_path / "report.json").read_text())["motion"]["accuracy"] == 1.0
    with pytest.raises(ValueError, match=r"000000.png: 384 px wide, not a strip of --frames 5 equal frames"):
        ma.main([str(folder), "--frames", "5"])
    gif = _write_predictions(tmp_path / "gif", [moving[0][2]], [moving[0][3]])
    with pytest.raises(ValueError, match=r"000000.gif: a GIF of 8 frames over \d+ ms, not --frames 3"):
        ma.main([str(gif), "--frames", "3"])
    still = _write_predictions(tmp_path / "still", [_clip(COLOURS["red"], "still")], ["a red circle staying still"])
    assert Image.open(still / "000000.gif").n_frames == 1  # PIL writes eight identical frames as one lasting eight
    assert len(clip_frames(still / "000000.gif", CLIP_FRAMES)) == CLIP_FRAMES
    for argv in ([str(folder), "--frames", "8", "--position"], [str(folder), "--frames", "1"]):
        with pytest.raises(SystemExit):
            ma.main(argv)
