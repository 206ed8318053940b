"""Samplers: one class each, written on a Gaussian path's (alpha, sigma).

A sampler's ``solve`` takes a denoiser (x_t, t) -> (x0_hat, eps_hat), the start x at times[0], the
times from the noise end to the clean end, and the objective's ``alpha_sigma``; the last time must have
sigma = 0. The denoiser is never called there. Step coefficients are Python floats, and endpoints with
alpha = 0 or sigma = 0 are handled without NaN. Any noise a sampler draws comes from ``generator``: one
generator for the batch, or one per sample, so that a sample's trajectory is its own whatever batch it
is drawn in.

Add one: a ``Sampler`` subclass (here or in a module of your own) with its ``kind``, its ``solve``, its
``evaluations`` if it is not one per step and its ``diffusers_scheduler`` if diffusers has one, and a
``configs/sampler/<name>.yaml`` naming its ``class_path``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from ldm.diffusion.objectives import Objective

Denoiser = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]  # (x_t, t (B,)) -> (x0_hat, eps_hat)
AlphaSigma = Callable[[Tensor], tuple[Tensor, Tensor]]  # times -> (alpha, sigma)
Generators = torch.Generator | Sequence[torch.Generator] | None  # one for the batch, or one per sample


def randn(shape: torch.Size | tuple[int, ...], generator: Generators, device: torch.device | str | None = None,
          dtype: torch.dtype | None = None) -> Tensor:
    """N(0, I) noise of ``shape`` (B, ...): from one generator, or sample i's from ``generator[i]`` (drawn on
    that generator's device, then moved), so each sample's noise does not depend on the others."""
    if isinstance(generator, Sequence):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        draws = [torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype) for g in generator]
        return torch.stack(draws).to(device)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def _steps(times: Tensor, alpha_sigma: AlphaSigma) -> list[tuple[Tensor, Tensor, float, float, float, float]]:
    """Per step from time t to the next, cleaner time n: (t, t_n, alpha_t, sigma_t, alpha_n, sigma_n)."""
    alpha, sigma = (a.double().tolist() for a in alpha_sigma(times))
    return [(times[i], times[i + 1], alpha[i], sigma[i], alpha[i + 1], sigma[i + 1]) for i in range(len(times) - 1)]


def _straight_steps(times: Tensor, alpha_sigma: AlphaSigma) -> list[tuple[Tensor, Tensor, float, float, float, float]]:
    """Per step, in straight coordinates: (t, t_n, k_t, u_t, k_n, u_n) with k = alpha + sigma, u = sigma / k.

    z = x / k is then the straight path (1 - u) x0 + u eps, whose probability-flow ODE is dz/du = E[eps - x0 | z].
    """
    return [(t, t_n, a_t + s_t, s_t / (a_t + s_t), a_n + s_n, s_n / (a_n + s_n))
            for t, t_n, a_t, s_t, a_n, s_n in _steps(times, alpha_sigma)]


def _call(denoise: Denoiser, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    return denoise(x, t.expand(x.shape[0]))  # t: () -> (B,)


def _posterior_std(a_t: float, s_t: float, a_n: float, s_n: float) -> float:
    """Std of q(x_n | x_t, x0): sigma_n / sigma_t * sqrt(sigma_t^2 - (alpha_t / alpha_n)^2 sigma_n^2)."""
    return s_n / s_t * math.sqrt(max(s_t**2 - (a_t / a_n * s_n) ** 2, 0.0))


def _add_noise(x: Tensor, std: float, generator: Generators) -> Tensor:
    if std == 0:
        return x
    return x + std * randn(x.shape, generator, x.device, x.dtype)


class Sampler(ABC):
    """A solver chosen in YAML by ``class_path``: draws a sample from noise with any objective's times.

    The noise N(0, I) is taken as x at the first time: exact where alpha = 0 there (flow matching,
    zero terminal SNR), the usual approximation for other DDPM schedules (alpha_T ~ 0.07).
    """

    kind: ClassVar[str]  # its short name in test reports and tools/sampler_table.py

    def __init__(self, steps: int = 25) -> None:
        self.steps = steps  # solver steps

    @abstractmethod
    def solve(self, denoise: Denoiser, x: Tensor, times: Tensor, alpha_sigma: AlphaSigma,
              generator: Generators = None) -> Tensor:
        """x at times[-1], the clean end, from x at times[0]."""

    def evaluations(self) -> int:
        """Denoiser evaluations per sample of one run (NFE): one per step unless a solver says otherwise.

        Classifier-free guidance doubles the batch of each evaluation, not their number.
        """
        return self.steps

    def diffusers_scheduler(self) -> tuple[type, dict[str, Any]] | None:
        """diffusers' scheduler class of this solver and its settings beyond the objective's; None where it has none."""
        return None

    def __call__(self, denoise: Denoiser, noise: Tensor, objective: Objective, generator: Generators = None) -> Tensor:
        times = objective.sampling_times(self.steps).to(noise.device)  # (steps+1,)
        return self.solve(denoise, noise, times, objective.alpha_sigma, generator)


class DDPMAncestral(Sampler):
    """Ancestral sampling from the posterior q(x_n | x_t, x0_hat) (Ho et al. 2020, Eq. 7, on any (alpha, sigma)).

    Fully stochastic: DDIM with eta = 1 draws the same samples.
    """

    kind = "ddpm"

    def solve(self, denoise: Denoiser, x: Tensor, times: Tensor, alpha_sigma: AlphaSigma,
              generator: Generators = None) -> Tensor:
        for t, _, a_t, s_t, a_n, s_n in _steps(times, alpha_sigma):
            x0, _ = _call(denoise, x, t)
            a_tn = a_t / a_n  # alpha_{t|n}; the transition's variance is sigma_t^2 - alpha_{t|n}^2 sigma_n^2
            var_tn = s_t**2 - a_tn**2 * s_n**2
            x = a_tn * s_n**2 / s_t**2 * x + a_n * var_tn / s_t**2 * x0  # Ho et al. 2020, Eq. 7 (posterior mean)
            x = _add_noise(x, _posterior_std(a_t, s_t, a_n, s_n), generator)
        return x

    def diffusers_scheduler(self) -> tuple[type, dict[str, Any]]:
        from diffusers import DDPMScheduler

        return DDPMScheduler, {"clip_sample": False}


class DDIM(Sampler):
    """DDIM: eta = 0 is deterministic, eta = 1 equals ancestral DDPM (Song et al. 2021, Eq. 12 and 16)."""

    kind = "ddim"

    def __init__(self, steps: int = 25, eta: float = 0.0) -> None:
        super().__init__(steps)
        self.eta = eta  # stochasticity: 0 deterministic, 1 ancestral

    def solve(self, denoise: Denoiser, x: Tensor, times: Tensor, alpha_sigma: AlphaSigma,
              generator: Generators = None) -> Tensor:
        for t, _, a_t, s_t, a_n, s_n in _steps(times, alpha_sigma):
            x0, eps = _call(denoise, x, t)
            c = self.eta * _posterior_std(a_t, s_t, a_n, s_n)  # Song et al. 2021, Eq. 16
            x = a_n * x0 + math.sqrt(max(s_n**2 - c**2, 0.0)) * eps  # Song et al. 2021, Eq. 12
            x = _add_noise(x, c, generator)
        return x

    def diffusers_scheduler(self) -> tuple[type, dict[str, Any]]:
        from diffusers import DDIMScheduler

        return DDIMScheduler, {"clip_sample": False, "set_alpha_to_one": True}  # eta: a pipeline call argument


class DPMSolverPP2M(Sampler):
    """DPM-Solver++(2M): multistep on the data prediction in lambda = log(alpha / sigma) (Lu et al. 2022, Alg. 2).

    The first step and the step onto sigma = 0 are first order. lambda = -inf where alpha = 0, so the
    step after such a start has h_prev = inf and no correction. Deterministic.
    """

    kind = "dpmpp_2m"

    def solve(self, denoise: Denoiser, x: Tensor, times: Tensor, alpha_sigma: AlphaSigma,
              generator: Generators = None) -> Tensor:
        x0_prev, h_prev = None, math.inf
        for t, _, a_t, s_t, a_n, s_n in _steps(times, alpha_sigma):
            x0, _ = _call(denoise, x, t)
            h = math.log(a_n / s_n) - math.log(a_t / s_t) if a_t > 0 and s_n > 0 else math.inf  # lambda_n - lambda_t
            # (1 + 1/2r) x0 - 1/2r x0_prev with r = h_prev / h
            d = x0 if x0_prev is None or s_n == 0 else x0 + h / (2 * h_prev) * (x0 - x0_prev)
            x = s_n / s_t * x - a_n * math.expm1(-h) * d  # Lu et al. 2022, Alg. 2: the ODE's exact solution for constant d
            x0_prev, h_prev = x0, h
        return x

    def diffusers_scheduler(self) -> tuple[type, dict[str, Any]]:
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                             "final_sigmas_type": "zero"}


class Euler(Sampler):
    """Euler on the probability-flow ODE (Karras et al. 2022, Alg. 1), in the straight coordinates of ``_straight_steps``.

    There an Euler step lands on alpha_n x0_hat + sigma_n eps_hat: DDIM with eta = 0.
    """

    kind = "euler"

    def solve(self, denoise: Denoiser, x: Tensor, times: Tensor, alpha_sigma: AlphaSigma,
              generator: Generators = None) -> Tensor:
        for t, _, k_t, u_t, k_n, u_n in _straight_steps(times, alpha_sigma):
            x0, eps = _call(denoise, x, t)
            x = k_n * (x / k_t + (u_n - u_t) * (eps - x0))  # z_n = z_t + (u_n - u_t) dz/du
        return x

    def diffusers_scheduler(self) -> tuple[type, dict[str, Any]]:
        from diffusers import EulerDiscreteScheduler

        return EulerDiscreteScheduler, {"final_sigmas_type": "zero"}


class Heun(Sampler):
    """Heun on the probability-flow ODE (Karras et al. 2022, Alg. 2), with an Euler step onto sigma = 0.

    It integrates the straight path's ODE dz/du = E[eps - x0 | z] (``_straight_steps``), which any Gaussian
    path becomes in z = x / (alpha + sigma), u = sigma / (alpha + sigma). For flow matching (alpha + sigma = 1)
    it is plain Heun in t on the velocity; on DDPM paths it needs no special step at alpha = 0 (u = 1) or
    sigma = 0 (u = 0). Deterministic.
    """

    kind = "heun"

    def solve(self, denoise: Denoiser, x: Tensor, times: Tensor, alpha_sigma: AlphaSigma,
              generator: Generators = None) -> Tensor:
        for t, t_n, k_t, u_t, k_n, u_n in _straight_steps(times, alpha_sigma):
            x0, eps = _call(denoise, x, t)
            z, d = x / k_t, eps - x0  # z_t and dz/du at t
            z_n = z + (u_n - u_t) * d  # Karras et al. 2022, Alg. 2, Euler predictor
            if u_n > 0:  # sigma_n > 0
                x0_n, eps_n = _call(denoise, k_n * z_n, t_n)
                z_n = z + (u_n - u_t) * (d + eps_n - x0_n) / 2  # Karras et al. 2022, Alg. 2, trapezoidal corrector
            x = k_n * z_n
        return x

    def evaluations(self) -> int:
        return 2 * self.steps - 1  # two per step but the last, onto sigma = 0

    def diffusers_scheduler(self) -> tuple[type, dict[str, Any]]:
        from diffusers import HeunDiscreteScheduler

        return HeunDiscreteScheduler, {}
