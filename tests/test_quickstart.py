"""The --fast quickstart runs the whole two-stage pipeline through the real CLI and produces what it announces."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent


def test_fast_quickstart_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "qs"
    proc = subprocess.run([sys.executable, "tools/quickstart.py", "--fast", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("1/5", "2/5", "3/5", "4/5", "5/5", "done in"):
        assert f"=== quickstart: {stage}" in proc.stdout
    assert "tensorboard --logdir" in proc.stdout
    # a clean first run: no warning with its source location (Python's or Lightning's), no traceback, no
    # advertisement, no model summary counting 0 FLOPs
    noise = [line for line in (proc.stdout + proc.stderr).splitlines()
             if re.match(r"\S+\.py:\d+: ", line) or any(s in line for s in ("Traceback", "litlogger", "FLOPs"))]
    assert not noise, noise
    # the stage-1 fit exports the autoencoder with its latent statistics for stage 2
    assert bool(load_file(out / "autoencoder.safetensors")["latent_stats_estimated"])
    for stage in ("autoencoder", "txt2img_unet"):
        run = out / stage / "version_0"
        assert list(run.glob("events.out.tfevents.*")) and (run / "config.yaml").is_file()
        assert (run / "checkpoints" / "last.ckpt").is_file() and list((run / "images").glob("*.png"))
    report = json.loads((out / "txt2img_unet_test" / "version_0" / "report.json").read_text())
    assert "test/loss" in report["metrics"] and report["sampler"] == "dpmpp_2m" and report["checkpoint"]
    samples = sorted((out / "txt2img_unet_predict" / "version_0" / "predictions").glob("*.png"))
    assert len(samples) == 8 and Image.open(samples[0]).size == (64, 64)
    assert Image.open(out / "samples.png").size[0] > 4 * 64
    # resuming skips the finished stages and still produces the report and the grid
    proc = subprocess.run([sys.executable, "tools/quickstart.py", "--fast", "--resume", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "$ ldm" not in proc.stdout
