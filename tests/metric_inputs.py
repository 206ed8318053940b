"""Inputs and direct computations shared by the metric tests: random and CIFAR-10 image folders, a random-weight
Inception file in torch-fidelity's format, FID computed exactly."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

from tests.assets import asset


def exact_fid(x, y) -> float:
    """FID from centred features: tr((S1 S2)^1/2) is the nuclear norm of A B.T / sqrt((n1-1)(n2-1))."""
    a, b = x - x.mean(0), y - y.mean(0)
    tr_covmean = torch.linalg.svdvals(a @ b.T).sum() / ((len(x) - 1) * (len(y) - 1)) ** 0.5
    diff = x.mean(0) - y.mean(0)
    return float(diff @ diff + a.square().sum() / (len(x) - 1) + b.square().sum() / (len(y) - 1) - 2 * tr_covmean)


def write_images(folder: Path, seed: int, n: int, size: int = 16, captions: bool = False) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / ("sub" if i % 2 else "") / f"{i:03d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        if captions:
            path.with_suffix(".txt").write_text(f"image number {i}\n")
        paths.append(path)
    return sorted(paths)


def as_tensor(paths: list[Path]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in paths])


def random_inception_file(path: Path, features: tuple[str, ...] = ("2048",)) -> nn.Module:
    """torch-fidelity's Inception with random weights (seed 0) giving ``features``, its state dict saved to ``path``."""
    with pytest.MonkeyPatch.context() as mp, torch.random.fork_rng(devices=[]):
        mp.setattr(tf_inception, "load_state_dict_from_url", lambda *args, **kwargs: None)
        mp.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *args, **kwargs: None)
        torch.manual_seed(0)
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", list(features))
    torch.save(net.state_dict(), path)
    return net


def cifar_folder(folder: Path, members: list[str]) -> Path:
    """Write CIFAR-10 test images of the shared archive (``test/<class>/NNNN.jpg``) as PNGs into ``folder``."""
    archive = asset("cifar10/cifar10-jpg.tar.gz", "test_inception_features_load_the_weights_and_see_uint8_pixels")
    folder.mkdir(parents=True)
    wanted = set(members)
    with tarfile.open(archive) as tar:
        for member in tar:
            if member.name in wanted:
                Image.open(tar.extractfile(member)).convert("RGB").save(folder / f"{Path(member.name).stem}.png")
                wanted.remove(member.name)
            if not wanted:
                return folder
    raise FileNotFoundError(f"{archive} lacks {sorted(wanted)[:3]}")
