"""A frozen OpenCLIP text encoder: caption tokens for cross-attention or the pooled text embedding."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import open_clip
import torch
from torch import Tensor

from ldm.conditioning.embedder import Embedder

# The image tower is deleted right after construction; a random-init build makes it this small first.
_VISION_STUB = {"layers": 1, "width": 8, "head_width": 8, "patch_size": 1, "image_size": 1}


class OpenCLIPTextEmbedder(Embedder):
    """OpenCLIP's text transformer, frozen and always in eval mode (SD 2 / SDXL conditioning).

    ``output="tokens"`` gives the (B, L, width) states of ``layer`` after the final LayerNorm
    (SD 2 reads the penultimate layer); ``output="pooled"`` gives CLIP's (B, embed_dim) text
    embedding, the projected end-of-text token of the last layer, whatever ``layer`` says.
    The null value is the embedding of the empty caption "" (SD 1/2).

    Weights come from ``pretrained``, an open_clip tag (downloaded once into open_clip's cache) or
    a local weights file. ``random_init=True`` builds without weights from ``seed``; only then may
    width / layers / heads / context_length override the architecture (tiny CPU encoders).
    """

    def __init__(
        self,
        model: str = "ViT-H-14",  # open_clip architecture name
        pretrained: str | None = "laion2b_s32b_b79k",  # open_clip tag or local weights path
        random_init: bool = False,  # build without weights (ignores pretrained)
        seed: int = 0,  # seeds a random init, leaving the global RNG untouched
        width: int | None = None,  # text transformer width (random init only)
        layers: int | None = None,  # text transformer depth (random init only)
        heads: int | None = None,  # attention heads (random init only)
        context_length: int | None = None,  # tokens per caption (random init only)
        layer: Literal["last", "penultimate"] = "penultimate",  # which layer's tokens
        output: Literal["tokens", "pooled"] = "tokens",
        key: str = "caption",
        drop_rate: float = 0.1,
    ) -> None:
        cfg = open_clip.get_model_config(model)
        if cfg is None or "width" not in cfg["text_cfg"]:
            raise ValueError(f"{model!r} is not an open_clip model with its own text transformer")
        overrides = {"width": width, "layers": layers, "heads": heads, "context_length": context_length}
        overrides = {name: value for name, value in overrides.items() if value is not None}
        if not random_init and pretrained is None:
            raise ValueError("pretrained is None: give a tag or a weights path, or set random_init=True")
        if not random_init and overrides:
            raise ValueError(f"{sorted(overrides)} change the architecture that pretrained weights fix: "
                             "set random_init=True for a custom-size encoder")
        text_cfg = {**cfg["text_cfg"], **overrides}
        super().__init__((key,), "crossattn" if output == "tokens" else "vector",
                         text_cfg["width"] if output == "tokens" else cfg["embed_dim"], drop_rate)
        if random_init:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                clip = open_clip.create_model(model, text_cfg=text_cfg, vision_cfg=_VISION_STUB)
        else:
            clip = open_clip.create_model(model, pretrained=pretrained)
        del clip.visual
        self.clip = clip.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model, context_length=text_cfg["context_length"])
        self.layer_index = -1 if layer == "last" else -2
        self.output = output

    def train(self, mode: bool = True) -> OpenCLIPTextEmbedder:
        """Set the mode as usual, but the frozen encoder stays in eval mode."""
        super().train(mode)
        self.clip.eval()
        return self

    def forward(self, batch: Mapping[str, Any], latent_size: tuple[int, int]) -> Tensor:
        return self._encode(batch[self.keys[0]])  # (B, L, width) or (B, embed_dim)

    def null(self, batch: Mapping[str, Any], latent_size: tuple[int, int]) -> Tensor:
        empty = self._encode([""])  # (1, ...)
        return empty.expand(len(batch[self.keys[0]]), *empty.shape[1:])

    @torch.no_grad()
    def _encode(self, captions: Sequence[str]) -> Tensor:
        ids = self.tokenizer(list(captions)).to(next(self.clip.parameters()).device)  # (B, L)
        if self.output == "pooled":
            return self.clip.encode_text(ids)  # (B, embed_dim)
        out = self.clip.forward_intermediates(
            text=ids, text_indices=[self.layer_index], stop_early=True,
            normalize_intermediates=True, intermediates_only=True,
        )
        return out["text_intermediates"][0]  # (B, L, width), after ln_final
