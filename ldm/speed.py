"""Training fast paths shared by both LightningModules: channels-last memory and torch.compile."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def speed_up(module: nn.Module, channels_last: bool = False, compile: dict[str, Any] | bool = False) -> None:
    """Make ``module`` faster in place, keeping its parameter names (checkpoints stay interchangeable).

    ``channels_last`` stores 4-d weights NHWC; convolutions then run in that layout (oneDNN on CPU,
    cuDNN on GPU) and pass it on to their outputs. ``compile`` (True, or torch.compile's keyword
    arguments such as ``{mode: max-autotune, dynamic: false}``) compiles ``module.forward`` on its
    first call. A new input shape (the last, smaller batch; sampling's guidance-doubled batch; another
    resolution) recompiles; after the first recompile torch marks the changing sizes dynamic, so it
    stops (pass ``dynamic: false`` to keep static kernels, at one compile per shape).
    """
    if channels_last:
        module.to(memory_format=torch.channels_last)
    if compile:
        module.compile(**(compile if isinstance(compile, dict) else {}))
