"""SDXL's size and crop micro-conditioning as a global vector (Podell et al. 2023, Sec. 2.2)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ldm.conditioning.fourier import FourierEmbedder
from ldm.data import batch as B


class SizeEmbedder(FourierEmbedder):
    """Fourier features of each (B, 2) pair the batch carries, concatenated in ``keys`` order.

    Defaults follow SDXL: ``original_size`` (H, W) of the source image, ``crop_coords`` (top, left)
    of the crop, ``target_size`` (H, W) of the output, each number embedded to
    ``features_per_value`` sinusoidal features -> a (B, 2 * len(keys) * features_per_value) vector.
    A batch without ``target_size`` (fixed-resolution training) uses (image_size, image_size); one without
    ``original_size`` or ``crop_coords`` (a generation request) uses the target size and no crop, the
    values that ask for a whole, uncropped picture at that size (SDXL Sec. 2.2).
    The null value is zeros; SDXL never drops these, hence drop_rate 0.
    """

    def __init__(
        self,
        keys: tuple[str, ...] = (B.ORIGINAL_SIZE, B.CROP_COORDS, B.TARGET_SIZE),
        features_per_value: int = 256,  # sinusoidal features per number
        image_size: int | None = None,  # target_size when the batch has none
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__(tuple(keys), 2 * len(keys), features_per_value, drop_rate)
        target = None if image_size is None else torch.tensor([[image_size, image_size]], dtype=torch.float32)
        # on the module's device from the start: a tensor made from Python numbers each step would be a host copy
        self.register_buffer("default_target", target, persistent=False)  # (1, 2)
        self.register_buffer("no_crop", torch.zeros(1, 2), persistent=False)  # (1, 2): crop_coords of a request

    def values(self, batch: Mapping[str, Any]) -> Tensor:
        pairs = torch.broadcast_tensors(*(self._pair(batch, key) for key in self.keys))  # each (B, 2)
        return torch.cat(pairs, 1)  # (B, 2K)

    def _pair(self, batch: Mapping[str, Any], key: str) -> Tensor:
        if key in batch:
            return self.number(batch[key]).reshape(-1, 2)  # (B, 2)
        if key == B.ORIGINAL_SIZE and (B.TARGET_SIZE in batch or self.default_target is not None):
            return self._pair(batch, B.TARGET_SIZE)  # (B, 2) or (1, 2)
        if key == B.CROP_COORDS:
            return self.no_crop  # (1, 2)
        if key == B.TARGET_SIZE and self.default_target is not None:
            return self.default_target  # (1, 2)
        raise KeyError(f"SizeEmbedder reads {key!r}, which the batch lacks (keys: {sorted(batch)})")
