"""CLIP score: how well images match their captions under an OpenCLIP model.

Weights are only ever read from disk (a local file, or a tag already in open_clip's caches), so
building a scorer never waits on the network; ``try_build_clip_scorer`` turns missing weights
into one log line and None, so evaluation goes on without the metric.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from huggingface_hub import try_to_load_from_cache
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

log = logging.getLogger(__name__)


def clip_score(image_feats: Tensor, text_feats: Tensor) -> Tensor:
    """Per pair max(100 * cos(E_I, E_C), 0) (Hessel et al. 2021 with w = 100, as torchmetrics writes it).

    torchmetrics' CLIPScore documents this per-pair clamp but clamps only the batch mean; the
    two agree whenever no pair has a negative cosine, the usual case for real captions.
    """
    return (100 * F.cosine_similarity(image_feats.float(), text_feats.float(), dim=-1)).clamp(min=0)  # (B,)


def _cached_tag_file(model: str, tag: str) -> tuple[str | None, dict]:
    """The cached weights file of an open_clip pretrained tag (None if not downloaded) and its config."""
    cfg = open_clip.get_pretrained_cfg(model, tag)
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])
        filename = filename or HF_WEIGHTS_NAME
        safe = HF_SAFE_WEIGHTS_NAME if filename == HF_WEIGHTS_NAME else Path(filename).with_suffix(".safetensors").name
        for name in (safe, filename):  # open_clip prefers the safetensors copy
            found = try_to_load_from_cache(repo, name)
            if isinstance(found, str):
                return found, cfg
    if cfg.get("url"):
        found = Path("~/.cache/clip").expanduser() / os.path.basename(cfg["url"])
        if found.is_file():
            return str(found), cfg
    return None, cfg


class CLIPScorer(nn.Module):
    """A frozen OpenCLIP model scoring (image, caption) pairs with ``clip_score``.

    ``pretrained`` is an open_clip tag, used only if already in open_clip's caches, or a local
    weights file (for OpenAI weights name the ``-quickgelu`` architecture). ``random_init=True``
    builds without weights from ``seed``; only then may width / layers / heads (both towers),
    image_size and patch_size shrink the architecture (tiny CPU tests).
    """

    def __init__(
        self,
        model: str = "ViT-B-32",  # open_clip architecture name
        pretrained: str | None = "laion2b_s34b_b79k",  # open_clip tag or local weights path
        random_init: bool = False,  # build without weights (ignores pretrained)
        seed: int = 0,  # seeds a random init, leaving the global RNG untouched
        width: int | None = None,  # tower widths (random init only)
        layers: int | None = None,  # tower depths (random init only)
        heads: int | None = None,  # attention heads per tower (random init only)
        image_size: int | None = None,  # vision input side (random init only)
        patch_size: int | None = None,  # vision patch side (random init only)
    ) -> None:
        super().__init__()
        cfg = open_clip.get_model_config(model)
        if cfg is None:
            raise ValueError(f"{model!r} is not an open_clip architecture")
        if not random_init and any(v is not None for v in (width, layers, heads, image_size, patch_size)):
            raise ValueError("width / layers / heads / image_size / patch_size change the architecture that "
                             "pretrained weights fix: set random_init=True for a custom-size model")
        if random_init:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                clip = open_clip.create_model(model, **_tiny_towers(cfg, width, layers, heads, image_size, patch_size))
        else:
            clip = open_clip.create_model(model, **_weights_kwargs(model, pretrained))
        self.clip = clip.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model)
        pre = open_clip.get_model_preprocess_cfg(clip)
        self.image_size = pre["size"] if isinstance(pre["size"], int) else tuple(pre["size"])
        self.register_buffer("mean", torch.tensor(pre["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(pre["std"]).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> CLIPScorer:
        """Set the mode as usual, but the frozen model stays in eval mode."""
        super().train(mode)
        self.clip.eval()
        return self

    @torch.no_grad()
    def forward(self, images: Tensor, captions: list[str]) -> Tensor:
        """CLIP scores (B,) of (B, 3, H, W) images in [-1, 1] against their captions."""
        device = self.mean.device
        pixels = images.to(device, torch.float32).add(1).div(2).clamp(0, 1)  # (B, 3, H, W) in [0, 1]
        size = _pair(self.image_size)
        pixels = TF.resize(pixels, min(size), interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        pixels = TF.center_crop(pixels, list(size))  # (B, 3, S, S), open_clip's eval resize and crop
        image_feats = self.clip.encode_image((pixels - self.mean) / self.std)  # (B, E)
        text_feats = self.clip.encode_text(self.tokenizer(captions).to(device))  # (B, E)
        return clip_score(image_feats, text_feats)


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else size


def _tiny_towers(cfg: dict, width: int | None, layers: int | None, heads: int | None,
                 image_size: int | None, patch_size: int | None) -> dict:
    """create_model overrides shrinking both towers of architecture config ``cfg``."""
    text = {"width": width, "layers": layers, "heads": heads}
    text_cfg = {**cfg["text_cfg"], **{k: v for k, v in text.items() if v is not None}}
    vision = {"width": width, "layers": layers, "image_size": image_size, "patch_size": patch_size}
    vision_cfg = {**cfg["vision_cfg"], **{k: v for k, v in vision.items() if v is not None}}
    if heads is not None:
        vision_cfg["head_width"] = vision_cfg["width"] // heads
    return {"text_cfg": text_cfg, "vision_cfg": vision_cfg}


def _weights_kwargs(model: str, pretrained: str | None) -> dict:
    """create_model arguments loading ``pretrained`` from a local file; FileNotFoundError if none."""
    if pretrained is not None and Path(pretrained).is_file():
        return {"pretrained": pretrained}
    cached, cfg = _cached_tag_file(model, pretrained) if pretrained else (None, {})
    if cached is None:
        known = "a tag not yet downloaded" if cfg else "neither a file nor a known tag"
        raise FileNotFoundError(
            f"no weights for {model} (pretrained={pretrained!r}, {known}): pass a local weights path, "
            f"e.g. --clip-pretrained /path/to/open_clip_model.safetensors"
        )
    # A file path loses what the tag implies, so pass its activation and preprocessing explicitly.
    return {"pretrained": cached, "force_quick_gelu": cfg.get("quick_gelu", False), "force_preprocess_cfg": cfg}


def try_build_clip_scorer(model: str = "ViT-B-32", pretrained: str | None = "laion2b_s34b_b79k") -> CLIPScorer | None:
    """A CLIPScorer, or None and one log line when its weights are not on this machine."""
    try:
        return CLIPScorer(model, pretrained)
    except FileNotFoundError as err:
        log.warning("CLIP score disabled: %s", err)
        return None
