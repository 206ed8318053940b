"""A tiny open_clip architecture registered under a name, so real OpenCLIP models build in milliseconds on a CPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import open_clip

TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
VISION = {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16}


def register_tiny_clip(folder: Path, name: str = "tiny-test-clip", text: dict[str, Any] | None = None,
                       vision: dict[str, Any] | None = None) -> str:
    """Register a 16-d CLIP (``TEXT`` / ``VISION`` towers, updated by ``text`` / ``vision``) as ``name``."""
    config = folder / f"{name}.json"
    config.write_text(json.dumps({"embed_dim": 16, "text_cfg": {**TEXT, **(text or {})},
                                  "vision_cfg": {**VISION, **(vision or {})}}))
    open_clip.add_model_config(config)
    return name
