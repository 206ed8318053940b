"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", Sec. 3
and App. C): choose the EMA length after training instead of before it.

A power-function EMA after t updates averages the weights of update tau <= t with density
p_{t,gamma}(tau) = (gamma + 1) / t * (tau / t)^gamma; its width relative to t is sigma_rel (Eq. 123). Training tracks
two such profiles (``PowerEMA``) and writes their snapshots every N steps (``PowerEMASnapshots``); afterwards
``reconstruct`` finds, by least squares over the snapshots' profiles, the combination closest to the profile of any
other sigma_rel (Alg. 3) and applies it to their weights (tools/posthoc_ema.py).

Each snapshot is an export (the backbone holding the profile's weights, the trained conditioning, the codec's
fingerprint) with its profile in the metadata, so ``init_weights`` and tools/export.py take one as it is, and a
reconstruction alike.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import lightning as L
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from ldm.diffusion.ema import EMA
from ldm.training.fsdp import full_weights
from ldm.training.module import write_weights

MAX_SIGMA_REL = 12**-0.5  # sigma_rel of gamma = 0 (a uniform average): wider profiles need gamma < 0
PROFILE_KEY = "power_ema"  # snapshot metadata: {"sigma_rel", "updates", "step"} of the profile it holds
RECONSTRUCTION_KEY = "posthoc_ema"  # reconstruction metadata: {"sigma_rel", "updates", "step", "snapshots"}
SNAPSHOT_FOLDER = "phema"  # beside the checkpoints
BACKBONE = "backbone."  # the keys a reconstruction combines (their floating-point tensors)


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative standard deviation of the power profile of exponent ``gamma`` (EDM2 Eq. 123)."""
    return ((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) ** 0.5


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent whose profile has width ``sigma_rel``: the positive root of Eq. 123 as a cubic in gamma,
    gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2) = 0 (EDM2 Eq. 126)."""
    if not 0 < sigma_rel < MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel {sigma_rel} is outside (0, {MAX_SIGMA_REL:.4f}): a power-function EMA is at "
                         f"most as wide as the uniform average of all steps")
    s = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def profile_inner_products(t_a: Tensor | float, gamma_a: Tensor | float, t_b: Tensor | float,
                           gamma_b: Tensor | float) -> Tensor:
    """<p_{t_a,gamma_a}, p_{t_b,gamma_b}> = int_0^min(t_a,t_b) p_a p_b, broadcast over the arguments (EDM2 Eq. 151).

    The integral is (ga+1)(gb+1) / (ga+gb+1) * min^(ga+gb+1) / (t_a^(ga+1) t_b^(gb+1)); written as
    (min/max)^g_max / max, with g_max the exponent of the later profile, no power of a time overflows."""
    t_a, gamma_a, t_b, gamma_b = (torch.as_tensor(x, dtype=torch.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    first, last = torch.minimum(t_a, t_b), torch.maximum(t_a, t_b)
    gamma_last = torch.where(t_a <= t_b, gamma_b, gamma_a)
    return (gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1) * (first / last) ** gamma_last / last


def posthoc_coefficients(times: Sequence[float], gammas: Sequence[float], target_times: Sequence[float],
                         target_gammas: Sequence[float]) -> Tensor:
    """(n, m): column j weighs the n snapshot profiles (``times``, ``gammas``) so that their sum is the least-squares
    fit of target profile j, solved from the normal equations of the profiles' inner products (EDM2 Alg. 3).

    Each column is rescaled to sum to one, so that weights which stayed constant are reproduced exactly."""
    t, g = torch.as_tensor(times, dtype=torch.float64)[:, None], torch.as_tensor(gammas, dtype=torch.float64)[:, None]
    gram = profile_inner_products(t, g, t.T, g.T)  # (n, n)
    target = profile_inner_products(t, g, torch.as_tensor(target_times)[None], torch.as_tensor(target_gammas)[None])
    x = torch.linalg.lstsq(gram, target).solution  # (n, m); least squares: many snapshots make the Gram ill-conditioned
    return x / x.sum(dim=0)


class PowerEMA(EMA):
    """EDM2's power-function EMA: after t updates the shadow holds sum_tau w_tau theta_tau with w_tau the mass of
    p_{t,gamma} on [tau - 1, tau], by the decay beta_t = (1 - 1/t)^(gamma + 1) of update t (EDM2 Eq. 127).

    The first update's decay is 0: the weights before training have no share. Updates skipped as non-finite do
    not count, so ``num_updates`` is the profile's t.
    """

    def __init__(self, model: nn.Module, sigma_rel: float) -> None:
        super().__init__(model, warmup=False)
        self.sigma_rel = sigma_rel
        self.gamma = sigma_rel_to_gamma(sigma_rel)

    def current_decay(self) -> Tensor:
        """(1 - 1/t)^(gamma + 1) for the coming update t, on the device (no host sync)."""
        t = self.num_updates.float() + 1
        return torch.exp((self.gamma + 1) * torch.log1p(-1 / t))


class PostHocEMA(TypedDict):
    """LatentDiffusion's ``posthoc_ema`` option."""

    sigma_rels: list[float]  # the profiles tracked, e.g. [0.05, 0.10] (EDM2's)
    every_n_steps: int  # optimizer steps between snapshots (and one when training ends)


def power_emas(model: nn.Module, settings: PostHocEMA | None) -> nn.ModuleList:
    """One PowerEMA of ``model`` per ``settings`` profile (none without settings)."""
    if settings is None:
        return nn.ModuleList()
    if settings["every_n_steps"] < 1 or not settings["sigma_rels"]:
        raise ValueError(f"model.init_args.posthoc_ema: needs sigma_rels (at least one) and every_n_steps >= 1, "
                         f"got {dict(settings)}")
    try:
        return nn.ModuleList(PowerEMA(model, s) for s in settings["sigma_rels"])
    except ValueError as error:
        raise ValueError(f"model.init_args.posthoc_ema.sigma_rels: {error}") from None


def snapshot_name(sigma_rel: float, step: int) -> str:
    return f"{sigma_rel:.3f}-{step:08d}.safetensors"


class PowerEMASnapshots(L.Callback):
    """Writes every post-hoc EMA profile of a LatentDiffusion (its ``power_emas``) each ``every_n_steps`` optimizer
    steps and when training ends, as ``<checkpoint folder>/phema/<sigma_rel>-<step>.safetensors``.

    The module adds it itself (``configure_callbacks``). Rank zero writes; under FSDP every rank takes part in
    gathering the weights. The profiles' state is in the checkpoints (module state), so a resumed run continues them,
    and rewrites any snapshot the lost steps had written.
    """

    def __init__(self, every_n_steps: int) -> None:
        super().__init__()
        self.every_n_steps = every_n_steps
        self._written: int | None = None  # the step whose snapshots exist

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.checkpoint_callback is None:
            raise ValueError("model.init_args.posthoc_ema writes its snapshots beside the checkpoints: "
                             "the trainer has no checkpoint callback (enable_checkpointing is false)")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._written = trainer.global_step  # a resumed run's first step was written before the stop

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: object, batch: object,
                           batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps == 0 and trainer.global_step != self._written:
            self.write(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._written:
            self.write(trainer, pl_module)

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Each profile's snapshot at the current step (none in a fast_dev_run, which writes no checkpoint either)."""
        if trainer.fast_dev_run:
            return
        step, self._written = trainer.global_step, trainer.global_step
        folder = Path(trainer.checkpoint_callback.dirpath) / SNAPSHOT_FOLDER
        with full_weights(trainer.strategy.model):  # a collective under FSDP: every rank enters
            if not trainer.is_global_zero:
                return
            folder.mkdir(parents=True, exist_ok=True)
            for ema in pl_module.power_emas:
                state, metadata = pl_module.export_state(ema)
                profile = {"sigma_rel": ema.sigma_rel, "updates": int(ema.num_updates), "step": step}
                write_weights(state, {**(metadata or {}), PROFILE_KEY: json.dumps(profile)},
                              folder / snapshot_name(ema.sigma_rel, step), step)


@dataclass(frozen=True)
class Snapshot:
    """A snapshot file and the profile it holds."""

    path: Path
    sigma_rel: float
    updates: int  # the profile's t: optimizer steps that updated it
    step: int  # the trainer's global step when it was written

    @classmethod
    def read(cls, path: Path) -> Snapshot:
        with safe_open(str(path), "pt") as f:
            found = (f.metadata() or {}).get(PROFILE_KEY)
        if found is None:
            raise ValueError(f"{path}: not a post-hoc EMA snapshot (no '{PROFILE_KEY}' metadata)")
        return cls(path, **json.loads(found))


def list_snapshots(folder: str | os.PathLike[str]) -> list[Snapshot]:
    """The snapshots in ``folder`` (``*.safetensors``), by step and sigma_rel."""
    paths = sorted(Path(folder).glob("*.safetensors"))
    if not paths:
        raise ValueError(f"{folder}: no post-hoc EMA snapshots (*.safetensors) there")
    return sorted((Snapshot.read(p) for p in paths), key=lambda s: (s.step, s.sigma_rel))


def reconstruct(snapshots: list[Snapshot], sigma_rels: list[float],
                step: int | None = None) -> list[tuple[dict[str, Tensor], dict[str, str]]]:
    """Exports of the EMA of each of ``sigma_rels`` at snapshot step ``step`` (default the last), and their metadata.

    The backbone's floating-point weights are the least-squares combination of the snapshots up to that step
    (``posthoc_coefficients``), accumulated in float64; everything else (the trained conditioning, integer buffers)
    and the metadata are those of a snapshot at that step. Reads each snapshot once; holds one output per sigma_rel.
    """
    step = max(s.step for s in snapshots) if step is None else step
    at_step = [s for s in snapshots if s.step == step]
    if not at_step:
        raise ValueError(f"step {step}: no snapshot was written then (steps: {sorted({s.step for s in snapshots})})")
    used = [s for s in snapshots if 0 < s.updates and s.step <= step]
    gammas = [sigma_rel_to_gamma(s) for s in sigma_rels]
    coefficients = posthoc_coefficients([s.updates for s in used], [sigma_rel_to_gamma(s.sigma_rel) for s in used],
                                        [at_step[0].updates] * len(gammas), gammas)  # (snapshots, outputs)
    base = load_file(at_step[0].path)
    with safe_open(str(at_step[0].path), "pt") as f:
        metadata = f.metadata()
    combined = [k for k, v in base.items() if k.startswith(BACKBONE) and v.is_floating_point()]
    sums = [{k: torch.zeros_like(base[k], dtype=torch.float64) for k in combined} for _ in sigma_rels]
    for i, snapshot in enumerate(used):
        with safe_open(str(snapshot.path), "pt") as f:
            if set(f.keys()) != set(base):
                raise ValueError(f"{snapshot.path}: its keys differ from {at_step[0].path}'s: snapshots of another model?")
            for k in combined:
                weights = f.get_tensor(k).double()
                for out, x in zip(sums, coefficients[i].tolist()):
                    out[k].add_(weights, alpha=x)
    exports = []
    for sigma_rel, out in zip(sigma_rels, sums):
        state = {**base, **{k: v.to(base[k].dtype) for k, v in out.items()}}
        made = {"sigma_rel": sigma_rel, "updates": at_step[0].updates, "step": step, "snapshots": len(used)}
        info = {k: v for k, v in metadata.items() if k != PROFILE_KEY} | {RECONSTRUCTION_KEY: json.dumps(made)}
        exports.append((state, info))
    return exports
