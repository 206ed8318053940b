"""Video shards (ldm.data.video): clips from mp4/webm entries and frame sequences, stride and temporal crop, one
spatial crop for every frame, buckets, bad clips skipped and counted through a real WebDataModule run."""

from __future__ import annotations

import io
import itertools
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser
from PIL import Image

from ldm.data import batch as B
from ldm.data import entries as E
from ldm.data.buckets import AspectBuckets, nearest
from ldm.data.datamodule import WebDataModule
from ldm.data.decoder import SkipSample
from ldm.data.images import ImageDecoder
from ldm.data.stream import EpochLoader, ShardStream
from ldm.data.synthetic import write_shapes
from ldm.data.video import VideoClips, VideoDecoder, encode_mp4
from tests.shardutil import write_shards, write_tar
from tests.video_samples import FIRST, FPS, STEP, frames, webm, zero_frame_mp4


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def clip_sample(key: str, pixels: np.ndarray, kind: str, caption: str = "a clip") -> dict:
    """A raw sample of ``pixels`` stored as an mp4 or webm entry, or as png frame images."""
    if kind == "png":
        media = {E.frame_entry(t, "png"): png(frame) for t, frame in enumerate(pixels)}
    else:
        media = {kind: encode_mp4(pixels, FPS) if kind == "mp4" else webm(pixels)}
    meta = {E.WIDTH: pixels.shape[2], E.HEIGHT: pixels.shape[1], E.FPS: FPS}
    return {"__key__": key, **media, E.TXT: caption.encode(), E.JSON: json.dumps(meta).encode()}


@pytest.fixture(scope="module")
def clips() -> dict[str, dict]:
    """A 16-frame clip of 24x16 pixels stored each way."""
    return {kind: clip_sample(kind, frames(16), kind) for kind in ("mp4", "webm", "png")}


def numbers(clip: torch.Tensor) -> list[int]:
    """The frame numbers a decoded clip (3, T, H, W) shows in its red channel."""
    red = (clip[0].mean((1, 2)) + 1) * 127.5  # (T,)
    return [round((level - FIRST) / STEP) for level in red.tolist()]


def decoder(frames: int, stride: int = 1, train: bool = False, **images) -> VideoDecoder:
    return VideoDecoder(ImageDecoder(**{"resolution": 16, **images}, crop="random" if train else "center",
                                     hflip=train), frames, stride)


@pytest.mark.parametrize("kind", ["mp4", "webm", "png"])
def test_clip_of_t_frames_at_the_stride(clips, kind) -> None:
    out = decoder(frames=4, stride=3)(clips[kind], random.Random(0))
    assert out[B.IMAGE].shape == (3, 4, 16, 16) and out[B.IMAGE].dtype == torch.float32
    assert -1 <= out[B.IMAGE].min() and out[B.IMAGE].max() <= 1
    assert numbers(out[B.IMAGE]) == [0, 3, 6, 9]  # evaluation: the first T frames at the stride
    assert out[B.FPS].dtype == torch.float32 and out[B.FPS].item() == pytest.approx(FPS / 3)
    assert out[B.NUM_FRAMES].dtype == torch.int64 and out[B.NUM_FRAMES].item() == 16
    assert out[B.ORIGINAL_SIZE].tolist() == [16, 24] and out[B.CROP_COORDS].tolist() == [0, 4]  # center crop
    assert out[B.CAPTION] == "a clip" and out[B.KEY] == kind
    exact = frames(16)[0, :, 4:20, 1:].transpose(2, 0, 1) / 127.5 - 1  # green and blue of the center crop
    error = np.abs(out[B.IMAGE][1:].numpy() - exact[:, None]).mean() * 127.5  # in levels
    assert error < {"png": 1e-4, "mp4": 2, "webm": 6}[kind]  # lossless frames; H.264 4:4:4; VP8 4:2:0

    at_fps = VideoDecoder(ImageDecoder(16, crop="center"), frames=3, fps=FPS / 2)(clips[kind], random.Random(0))
    assert numbers(at_fps[B.IMAGE]) == [0, 2, 4] and at_fps[B.FPS].item() == FPS / 2  # fps: stride 2


