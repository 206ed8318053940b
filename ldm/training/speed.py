"""Training fast paths shared by both LightningModules: channels-last memory, torch.compile, and gradient
clipping that works with the fused optimizers."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel


def speed_up(module: nn.Module, channels_last: bool = False, compile: dict[str, Any] | bool = False) -> None:
    """Make ``module`` faster in place, keeping its parameter names (checkpoints stay interchangeable).

    ``channels_last`` stores 4-d weights NHWC; convolutions then run in that layout (oneDNN on CPU,
    cuDNN on GPU) and pass it on to their outputs. ``compile`` (True, or torch.compile's keyword
    arguments such as ``{mode: max-autotune}``) compiles ``module.forward`` on its first call, with static
    shapes unless ``dynamic`` is given: each new input shape (the last, smaller batch; sampling's
    guidance-doubled batch; another bucket's resolution) compiles once. Torch's automatic dynamic shapes
    (``dynamic: null``) would recompile once and then mark the changing sizes dynamic, but inductor then fails
    on the UNet's attention when a latent side changes (torch 2.14: "cannot determine truth value of Relational").
    Channels-last is left off, with a warning, for a module that measured slower with it (``channels_last_pays``).
    """
    if channels_last and channels_last_pays(module):
        module.to(memory_format=torch.channels_last)
    elif channels_last:
        warnings.warn(f"channels_last: {type(module).__name__} keeps its NCHW weights, its training step measured "
                      "no faster channels-last (README, Performance)", stacklevel=2)
    if compile:
        module.compile(**{"dynamic": False, **(compile if isinstance(compile, dict) else {})})


def channels_last_pays(module: nn.Module) -> bool:
    """Whether channels-last speeds up ``module``'s training: yes unless its class says ``channels_last_pays = False``,
    as SD's kl-f8 autoencoder does (``tools/benchmark.py compare --arch vae --fast``: 0.05-0.08 slower relative to
    diffusers on CPU at 64 px, no faster at 128 px; README, Performance)."""
    return getattr(module, "channels_last_pays", True)


def channels_last_weights(module: nn.Module) -> bool:
    """Whether any of ``module``'s 4-d weights are stored NHWC (``speed_up`` chose channels-last for it)."""
    return any(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in module.parameters())


def amp_scaler(trainer: Any) -> torch.amp.GradScaler | None:
    """The trainer's fp16 gradient scaler, if it has one (bf16 and fp32 scale nothing)."""
    return getattr(trainer.precision_plugin, "scaler", None)


@torch.no_grad()
def clip_gradients(
    optimizer: torch.optim.Optimizer,
    max_value: float,
    algorithm: str = "norm",
    scaler: torch.amp.GradScaler | None = None,
    model: nn.Module | None = None,  # the module the strategy runs (trainer.strategy.model)
) -> None:
    """Clip ``optimizer``'s gradients to ``max_value`` (their total norm, or each value) in true units.

    Lightning refuses to clip for a fused optimizer under mixed precision because the fused kernel
    unscales fp16 gradients itself; this unscales them first (the scaler's step then knows they are),
    and with bf16 nothing is scaled at all. Call it where Lightning has already unscaled any other
    optimizer's gradients: ``on_before_optimizer_step`` or ``configure_gradient_clipping``.
    When ``model`` is an FSDP root, each rank holds only its shards of the gradients: the norm is then FSDP's
    own over every rank's shards (``clip_grad_norm_``, a collective), over all the model's gradients, which
    under automatic optimization (one optimizer) are this optimizer's. Each value clips without the other ranks.
    """
    if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
        scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if algorithm != "norm":
        torch.nn.utils.clip_grad_value_(params, max_value, foreach=True)
    elif isinstance(model, FullyShardedDataParallel):
        model.clip_grad_norm_(max_value)
    else:
        torch.nn.utils.clip_grad_norm_(params, max_value, foreach=True)
