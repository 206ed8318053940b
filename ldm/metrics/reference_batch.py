"""ADM-style reference batches (guided-diffusion's ``evaluations/``, e.g. ``VIRTUAL_imagenet256_labeled.npz``),
read as they are so that figures compare with published ones, and written from our own data.

The ``.npz`` holds ``arr_0``, the images as (N, H, W, 3) uint8, and optionally ``mu`` / ``sigma``, the mean and
covariance of their pool3 features, and ``mu_s`` / ``sigma_s``, those of the spatial sFID features; ADM's
evaluator uses the statistics where present (FID, sFID) and the images' own features otherwise (and always for
precision and recall). ``arr_0`` is streamed in batches, so a 50k-image batch never sits in memory whole.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np
import torch
from torch import Tensor

from ldm.metrics.statistics import FeatureSet

IMAGES = "arr_0"
STATISTICS = {"pool3": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}  # feature kind -> its arrays' names


def is_reference_batch(source: str | os.PathLike[str]) -> bool:
    """Whether an image source names an ADM-style ``.npz`` batch (rather than a folder or shards)."""
    return str(source).endswith(".npz")


@contextmanager
def _member(path: str | os.PathLike[str], name: str) -> Iterator[tuple[IO[bytes], tuple[int, ...], np.dtype]]:
    """The open ``name.npy`` of an ``.npz``, positioned at its data, with its shape and dtype."""
    with zipfile.ZipFile(path) as archive:
        if f"{name}.npy" not in archive.namelist():
            raise ValueError(f"{path}: no {name} in this .npz (an ADM reference batch holds its images as {IMAGES})")
        with archive.open(f"{name}.npy") as f:
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(np.lib.format.read_magic(f))
            if read_header is None:
                raise ValueError(f"{path}: {name} is in an .npy format version other than 1.0 and 2.0")
            shape, fortran, dtype = read_header(f)
            if fortran or dtype.hasobject:
                raise ValueError(f"{path}: {name} is not a C-ordered array of numbers")
            yield f, shape, dtype


def image_count(path: str | os.PathLike[str]) -> int:
    """How many images ``arr_0`` holds (from its header alone)."""
    with _member(path, IMAGES) as (_, shape, _dtype):
        return shape[0]


def read_images(path: str | os.PathLike[str], batch_size: int) -> Iterator[Tensor]:
    """``arr_0`` as (B, 3, H, W) batches in [-1, 1], streamed from the file."""
    with _member(path, IMAGES) as (f, shape, dtype):
        if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
            raise ValueError(f"{path}: {IMAGES} is {dtype} {shape}, expected uint8 images (N, H, W, 3)")
        size = int(np.prod(shape[1:]))
        for start in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - start)
            data = f.read(n * size)
            if len(data) != n * size:
                raise ValueError(f"{path}: {IMAGES} ends after {start} of {shape[0]} images")
            pixels = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(n, *shape[1:])  # (B, H, W, 3)
            yield pixels.permute(0, 3, 1, 2).float().div(127.5).sub(1)  # (B, 3, H, W)


def read_statistics(path: str | os.PathLike[str]) -> dict[str, tuple[Tensor, Tensor]]:
    """The published (mean, covariance) in float64 by feature kind, of the kinds whose arrays the file holds."""
    with np.load(path) as stored:
        return {kind: (torch.from_numpy(stored[mu]).double(), torch.from_numpy(stored[sigma]).double())
                for kind, (mu, sigma) in STATISTICS.items() if mu in stored and sigma in stored}


def write_reference_batch(path: str | os.PathLike[str], images: Iterable[Tensor],
                          extractor: Callable[[Tensor], Mapping[str, Tensor]]) -> int:
    """Write (B, 3, H, W) batches in [-1, 1] as ``arr_0`` (8 bits, streamed through a temporary file) with the
    mean and covariance of their features of each kind of ``STATISTICS`` under ``extractor`` (Inception's, for
    ADM's evaluator to read); returns the count of images."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count, shape, sets = 0, None, {kind: FeatureSet() for kind in STATISTICS}
    with tempfile.TemporaryFile(dir=path.parent) as raw:
        for batch in images:
            features = extractor(batch)
            for kind, feature_set in sets.items():
                feature_set.add(features[kind])
            pixels = batch.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()  # (B, H, W, 3)
            if shape not in (None, pixels.shape[1:]):
                raise ValueError(f"{path}: images of sizes {tuple(shape)} and {tuple(pixels.shape[1:])} in one batch")
            shape, count = pixels.shape[1:], count + len(pixels)
            raw.write(pixels.contiguous().numpy().tobytes())
        if not count:
            raise ValueError(f"{path}: no images to write")
        raw.seek(0)
        partial = path.with_suffix(f".partial{os.getpid()}")
        with zipfile.ZipFile(partial, "w") as archive:
            with archive.open(f"{IMAGES}.npy", "w", force_zip64=True) as f:
                header = {"descr": "|u1", "fortran_order": False, "shape": (count, *shape)}
                np.lib.format.write_array_header_2_0(f, header)
                shutil.copyfileobj(raw, f)
            for kind, feature_set in sets.items():
                for name, array in zip(STATISTICS[kind], feature_set.mu_sigma()):
                    with archive.open(f"{name}.npy", "w") as f:
                        np.lib.format.write_array(f, array.double().cpu().numpy())
    os.replace(partial, path)
    return count