def test_training_draws_the_start_and_one_crop_for_every_frame(clips) -> None:
    starts, crops, flips = Counter(), set(), set()
    for seed in range(40):
        out = decoder(frames=4, stride=2, train=True, resolution=12)(clips["png"], random.Random(seed))
        clip = out[B.IMAGE]  # (3, T, 12, 12)
        shown = numbers(clip)
        assert shown == list(range(shown[0], shown[0] + 7, 2)) and 0 <= shown[0] <= 16 - 7  # within the clip
        starts[shown[0]] += 1
        assert torch.equal(clip[1:], clip[1:, :1].expand_as(clip[1:]))  # green, blue: one crop and flip for all frames
        crops.add(tuple(out[B.CROP_COORDS].tolist()))
        flips.add(bool(clip[1, 0, 0, 0] > clip[1, 0, 0, -1]))  # green falls to the right: flipped
        again = decoder(frames=4, stride=2, train=True, resolution=12)(clips["png"], random.Random(seed))
        assert torch.equal(again[B.IMAGE], clip)  # the sample's rng decides everything
    assert len(starts) >= 6  # random starts (0 to 9)
    assert len(crops) > 3 and flips == {True, False}


def test_buckets_go_by_the_frame_size(clips) -> None:
    buckets = AspectBuckets(max_ratio=2.0, multiple=4).sizes(16)
    out = decoder(frames=2, buckets=buckets)(clips["mp4"], random.Random(0))
    target = buckets[nearest(buckets, (16, 24))]
    assert target[1] > target[0] and out[B.TARGET_SIZE].tolist() == list(target)
    assert out[B.IMAGE].shape == (3, 2, *target)


