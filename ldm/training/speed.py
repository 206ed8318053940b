"""Training fast paths shared by both LightningModules: channels-last memory, torch.compile, and gradient
clipping that works with the fused optimizers."""

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


def amp_scaler(trainer: Any) -> torch.amp.GradScaler | None:
    """The trainer's fp16 gradient scaler, if it has one (bf16 and fp32 scale nothing)."""
    return getattr(trainer.precision_plugin, "scaler", None)


@torch.no_grad()
def clip_gradients(
    optimizer: torch.optim.Optimizer, max_value: float, algorithm: str = "norm", scaler: torch.amp.GradScaler | None = None
) -> None:
    """Clip ``optimizer``'s gradients to ``max_value`` (their total norm, or each value) in true units.

    Lightning refuses to clip for a fused optimizer under mixed precision because the fused kernel
    unscales fp16 gradients itself; this unscales them first (the scaler's step then knows they are),
    and with bf16 nothing is scaled at all. Call it where Lightning has already unscaled any other
    optimizer's gradients: ``on_before_optimizer_step`` or ``configure_gradient_clipping``.
    """
    if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
        scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if algorithm == "norm":
        torch.nn.utils.clip_grad_norm_(params, max_value, foreach=True)
    else:
        torch.nn.utils.clip_grad_value_(params, max_value, foreach=True)
