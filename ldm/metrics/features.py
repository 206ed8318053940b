"""Feature extractors for the distribution metrics (FID, KID, ...).

An extractor is any ``nn.Module`` mapping (B, 3, H, W) images in [-1, 1] to a dict of (B, D) features by
kind, one entry per kind the metrics read (``DistributionMetric.feature``); one forward serves them all.
``InceptionFeatures`` is the standard one, others (a tiny random net in tests) plug in the same way. One that
reads (B, 3, T, H, W) clips whole (I3D, for FVD) says so with ``reads_clips = True``; ``FeatureExtractors`` runs
image and clip extractors as one, giving the image extractors every frame of a clip (per-frame FID).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange
from torch import Tensor, nn
from torch_fidelity.feature_extractor_inceptionv3 import (
    URL_INCEPTION_V3,
    FeatureExtractorInceptionV3,
)

from ldm.nn.frozen import StaysInEval
from ldm.weights.io import WeightsError, WeightsUnavailable, error_line, read_state_dict
from ldm.weights.pretrained import hub_weights

INCEPTION_OPTION = "inception_weights of SampleMetrics or --inception-weights of tools/evaluate.py"
# feature kind -> the torch-fidelity output it is; "spatial" is read on the way (``spatial_features``), its entry
# names the output the network must reach for it (Mixed_6e's pooled 768, just after Mixed_6d)
INCEPTION_LAYERS = {"pool3": "2048", "logits": "logits_unbiased", "spatial": "768"}
SPATIAL_CHANNELS = 7  # ADM's sFID: the first 7 channels of mixed_6/conv


class FeaturesUnavailable(WeightsUnavailable):
    """Weights that give some feature kinds (``kinds``) but not all asked for, e.g. an Inception file without
    its classifier: the metrics reading those kinds are left out, the others run."""

    def __init__(self, message: str, kinds: Sequence[str]) -> None:
        super().__init__(message)
        self.kinds = tuple(kinds)


def reads_clips(part: nn.Module) -> bool:
    """Whether a feature extractor or a distribution metric reads (B, 3, T, H, W) clips whole (I3D, FVD: its class
    sets ``reads_clips = True``) rather than images, of which a clip gives its frames."""
    return bool(getattr(part, "reads_clips", False))


def frames_of(clips: Tensor) -> Tensor:
    """The (B * T, 3, H, W) frames of (B, 3, T, H, W) clips, frame t of clip b in row b * T + t."""
    return rearrange(clips, "b c t h w -> (b t) c h w")


class FeatureExtractors(nn.Module):
    """Several extractors as one (Inception for FID and I3D for FVD), each run once per forward. Of (B, 3, H, W)
    images, every part's features; of (B, 3, T, H, W) clips, the clip extractors' ((B, D) a kind) and the image
    extractors' of every frame ((B * T, D) a kind, in ``frames_of``'s order)."""

    reads_clips = True  # takes clips whole, and gives its image extractors their frames

    def __init__(self, *parts: nn.Module) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        frames = frames_of(x) if x.ndim == 5 else x  # (B [* T], 3, H, W)
        features: dict[str, Tensor] = {}
        for part in self.parts:
            features |= part(x if reads_clips(part) else frames)
        return features


def spatial_features(mixed_6_conv: Tensor) -> Tensor:
    """ADM's sFID features from TF Inception's ``mixed_6/conv`` (torch-fidelity's ``Mixed_6d.branch1x1`` after its
    ReLU, (B, 192, 17, 17)): the first 7 channels, flattened in TF's (H, W, C) order as ADM reshapes them."""
    return mixed_6_conv[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)  # (B, 17 * 17 * 7 = 2023)


class InceptionFeatures(StaysInEval):
    """Features of the TF-ported Inception-v3 that defines FID (torch-fidelity's): of each kind in ``kinds``,
    of those in ``INCEPTION_LAYERS``: "pool3" (the 2048-d pool features of FID, KID, precision and recall),
    "spatial" (ADM's 2023-d sFID features, ``spatial_features``) and "logits" (the 1008 classifier logits
    without bias, as ADM's and torch-fidelity's Inception Score read them).

    ``weights`` is a local copy of torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``;
    None finds it where torch-fidelity does (torch hub's checkpoint cache), else downloads it there
    as torch-fidelity would, unless ``LDM_OFFLINE=1`` (see ``ldm.weights.pretrained``). A file without
    the classifier (a pool3-only conversion stores it as NaN) raises ``FeaturesUnavailable`` for "logits".
    """

    frozen_part = "net"  # stays in eval mode (StaysInEval)

    def __init__(self, weights: str | None = None, kinds: Sequence[str] = ("pool3",)) -> None:
        super().__init__()
        unknown = set(kinds) - set(INCEPTION_LAYERS)
        if unknown:
            raise ValueError(f"Inception features {sorted(unknown)}: expected some of {sorted(INCEPTION_LAYERS)}")
        self.kinds = tuple(kinds)
        path = hub_weights(weights, URL_INCEPTION_V3, what="FID Inception-v3 weights", option=INCEPTION_OPTION,
                           check_hash=False)
        state = read_state_dict(path)  # torch-fidelity unpickles without weights_only: refuse anything but tensors first
        classifier = state.get("fc.weight")  # (1008, 2048)
        if "logits" in self.kinds and (classifier is None or not classifier.isfinite().all()):
            raise FeaturesUnavailable(f"{path} has no Inception classifier layer (its fc weights are NaN or absent); "
                                      f"the Inception Score needs torch-fidelity's full file ({INCEPTION_OPTION})",
                                      ["logits"])
        try:
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", [INCEPTION_LAYERS[k] for k in self.kinds],
                                                   feature_extractor_weights_path=path)
        except Exception as error:  # its own torch.load (no safetensors) and strict load_state_dict
            raise WeightsError(f"{path} does not fit torch-fidelity's Inception-v3 ({error_line(error)})") from error
        self._mixed_6_conv: Tensor | None = None  # (B, 192, 17, 17) of the last forward, when "spatial" is read
        if "spatial" in self.kinds:
            self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_mixed_6_conv)

    def _keep_mixed_6_conv(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self._mixed_6_conv = output

    @torch.no_grad()
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """{kind: (B, D)} of (B, 3, H, W) images in [-1, 1], quantised to 8 bits as decoded files are."""
        pixels = images.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)  # (B, 3, H, W)
        features = dict(zip(self.kinds, self.net(pixels)))  # pool3: (B, 2048), logits: (B, 1008)
        if "spatial" in self.kinds:
            features["spatial"], self._mixed_6_conv = spatial_features(self._mixed_6_conv), None
        return features
