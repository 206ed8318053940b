"""Tiny stand-ins for pretrained evaluation networks, nameable by class_path from YAML in CLI tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TinyFeatures(nn.Module):
    """A small random conv net standing in for Inception (B, 3, H, W) -> (B, 8); counts the images it sees."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.images_seen = 0

    def forward(self, images: Tensor) -> Tensor:
        self.images_seen += len(images)
        return self.net(images)  # (B, 8)
