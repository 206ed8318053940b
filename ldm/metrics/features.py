"""Feature extractors for the distribution metrics (FID, KID, ...).

An extractor is any ``nn.Module`` mapping (B, 3, H, W) images in [-1, 1] to a dict of (B, D) features by
kind, one entry per kind the metrics read (``DistributionMetric.feature``); one forward serves them all.
``InceptionFeatures`` is the standard one, others (a tiny random net in tests) plug in the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch_fidelity.feature_extractor_inceptionv3 import (
    URL_INCEPTION_V3,
    FeatureExtractorInceptionV3,
)

from ldm.nn.frozen import StaysInEval
from ldm.weights.io import WeightsError, error_line, read_state_dict
from ldm.weights.pretrained import hub_weights

INCEPTION_OPTION = "inception_weights of SampleMetrics or --inception-weights of tools/evaluate.py"
INCEPTION_LAYERS = {"pool3": "2048"}  # feature kind -> torch-fidelity's name of the Inception output it is


class InceptionFeatures(StaysInEval):
    """Features of the TF-ported Inception-v3 that defines FID (torch-fidelity's): of each kind in ``kinds``,
    of those in ``INCEPTION_LAYERS`` ("pool3": the 2048-d pool features of FID and KID).

    ``weights`` is a local copy of torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``;
    None finds it where torch-fidelity does (torch hub's checkpoint cache), else downloads it there
    as torch-fidelity would, unless ``LDM_OFFLINE=1`` (see ``ldm.weights.pretrained``).
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
        read_state_dict(path)  # torch-fidelity unpickles without weights_only: refuse anything but tensors first
        try:
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", [INCEPTION_LAYERS[k] for k in self.kinds],
                                                   feature_extractor_weights_path=path)
        except Exception as error:  # its own torch.load (no safetensors) and strict load_state_dict
            raise WeightsError(f"{path} does not fit torch-fidelity's Inception-v3 ({error_line(error)})") from error


    @torch.no_grad()
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """{kind: (B, D)} of (B, 3, H, W) images in [-1, 1], quantised to 8 bits as decoded files are."""
        pixels = images.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)  # (B, 3, H, W)
        return dict(zip(self.kinds, self.net(pixels)))  # pool3: (B, 2048)
