"""All of a model's embedders: one Conditioning per batch, with classifier-free guidance dropout."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ldm.conditioning.conditioning import Conditioning
from ldm.conditioning.embedder import Embedder, Kind
from ldm.data import batch as B
from ldm.data.latents import check_cache
from ldm.nn.frozen import is_frozen
from ldm.weights.io import state_sha256


class Conditioner(nn.Module):
    """Runs each embedder on a batch (or takes its cached output, ``embedding.<i>``) and joins outputs of the
    same kind along features.

    Tokens join on D (their lengths must match), vectors on D, maps on C, in list order. The
    ``context_dim``, ``vector_dim`` and ``concat_channels`` properties are what the diffusion model
    hands its backbone.
    """

    def __init__(self, embedders: list[Embedder]) -> None:
        super().__init__()
        self.embedders = nn.ModuleList(embedders)
        self._frozen_hash: str | None = None

    @property
    def context_dim(self) -> int | None:
        """Token width D of the joined cross-attention context; None without token embedders."""
        return self._dim("crossattn")

    @property
    def vector_dim(self) -> int | None:
        """Width of the joined global vector; None without vector embedders."""
        return self._dim("vector")

    @property
    def concat_channels(self) -> int:
        """Channels stacked on the latent (0 without map embedders)."""
        return self._dim("concat") or 0

    def forward(
        self,
        batch: Mapping[str, Any],
        latent_size: tuple[int, int],  # (h, w) of the latent the maps are resized to
        drop: bool | None = None,  # CFG dropout; None: only while training
        generator: torch.Generator | None = None,  # CPU generator for the drops; None: global RNG
    ) -> Conditioning:
        """Embed ``batch``; when dropping, each embedder nulls its own Bernoulli(drop_rate) samples."""
        drop = self.training if drop is None else drop
        out = Conditioning()
        for index, embedder in enumerate(self.embedders):
            cached = B.cached_embedding(index)  # a latent cache may bring a frozen embedder's output
            if cached in batch:
                check_cache(batch, self.frozen_hash(), B.CACHE_TEXT, "text encoder")
            value = batch[cached] if cached in batch else embedder(batch, latent_size)
            if drop and embedder.drop_rate > 0:
                dropped = torch.rand(value.shape[0], generator=generator) < embedder.drop_rate  # (B,) ~ Bernoulli(p)
                dropped = dropped.to(value.device).view(-1, *[1] * (value.ndim - 1))
                value = torch.where(dropped, embedder.null(batch, latent_size), value)
            out = self._join(out, embedder, value)
        return out

    def frozen(self) -> list[int]:
        """Indices of the embedders with weights, all frozen (text towers): their outputs may be cached."""
        return [i for i, e in enumerate(self.embedders) if is_frozen(e)]

    def frozen_hash(self) -> str:
        """A short hash of the frozen embedders' weights and settings, which a latent cache records."""
        if self._frozen_hash is None:  # frozen: hash once
            settings = [(i, type(e).__qualname__, state_sha256(e),
                         {k: v for k, v in vars(e).items()
                          if isinstance(v, (bool, int, float, str, tuple)) and not k.startswith("_") and k != "training"})
                        for i, e in enumerate(self.embedders) if i in self.frozen()]
            self._frozen_hash = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return self._frozen_hash

    def unconditional(self, batch: Mapping[str, Any], latent_size: tuple[int, int]) -> Conditioning:
        """Every embedder's null value: the unconditional branch of classifier-free guidance."""
        out = Conditioning()
        for embedder in self.embedders:
            out = self._join(out, embedder, embedder.null(batch, latent_size))
        return out

    def _dim(self, kind: Kind) -> int | None:
        dims = [e.dim for e in self.embedders if e.kind == kind]
        return sum(dims) if dims else None

    def _join(self, out: Conditioning, embedder: Embedder, value: Tensor) -> Conditioning:
        """Add one embedder's value to the joined conditioning, in the field it declares."""
        if embedder.kind == "crossattn" and out.crossattn is not None and out.crossattn.shape[1] != value.shape[1]:
            raise ValueError(
                f"{type(embedder).__name__} gives {value.shape[1]} tokens but the embedders before it give "
                f"{out.crossattn.shape[1]}: tokens join on D, so their lengths must match"
            )
        return out.merge(Conditioning(**{embedder.kind: value}))
