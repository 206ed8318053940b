"""tools/caption_probe.py: the word swap, and the loss comparison at the same draws (its run on a trained model:
test_latent_diffusion.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import torch
from torch import Tensor

from ldm.data import batch as B
from ldm.diffusion.loss_by_noise import LossByNoise
from ldm.diffusion.objectives import DDPM
from tools.caption_probe import noise_summary, parse_swaps, probe, summary, swap_words

MIRROR = parse_swaps(["left=right", "right=left", "top=bottom", "bottom=top"])


def test_swaps_exchange_whole_words_at_once() -> None:
    assert swap_words("a small red cross in the top left", MIRROR) == "a small red cross in the bottom right"
    assert swap_words("a red circle moving to the right", MIRROR) == "a red circle moving to the left"
    assert swap_words("an upright stop sign, leftover paint", parse_swaps(["up=down", "left=right"])) == \
        "an upright stop sign, leftover paint"  # whole words only
    assert swap_words("a blue square in the center", MIRROR) == "a blue square in the center"
    with pytest.raises(ValueError, match="'left'"):
        parse_swaps(["left"])


class LeftHeavy:
    """Stands in for LatentDiffusion: each sample's loss is a draw from the generator, plus 1 at high noise (DDPM
    step 500 or later) if its caption says "left"."""

    def timed_loss(self, batch: Mapping[str, Any], generator: torch.Generator) -> tuple[Tensor, Tensor]:
        draw, t = replay(len(batch[B.CAPTION]), generator)
        return draw + (t >= 500) * torch.tensor([float("left" in c.split()) for c in batch[B.CAPTION]]), t


def replay(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """LeftHeavy's draws for n samples: the same for the same seed, whatever the caption."""
    return torch.rand(n, generator=generator) + 1, torch.randint(0, 1000, (n,), generator=generator).float()


def test_probe_compares_each_changed_caption_at_the_same_draws() -> None:
    batches = [{B.CAPTION: ["a red circle on the right", "a blue square in the center"]},
               {B.CAPTION: ["a green star on the left"]}, {B.CAPTION: ["a white cross"]}]
    def first(n: int) -> list[Tensor]:  # the first sample's loss draw and time at seeds 0, 1, 2: (3,) each
        return [torch.stack(d)[:, 0] for d in zip(*[replay(n, torch.Generator().manual_seed(s)) for s in range(3)])]

    (right, t_right), (left, t_left) = first(2), first(1)
    by_noise = LossByNoise(DDPM(), 2), LossByNoise(DDPM(), 2)
    increases = probe(LeftHeavy(), batches, MIRROR, seeds=3, by_noise=by_noise)  # the center and cross: no swap
    cost_right, cost_left = (t_right >= 500).float(), (t_left >= 500).float()  # right -> left costs 1 at high noise
    expected = torch.stack([cost_right.mean() / right.mean(), -cost_left.mean() / (left + cost_left).mean()])
    torch.testing.assert_close(increases, expected)
    assert summary(increases).startswith("2 samples: the true caption's loss is lower for 50%")
    high = torch.cat([t_right, t_left]) >= 500
    true, swapped = torch.cat([right, left + cost_left]), torch.cat([right + cost_right, left])
    lines = noise_summary(*by_noise)  # only high noise tells the captions apart
    assert lines[0].startswith("noise 0..0.5: +0.00% (")
    assert lines[-1] == f"noise 0.5..1: {swapped[high].mean() / true[high].mean() - 1:+.2%} ({int(high.sum())} draws)"
    with pytest.raises(ValueError, match="no caption holds any of the words"):
        probe(LeftHeavy(), [{B.CAPTION: ["a white cross"]}], MIRROR)
