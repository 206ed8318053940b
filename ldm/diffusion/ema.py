"""Exponential moving average of a model's weights, kept as a frozen fp32 copy."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class EMA(nn.Module):
    """A frozen copy whose parameters track the model's by lerp; buffers are copied as they are.

    Shadow weights and the update count are registered state, so they land in ``state_dict()`` (and
    a Lightning checkpoint) of whatever module holds this one. Build the optimizer over the trained
    model's parameters only: the shadow's are frozen.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9999,  # per-update decay once warmed up
        warmup: bool = True,  # decay min(decay, (1 + n) / (10 + n)) after n updates
    ) -> None:
        super().__init__()
        self.decay = decay
        self.warmup = warmup
        self.module = copy.deepcopy(model).float().eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> torch.Tensor:
        """The decay the next update uses, a 0-d tensor on the EMA's device (reading it needs no host sync)."""
        if not self.warmup:
            return torch.full((), self.decay, device=self.num_updates.device)
        n = self.num_updates.float()
        return torch.clamp((1 + n) / (10 + n), max=self.decay)

    @torch.no_grad()
    def update(self, model: nn.Module, apply: torch.Tensor | bool = True) -> None:
        """shadow <- decay * shadow + (1 - decay) * param, in fp32; where ``apply`` (a device bool, e.g. the
        step was finite) is false nothing changes. All on the device: no host sync."""
        apply = torch.as_tensor(apply, device=self.num_updates.device)
        weight = (1 - self.current_decay()) * apply
        shadow = list(self.module.parameters())
        torch._foreach_lerp_(shadow, [p.detach().float() for p in model.parameters()], weight)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(torch.where(apply, b.to(b_ema.dtype), b_ema))
        self.num_updates += apply.long()

    def _pairs(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(``model``'s tensor, the shadow's): parameters, then buffers, matched by position.

        The tensors themselves, not ``state_dict()``: under FSDP a state dict holds gathered clones, while each
        parameter is a view into this rank's shard, laid out as the shadow's (each backbone is one FSDP unit,
        see ``ldm.training.fsdp.wrap_policy``), so writing them pairwise writes the shards.
        """
        model_tensors = [*model.parameters(), *model.buffers()]
        return list(zip(model_tensors, [*self.module.parameters(), *self.module.buffers()], strict=True))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the EMA parameters and buffers into ``model``'s own (cast to its dtypes; under FSDP, its shards)."""
        for dst, src in self._pairs(model):
            dst.copy_(src)

    @contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """Run a block with the EMA weights in ``model``; its trained weights come back afterwards."""
        pairs = self._pairs(model)
        trained = [dst.detach().clone() for dst, _ in pairs]
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for (dst, _), saved in zip(pairs, trained):
                    dst.copy_(saved)
