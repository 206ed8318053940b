"""Small encoded clips for the video data and make_shards tests: frames that say their number, WebM, a broken mp4."""

from __future__ import annotations

import io

import av
import numpy as np

FPS = 8
STEP, FIRST = 15, 10  # frame t's red level: FIRST + STEP * t


def frames(count: int, height: int = 16, width: int = 24) -> np.ndarray:
    """(T, H, W, 3) uint8: red says the frame's number, green its column, blue its row (so a crop shows)."""
    out = np.empty((count, height, width, 3), np.uint8)
    out[..., 0] = (FIRST + STEP * np.arange(count))[:, None, None]
    out[..., 1] = np.linspace(0, 255, width).round()[None, None, :]
    out[..., 2] = np.linspace(0, 255, height).round()[None, :, None]
    return out


def webm(pixels: np.ndarray) -> bytes:
    """VP8 in WebM: a container that records no frame count (the decoder counts its packets)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="webm") as container:
        stream = container.add_stream("libvpx", rate=FPS, options={"crf": "4", "b": "2M"})
        stream.width, stream.height, stream.pix_fmt = pixels.shape[2], pixels.shape[1], "yuv420p"
        for frame in pixels:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def zero_frame_mp4() -> bytes:
    """An mp4 whose video track never got a frame."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width = stream.height = 16
        container.start_encoding()
    return buffer.getvalue()
