"""The JSON report of `ldm test`: every test metric, under the name it was logged with, and how the samples were made."""

from __future__ import annotations

import json
import os
from typing import Any

import lightning as L


class EvaluationReport(L.Callback):
    """Writes ``<log dir>/<filename>`` at the end of a test run: metrics, sample count, sampler, steps,
    guidance, seed and checkpoint, so a number can be compared and reproduced."""

    def __init__(self, filename: str = "report.json") -> None:
        super().__init__()
        self.filename = filename

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = trainer.log_dir or trainer.default_root_dir  # a broadcast: every rank must ask
        if not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        sampler = getattr(pl_module, "sampler", None)
        hp = pl_module.hparams
        report: dict[str, Any] = {
            "metrics": metrics,
            "num_samples": int(metrics.get("test/samples", 0)) or None,  # generated images (SampleMetrics)
            "sampler": getattr(sampler, "kind", None),
            "steps": getattr(sampler, "steps", None),
            "guidance": hp.get("cfg_scale"),
            "seed": hp.get("seed"),
            "checkpoint": trainer.ckpt_path,
            "model": type(pl_module).__name__,
        }
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, self.filename)
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
        print(f"evaluation report: {path}")
