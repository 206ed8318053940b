"""PSNR, SSIM and LPIPS: each generated image against the real image it was made from (an autoencoder's
reconstructions against their inputs), with the definitions AutoencoderKL logs for its test batches."""

from __future__ import annotations

import math

from torch import Tensor
from torchmetrics.functional.image import structural_similarity_index_measure

from ldm.autoencoder.lpips import Net, build_lpips
from ldm.metrics.base import PairedMetric

LPIPS_OPTION = "weights of LPIPS (--lpips-weights of tools/evaluate.py)"


def _unit(images: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1] in fp32, clamped."""
    return images.float().add(1).div(2).clamp(0, 1)


class PSNR(PairedMetric):
    """``psnr``: peak signal-to-noise ratio (dB) of the mean squared error over every pair, pixels in [0, 1]
    (torchmetrics' ``PeakSignalNoiseRatio(data_range=1)`` over the whole set)."""

    names = ("psnr",)
    label = "PSNR"

    def forward(self, generated: Tensor, real: Tensor) -> Tensor:
        return (_unit(generated) - _unit(real)).square().flatten(1).mean(1)  # (B,) squared error per image

    def finish(self, mean: float) -> float:
        return -10 * math.log10(mean) if mean > 0 else math.inf


class SSIM(PairedMetric):
    """``ssim``: mean structural similarity (Wang et al. 2004; 11x11 Gaussian window, sigma 1.5), pixels in [0, 1]."""

    names = ("ssim",)
    label = "SSIM"

    def forward(self, generated: Tensor, real: Tensor) -> Tensor:
        return structural_similarity_index_measure(_unit(generated), _unit(real), data_range=1.0, reduction="none")


class LPIPS(PairedMetric):
    """``lpips``: mean LPIPS distance (Zhang et al. 2018) on an AlexNet or VGG16 trunk (``build_lpips``).

    ``weights`` as ``AutoencoderLoss.lpips_weights``: a local trunk or LPIPS file, None for torch hub's cache,
    else torchvision's download; ``random_init`` keeps a random trunk (uncalibrated: tests only).
    """

    names = ("lpips",)
    label = "LPIPS"

    def __init__(self, net: Net = "vgg", weights: str | None = None, random_init: bool = False) -> None:
        super().__init__()
        self.trunk, self.weights, self.random_init = net, weights, random_init

    def load(self) -> None:
        self.distance = build_lpips(self.trunk, self.weights, self.random_init, option=LPIPS_OPTION)

    def forward(self, generated: Tensor, real: Tensor) -> Tensor:
        return self.distance(generated, real)  # (B,)
