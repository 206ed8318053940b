"""Generation requests for `ldm predict`: prompts, labels and maps from a .txt or .jsonl file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset


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
            self.requests = [{"caption": line.strip()} for line in lines]
        if not self.requests:
            raise ValueError(f"prompt file {path!r} has no prompts")
        self.folder, self.resolution = file.parent, resolution

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {"index": index, "target_size": torch.tensor([self.resolution] * 2)}
        for key, value in self.requests[index].items():
            if isinstance(value, str) and value.lower().endswith((".png", ".jpg", ".jpeg", ".webp")):
                item[key] = self._map(value)
            else:
                item[key] = value
        return item

    def _map(self, value: str) -> torch.Tensor:
        """A conditioning image, resized to the output size: class maps (L/P mode) stay integers."""
        img = Image.open(os.path.join(self.folder, value))
        size = (self.resolution, self.resolution)
        if img.mode in ("L", "P"):
            return torch.from_numpy(np.array(img.resize(size, Image.NEAREST))).long()[None]  # (1, R, R); a writable copy
        array = np.asarray(img.convert("RGB").resize(size, Image.BICUBIC))
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(127.5).sub(1)  # (3, R, R)
