"""Write small WebDataset shards with chosen contents for data tests."""

from __future__ import annotations

import io
from pathlib import Path

import webdataset as wds
from PIL import Image


def jpeg_bytes(colour: tuple[int, int, int], size: tuple[int, int] = (40, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_shards(folder: Path, counts: list[int], size: tuple[int, int] = (40, 32)) -> list[str]:
    """Shards with counts[i] samples each; sample n has caption 'sample n', cls n % 5, a seg map."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, n = [], 0
    for i, count in enumerate(counts):
        path = folder / f"shard-{i:04d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for _ in range(count):
                seg = io.BytesIO()
                Image.new("L", size, n % 5).save(seg, format="PNG")
                sink.write({
                    "__key__": f"{n:06d}",
                    "jpg": jpeg_bytes((n % 256, 40, 200), size),
                    "txt": f"sample {n}",
                    "cls": str(n % 5),
                    "seg.png": seg.getvalue(),
                })
                n += 1
        paths.append(str(path))
    return paths
