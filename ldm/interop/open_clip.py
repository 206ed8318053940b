"""The one builder of OpenCLIP models: a seeded random init of any size, or weights found by the pretrained policy.

``pretrained`` is a local weights file or an open_clip tag; a tag's file comes from open_clip's cache
(Hugging Face hub or ``~/.cache/clip``), else from open_clip's own download unless ``LDM_OFFLINE=1`` or
``HF_HUB_OFFLINE=1`` (see ``ldm.interop.pretrained``). Either way open_clip loads the file itself.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from huggingface_hub import try_to_load_from_cache
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from torch import nn

from ldm.interop.io import WeightsError, WeightsUnavailable, error_line
from ldm.interop.pretrained import OFFLINE, resolve_weights


def model_config(model: str) -> dict[str, Any]:
    """open_clip's architecture config of ``model`` (its ``text_cfg``, ``vision_cfg``, ``embed_dim``)."""
    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise ValueError(f"{model!r} is not an open_clip architecture")
    return cfg


@dataclass(frozen=True)
class OpenCLIP:
    """Which OpenCLIP model: an architecture and its weights, or a seeded random init of any size."""

    model: str = "ViT-B-32"  # open_clip architecture name
    pretrained: str | None = None  # open_clip tag (cache, else download) or a local weights file
    random_init: bool = False  # build without weights (ignores pretrained)
    seed: int = 0  # seeds a random init, leaving the global RNG untouched
    text_cfg: dict[str, int] | None = None  # random init only: open_clip text_cfg overrides (width, layers, ...)
    vision_cfg: dict[str, int] | None = None  # random init only: open_clip vision_cfg overrides

    def build(self, option: str, vision_cfg: Mapping[str, Any] | None = None) -> nn.Module:
        """``create_clip`` of this model; ``option`` names the setting in messages, ``vision_cfg`` adds overrides."""
        vision = {**(self.vision_cfg or {}), **(vision_cfg or {})} if self.random_init else None
        return create_clip(self.model, self.pretrained, option, self.random_init, self.seed, self.text_cfg, vision)


def create_clip(
    model: str,  # open_clip architecture name
    pretrained: str | None,  # open_clip tag or local weights file
    option: str,  # the setting that holds ``pretrained``, named in messages
    random_init: bool = False,  # build without weights (ignores pretrained)
    seed: int = 0,  # seeds a random init, leaving the global RNG untouched
    text_cfg: Mapping[str, Any] | None = None,  # text tower overrides (random init only)
    vision_cfg: Mapping[str, Any] | None = None,  # vision tower overrides (random init only)
) -> nn.Module:
    """A frozen open_clip model in eval mode.

    Raises ``WeightsUnavailable`` (naming ``option``) when the weights are nowhere to be had, and
    ``WeightsError`` naming the file when open_clip cannot load it.
    """
    cfg = model_config(model)
    if random_init:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            clip = open_clip.create_model(model, text_cfg={**cfg["text_cfg"], **(text_cfg or {})},
                                          vision_cfg={**cfg["vision_cfg"], **(vision_cfg or {})})
        return clip.eval().requires_grad_(False)
    if text_cfg or vision_cfg:
        raise ValueError(f"{sorted({**(text_cfg or {}), **(vision_cfg or {})})} change the architecture that "
                         "pretrained weights fix: set random_init=True for a custom-size model")
    kwargs = _weights_kwargs(model, pretrained, option)
    try:
        clip = open_clip.create_model(model, **kwargs)
    except Exception as error:  # open_clip's own reading and strict loading of the file
        path = kwargs["pretrained"]
        raise WeightsError(f"{path}: cannot load as open_clip {model} weights ({error_line(error)})") from error
    return clip.eval().requires_grad_(False)


def _weights_kwargs(model: str, pretrained: str | None, option: str) -> dict[str, Any]:
    """create_model arguments loading ``pretrained`` from a local file, found or fetched for a tag."""
    what = f"OpenCLIP {model} weights"
    tag = open_clip.get_pretrained_cfg(model, pretrained) if pretrained else {}
    if not tag:
        if pretrained is not None and os.path.isfile(pretrained):
            return {"pretrained": pretrained}
        given = "none named" if pretrained is None else f"{pretrained!r} is neither a file nor one of its tags"
        raise WeightsUnavailable(f"{what}: {given}; set {option} to a local weights file or an open_clip tag "
                                 f"(open_clip.list_pretrained_tags_by_model({model!r}) lists them)")
    origin = f"huggingface.co/{tag['hf_hub'].rstrip('/')}" if tag.get("hf_hub") else tag.get("url")
    path = resolve_weights(None, what=f"{what} {pretrained!r}", option=option, source=f"its file ({origin})",
                           where="open_clip's caches: Hugging Face hub, ~/.cache/clip",
                           cached=lambda: _cached_tag_file(tag), download=lambda: _download(tag),
                           offline_vars=(OFFLINE, "HF_HUB_OFFLINE"))
    # A file path loses what the tag implies, so pass its activation and preprocessing explicitly.
    return {"pretrained": path, "force_quick_gelu": tag.get("quick_gelu", False), "force_preprocess_cfg": tag}


def _cached_tag_file(tag: Mapping[str, Any]) -> str | None:
    """The weights file of an open_clip tag config in open_clip's caches, or None if not downloaded."""
    if tag.get("hf_hub"):
        repo, filename = os.path.split(tag["hf_hub"])
        filename = filename or HF_WEIGHTS_NAME
        safe = HF_SAFE_WEIGHTS_NAME if filename == HF_WEIGHTS_NAME else Path(filename).with_suffix(".safetensors").name
        for name in (safe, filename):  # open_clip prefers the safetensors copy
            found = try_to_load_from_cache(repo, name)
            if isinstance(found, str):
                return found
    if tag.get("url"):
        found = Path("~/.cache/clip").expanduser() / os.path.basename(tag["url"])
        if found.is_file():
            return str(found)
    return None


def _download(tag: Mapping[str, Any]) -> str:
    """open_clip's own download of a tag's file (the one ``create_model(pretrained=tag)`` makes)."""
    path = open_clip.download_pretrained(dict(tag))
    if not path:
        raise FileNotFoundError("open_clip names no download for this tag")
    return path
