"""Generation requests for `ldm predict`: prompts, labels and maps from a .txt or .jsonl file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from ldm.data import batch as B
from ldm.data.transforms import Crop, map_tensor


class PromptDataset(Dataset):
    """One request per line: a caption (.txt), or an object (.jsonl) such as
    ``{"caption": "a red circle", "label": 0, "seg": "maps/0.png"}``; image paths are relative to the file.

    Every item carries its line `index` (sample seeds derive from it) and the `target_size` to generate.
    """

    def __init__(self, path: str, resolution: int) -> None:
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
        self.folder, self.resolution = file.parent, resolution

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {B.INDEX: index, B.TARGET_SIZE: torch.tensor([self.resolution] * 2)}
        for key, value in self.requests[index].items():
            if isinstance(value, str) and value.lower().endswith((".png", ".jpg", ".jpeg", ".webp")):
                item[key] = self._map(value)
            else:
                item[key] = value
        return item

    def _map(self, value: str) -> torch.Tensor:
        """A conditioning map, cropped and resized as evaluation data is (class maps stay integers)."""
        img = Image.open(os.path.join(self.folder, value))
        return map_tensor(img, Crop.center(img.size, self.resolution))
