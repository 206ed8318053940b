"""Every weights loader fails the same way: a WeightsError whose message names the file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ldm.autoencoder.lpips import build_lpips
from ldm.autoencoder.vae import VAE
from ldm.autoencoder.weights import load_vae_weights
from ldm.backbones.dit import DiT
from ldm.backbones.unet import UNet
from ldm.conditioning.conditioner import Conditioner
from ldm.conditioning.open_clip import create_clip
from ldm.diffusion.init_weights import load_init_weights
from ldm.metrics.features import InceptionFeatures
from ldm.weights.io import WeightsError
from tests.backbones import TINY
from tests.tiny_clip import register_tiny_clip

TINY_CLIP = "ldm-io-tiny-clip"
LOADERS: dict[str, Callable[[str], object]] = {
    "vae": lambda path: load_vae_weights(VAE(base_channels=8, channel_mult=(1,), num_res_blocks=1, latent_channels=4,
                                             norm_groups=4), path),
    "unet": lambda path: load_init_weights(UNet(4, 4, None, None, **TINY), Conditioner([]), path),
    "dit": lambda path: load_init_weights(DiT(4, 4, None, None, width=32, depth=1, num_heads=2), Conditioner([]),
                                              path),
    "lpips": lambda path: build_lpips("alex", path),
    "inception": InceptionFeatures,
    "open_clip": lambda path: create_clip(TINY_CLIP, path, "pretrained"),
}
FILES: dict[str, Callable[[Path], None]] = {
    "missing": lambda path: None,
    "not-weights": lambda path: path.write_bytes(b"not a weights file"),
    "wrong-keys": lambda path: torch.save({"unrelated.weight": torch.zeros(2)}, path),
}


@pytest.fixture(scope="module", autouse=True)
def tiny_clip_architecture(tmp_path_factory: pytest.TempPathFactory) -> None:
    register_tiny_clip(tmp_path_factory.mktemp("open_clip"), TINY_CLIP)


@pytest.mark.parametrize("file", list(FILES))
@pytest.mark.parametrize("loader", list(LOADERS))
def test_every_loader_names_the_file(loader: str, file: str, tmp_path: Path, offline) -> None:
    path = tmp_path / f"{file}.pt"
    FILES[file](path)
    with pytest.raises(WeightsError) as error:
        LOADERS[loader](str(path))
    assert str(path) in str(error.value)
