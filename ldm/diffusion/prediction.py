"""What the network regresses on a Gaussian path x_t = alpha x0 + sigma eps, and how that converts back.

A parameterisation is a linear map of (x0, eps) at (alpha, sigma) that ``to_x0_eps`` inverts given x_t,
exactly on any path (variance preserving or flow), so one class serves every objective and the exporter.
``alpha`` and ``sigma`` arrive broadcastable over x (B, 1, ..., 1), or as (B,) with (B,) tensors.
Add one: subclass ``Prediction`` here or in a module of your own, with its ``name`` (the string objectives
accept once it is imported) and its ``diffusers_name``; a YAML part can also name it by ``class_path``.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor


class Prediction:
    """One parameterisation of the network's output."""

    name: ClassVar[str]  # what objectives accept as ``prediction: <name>``
    diffusers_name: ClassVar[str | None] = None  # diffusers' ``prediction_type``; None: diffusers has none

    def target(self, x0: Tensor, noise: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """What the network regresses for clean x0 and noise eps."""
        raise NotImplementedError

    def to_x0_eps(self, pred: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """The denoiser's (x0_hat, eps_hat) from a prediction at x_t; linear in pred."""
        raise NotImplementedError

    @staticmethod
    def named(name: str) -> Prediction:
        """The parameterisation called ``name`` among the subclasses imported so far."""
        known = {cls.name: cls for cls in Prediction.__subclasses__()}
        if name not in known:
            raise ValueError(f"unknown prediction {name!r}: one of {sorted(known)}, or a Prediction's class_path")
        return known[name]()


class Eps(Prediction):
    """The noise eps (Ho et al. 2020, Eq. 14); x0 = (x_t - sigma eps) / alpha needs alpha > 0."""

    name, diffusers_name = "eps", "epsilon"

    def target(self, x0: Tensor, noise: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return noise

    def to_x0_eps(self, pred: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        return (x_t - sigma * pred) / alpha, pred


class X0(Prediction):
    """The clean sample x0 itself; eps = (x_t - alpha x0) / sigma."""

    name, diffusers_name = "x0", "sample"

    def target(self, x0: Tensor, noise: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return x0

    def to_x0_eps(self, pred: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        return pred, (x_t - alpha * pred) / sigma


class V(Prediction):
    """v = alpha eps - sigma x0 (Salimans & Ho 2022, Sec. 4), well posed at both ends of the path."""

    name, diffusers_name = "v", "v_prediction"

    def target(self, x0: Tensor, noise: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return alpha * noise - sigma * x0

    def to_x0_eps(self, pred: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        det = alpha**2 + sigma**2  # 1 on variance-preserving paths
        return (alpha * x_t - sigma * pred) / det, (sigma * x_t + alpha * pred) / det


class Velocity(Prediction):
    """The straight path's velocity eps - x0, rectified flow's dx_t/dt (Liu et al. 2022, Eq. 1).

    On any path, x_t / (alpha + sigma) moves along (1 - u) x0 + u eps with u = sigma / (alpha + sigma)
    at this velocity. diffusers' "flow_prediction" assumes flow sigmas, so it has no name there.
    """

    name = "velocity"

    def target(self, x0: Tensor, noise: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        return noise - x0

    def to_x0_eps(self, pred: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        k = alpha + sigma  # 1 on the rectified flow path
        return (x_t - sigma * pred) / k, (x_t + alpha * pred) / k
