"""Generation requests for `ldm predict`: prompts, labels and maps from a .txt or .jsonl file."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from ldm.data import batch as B
from ldm.data import entries as E
from ldm.data.entries import MapKind
from ldm.data.images import Crop, map_tensor


class PromptDataset(Dataset):
    """One request per line: a caption (.txt), or an object (.jsonl) such as
    ``{"caption": "a red circle", "label": 0, "width": 96, "height": 48, "seg": "maps/0.png"}``; image paths are
    relative to the file. A field named in ``maps`` is an image file decoded as that kind of map (the data module
    passes the kinds its ``extra_keys`` declare), cropped to the request's size as evaluation data is; other
    fields pass on as they are. ``width``/``height`` default to ``size`` (W, H).

    Every item carries its request `index` (sample seeds derive from it) and the `target_size` (H, W) to generate.
    """

    def __init__(self, path: str, size: tuple[int, int], maps: Mapping[str, MapKind] | None = None) -> None:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"prompt file {path!r} does not exist")
        numbered = [(n, line) for n, line in enumerate(file.read_text().splitlines(), 1) if line.strip()]
        self.lines = [n for n, _ in numbered]  # each request's line in the file, for messages
        if file.suffix == ".jsonl":
            self.requests = [_request(path, n, line) for n, line in numbered]
        else:
            self.requests = [{B.CAPTION: line.strip()} for _, line in numbered]
        if not self.requests:
            raise ValueError(f"prompt file {path!r} has no prompts")
        self.path, self.folder, self.maps = path, file.parent, dict(maps or {})
        self.sizes = [(r.pop(E.HEIGHT, size[1]), r.pop(E.WIDTH, size[0])) for r in self.requests]  # (H, W) each

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {B.INDEX: index, B.TARGET_SIZE: torch.tensor(self.sizes[index])}
        for key, value in self.requests[index].items():
            item[key] = self._map(value, self.maps[key], self.sizes[index]) if key in self.maps else value
        return item

    def refuse_sizes(self, multiple: int) -> None:
        """Refuse the first request of a size the model cannot take, naming its line and the sizes it can."""
        for line, (height, width) in zip(self.lines, self.sizes):
            if not all(isinstance(side, int) and side > 0 and side % multiple == 0 for side in (height, width)):
                near = [f"{w}x{h}" for w in _round(width, multiple) for h in _round(height, multiple)]
                raise ValueError(f"{self.path} line {line} asks for {width}x{height} (width x height): this model "
                                 f"generates widths and heights that are multiples of {multiple}, e.g. {', '.join(near)}")

    def _map(self, value: str, kind: MapKind, size: tuple[int, int]) -> torch.Tensor:
        """A conditioning map, cropped and resized as evaluation data is, decoded as its declared kind."""
        img = Image.open(os.path.join(self.folder, value))
        return map_tensor(img, Crop.center(img.size, size), kind)


class RequestBatches(Dataset):
    """Requests in batches of one size each (sizes in order of first request, requests in file order): the
    predict loader reads whole batches (``batch_size=None``), so under DDP the ranks share them out."""

    def __init__(self, prompts: PromptDataset, batch_size: int) -> None:
        by_size: dict[tuple[int, int], list[int]] = {}
        for index, size in enumerate(prompts.sizes):
            by_size.setdefault(size, []).append(index)
        self.prompts = prompts
        self.batches = [group[i : i + batch_size] for group in by_size.values() for i in range(0, len(group), batch_size)]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return default_collate([self.prompts[i] for i in self.batches[index]])


def _request(path: str, line: int, text: str) -> dict[str, Any]:
    try:
        request = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"{path} line {line} is not JSON: {text!r}") from None
    if not isinstance(request, dict):
        raise ValueError(f"{path} line {line} is not a JSON object: {text!r}")
    return request


def _round(side: Any, multiple: int) -> list[int]:
    """The multiples of ``multiple`` on either side of ``side`` (just ``multiple`` for a side that is no number)."""
    if not isinstance(side, int) or side < multiple:
        return [multiple]
    below = side // multiple * multiple
    return [below] if below == side else [below, below + multiple]
