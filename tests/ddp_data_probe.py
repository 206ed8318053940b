"""Fit a 1-parameter model under real CPU DDP (2 ranks, gloo) on WebDataModule; record the captions seen.

Run by tests/test_data_ddp.py in a subprocess: Lightning's DDP launcher re-executes `sys.argv`, so
the script must be its own entry point. Each rank writes `<out>/rank<r>.json` with the captions of
every train and val batch it stepped on, per epoch. Gradients are all-reduced every training step
and the validation step all-reduces too, so ranks with unequal batch counts hang instead of passing.

    python tests/ddp_data_probe.py --train 'shards/train-{0000..0002}.tar' --val shards/val.tar --out /tmp/probe
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L
import torch

from ldm.data.buckets import AspectBuckets
from ldm.data.datamodule import WebDataModule


class CaptionRecorder(L.LightningModule):
    """Trivial DDP model whose steps record the captions of their batches per epoch."""

    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out = out
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.seen: dict[str, dict[int, list]] = {"train": defaultdict(list), "val": defaultdict(list), "buckets": defaultdict(list)}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self.seen["train"][self.current_epoch].append(list(batch["caption"]))
        if "target_size" in batch:  # bucketed: one bucket per batch, at its size
            assert {tuple(s) for s in batch["target_size"].tolist()} == {tuple(batch["image"].shape[-2:])}
            self.seen["buckets"][self.current_epoch].append(batch["image"].shape[-1])
        return (self.weight * batch["image"].mean()) ** 2  # backward all-reduces the gradient across ranks

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.trainer.strategy.barrier()  # a collective: a rank with more val batches than the other blocks here
        if not self.trainer.sanity_checking:
            self.seen["val"][self.current_epoch].append(list(batch["caption"]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_fit_end(self) -> None:
        record = {
            "world_size": self.trainer.world_size,
            "num_training_batches": self.trainer.num_training_batches,
            "num_val_batches": self.trainer.num_val_batches[0],
            **self.seen,
        }
        (self.out / f"rank{self.global_rank}.json").write_text(json.dumps(record))
        self.trainer.strategy.barrier()  # rank 0's exit ends the test's wait: every rank's file is written by then


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", required=True, help="train shard pattern")
    parser.add_argument("--val", required=True, help="val shard pattern")
    parser.add_argument("--out", type=Path, required=True, help="folder for rank<r>.json")
    parser.add_argument("--shuffle-buffer", type=int, default=4)
    parser.add_argument("--buckets", action="store_true", help="aspect-ratio buckets (16x8, 8x8, 8x16)")
    args = parser.parse_args()
    data = WebDataModule(train=args.train, val=args.val, batch_size=2, num_workers=2, resolution=8,
                         shuffle_buffer=args.shuffle_buffer, buckets=AspectBuckets(2.0, 8) if args.buckets else None)
    trainer = L.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_epochs=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(CaptionRecorder(args.out), datamodule=data)


if __name__ == "__main__":
    main()
