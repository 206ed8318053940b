"""Class labels as a learned global vector."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ldm.conditioning.embedder import Embedder
from ldm.data import batch as B


class ClassEmbedder(Embedder):
    """A table of ``num_classes`` learned vectors plus one for "no class" (DiT's LabelEmbedder).

    Reads integer labels (B,) in [0, num_classes); the extra last row is the null class that
    classifier-free guidance drops to, so the unconditional model is learned alongside.
    """

    def __init__(self, num_classes: int, dim: int, key: str = B.LABEL, drop_rate: float = 0.1) -> None:
        super().__init__((key,), "vector", dim, drop_rate)
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes + 1, dim)  # row num_classes: the null class

    def forward(self, batch: Mapping[str, Any], latent_size: tuple[int, int]) -> Tensor:
        labels = torch.as_tensor(batch[self.keys[0]], device=self.embedding.weight.device).long()  # (B,)
        return self.embedding(labels)  # (B, D)

    def null(self, batch: Mapping[str, Any], latent_size: tuple[int, int]) -> Tensor:
        return self.embedding.weight[-1].expand(len(batch[self.keys[0]]), -1)  # (B, D)
