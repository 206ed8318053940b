"""Generation requests for `ldm predict`: prompts, labels and maps from a .txt or .jsonl file."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from ldm.data import batch as B
from ldm.data.entries import MapKind
from ldm.data.images import Crop, map_tensor


class PromptDataset(Dataset):
    """One request per line: a caption (.txt), or an object (.jsonl) such as
    ``{"caption": "a red circle", "label": 0, "seg": "maps/0.png"}``; image paths are relative to the file.
    A field named in ``maps`` is an image file decoded as that kind of map (the data module passes the
    kinds its ``extra_keys`` declare), as evaluation data is; other fields pass on as they are.

    Every item carries its line `index` (sample seeds derive from it) and the `target_size` to generate.
    """

    def __init__(self, path: str, resolution: int, maps: Mapping[str, MapKind] | None = None) -> None:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"prompt file {path!r} does not exist")
        lines = [line for line in file.read_text().splitlines() if line.strip()]
        if file.suffix == ".jsonl":
            try:
                self.requests = [json.loads(line) for line in lines]
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {err.doc!r} is not JSON") from None
        else:
            self.requests = [{B.CAPTION: line.strip()} for line in lines]
        if not self.requests:
            raise ValueError(f"prompt file {path!r} has no prompts")
        self.folder, self.resolution, self.maps = file.parent, resolution, dict(maps or {})

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {B.INDEX: index, B.TARGET_SIZE: torch.tensor([self.resolution] * 2)}
        for key, value in self.requests[index].items():
            item[key] = self._map(value, self.maps[key]) if key in self.maps else value
        return item

    def _map(self, value: str, kind: MapKind) -> torch.Tensor:
        """A conditioning map, cropped and resized as evaluation data is, decoded as its declared kind."""
        img = Image.open(os.path.join(self.folder, value))
        return map_tensor(img, Crop.center(img.size, self.resolution), kind)
