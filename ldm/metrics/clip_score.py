"""CLIP score: how well images match their captions under an OpenCLIP model.

Weights follow the pretrained policy (``ldm.conditioning.open_clip``): a local file, else the tag from
open_clip's cache, else open_clip's download; built in ``load``, so unavailable weights leave the metric
out with one log line (``ldm.metrics.evaluation.load_metrics``) and evaluation goes on without it.
"""

from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from ldm.conditioning.open_clip import OpenCLIP
from ldm.metrics.base import TextMetric

CLIP_OPTION = "clip.pretrained of CLIPScore (--clip-pretrained of tools/evaluate.py)"
SCORER_CLIP = OpenCLIP("ViT-B-32", "laion2b_s34b_b79k")


def clip_score(image_feats: Tensor, text_feats: Tensor) -> Tensor:
    """Per pair max(100 * cos(E_I, E_C), 0) (Hessel et al. 2021 with w = 100, as torchmetrics writes it).

    torchmetrics' CLIPScore documents this per-pair clamp but clamps only the batch mean; the
    two agree whenever no pair has a negative cosine, the usual case for real captions.
    """
    return (100 * F.cosine_similarity(image_feats.float(), text_feats.float(), dim=-1)).clamp(min=0)  # (B,)


class CLIPScore(TextMetric):
    """``clip_score``: the mean CLIP score of (image, caption) pairs under a frozen OpenCLIP model.

    ``clip.pretrained`` is an open_clip tag or a local weights file (for OpenAI weights in a file, name
    the ``-quickgelu`` architecture). ``clip.random_init`` builds without weights from ``clip.seed``;
    only then may ``clip.text_cfg`` / ``clip.vision_cfg`` override the towers (tiny CPU tests).
    """

    names = ("clip_score",)
    label = "CLIP score"

    def __init__(self, clip: OpenCLIP = SCORER_CLIP) -> None:
        super().__init__()
        self.config = clip

    def load(self) -> None:
        self.clip = self.config.build(CLIP_OPTION)
        self.tokenizer = open_clip.get_tokenizer(self.config.model)
        pre = open_clip.get_model_preprocess_cfg(self.clip)
        self.image_size = (pre["size"],) * 2 if isinstance(pre["size"], int) else tuple(pre["size"])
        self.register_buffer("mean", torch.tensor(pre["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(pre["std"]).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor, captions: list[str]) -> Tensor:
        """CLIP scores (B,) of (B, 3, H, W) images in [-1, 1] against their captions."""
        device = self.mean.device
        pixels = images.to(device, torch.float32).add(1).div(2).clamp(0, 1)  # (B, 3, H, W) in [0, 1]
        pixels = TF.resize(pixels, min(self.image_size), interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        pixels = TF.center_crop(pixels, list(self.image_size))  # (B, 3, S, S), open_clip's eval resize and crop
        image_feats = self.clip.encode_image((pixels - self.mean) / self.std)  # (B, E)
        text_feats = self.clip.encode_text(self.tokenizer(captions).to(device))  # (B, E)
        return clip_score(image_feats, text_feats)
