"""A guard against non-finite losses and gradients, shared by both LightningModules.

A NaN or inf loss or gradient skips that optimizer step: the gradients are dropped (set to None),
so the optimizer leaves every parameter and its moments as they were, and the module skips its EMA
update. Skipped steps are counted (``train/nonfinite_steps``); after ``max_consecutive`` in a row
the run stops with a message naming the step, the last finite loss and the likely causes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn


class NonFiniteTraining(RuntimeError):
    """Training produced nothing but non-finite losses or gradients for too long."""


class NonFiniteGuard:
    """Decides, once per optimizer step, whether its loss and gradients are finite."""

    def __init__(self, max_consecutive: int = 10) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_nonfinite_steps must be at least 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.skipped = 0  # steps skipped in this run
        self.consecutive = 0
        self.last_finite: tuple[int, float] | None = None  # (step, loss)

    @torch.no_grad()
    def step_is_finite(self, step: int, loss: Tensor | None, parameters: Iterable[nn.Parameter]) -> bool:
        """True if ``loss`` and every gradient are finite; otherwise drop the gradients (the step then
        changes nothing), count it, and raise NonFiniteTraining after ``max_consecutive`` in a row."""
        params = [p for p in parameters if p.grad is not None]
        grads = [p.grad for p in params]
        checks = [torch.stack(torch._foreach_norm(grads)).isfinite().all()] if grads else []
        if loss is not None:
            checks.append(loss.detach().isfinite().all())
        finite = bool(torch.stack(checks).all()) if checks else True  # one host sync per step
        if finite:
            self.consecutive = 0
            if loss is not None:
                self.last_finite = (step, float(loss.detach().float().mean()))
            return True
        for p in params:
            p.grad = None
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            last = "no finite loss yet" if self.last_finite is None else \
                f"the last finite loss was {self.last_finite[1]:.6g} at step {self.last_finite[0]}"
            raise NonFiniteTraining(
                f"{self.consecutive} optimizer steps in a row, up to step {step}, had a non-finite loss or gradient "
                f"(each was skipped); {last}. Likely causes: a learning rate too high for this model and batch size, "
                "fp16 overflow (use bf16-mixed), or input data with NaN/inf values. Raise max_nonfinite_steps to "
                "tolerate more."
            )
        return False


def assert_finite_state(state: Mapping[str, Tensor], what: str) -> None:
    """Refuse to write ``what`` when any floating tensor of ``state`` holds NaN or inf."""
    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise NonFiniteTraining(f"refusing to write {what}: non-finite values in {bad[:5]}"
                                + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
