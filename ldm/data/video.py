"""Video shards: clips of T frames at a frame stride, from a video entry or a sequence of frame images.

A video sample is a WebDataset sample with either one video entry (``ldm.data.entries.VIDEO_EXTENSIONS``:
the file's bytes as they are, decoded with PyAV, whose wheel bundles its own FFmpeg) or frame images
``000.jpg``, ``001.jpg``, ... (tar members ``<key>.000.jpg``: webdataset cuts the key at the first dot, so
each frame is one entry; ``entries.frame_entry``), with its caption as for images (txt / json / cls). Its json
gives ``width``/``height`` (what a bucketed epoch plans with, as for images) and ``fps`` (a frame sequence's
only frame rate); tools/make_shards.py and the synthetic moving shapes write both.

``VideoClips`` is the shard format a run names in ``WebDataModule(formats=[...])``; its ``VideoDecoder`` samples
a clip's frames (a random start under a random crop, i.e. in training; the first T frames under the center crop
of evaluation), decodes only those (and, of an encoded video, the frames before them, stopping at the last),
and crops, resizes and flips every frame alike with the image decoder's geometry.
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
import numpy as np
import torch
from PIL import Image, ImageSequence
from webdataset.handlers import ignore_and_stop
from webdataset.tariterators import tarfile_samples

from ldm.data import batch as B
from ldm.data import entries as E
from ldm.data.buckets import Size
from ldm.data.decoder import SkipSample
from ldm.data.formats import ShardFormat
from ldm.data.images import (
    ImageDecoder,
    map_tensor,
    open_image,
    read_json,
    sample_annotations,
)

# libx264 (at 4:4:4): colours of small shapes survive within a few levels; without the macroblock tree, whose
# lookahead made one encode in ~50 of tiny clips differ from the next (same frames, other bytes)
MP4_OPTIONS = {"crf": "10", "preset": "medium", "x264-params": "mbtree=0"}


@dataclass(frozen=True)
class VideoInfo:
    """What sampling a clip needs before decoding it: its frame size, rate and count."""

    width: int
    height: int
    fps: float
    num_frames: int

    @property
    def size(self) -> Size:
        return self.height, self.width


@contextmanager
def _video_stream(data: bytes, entry: str) -> Iterator[av.VideoStream]:
    """The first video stream of encoded video bytes; bad data (here or in the block's decoding) raises SkipSample."""
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise SkipSample(f"no video frames in {entry}")
            stream = container.streams.video[0]
            stream.thread_count = 1  # the loader's workers decode samples in parallel
            yield stream
    except SkipSample:
        raise
    except Exception as err:  # noqa: BLE001 - PyAV raises FFmpegError kinds (ValueErrors), IndexError, EOFError...
        raise SkipSample(f"undecodable {entry}: {type(err).__name__}") from None


class EncodedVideo:
    """A video entry (mp4, webm, ...): its header read on construction, its frames decoded on demand."""

    def __init__(self, data: bytes, entry: str) -> None:
        self.data, self.entry = data, entry
        with _video_stream(data, entry) as stream:
            rate = stream.average_rate or stream.guessed_rate
            # a container that records no count (webm, often): its packets counted, nothing decoded
            count = stream.frames or sum(1 for packet in stream.container.demux(stream) if packet.size)
            size = stream.codec_context.width, stream.codec_context.height
        if not count:
            raise SkipSample(f"no video frames in {entry}")
        if not rate or not all(size):
            raise SkipSample(f"no frame {'rate' if not rate else 'size'} in {entry}")
        self.info = VideoInfo(*size, float(rate), count)

    def read(self, indices: Sequence[int]) -> list[Image.Image]:
        """Frames ``indices`` (increasing) as RGB images; decoding stops at the last of them."""
        wanted, frames = set(indices), []
        with _video_stream(self.data, self.entry) as stream:
            for index, frame in enumerate(stream.container.decode(stream)):
                if index in wanted:
                    frames.append(frame.to_image())
                if index == indices[-1]:
                    return frames
        raise SkipSample(f"{self.entry} ends before its recorded frame count")


class FrameSequence:
    """Frame images ``000.jpg``, ``001.jpg``, ... of one sample, the first one's header read on construction; JPEG
    frames decode at the smallest scale whose short side covers ``min_side``."""

    def __init__(self, raw: dict[str, Any], entries: list[str], min_side: int | None = None) -> None:
        self.raw, self.entries, self.min_side = raw, entries, min_side
        fps = read_json(raw).get(E.FPS)
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or fps <= 0:
            raise SkipSample("frame sequence without a json fps")
        try:
            width, height = Image.open(io.BytesIO(raw[entries[0]])).size  # the header only
        except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ... on bad data
            raise SkipSample(f"undecodable {entries[0].partition('.')[2]} frame: {type(err).__name__}") from None
        self.info = VideoInfo(width, height, float(fps), len(entries))

    def read(self, indices: Sequence[int]) -> list[Image.Image]:
        """Frames ``indices`` as RGB images."""
        frames = []
        for i in indices:
            image, original = open_image(self.raw[self.entries[i]], self.entries[i].partition(".")[2] + " frame", "RGB", self.min_side)
            if original != self.info.size:
                raise SkipSample("frames of different sizes")
            frames.append(image)
        return frames


def open_clip(raw: dict[str, Any], min_side: int | None = None) -> EncodedVideo | FrameSequence:
    """The video of a raw sample: its first video entry, else its frame images (JPEGs decoded down to ``min_side``);
    SkipSample without either."""
    entry = next((k for k in E.VIDEO_EXTENSIONS if k in raw), None)
    if entry is not None:
        return EncodedVideo(raw[entry], entry)
    frames = sorted((k for k in raw if E.frame_index(k) is not None), key=E.frame_index)
    if not frames:
        raise SkipSample("no video entry")
    return FrameSequence(raw, frames, min_side)


def is_video_sample(raw: dict[str, Any]) -> bool:
    """Whether a raw sample carries a video entry or frame images."""
    return any(k in E.VIDEO_EXTENSIONS or E.frame_index(k) is not None for k in raw)


def check_video(data: bytes, entry: str) -> VideoInfo:
    """The header's size, frame rate and count of encoded video bytes, with the first frame decoded to prove the
    data (tools/make_shards.py stores files by this); bad data raises SkipSample."""
    video = EncodedVideo(data, entry)
    video.read([0])
    return video.info


def encode_mp4(frames: np.ndarray, fps: int) -> bytes:
    """(T, H, W, 3) uint8 frames as an H.264 mp4 at 4:4:4 (no chroma subsampling: small coloured shapes keep their
    colour); the same frames give the same bytes."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps), options=MP4_OPTIONS)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv444p"
        stream.thread_count = 1  # one thread: deterministic bytes
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


@dataclass(frozen=True)
class VideoDecoder:
    """Decodes a video sample into a clip ``image`` (3, T, H, W) in [-1, 1] with its annotations, size and crop
    fields as an image's, its ``fps`` (the source's / the stride) and its source's ``num_frames``.

    T frames ``stride`` apart (with ``fps``, the stride nearest the source's rate / fps, at least 1); the start is
    drawn from ``rng`` when ``images`` crops at random (training), else the first frame (evaluation). Every frame
    gets the same resize, crop and flip: ``images``'s geometry, its bucket chosen by the frame size."""

    images: ImageDecoder  # the split's resolution, crop, flips, required annotations and buckets
    frames: int = 8
    stride: int = 1
    fps: float | None = None

    @property
    def buckets(self) -> tuple[Size, ...] | None:
        return self.images.buckets

    def __call__(self, raw: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        out: dict[str, Any] = {B.KEY: raw.get("__key__", ""), **sample_annotations(raw)}
        for key in self.images.require:
            if out.get(key) in (None, ""):
                raise SkipSample(f"no {key}")
        images = self.images
        largest = images.resolution if images.buckets is None else max(map(max, images.buckets))  # covers any target
        clip = open_clip(raw, largest)
        info = clip.info
        stride = self.stride if self.fps is None else max(1, round(info.fps / self.fps))
        span = (self.frames - 1) * stride + 1  # source frames the clip covers
        if info.num_frames < span:
            raise SkipSample(f"video shorter than {self.frames} frames at stride {stride}")
        start = rng.randint(0, info.num_frames - span) if images.crop == "random" else 0
        frames = clip.read(range(start, start + span, stride))
        target = images.target(info.size)
        crop = images.crop_for(frames[0].size, target, rng)
        out[B.IMAGE] = torch.stack([map_tensor(frame, crop, "image") for frame in frames], dim=1)  # (3, T, H, W)
        out[B.ORIGINAL_SIZE] = torch.tensor(info.size)
        out[B.CROP_COORDS] = torch.tensor([crop.top, crop.left])
        if images.buckets is not None:
            out[B.TARGET_SIZE] = torch.tensor(target)
        out[B.FPS] = torch.tensor(info.fps / stride, dtype=torch.float32)
        out[B.NUM_FRAMES] = torch.tensor(info.num_frames, dtype=torch.int64)
        return out


class VideoClips(ShardFormat):
    """Video shards: recognised by their first sample's video entry or frame images, read by a ``VideoDecoder``
    with the split's image settings. Name it in the data part to train on clips:
    ``formats: [{class_path: ldm.data.video.VideoClips, init_args: {frames: 8, stride: 1}}]``."""

    def __init__(self, frames: int = 8, stride: int = 1, fps: float | None = None) -> None:
        """``frames`` per clip (T), ``stride`` between them; or ``fps``: the stride nearest each video's rate / fps."""
        if frames < 1 or stride < 1 or (fps is not None and fps <= 0):
            raise ValueError(f"data.init_args.formats: VideoClips needs frames >= 1, stride >= 1 and fps > 0 (or null), "
                             f"got frames={frames}, stride={stride}, fps={fps}")
        self.frames, self.stride, self.fps = frames, stride, fps

    def recognises(self, urls: Sequence[str]) -> bool:
        first = next(iter(tarfile_samples([{"url": urls[0]}], handler=ignore_and_stop)), {}) if urls else {}
        return is_video_sample(first)

    def decoder(self, images: ImageDecoder) -> VideoDecoder:
        if images.extra_keys:
            raise ValueError(f"data.init_args.extra_keys {sorted(images.extra_keys)}: video shards carry no extra maps")
        return VideoDecoder(images, self.frames, self.stride, self.fps)


def clip_frames(path: str | os.PathLike[str], frames: int) -> list[Image.Image]:
    """The ``frames`` RGB frames of a clip saved as an image: a GIF of that many frames, or a strip of that many
    equal frames side by side (``ldm predict``'s PNGs, ldm.callbacks.images.frame_strips); anything else is a
    ValueError naming the file.

    A GIF writer (PIL's) stores a run of identical frames as one frame lasting the run, so each GIF frame counts
    for its share of the clip's duration (a still clip may be one frame).
    """
    with Image.open(path) as image:
        if image.format == "GIF":
            held = [(frame.convert("RGB"), frame.info.get("duration", 0)) for frame in ImageSequence.Iterator(image)]
            total = sum(duration for _, duration in held)
            repeats = [round(duration * frames / total) for _, duration in held] if total else [1] * len(held)
            if sum(repeats) != frames:
                raise ValueError(f"{path}: a GIF of {len(held)} frames over {total} ms, not --frames {frames}")
            return [frame for (frame, _), k in zip(held, repeats) for _ in range(k)]
        if image.width % frames:
            raise ValueError(f"{path}: {image.width} px wide, not a strip of --frames {frames} equal frames in a row")
        width, rgb = image.width // frames, image.convert("RGB")
        return [rgb.crop((i * width, 0, (i + 1) * width, image.height)) for i in range(frames)]
