"""A guard against non-finite losses and gradients, shared by both LightningModules.

A NaN or inf loss or gradient skips that optimizer step: the optimizer leaves every parameter and
its moments as they were, and the module skips its EMA update. Skipped steps are counted
(``train/nonfinite_steps``); after ``max_consecutive`` in a row the run stops with a message naming
the step, the last finite loss and the likely causes.

With a fused Adam/AdamW (the default optimizer parts) the decision stays on the device: the guard
hands the optimizer ``found_inf``, the flag its fused kernel already honours (as it does for AMP's
gradient scaler), so no step waits for the host; the run of skipped steps is read on the host only
every ``max_consecutive`` steps. Any other optimizer gets its gradients dropped (set to None) after a
host-side check, one sync per step. Under FSDP each rank sees only its shards of the gradients, so the ranks
agree on the decision by an all-reduce of the flag (on the device: no host sync); under DDP every rank already
holds the same all-reduced gradients.

Every other non-finite value a run produces (latent statistics, validation metrics, a checkpoint or an export)
ends it the same way: ``diverged`` builds the one message, naming the step, the likely causes and what to change.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.fsdp._common_utils import _is_fsdp_flattened
from torch.distributed.tensor import DTensor

# what makes a run diverge, most likely first, each with the setting that changes it
LIKELY_CAUSES = ("a learning rate too high for this model and batch size (--model.init_args.optimizer.init_args.lr), "
                 "fp16 overflow (use bf16-mixed), or input data with NaN/inf values")


class NonFiniteTraining(RuntimeError):
    """A run produced NaN/inf values (losses and gradients for too long, latent statistics, metrics, weights)."""


def diverged(problem: str, advice: str = "") -> NonFiniteTraining:
    """The error that ends a run with a non-finite value: ``problem`` (which names the step), the likely causes,
    then ``advice``; raised from ldm's code, the `ldm` CLI ends in this one line."""
    return NonFiniteTraining(f"{problem}. Likely causes: {LIKELY_CAUSES}." + (f" {advice}" if advice else ""))


def _takes_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and bool(optimizer.defaults.get("fused"))


def _sharded(optimizer: torch.optim.Optimizer) -> bool:
    """Whether FSDP manages ``optimizer``'s parameters: then each rank holds only its shards of their gradients."""
    return any(_is_fsdp_flattened(p) for group in optimizer.param_groups for p in group["params"])


def _on_every_rank(finite: Tensor) -> Tensor:
    """``finite`` where it holds on every rank: an all-reduce (MIN) queued on the device, not a host sync."""
    flag = finite.to(torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return flag.bool()


class NonFiniteGuard:
    """Decides, once per optimizer step, whether its loss and gradients are finite, and makes the step a no-op if not."""

    def __init__(self, max_consecutive: int = 10) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_nonfinite_steps must be at least 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.skipped: Tensor | float = 0.0  # steps skipped in this run (a float device tensor, as Lightning logs it)
        self._consecutive: Tensor | int = 0
        self._last_loss = torch.tensor(float("nan"))  # the last finite loss (on the device once one was seen)

    @torch.no_grad()
    def check(self, step: int, loss: Tensor | None, optimizer: torch.optim.Optimizer, scaled: bool = False) -> Tensor:
        """A device bool: are ``loss`` and every gradient of ``optimizer`` finite? If not, the coming
        ``optimizer.step()`` changes nothing. ``scaled``: an AMP gradient scaler already skips inf steps
        (and owns ``found_inf``), so only the gradients are dropped. Raises NonFiniteTraining after a run
        of ``max_consecutive`` skipped steps."""
        optimizer = getattr(optimizer, "optimizer", optimizer)  # Lightning's wrapper holds the torch optimizer
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms = torch._foreach_norm([p.grad for p in params]) if params else []
        checks = [torch.stack(norms).isfinite().all()] if params else []
        if loss is not None:
            checks.append(loss.detach().isfinite().all())
        device = loss.device if loss is not None else params[0].device if params else torch.device("cpu")
        finite = torch.stack(checks).all() if checks else torch.tensor(True, device=device)
        if _sharded(optimizer):  # FSDP: a non-finite shard on one rank skips the step on all of them
            finite = _on_every_rank(finite)
        if scaled:
            pass  # the gradient scaler skips an inf step itself
        elif _takes_found_inf(optimizer):
            optimizer.found_inf = (~finite).float()  # the fused kernel skips the update on the device
        elif not finite:  # a host sync: drop the gradients, the optimizer then skips every parameter
            for p in params:
                p.grad = None
        self._count(step, loss, finite)
        return finite

    def _count(self, step: int, loss: Tensor | None, finite: Tensor) -> None:
        """Device-side counters; the host reads them every ``max_consecutive`` steps."""
        bad = (~finite).long()
        self.skipped = self.skipped + bad.float()
        self._consecutive = (self._consecutive + 1) * bad
        if loss is not None:
            self._last_loss = torch.where(finite, loss.detach().float().mean(), self._last_loss.to(finite.device))
        if (step + 1) % self.max_consecutive == 0:
            self.raise_if_stuck(step)

    def raise_if_stuck(self, step: int) -> None:
        """Raise NonFiniteTraining when the last ``max_consecutive`` steps were all skipped (reads the host)."""
        consecutive = int(self._consecutive)
        if consecutive < self.max_consecutive:
            return
        last_loss = float(self._last_loss)
        last = "no finite loss yet" if math.isnan(last_loss) else \
            f"the last finite loss was {last_loss:.6g} at step {step - consecutive}"
        raise diverged(f"{consecutive} optimizer steps in a row, up to step {step}, had a non-finite loss or gradient "
                       f"(each was skipped); {last}", "Raise max_nonfinite_steps to tolerate more.")


def _local(tensor: Tensor) -> Tensor:
    """This rank's part of a tensor of a sharded state dict (FSDP's ShardedTensor or a DTensor), else the tensor."""
    if isinstance(tensor, ShardedTensor):
        return tensor.local_tensor()
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def assert_finite_state(state: Mapping[str, Tensor], what: str, step: int | None = None) -> None:
    """Refuse to write ``what`` (of training step ``step``, where known) when any floating tensor of ``state``
    holds NaN or inf."""
    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(_local(v)).all()]
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        at = "" if step is None else f" at step {step}"
        raise diverged(f"refusing to write {what}: non-finite values in {bad[:5]}{more}{at}")
