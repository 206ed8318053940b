"""Feature extractors for FID/KID and the on-disk cache of reference statistics.

An extractor is any ``nn.Module`` mapping (B, 3, H, W) images in [-1, 1] to (B, D) features;
``InceptionFeatures`` is the standard one, others (a tiny random net in tests) plug in the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

from ldm.metrics.fid import feature_stats


def default_inception_weights() -> Path:
    """Where torch-fidelity keeps its downloaded Inception weights (the torch hub checkpoint cache)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(URL_INCEPTION_V3)


class InceptionFeatures(nn.Module):
    """The 2048-d pool features of the TF-ported Inception-v3 that defines FID (torch-fidelity's).

    ``weights`` is a local copy of torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``;
    None looks for it in torch-fidelity's download cache and never downloads.
    """

    def __init__(self, weights: str | None = None) -> None:
        super().__init__()
        path = Path(weights) if weights is not None else default_inception_weights()
        if not path.is_file():
            raise FileNotFoundError(
                f"no FID Inception weights at {path}: pass a local path to {os.path.basename(URL_INCEPTION_V3)} "
                f"(from {URL_INCEPTION_V3}), or place it in torch-fidelity's cache {default_inception_weights()}"
            )
        # torch-fidelity unpickles without weights_only; refuse anything that is not plain tensors first.
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))

    def train(self, mode: bool = True) -> InceptionFeatures:
        """Set the mode as usual, but the frozen network stays in eval mode."""
        super().train(mode)
        self.net.eval()
        return self

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        pixels = images.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)  # (B, 3, H, W), as decoded files
        return self.net(pixels)[0]  # (B, 2048)


@torch.no_grad()
def extract_features(images: Iterable[Tensor], extractor: nn.Module) -> Tensor:
    """(N, D) float32 features, on the CPU, of batches of (B, 3, H, W) images in [-1, 1]."""
    device = next(extractor.parameters(), torch.empty(0)).device
    features = [extractor(batch.to(device)).float().cpu() for batch in images]  # [(B, D)]
    if not features:
        raise ValueError("no images to extract features from")
    return torch.cat(features)  # (N, D)


def _stats_path(cache_dir: str, key: Mapping[str, object]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return Path(cache_dir) / f"refstats-{digest}.safetensors"


def load_cached_stats(cache_dir: str, key: Mapping[str, object]) -> tuple[Tensor, Tensor, int] | None:
    """The (mu, sigma, count) cached under ``key``, or None."""
    path = _stats_path(cache_dir, key)
    if not path.is_file():
        return None
    stored = load_file(path)
    return stored["mu"], stored["sigma"], int(stored["count"])


def save_cached_stats(cache_dir: str, key: Mapping[str, object], mu: Tensor, sigma: Tensor, count: int) -> None:
    """Cache (mu, sigma, count) under ``key``; written atomically, so readers never see a torn file."""
    path = _stats_path(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    tensors = {"mu": mu.contiguous(), "sigma": sigma.contiguous(), "count": torch.tensor(count)}
    save_file(tensors, partial, metadata={"key": json.dumps(key, sort_keys=True, default=str)})
    os.replace(partial, path)


def reference_stats(
    images: Iterable[Tensor], extractor: nn.Module, cache_dir: str, key: Mapping[str, object]
) -> tuple[Tensor, Tensor, int]:
    """FID statistics (mu, sigma, count) of a reference set, computed once and cached on disk.

    The file name hashes ``key``, which must name everything the statistics depend on (data,
    split, resolution, count, extractor); ``images`` is iterated only when no file matches.
    """
    cached = load_cached_stats(cache_dir, key)
    if cached is not None:
        return cached
    features = extract_features(images, extractor)  # (N, D)
    mu, sigma = feature_stats(features)
    save_cached_stats(cache_dir, key, mu, sigma, len(features))
    return mu, sigma, len(features)