def test_bad_clips_raise_skip_sample_with_their_reason(clips) -> None:
    good = clips["mp4"]
    no_fps = {**clips["png"], E.JSON: b"{}"}
    odd = {**clips["png"], E.frame_entry(3, "png"): png(frames(1, 8, 8)[0])}
    cases = {
        "video shorter than 6 frames at stride 3": clip_sample("short", frames(15), "mp4"),  # 16 frames needed
        "no video frames in mp4": {**good, "mp4": zero_frame_mp4()},
        "undecodable mp4: InvalidDataError": {**good, "mp4": b"not a video at all" * 8},
        "no video entry": {k: v for k, v in good.items() if k != "mp4"},
        "frame sequence without a json fps": no_fps,
        "frames of different sizes": odd,
    }
    for reason, raw in cases.items():
        with pytest.raises(SkipSample, match=f"^{reason}$"):
            decoder(frames=6, stride=3)(raw, random.Random(0))
    with pytest.raises(SkipSample, match="^undecodable mp4"):  # cut short: its index lost, or its frames
        decoder(frames=6, stride=3)({**good, "mp4": good["mp4"][: len(good["mp4"]) // 2]}, random.Random(0))
    assert decoder(frames=6, stride=3)(clip_sample("enough", frames(16), "mp4"), random.Random(0))[B.IMAGE].shape[1] == 6


def test_video_shards_through_the_data_module(tmp_path: Path) -> None:
    """The CLI's formats option names VideoClips; good clips come as (B, 3, T, H, W) batches with fps and num_frames,
    bad ones are skipped and counted; image shards of another split stay images."""
    good = [clip_sample(f"{n:04d}", frames(8 + n % 3), ("mp4", "png")[n % 2], f"clip {n}") for n in range(7)]
    short = clip_sample("0100", frames(3), "mp4", "too short")
    broken = {**good[0], "__key__": "0101", "mp4": b"\x00" * 64}
    write_tar(tmp_path / "clips-0.tar", good[:4] + [short])
    write_tar(tmp_path / "clips-1.tar", [broken] + good[4:])
    write_shards(tmp_path / "images", [3], size=(20, 16))
    parser = ArgumentParser()
    parser.add_subclass_arguments(WebDataModule, "data")
    args = parser.parse_args([
        "--data", "ldm.data.datamodule.WebDataModule", "--data.init_args.train", str(tmp_path / "clips-{0..1}.tar"),
        "--data.init_args.val", str(tmp_path / "images" / "shard-0000.tar"), "--data.init_args.batch_size", "3",
        "--data.init_args.num_workers", "0", "--data.init_args.resolution", "16", "--data.init_args.hflip", "true",
        "--data.init_args.formats", "[{class_path: ldm.data.video.VideoClips, init_args: {frames: 4, stride: 2}}]"])
    dm = parser.instantiate_classes(args).data
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert sorted(k for b in batches for k in b[B.KEY]) == [g["__key__"] for g in good]
    for batch in batches:
        n = len(batch[B.KEY])
        assert batch[B.IMAGE].shape == (n, 3, 4, 16, 16)
        assert batch[B.FPS].dtype == torch.float32 and batch[B.FPS].tolist() == [FPS / 2] * n
        expected = [8 + int(c.split()[1]) % 3 for c in batch[B.CAPTION]]
        assert batch[B.NUM_FRAMES].dtype == torch.int64 and batch[B.NUM_FRAMES].tolist() == expected
        for clip, count in zip(batch[B.IMAGE], expected):
            shown = numbers(clip)
            assert shown == list(range(shown[0], shown[0] + 7, 2)) and shown[-1] < count
    assert dm.skipped == {"video shorter than 4 frames at stride 2": 1, "undecodable mp4: InvalidDataError": 1}
    (val,) = list(dm.val_dataloader())
    assert val[B.IMAGE].shape == (3, 3, 16, 16) and B.FPS not in val


def test_bucketed_video_shards_plan_from_the_json_size(tmp_path: Path) -> None:
    wide, tall = frames(6, 16, 32), frames(6, 32, 16)
    write_tar(tmp_path / "clips.tar", [clip_sample(f"{n}", (wide, tall)[n % 2], "mp4") for n in range(6)])
    dm = WebDataModule(train=str(tmp_path / "clips.tar"), batch_size=2, num_workers=0, resolution=32,
                       buckets=AspectBuckets(max_ratio=2.0, multiple=8), formats=[VideoClips(frames=2)])
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert sorted(k for b in batches for k in b[B.KEY]) == [str(n) for n in range(6)] and not dm.skipped
    for batch in batches:
        assert batch[B.IMAGE].shape[1:] == (3, 2, *batch[B.TARGET_SIZE][0].tolist())
        wide = [int(k) % 2 == 0 for k in batch[B.KEY]]
        assert batch[B.TARGET_SIZE].tolist() == [[24, 48] if wide[0] else [48, 24]] * len(wide) and len(set(wide)) == 1


def test_video_clips_options_are_checked() -> None:
    with pytest.raises(ValueError, match="data.init_args.formats: VideoClips needs frames >= 1"):
        VideoClips(frames=0)
    with pytest.raises(ValueError, match="fps=0"):
        VideoClips(fps=0)
    with pytest.raises(ValueError, match=r"data.init_args.extra_keys \['seg.png'\]"):
        VideoClips().decoder(ImageDecoder(extra_keys={"seg.png": "class"}))


def test_a_video_loader_resumes_with_the_same_clips_and_two_ranks_read_each_clip_once(tmp_path: Path) -> None:
    """Moving-shapes mp4 shards with random temporal starts and crops: a loader restored mid-epoch yields the same
    clips (pixels, not only keys) as the uninterrupted one, and two ranks read every clip once per epoch."""
    write_shapes(tmp_path, train=11, val=0, test=0, size=16, frames=8, samples_per_shard=4)
    train = str(tmp_path / "train" / "shard-*.tar")

    def loader() -> EpochLoader:
        data = WebDataModule(train=train, batch_size=2, num_workers=0, resolution=16, shuffle_buffer=3, crop="random",
                             pin_memory=False, formats=[VideoClips(frames=4, stride=1)])
        data.setup("fit")
        return data.train_dataloader()

    reference = [(b[B.KEY], b[B.IMAGE]) for b in loader()]
    assert reference[0][1].shape[1:] == (3, 4, 16, 16)
    interrupted = loader()
    seen = [(b[B.KEY], b[B.IMAGE]) for b in itertools.islice(iter(interrupted), 2)]
    resumed = loader()
    resumed.load_state_dict(interrupted.state_dict())
    for (keys, clips), (want_keys, want) in zip([*seen, *((b[B.KEY], b[B.IMAGE]) for b in resumed)], reference,
                                                 strict=True):
        assert list(keys) == list(want_keys) and torch.equal(clips, want)

    urls = sorted(str(p) for p in (tmp_path / "train").glob("shard-*.tar"))
    video = VideoClips(frames=4).decoder(ImageDecoder(16))
    streams = [ShardStream(urls, video, 2, rank=rank, world_size=2) for rank in range(2)]
    read = [[key for batch in stream.batches(0) for key in batch[B.KEY]] for stream in streams]
    assert len(streams[0]) == len(streams[1])  # ranks in step
    everything = {key for keys, _ in reference for key in keys}
    assert len(everything) == 11 and set(read[0] + read[1]) == everything  # none lost
    assert len(read[0]) + len(read[1]) - 11 <= 1  # none repeated, but for one padding the odd rank out
