"""Per-sample numbers of a clip as a global vector: its frame rate, its source's frame count (Stable Video
Diffusion's fps and motion micro-conditioning, Blattmann et al. 2023, Sec. 4)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ldm.conditioning.fourier import FourierEmbedder
from ldm.data import batch as B


class ScalarEmbedder(FourierEmbedder):
    """Fourier features of one number per sample for each of ``keys`` (e.g. ``fps``, which clip batches carry),
    concatenated in ``keys`` order. A batch without a key uses its ``defaults`` value: a generation request
    that does not say (a ``.jsonl`` request may: ``{"caption": ..., "fps": 4}``). Like SVD's, these are not
    dropped for guidance (drop_rate 0): the null value is zeros."""

    def __init__(
        self,
        keys: tuple[str, ...] = (B.FPS,),
        defaults: dict[str, float] | None = None,  # the value of a key a batch lacks, e.g. {fps: 8}
        features_per_value: int = 256,  # sinusoidal features per number
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__(tuple(keys), len(keys), features_per_value, drop_rate)
        self.defaults = dict(defaults or {})

    def values(self, batch: Mapping[str, Any]) -> Tensor:
        size = B.batch_size(batch)
        columns = []
        for key in self.keys:
            if key in batch:
                columns.append(self.number(batch[key]).reshape(size))  # (B,)
            elif key in self.defaults:
                columns.append(self.number(self.defaults[key]).expand(size))  # (B,)
            else:
                raise KeyError(f"ScalarEmbedder reads {key!r}, which the batch lacks (keys: {sorted(batch)}); "
                               f"give it a value in defaults, or the request a {key!r} field")
        return torch.stack(columns, dim=1)  # (B, K)
