"""A map from the batch (segmentation, mask, low-res image) stacked on the latent's channels."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from ldm.conditioning.embedder import Embedder
from ldm.data.entries import resize_map


class SpatialEmbedder(Embedder):
    """Resizes a pixel-space map to the latent's (h, w) for channel concatenation.

    Two kinds of map, chosen by which of ``num_classes`` / ``channels`` is given:
      - class map: integer ids (B, H, W) or (B, 1, H, W), as the data module yields for "L"/"P"
        PNGs -> one-hot (B, num_classes, h, w), resized nearest so classes never blend. Maps
        stored as floats v / 127.5 - 1 (a uint8 image scaled to [-1, 1]) set ``from_uint8`` to
        recover the ids as round((x + 1) * 127.5).
      - float map: (B, channels, H, W) in [-1, 1] (mask, low-res image), resized bilinear with
        antialiasing.
    The null value is zeros: no class at all for a class map, mid-grey for a float map.
    """

    def __init__(
        self,
        key: str = "seg",
        num_classes: int | None = None,  # class-index map with this many classes
        channels: int | None = None,  # float map with this many channels
        from_uint8: bool = False,  # class ids encoded as v / 127.5 - 1 floats
        drop_rate: float = 0.0,  # concat maps are usually kept (SD inpainting, upscaling)
    ) -> None:
        if (num_classes is None) == (channels is None):
            raise ValueError("give exactly one of num_classes (class-index map) or channels (float map)")
        if from_uint8 and num_classes is None:
            raise ValueError("from_uint8 decodes class ids; it needs num_classes")
        super().__init__((key,), "concat", num_classes or channels, drop_rate)
        self.num_classes = num_classes
        self.from_uint8 = from_uint8

    def forward(self, batch: Mapping[str, Any], latent_size: tuple[int, int]) -> Tensor:
        x = batch[self.keys[0]]
        if self.num_classes is None:
            if x.shape[1] != self.dim:
                raise ValueError(f"{self.keys[0]!r} has {x.shape[1]} channels, SpatialEmbedder expects {self.dim}")
            return resize_map(x.float(), latent_size)  # (B, C, h, w)
        ids = x.reshape(x.shape[0], 1, *x.shape[-2:])  # (B, 1, H, W)
        ids = resize_map(((ids + 1) * 127.5).round().long() if self.from_uint8 else ids.long(), latent_size)  # (B, 1, h, w)
        return rearrange(F.one_hot(ids[:, 0], self.num_classes), "b h w k -> b k h w").float()  # (B, K, h, w)

    def null(self, batch: Mapping[str, Any], latent_size: tuple[int, int]) -> Tensor:
        x = batch[self.keys[0]]
        return torch.zeros(x.shape[0], self.dim, *latent_size, device=x.device)  # (B, C, h, w)
