"""Does a trained model use some words of its captions? Its loss with those words swapped, against the true caption.

    python tools/caption_probe.py --config experiments/shapes/txt2vid_dit.yaml \\
        --ckpt runs/shapes-txt2vid-dit/version_0/checkpoints/last.ckpt --swap left=right right=left up=down down=up

Every other option goes to the model and data as `ldm fit` takes it (e.g. --model.init_args.backbone ...).

For each validation sample whose caption holds a swapped word, the diffusion loss of the checkpoint's EMA weights
with the words swapped (all at once: "top left" becomes "bottom right" under left=right right=left top=bottom
bottom=top) against the loss with the true caption, at the same latents, noise and times, averaged over `--seeds`
draws. It prints how many samples were probed, on how many the true caption's loss is lower, and the mean relative
increase (`--by-noise K`: also in K equal ranges of noise level, which tell whether the words count where a
sample's layout is drawn). Near 0%, with the true caption lower about half the time, the model does not tell the
words apart: the README's Video and Any aspect ratio sections follow a motion's sign and the position words this
way while samples still draw them at chance.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable, Mapping
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor

from ldm.cli import instantiate_trained, refusals
from ldm.data import batch as B
from ldm.diffusion.loss_by_noise import LossByNoise
from ldm.diffusion.module import LatentDiffusion


def parse_swaps(pairs: list[str]) -> dict[str, str]:
    """``["left=right", "right=left"]`` -> {"left": "right", "right": "left"}; a malformed pair raises naming it."""
    table = {}
    for pair in pairs:
        word, _, other = pair.partition("=")
        if not word.strip() or not other.strip():
            raise ValueError(f"--swap {pair!r}: give WORD=OTHER, e.g. left=right")
        table[word.strip()] = other.strip()
    return table


def swap_words(caption: str, table: Mapping[str, str]) -> str:
    """``caption`` with every whole word of ``table`` replaced at once (so left=right right=left exchanges them)."""
    pattern = r"\b(" + "|".join(re.escape(word) for word in sorted(table, key=len, reverse=True)) + r")\b"
    return re.sub(pattern, lambda match: table[match.group(1)], caption)


def probe(model: LatentDiffusion, batches: Iterable[Mapping[str, Any]], table: Mapping[str, str], seeds: int = 3,
          device: str = "cpu", by_noise: tuple[LossByNoise, LossByNoise] | None = None) -> Tensor:
    """(swapped loss - true loss) / true loss for each sample whose caption the swap changes, (N,); the model and
    batches on ``device``. ``by_noise``: (true, swapped) metrics that also take each draw's losses by noise level."""
    increases = []
    for batch in batches:
        captions = list(batch[B.CAPTION])
        swapped = [swap_words(caption, table) for caption in captions]
        changed = torch.tensor([s != c for s, c in zip(swapped, captions, strict=True)])
        if not changed.any():
            continue
        (true, t), (other, _) = (_losses(model, {**batch, B.CAPTION: text}, seeds, device) for text in (captions, swapped))
        swapped_draws = changed.to(t.device)
        for metric, losses in zip(by_noise or (), (true, other)):
            metric.update(losses[:, swapped_draws].flatten(), t[:, swapped_draws].flatten())
        true, other = true.mean(0), other.mean(0)  # (B,) each
        increases.append(((other - true) / true).cpu()[changed])
    if not increases:
        raise ValueError(f"no caption holds any of the words {sorted(table)}")
    return torch.cat(increases)


def _losses(model: LatentDiffusion, batch: Mapping[str, Any], seeds: int, device: str) -> tuple[Tensor, Tensor]:
    """Each sample's loss and time at ``seeds`` draws of latents, noise and times, seeded 0, 1, ...: (S, B) each."""
    with torch.no_grad():
        draws = [model.timed_loss(batch, torch.Generator(device).manual_seed(seed)) for seed in range(seeds)]
    return torch.stack([loss for loss, _ in draws]), torch.stack([t for _, t in draws])


def summary(increases: Tensor) -> str:
    """One line: samples probed, how often the true caption's loss is lower, the mean relative increase."""
    return (f"{len(increases)} samples: the true caption's loss is lower for {(increases > 0).float().mean():.0%}; "
            f"swapping raises the loss by {increases.mean():+.2%} on average")


def noise_summary(true: LossByNoise, swapped: LossByNoise) -> list[str]:
    """A line per noise level that saw a draw: its range and how much swapping raises the mean loss there."""
    (means, counts), (other, _) = true.compute(), swapped.compute()
    bounds = true.bounds()
    return [f"noise {bounds[k]:.3g}..{bounds[k + 1]:.3g}: {other[k] / means[k] - 1:+.2%} ({int(counts[k])} draws)"
            for k in range(true.buckets) if counts[k]]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True, help="stage-2 Lightning checkpoint or our export .safetensors")
    parser.add_argument("--swap", nargs="+", required=True, metavar="WORD=OTHER", help="words to swap, e.g. left=right right=left")
    parser.add_argument("--batches", type=int, default=9, help="validation batches to probe (fewer if the split ends first)")
    parser.add_argument("--seeds", type=int, default=3, help="draws of latents, noise and times each loss averages")
    parser.add_argument("--by-noise", type=int, default=0, metavar="K",
                        help="also the increase in K equal ranges of noise level (where a sample's layout is drawn)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args, options = parser.parse_known_args(argv)  # the rest: ldm fit's options (--config ... and overrides)
    try:
        table = parse_swaps(args.swap)
    except ValueError as error:
        parser.error(str(error))
    with refusals(parser.prog):
        model, data = instantiate_trained(options, args.ckpt)
        data.setup("validate")
        batches = (move_data_to_device(batch, args.device) for batch in islice(data.val_dataloader(), args.batches))
        by_noise = tuple(LossByNoise(model.objective, args.by_noise).to(args.device) for _ in range(2)) \
            if args.by_noise else None
        print(summary(probe(model.to(args.device), batches, table, args.seeds, args.device, by_noise)))
        if by_noise:
            print("\n".join(noise_summary(*by_noise)))


if __name__ == "__main__":
    main()
