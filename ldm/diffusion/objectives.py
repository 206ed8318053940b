"""Training objectives, each a Gaussian path x_t = alpha(t) x0 + sigma(t) eps.

An objective owns its times, its (alpha, sigma) and its time spacing for sampling; what the network
regresses is its ``Prediction`` (ldm/diffusion/prediction.py). Samplers see only (alpha, sigma) and a
denoiser's (x0_hat, eps_hat), so every objective works with every sampler.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import torch
from torch import Tensor

from ldm.diffusion.prediction import Prediction
from ldm.diffusion.schedules import (
    cosine_betas,
    linear_betas,
    rescale_zero_terminal_snr,
    scaled_linear_betas,
    draw_times,
    shifted_linear_times,
    trailing_timesteps,
)
from ldm.diffusion.weighting import LossWeighting, Uniform


def _bcast(a: Tensor, x: Tensor) -> Tensor:
    """View per-sample coefficients (B,) so they broadcast over x (B, ...)."""
    return a.view(-1, *[1] * (x.ndim - 1))


class Objective:
    """A Gaussian path, its training-time distribution and its regression target.

    Subclasses set up their path before calling ``Objective.__init__``, which refuses a prediction that
    cannot give x0 at the path's noise end (eps where alpha = 0 there).
    """

    def __init__(self, prediction: str | Prediction, weighting: LossWeighting | None = None) -> None:
        self.prediction = prediction if isinstance(prediction, Prediction) else Prediction.named(prediction)
        self.weighting = weighting or Uniform()  # per-timestep weight on the MSE
        alpha, sigma = self.alpha_sigma(self.sampling_times(1)[:1])  # (1,) each, at the noise end
        if not self.prediction.to_x0_eps(torch.ones(1), torch.ones(1), alpha, sigma)[0].isfinite().all():
            raise ValueError(
                f"prediction={self.prediction.name!r} is ill-posed on this path: it gives no x0 at the noise end, "
                "where alpha = 0; use prediction='v' (Lin et al. 2024, Sec. 3.2)"
            )

    def sample_t(
        self, n: int, device: torch.device | str | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """(n,) training times."""
        raise NotImplementedError

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Signal and noise scales at times t, each shaped like t."""
        raise NotImplementedError

    def model_time(self, t: Tensor) -> Tensor:
        """The timestep the backbone sees: DDPM's step index 0..N-1, flow matching's 1000 t (0..1000)."""
        raise NotImplementedError

    def sampling_times(self, steps: int) -> Tensor:
        """(steps + 1,) times from the noise end to the clean end, where sigma = 0 and alpha = 1."""
        raise NotImplementedError

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the network regresses at times t (B,)."""
        alpha, sigma = (_bcast(a, x0) for a in self.alpha_sigma(t))
        return self.prediction.target(x0, noise, alpha, sigma)

    def to_x0_eps(self, pred: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """The denoiser's (x0_hat, eps_hat) from a prediction at times t (B,); linear in pred."""
        alpha, sigma = (_bcast(a, x_t) for a in self.alpha_sigma(t))
        return self.prediction.to_x0_eps(pred, x_t, alpha, sigma)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        alpha, sigma = self.alpha_sigma(t)  # (B,), (B,)
        return _bcast(alpha, x0) * x0 + _bcast(sigma, x0) * noise  # x_t = alpha x0 + sigma eps

    def loss(self, pred: Tensor, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """(B,) weighted mean-squared error of the prediction."""
        alpha, sigma = self.alpha_sigma(t)  # (B,), (B,)
        # x0_hat = a x_t + b pred, so MSE on pred weighs the x0 error by 1 / b^2 (eps: snr, v: snr + 1, x0: 1)
        b = self.prediction.to_x0_eps(torch.ones_like(alpha), torch.zeros_like(alpha), alpha, sigma)[0]  # (B,)
        weight = self.weighting(alpha**2 / sigma**2, b.pow(-2))  # (B,)
        mse = (pred.float() - self.target(x0, noise, t).float()).pow(2).flatten(1).mean(1)  # (B,)
        return weight * mse


class DDPM(Objective):
    """Discrete variance-preserving diffusion: t is the step index, alpha = sqrt(abar), sigma = sqrt(1 - abar).

    Sampling ends at t = -1, the clean end (abar = 1), which the network never sees. Training steps are uniform
    by default; ``time_sampling`` and ``shift`` draw a step's fraction of the schedule as FlowMatching draws its
    times (on the cosine schedule a fraction u has nearly the SNR of flow time u), to train more where a sample's
    layout is decided without leaving the path a trained model knows. Sampling times stay trailing.
    """

    def __init__(
        self,
        prediction: str | Prediction = "eps",  # what the network regresses: eps, v, x0, velocity, or a class_path
        schedule: Literal["linear", "scaled_linear", "cosine"] = "scaled_linear",
        num_timesteps: int = 1000,  # training steps N; t in 0..N-1
        beta_start: float = 0.00085,  # linear schedules only
        beta_end: float = 0.012,  # linear schedules only
        zero_terminal_snr: bool = False,  # rescale so step N-1 is pure noise (Lin et al. 2024)
        weighting: LossWeighting | None = None,  # default: plain MSE
        time_sampling: Literal["uniform", "logit_normal"] = "uniform",  # the training steps' fractions
        logit_mean: float = 0.0,  # location of their logit under logit_normal
        logit_std: float = 1.0,  # scale of their logit under logit_normal
        shift: float = 1.0,  # > 1 trains more at high noise (shift_time)
    ) -> None:
        betas = {
            "linear": partial(linear_betas, num_timesteps, beta_start, beta_end),
            "scaled_linear": partial(scaled_linear_betas, num_timesteps, beta_start, beta_end),
            "cosine": partial(cosine_betas, num_timesteps),
        }[schedule]()  # (N,)
        abar = torch.cumprod(1 - betas, 0)  # (N,)
        if zero_terminal_snr:
            abar = rescale_zero_terminal_snr(abar)
        abar = torch.cat([abar.new_ones(1), abar])  # (N+1,) indexed by t + 1: t = -1 is the clean end
        self.num_timesteps = num_timesteps
        self.time_sampling, self.logit_mean, self.logit_std, self.shift = time_sampling, logit_mean, logit_std, shift
        self._alpha, self._sigma = abar.sqrt().float(), (1 - abar).sqrt().float()  # (N+1,) each
        super().__init__(prediction, weighting)  # eps is refused with zero_terminal_snr: alpha = 0 at step N-1

    def sample_t(
        self, n: int, device: torch.device | str | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        if self.time_sampling == "uniform" and self.shift == 1:
            return torch.randint(0, self.num_timesteps, (n,), device=device, generator=generator).float()  # (n,)
        u = draw_times(n, self.time_sampling, self.logit_mean, self.logit_std, self.shift, device, generator)  # (n,)
        return (u * self.num_timesteps).floor().clamp(max=self.num_timesteps - 1)  # (n,) step indices

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        i = t.round().long() + 1
        return self._alpha.to(t.device)[i], self._sigma.to(t.device)[i]

    def model_time(self, t: Tensor) -> Tensor:
        return t

    def sampling_times(self, steps: int) -> Tensor:
        return trailing_timesteps(self.num_timesteps, steps)  # (steps+1,)


class FlowMatching(Objective):
    """Rectified flow x_t = (1 - t) x0 + t eps, by default regressing the velocity eps - x0 (Liu et al. 2022).

    ``shift`` warps training and sampling times alike, so a model trained shifted samples shifted.
    """

    def __init__(
        self,
        time_sampling: Literal["uniform", "logit_normal"] = "logit_normal",  # Esser et al. 2024, Sec. 3.1
        logit_mean: float = 0.0,  # location of logit(t) under logit_normal
        logit_std: float = 1.0,  # scale of logit(t) under logit_normal
        shift: float = 1.0,  # > 1 puts more time at high noise (large images)
        prediction: str | Prediction = "velocity",  # what the network regresses: velocity, x0, v, or a class_path
        weighting: LossWeighting | None = None,  # default: plain MSE
    ) -> None:
        self.time_sampling, self.logit_mean, self.logit_std, self.shift = time_sampling, logit_mean, logit_std, shift
        super().__init__(prediction, weighting)  # eps is refused: alpha = 0 at t = 1

    def sample_t(
        self, n: int, device: torch.device | str | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        return draw_times(n, self.time_sampling, self.logit_mean, self.logit_std, self.shift, device, generator)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return 1 - t, t

    def model_time(self, t: Tensor) -> Tensor:
        return t * 1000

    def sampling_times(self, steps: int) -> Tensor:
        return shifted_linear_times(steps, self.shift)  # (steps+1,)
