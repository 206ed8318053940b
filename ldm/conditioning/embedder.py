"""The interface every conditioning embedder implements."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from torch import Tensor, nn

Kind = Literal["crossattn", "vector", "concat"]  # the Conditioning field an embedder fills


class Embedder(nn.Module):
    """One conditioning signal: which batch entries it reads, which Conditioning field it fills.

    Attributes set by every subclass's constructor:
        keys: the batch keys it reads.
        kind: "crossattn" -> (B, L, dim) tokens, "vector" -> (B, dim), "concat" -> (B, dim, h, w).
        dim: D of its tokens or vector, C of its map.
        drop_rate: probability, per sample and per step, that training replaces its value by
            ``null`` (classifier-free guidance dropout, Ho & Salimans 2022).
    """

    def __init__(self, keys: tuple[str, ...], kind: Kind, dim: int, drop_rate: float) -> None:
        super().__init__()
        if not 0.0 <= drop_rate <= 1.0:
            raise ValueError(f"drop_rate must lie in [0, 1], got {drop_rate}")
        self.keys = keys
        self.kind = kind
        self.dim = dim
        self.drop_rate = drop_rate

    def forward(self, batch: Mapping[str, Any], latent_size: tuple[int, int]) -> Tensor:
        """The conditioned value for ``batch``; ``latent_size`` (h, w) matters to concat maps only."""
        raise NotImplementedError

    def null(self, batch: Mapping[str, Any], latent_size: tuple[int, int]) -> Tensor:
        """The unconditional value, shaped as ``forward``'s output for the same batch."""
        raise NotImplementedError
