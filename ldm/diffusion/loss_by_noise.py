"""Loss per noise level: the mean per-sample loss in equal ranges of the noise level, and its bar chart.

Discrete steps (DDPM) are bucketed by t / N in [0, 1); other paths (flow matching) by log-SNR, where their
times say little across shifts and time samplings. Bucket 0 is the clean end in both. The sums and counts stay
on the device; the step only scatter-adds into them, and they are all-reduced when read (torchmetrics' sync).
"""

from __future__ import annotations

import math

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchmetrics import Metric
from torchvision.transforms.functional import pil_to_tensor

from ldm.diffusion.objectives import DDPM, Objective

LOGSNR_MAX = 10.0  # flow buckets split log-SNR 10 .. -10 (clean to noisy); the end buckets also hold what lies beyond


class LossByNoise(Metric):
    """Mean loss in each of ``buckets`` equal ranges of noise level, from the clean end (bucket 0) to the noise end.

    ``update`` is sync-free (a bucketize and two scatter-adds on the device); ``compute`` gives the means and counts
    over all ranks (a mean is NaN where its bucket saw nothing).
    """

    full_state_update = False

    def __init__(self, objective: Objective, buckets: int = 10) -> None:
        super().__init__()
        if buckets < 1:
            raise ValueError(f"LatentDiffusion loss_buckets must be at least 1, got {buckets}")
        self.objective, self.buckets = objective, buckets
        self.by_step = isinstance(objective, DDPM)  # else by log-SNR
        end = float(objective.num_timesteps) if self.by_step else LOGSNR_MAX
        # ascending edges of what is bucketed: t for DDPM, -log-SNR otherwise (so that both start at the clean end)
        self.register_buffer("edges", torch.linspace(0.0 if self.by_step else -end, end, buckets + 1), persistent=False)
        self.add_state("sums", torch.zeros(buckets), dist_reduce_fx="sum")
        self.add_state("counts", torch.zeros(buckets), dist_reduce_fx="sum")

    def bucket(self, t: Tensor) -> Tensor:
        """(B,) bucket indices of times t (B,), values beyond the outer edges in the end buckets."""
        if self.by_step:
            level = t.float()
        else:
            alpha, sigma = self.objective.alpha_sigma(t.float())
            level = 2 * (sigma.log() - alpha.log())  # -log-SNR
        return torch.bucketize(level, self.edges[1:-1], right=True)  # [lo, hi) ranges

    def update(self, loss: Tensor, t: Tensor) -> None:
        """Add per-sample losses (B,) at times t (B,): no host sync."""
        k = self.bucket(t)
        self.sums.scatter_add_(0, k, loss.detach().float())
        self.counts.scatter_add_(0, k, torch.ones_like(k, dtype=self.counts.dtype))

    def compute(self) -> tuple[Tensor, Tensor]:
        """(buckets,) mean losses and (buckets,) sample counts, summed over the ranks."""
        return self.sums / self.counts, self.counts

    def bounds(self) -> list[float]:
        """The buckets' edges, clean end first: t / N for DDPM, log-SNR (falling) otherwise."""
        return (self.edges / self.edges[-1] if self.by_step else -self.edges + 0.0).tolist()  # + 0.0: no "-0"

    def scalars(self, means: Tensor, counts: Tensor, prefix: str) -> dict[str, float]:
        """``<prefix>/<bucket>`` (zero-padded, so TensorBoard sorts them): the mean of each bucket that saw a sample."""
        width = len(str(self.buckets - 1))
        return {f"{prefix}/{k:0{width}d}": m for k, (m, n) in enumerate(zip(means.tolist(), counts.tolist())) if n}

    def picture(self, means: Tensor, title: str) -> Tensor:
        """A (3, H, W) uint8 bar chart of the means, ``title`` above, bucket 0 on the left, its edges ticked below
        (every n-th where labels would overlap); an empty bucket gets no bar."""
        values, bounds = means.tolist(), [f"{b:.3g}" for b in self.bounds()]
        width, height, left, bottom, top = min(1280, max(360, 48 * self.buckets + 52)), 240, 44, 24, 28
        image = Image.new("RGB", (width, height), "white")
        draw, font = ImageDraw.Draw(image), ImageFont.load_default()
        peak = max((v for v in values if math.isfinite(v)), default=0.0) or 1.0
        slot, base = (width - left - 8) / self.buckets, height - bottom
        gap = min(2.0, slot / 4)  # between bars
        every = math.ceil((max(draw.textlength(b, font=font) for b in bounds) + 4) / slot)
        draw.text((8, 6), f"{title} by {'t / N' if self.by_step else 'log-SNR'}; top = {peak:.4g}", fill="black", font=font)
        draw.line([(left, top), (left, base), (width - 8, base)], fill="black")
        for k, value in enumerate(values):
            if math.isfinite(value):  # else an empty bucket (or a NaN/inf loss)
                x = left + k * slot
                draw.rectangle([x + gap, base - (base - top) * value / peak, x + slot - gap, base], fill=(66, 111, 178))
        for k in range(0, self.buckets + 1, every):
            x = left + k * slot
            draw.line([(x, base), (x, base + 3)], fill="black")
            draw.text((x, base + 5), bounds[k], fill="black", font=font, anchor="ma")
        return pil_to_tensor(image)  # (3, H, W) uint8
