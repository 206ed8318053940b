"""The device a benchmark runs on: its option, and a clock that waits for the device's queued work."""

from __future__ import annotations

import argparse
import time

import torch

from ldm.callbacks.monitor import synchronize


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")


def clock(device: torch.device) -> float:
    """`time.perf_counter()` once ``device`` has run what was queued: CUDA runs asynchronously."""
    synchronize(device)
    return time.perf_counter()
