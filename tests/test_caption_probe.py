"""tools/caption_probe.py: the word swap, and the loss comparison at the same draws (its run on a trained model:
test_latent_diffusion.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import torch
from torch import Tensor

from ldm.data import batch as B
from tools.caption_probe import parse_swaps, probe, summary, swap_words

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
    """Stands in for LatentDiffusion: each sample's loss is a draw from the generator, plus 1 if its caption says "left"."""

    def timed_loss(self, batch: Mapping[str, Any], generator: torch.Generator) -> tuple[Tensor, Tensor]:
        captions = batch[B.CAPTION]
        draw = torch.rand(len(captions), generator=generator) + 1  # the same for the same seed, whatever the caption
        return draw + torch.tensor([float("left" in c.split()) for c in captions]), torch.zeros(len(captions))


def test_probe_compares_each_changed_caption_at_the_same_draws() -> None:
    batches = [{B.CAPTION: ["a red circle on the right", "a blue square in the center"]},
               {B.CAPTION: ["a green star on the left"]}, {B.CAPTION: ["a white cross"]}]
    draws = torch.stack([torch.rand(2, generator=torch.Generator().manual_seed(s)) + 1 for s in range(3)]).mean(0)
    one = torch.stack([torch.rand(1, generator=torch.Generator().manual_seed(s)) + 1 for s in range(3)]).mean(0)
    increases = probe(LeftHeavy(), batches, MIRROR, seeds=3)  # the center and the cross have nothing to swap
    expected = torch.cat([1 / draws[:1], -1 / (one + 1)])  # right -> left costs 1; left -> right saves 1
    torch.testing.assert_close(increases, expected)
    assert summary(increases).startswith("2 samples: the true caption's loss is lower for 50%")
    with pytest.raises(ValueError, match="no caption holds any of the words"):
        probe(LeftHeavy(), [{B.CAPTION: ["a white cross"]}], MIRROR)
