"""The conditioning a backbone receives, as one typed value (no routing by tensor rank)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class Conditioning:
    """What the embedders produce for a batch; any field may be absent."""

    crossattn: Tensor | None = None  # (B, L, D) tokens for cross-attention
    vector: Tensor | None = None  # (B, D) global conditioning added to the time embedding
    concat: Tensor | None = None  # (B, C, h, w) maps stacked on the latent's channels

    def merge(self, other: Conditioning) -> Conditioning:
        """Join two embedders' outputs along features: tokens on D, vectors on D, maps on C."""
        dims = {"crossattn": -1, "vector": 1, "concat": 1}
        out = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            out[f.name] = a if b is None else b if a is None else torch.cat([a, b], dims[f.name])
        return Conditioning(**out)

    def cat_batch(self, other: Conditioning) -> Conditioning:
        """Stack two conditionings along the batch (classifier-free guidance's doubled batch)."""
        return Conditioning(
            **{f.name: None if getattr(self, f.name) is None else torch.cat([getattr(self, f.name), getattr(other, f.name)])
               for f in fields(self)}
        )
