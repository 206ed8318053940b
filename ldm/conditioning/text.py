"""A frozen OpenCLIP text encoder: caption tokens for cross-attention or the pooled text embedding."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import open_clip
import torch
from torch import Tensor

from ldm.conditioning.embedder import Embedder
from ldm.conditioning.open_clip import OpenCLIP, model_config
from ldm.data import batch as B
from ldm.nn.frozen import StaysInEval

SD2_TEXT = OpenCLIP("ViT-H-14", "laion2b_s32b_b79k")


class OpenCLIPTextEmbedder(StaysInEval, Embedder):
    """OpenCLIP's text transformer, frozen and always in eval mode (SD 2 / SDXL conditioning).

    ``output="tokens"`` gives the (B, L, width) states of ``layer`` after the final LayerNorm
    (SD 2 reads the penultimate layer); ``output="pooled"`` gives CLIP's (B, embed_dim) text
    embedding, the projected end-of-text token of the last layer, whatever ``layer`` says.
    The null value is the embedding of the empty caption "" (SD 1/2). Captions are padded with zeros as
    open_clip's tokenizer does (SD 2), or with ``pad="end_of_text"`` with the end-of-text token as SD 1.x's
    Hugging Face tokenizer does.

    Weights come from ``clip.pretrained``, a local weights file or an open_clip tag (from open_clip's
    cache, else its download unless ``LDM_OFFLINE=1``; ``WeightsUnavailable`` otherwise, see
    ``ldm.conditioning.open_clip``). ``clip.random_init`` builds without weights from ``clip.seed``; only
    then may ``clip.text_cfg`` override the text tower (width, layers, heads, context_length: tiny CPU
    encoders). ``clip.pretrained`` may also be a Stable Diffusion single file: its text tower loads
    (``ldm.conditioning.open_clip``), SD 1.x's as ``ViT-L-14-quickgelu`` and SD 2.x's as ``ViT-H-14``.
    """

    frozen_part = "clip"  # stays in eval mode (StaysInEval)

    def __init__(
        self,
        clip: OpenCLIP = SD2_TEXT,  # the model; SD 2's ViT-H-14 by default
        layer: Literal["last", "penultimate"] = "penultimate",  # which layer's tokens
        output: Literal["tokens", "pooled"] = "tokens",
        key: str = B.CAPTION,
        drop_rate: float = 0.1,
        pad: Literal["zeros", "end_of_text"] = "zeros",  # what fills a caption's tokens up to the context length
    ) -> None:
        cfg = model_config(clip.model)
        if "width" not in cfg["text_cfg"]:
            raise ValueError(f"{clip.model!r} is not an open_clip model with its own text transformer")
        tower = {**cfg["text_cfg"], **(clip.text_cfg or {})}
        super().__init__((key,), "crossattn" if output == "tokens" else "vector",
                         tower["width"] if output == "tokens" else cfg["embed_dim"], drop_rate)
        self.clip = clip.build("clip.pretrained of OpenCLIPTextEmbedder", text_only=True)
        if output == "pooled" and self.clip.text_projection is None:
            raise ValueError(f"{clip.pretrained}: this text tower has no projection head (SD 1.x files hold none), "
                             "so it gives output='tokens' only")
        self.tokenizer = open_clip.get_tokenizer(clip.model, context_length=tower["context_length"])
        self.layer_index = -1 if layer == "last" else -2
        self.output = output
        self.pad = pad
        self._empty: Tensor | None = None


    def forward(self, batch: Mapping[str, Any], latent_size: tuple[int, int]) -> Tensor:
        return self._encode(batch[self.keys[0]])  # (B, L, width) or (B, embed_dim)

    def null(self, batch: Mapping[str, Any], latent_size: tuple[int, int]) -> Tensor:
        device = next(self.clip.parameters()).device
        if self._empty is None or self._empty.device != device:  # the frozen tower encodes "" once
            self._empty = self._encode([""])  # (1, ...)
        return self._empty.expand(len(batch[self.keys[0]]), *self._empty.shape[1:])

    @torch.no_grad()
    def _encode(self, captions: Sequence[str]) -> Tensor:
        ids = self.tokenizer(list(captions))  # (B, L), zeros after the end-of-text token
        if self.pad == "end_of_text":
            ended = (ids == self.tokenizer.eot_token_id).cumsum(1) > 0  # (B, L): from the end-of-text token on
            ids = ids.masked_fill(ended, self.tokenizer.eot_token_id)
        ids = ids.to(next(self.clip.parameters()).device)
        if self.output == "pooled":
            return self.clip.encode_text(ids)  # (B, embed_dim)
        out = self.clip.forward_intermediates(
            text=ids, text_indices=[self.layer_index], stop_early=True,
            normalize_intermediates=True, intermediates_only=True,
        )
        return out["text_intermediates"][0]  # (B, L, width), after ln_final
