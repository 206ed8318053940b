"""Pretrained parts used frozen: which parameters do not train, and modules that stay in eval mode."""

from __future__ import annotations

from torch import nn


def frozen_names(module: nn.Module) -> set[str]:
    """Names of ``module``'s parameters that do not train (frozen pretrained parts, rebuilt from their files)."""
    return {name for name, p in module.named_parameters() if not p.requires_grad}


def is_frozen(module: nn.Module) -> bool:
    """Whether ``module`` has parameters and none of them trains."""
    flags = [p.requires_grad for p in module.parameters()]
    return bool(flags) and not any(flags)


class StaysInEval(nn.Module):
    """A module holding a frozen network that ``train()`` leaves in eval mode, whatever its parent does.

    ``frozen_part`` names that submodule; "" keeps the whole module in eval mode (dropout and
    normalisation always behave as at inference, where the network was trained).
    """

    frozen_part: str = ""

    def train(self, mode: bool = True) -> StaysInEval:
        super().train(mode and bool(self.frozen_part))
        if self.frozen_part:
            self.get_submodule(self.frozen_part).eval()
        return self
