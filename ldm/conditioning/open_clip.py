"""The one builder of OpenCLIP models: a seeded random init of any size, or weights found by the pretrained policy.

``pretrained`` is a local weights file or an open_clip tag; a tag's file comes from open_clip's cache
(Hugging Face hub or ``~/.cache/clip``), else from open_clip's own download unless ``LDM_OFFLINE=1`` or
``HF_HUB_OFFLINE=1`` (see ``ldm.weights.pretrained``). Either way open_clip loads the file itself, but
for a Stable Diffusion checkpoint, whose text tower ``ldm.convert.clip_text`` converts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from huggingface_hub import constants, try_to_load_from_cache
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from open_clip.transformer import QuickGELU
from torch import nn

from ldm.convert.clip_text import CLIP_HEAD, text_from_sd
from ldm.weights.io import (
    StateDict,
    WeightsError,
    WeightsUnavailable,
    check_keys,
    error_line,
    read_state_dict,
)
from ldm.weights.pretrained import OFFLINE, resolve_weights
from ldm.weights.sd import TEXT_PREFIX, is_sd_checkpoint

# The image tower of a text-only build is deleted right after construction; it is built this small first.
_VISION_STUB = {"layers": 1, "width": 8, "head_width": 8, "patch_size": 1, "image_size": 1}


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
    pretrained: str | None = None  # open_clip tag (cache, else download), a local weights file, or an SD checkpoint
    random_init: bool = False  # build without weights (ignores pretrained)
    seed: int = 0  # seeds a random init, leaving the global RNG untouched
    text_cfg: dict[str, int] | None = None  # random init or an SD checkpoint: text_cfg overrides (width, layers, ...)
    vision_cfg: dict[str, int] | None = None  # random init only: open_clip vision_cfg overrides

    def build(self, option: str, text_only: bool = False) -> nn.Module:
        """``create_clip`` of this model; ``option`` names the setting in messages."""
        return create_clip(self.model, self.pretrained, option, self.random_init, self.seed, self.text_cfg,
                           self.vision_cfg, text_only)


def create_clip(
    model: str,  # open_clip architecture name
    pretrained: str | None,  # open_clip tag, local weights file or Stable Diffusion checkpoint
    option: str,  # the setting that holds ``pretrained``, named in messages
    random_init: bool = False,  # build without weights (ignores pretrained)
    seed: int = 0,  # seeds a random init, leaving the global RNG untouched
    text_cfg: Mapping[str, Any] | None = None,  # text tower overrides (random init or an SD checkpoint)
    vision_cfg: Mapping[str, Any] | None = None,  # vision tower overrides (random init only)
    text_only: bool = False,  # the text encoder alone: the image tower is deleted (built as a stub where it can)
) -> nn.Module:
    """A frozen open_clip model in eval mode.

    A Stable Diffusion single file as ``pretrained`` gives its text tower (``text_only`` builds only):
    SD 1.x's OpenAI CLIP ViT-L/14 (built with quick GELU, without CLIP's projection head, which the file
    lacks) or SD 2.x's open_clip tower; ``model`` and ``text_cfg`` must describe it. Raises
    ``WeightsUnavailable`` (naming ``option``) when the weights are nowhere to be had, and
    ``WeightsError`` naming the file when they cannot be loaded.
    """
    sd_file = not random_init and pretrained is not None and os.path.isfile(pretrained) and is_sd_checkpoint(pretrained)
    if sd_file and not text_only:
        raise WeightsError(f"{pretrained} is a Stable Diffusion checkpoint: it holds a text tower, and {option} "
                           "needs a whole CLIP model")
    if random_init or sd_file:
        text, openai = text_from_sd(read_state_dict(pretrained)) if sd_file else ({}, False)
        clip = _random_clip(model, seed, text_cfg, {**(vision_cfg or {}), **(_VISION_STUB if text_only else {})}, openai)
        if sd_file:
            _load_text_tower(clip, text, openai, f"{pretrained} (its {TEXT_PREFIX}*)", f"open_clip {model}'s text tower")
    else:
        if text_cfg or vision_cfg:
            raise ValueError(f"{sorted({**(text_cfg or {}), **(vision_cfg or {})})} change the architecture that "
                             "pretrained weights fix: set random_init=True for a custom-size model (text_cfg also "
                             "describes a Stable Diffusion checkpoint's text tower)")
        kwargs = _weights_kwargs(model, pretrained, option)
        try:
            clip = open_clip.create_model(model, **kwargs)
        except Exception as error:  # open_clip's own reading and strict loading of the file
            path = kwargs["pretrained"]
            raise WeightsError(f"{path}: cannot load as open_clip {model} weights ({error_line(error)})") from error
    if text_only:
        del clip.visual
    return clip.eval().requires_grad_(False)


def _random_clip(model: str, seed: int, text_cfg: Mapping[str, Any] | None, vision_cfg: Mapping[str, Any],
                 quick_gelu: bool) -> nn.Module:
    """``model`` with its towers' config updated, initialised from ``seed`` (the global RNG untouched)."""
    cfg = model_config(model)
    with torch.random.fork_rng(devices=[]), _no_random_init_warning():
        torch.manual_seed(seed)
        return open_clip.create_model(model, text_cfg={**cfg["text_cfg"], **(text_cfg or {})},
                                      vision_cfg={**cfg["vision_cfg"], **vision_cfg}, force_quick_gelu=quick_gelu)



@contextmanager
def _no_random_init_warning() -> Iterator[None]:
    """Drop open_clip's root-logger warning that a model is "initialized randomly", which a random init asks for.

    The NullHandler keeps ``logging.warning`` from configuring the root logger (and so every later log line's format).
    """
    root, handler = logging.getLogger(), logging.NullHandler()
    asked = lambda record: "initialized randomly" not in record.getMessage()  # noqa: E731
    root.addHandler(handler)
    root.addFilter(asked)
    try:
        yield
    finally:
        root.removeFilter(asked)
        root.removeHandler(handler)


def _load_text_tower(clip: nn.Module, text: StateDict, openai: bool, source: str, what: str) -> None:
    """Load an SD file's text tower strictly; OpenAI's (SD 1.x) comes without CLIP's projection head."""
    if openai:
        for name in CLIP_HEAD:  # the file has none: the model has none either, so nothing is left random
            setattr(clip, name, None)
    check_keys(text, text_state(clip), source, what)
    clip.load_state_dict(text, strict=False)  # strict on the text tower (checked above); the image tower is not in it


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
    url = f"{constants.ENDPOINT}/{tag['hf_hub'].rstrip('/')}" if tag.get("hf_hub") else tag.get("url", "")
    path = resolve_weights(None, what=f"{what} {pretrained!r}", option=option, url=url,
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


def text_state(clip: nn.Module) -> StateDict:
    """An open_clip model's text-tower state dict (everything but an image tower)."""
    return {k: v for k, v in clip.state_dict().items() if not k.startswith("visual.")}


def uses_quick_gelu(clip: nn.Module) -> bool:
    """Whether an open_clip text tower uses OpenAI's quick GELU (x * sigmoid(1.702 x))."""
    return isinstance(clip.transformer.resblocks[0].mlp.gelu, QuickGELU)
