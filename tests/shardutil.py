"""Write small WebDataset shards with chosen contents for data tests."""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image


def jpeg_bytes(colour: tuple[int, int, int], size: tuple[int, int] = (40, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def sample(n: int, size: tuple[int, int] = (40, 32)) -> dict[str, Any]:
    """Sample n of `write_shards`: caption 'sample n', cls n % 5, a seg map of class n % 5, all (W, H) = size."""
    return {
        "__key__": f"{n:06d}",
        "jpg": jpeg_bytes((n % 256, 40, 200), size),
        "txt": f"sample {n}",
        "cls": str(n % 5),
        "seg.png": png_bytes(Image.new("L", size, n % 5)),
    }


def write_tar(path: Path, samples: Iterable[dict[str, Any]]) -> str:
    with wds.TarWriter(str(path)) as sink:
        for item in samples:
            sink.write(item)
    return str(path)


def write_shards(folder: Path, counts: list[int], size: tuple[int, int] | list[tuple[int, int]] = (40, 32)) -> list[str]:
    """Shards with counts[i] samples each, numbered on across shards (see `sample`); with a list of sizes,
    sample n is of size[n * 7 % len(size)] (mixed aspect ratios)."""
    folder.mkdir(parents=True, exist_ok=True)
    starts = [sum(counts[:i]) for i in range(len(counts))]
    sizes = size if isinstance(size, list) else [size]
    return [write_tar(folder / f"shard-{i:04d}.tar", (sample(n, sizes[n * 7 % len(sizes)]) for n in range(start, start + count)))
            for i, (start, count) in enumerate(zip(starts, counts))]
