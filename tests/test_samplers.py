"""Oracle tests: with data whose exact denoiser is closed-form, samplers must produce that data.

Also what each solver states about itself: its evaluations per sample and its options."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from jsonargparse import ArgumentParser
from torch import Tensor

from ldm.diffusion.objectives import DDPM, FlowMatching, Objective
from ldm.diffusion.samplers import (
    DDIM,
    DDPMAncestral,
    Denoiser,
    DPMSolverPP2M,
    Euler,
    Heun,
    Sampler,
)
from tests.tiny_models import OBJECTIVES, SAMPLERS
from tests.tiny_modules import OneJump
DETERMINISTIC = [(DDIM, {}), (DPMSolverPP2M, {}), (Euler, {}), (Heun, {})]
ODE_TOLERANCE = {"ddim": 0.1, "euler": 0.1, "dpmpp_2m": 0.05, "heun": 0.05}  # max error at 100 steps, by order
STOCHASTIC = [(DDPMAncestral, {}), (DDIM, {"eta": 1.0}), (DDIM, {"eta": 0.5})]
IDS = lambda case: f"{case[0].kind}{case[1].get('eta', '')}"  # noqa: E731


def gaussian_denoiser(objective: Objective, mean: Tensor | float, var: float) -> Denoiser:
    """The exact denoiser for data N(mean, var I) (var = 0: a single point), returned through the
    objective's own target and to_x0_eps so the prediction conversions are under test too."""

    def denoise(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        alpha, sigma = (a.view(-1, 1, 1, 1) for a in objective.alpha_sigma(t))
        x0 = mean + alpha * var / (alpha**2 * var + sigma**2) * (x - alpha * mean)  # E[x0 | x_t]
        eps = (x - alpha * x0) / sigma
        return objective.to_x0_eps(objective.target(x0, eps, t), x, t)

    return denoise


def start(objective: Objective, times: Tensor, mean: float, var: float, noise: Tensor) -> Tensor:
    """x at times[0] drawn from its exact marginal N(alpha mean, (alpha^2 var + sigma^2) I)."""
    alpha, sigma = (a.double().item() for a in objective.alpha_sigma(times[:1]))
    return alpha * mean + (alpha**2 * var + sigma**2) ** 0.5 * noise


def noise(seed: int = 0, shape: tuple[int, ...] = (64, 1, 16, 16)) -> Tensor:
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", DETERMINISTIC + STOCHASTIC, ids=IDS)
def test_recovers_a_single_point(objective, case):
    x0 = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    sampler = case[0](steps=10, **case[1])
    denoise = gaussian_denoiser(objective, x0, 0.0)
    out = sampler(denoise, torch.randn(4, 3, 8, 8), objective, torch.Generator().manual_seed(2))
    torch.testing.assert_close(out, x0.expand_as(out), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", DETERMINISTIC, ids=IDS)
def test_ode_samplers_follow_the_exact_gaussian_flow(objective, case):
    """For N(mu, s^2) data the probability-flow ODE maps the start's noise n to mu + s n exactly."""
    mean, var, n = 1.0, 0.25, noise()
    times = objective.sampling_times(100)
    x = start(objective, times, mean, var, n)
    sampler = case[0](**case[1])
    out = sampler.solve(gaussian_denoiser(objective, mean, var), x, times, objective.alpha_sigma)
    assert torch.isfinite(out).all()
    assert (out - (mean + var**0.5 * n)).abs().max().item() < ODE_TOLERANCE[sampler.kind]
    assert abs(out.std().item() - var**0.5 * n.std().item()) < 0.03


@pytest.mark.parametrize("case", STOCHASTIC, ids=IDS)
def test_stochastic_samplers_reach_the_gaussian(objective, case):
    mean, var = 1.0, 0.25
    times = objective.sampling_times(250)
    x = start(objective, times, mean, var, noise())
    generator = torch.Generator().manual_seed(3)
    out = case[0](**case[1]).solve(gaussian_denoiser(objective, mean, var), x, times, objective.alpha_sigma, generator)
    assert out.mean().item() == pytest.approx(mean, abs=0.02)
    assert out.std().item() == pytest.approx(var**0.5, abs=0.03)


@pytest.mark.parametrize("objective_name", ["flow-uniform", "ddpm-v-cosine"])
def test_second_order_solvers_beat_first_order(objective_name):
    obj, mean, var, n = OBJECTIVES[objective_name](), 1.0, 0.25, noise()
    times = obj.sampling_times(40)
    x, exact = start(obj, times, mean, var, n), mean + var**0.5 * n
    err = {c.kind: (c().solve(gaussian_denoiser(obj, mean, var), x, times, obj.alpha_sigma) - exact).abs().max().item()
           for c in (Euler, DPMSolverPP2M, Heun)}
    assert err["dpmpp_2m"] < err["euler"] / 4 and err["heun"] < err["euler"] / 4


def test_heun_converges_at_second_order():
    obj, mean, var, n = FlowMatching("uniform"), 1.0, 0.25, noise()
    errs = []
    for steps in (20, 40):
        times = obj.sampling_times(steps)
        x = start(obj, times, mean, var, n)
        out = Heun().solve(gaussian_denoiser(obj, mean, var), x, times, obj.alpha_sigma)
        errs.append((out - (mean + var**0.5 * n)).abs().max().item())
    assert errs[0] / errs[1] > 3.5  # halving the step divides the error by ~4


def test_flow_euler_and_heun_are_the_usual_ones_in_t():
    obj = FlowMatching(shift=3.0)
    denoise = gaussian_denoiser(obj, 1.0, 0.25)
    times, x = obj.sampling_times(6), noise(shape=(4, 1, 4, 4))

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        x0, eps = denoise(x, t.expand(x.shape[0]))
        return eps - x0

    euler, heun = x.clone(), x.clone()
    for t, t_n in zip(times[:-1], times[1:]):
        euler = euler + (t_n - t) * velocity(euler, t)
        d = velocity(heun, t)
        pred = heun + (t_n - t) * d
        heun = heun + (t_n - t) * (d + velocity(pred, t_n)) / 2 if t_n > 0 else pred
    torch.testing.assert_close(Euler().solve(denoise, x, times, obj.alpha_sigma), euler)
    torch.testing.assert_close(Heun().solve(denoise, x, times, obj.alpha_sigma), heun)


def test_ddim_limits(objective):
    """DDIM with eta = 1 is ancestral DDPM (same draws), with eta = 0 it is Euler on the flow ODE."""
    denoise, times, x = gaussian_denoiser(objective, 1.0, 0.25), objective.sampling_times(8), noise(shape=(4, 1, 4, 4))
    run = lambda sampler: sampler.solve(denoise, x, times, objective.alpha_sigma, torch.Generator().manual_seed(0))  # noqa: E731
    torch.testing.assert_close(run(DDIM(eta=1.0)), run(DDPMAncestral()))
    torch.testing.assert_close(run(DDIM(eta=0.0)), run(Euler()))


@pytest.mark.parametrize("case", STOCHASTIC, ids=IDS)
def test_seeded_samples_are_reproducible(case):
    obj = DDPM("v")
    sampler, x = case[0](steps=5, **case[1]), torch.randn(2, 3, 8, 8)
    denoise = gaussian_denoiser(obj, 0.0, 1.0)
    draw = lambda seed: sampler(denoise, x, obj, torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(0), draw(0))
    assert not torch.allclose(draw(0), draw(1))


def test_denoiser_never_sees_the_clean_end(objective):
    seen = []

    def denoise(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        seen.append(t)
        return gaussian_denoiser(objective, 0.0, 1.0)(x, t)

    for cls in SAMPLERS:
        cls(steps=4)(denoise, torch.randn(2, 1, 4, 4), objective)
    assert all(t.shape == (2,) and objective.alpha_sigma(t)[1].min() > 0 for t in seen)


@pytest.mark.parametrize("objective_name", ["ddpm-v-ztsnr", "flow-logit_normal-shift3"])
@pytest.mark.parametrize("cls", SAMPLERS, ids=lambda cls: cls.kind)
@pytest.mark.parametrize("steps", [1, 2, 5])
def test_each_solver_states_its_evaluations(cls, steps, objective_name):
    """NFE as tools/sampler_table.py reports it: the denoiser calls of one run, whatever the batch."""
    objective, calls = OBJECTIVES[objective_name](), []

    def denoise(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        calls.append(t)
        return gaussian_denoiser(objective, 0.0, 1.0)(x, t)

    sampler = cls(steps=steps)
    sampler(denoise, torch.randn(3, 1, 4, 4), objective, torch.Generator().manual_seed(0))
    assert len(calls) == sampler.evaluations()


def test_a_new_sampler_is_one_class_chosen_by_class_path():
    """LatentDiffusion's ``sampler: Sampler | None``: jsonargparse builds any subclass from its class_path."""
    parser = ArgumentParser()
    parser.add_argument("--sampler", type=Sampler | None)
    config = parser.parse_args(["--sampler", json.dumps({"class_path": "tests.tiny_modules.OneJump", "init_args": {"steps": 3}})])
    sampler = parser.instantiate(config).sampler
    assert type(sampler) is OneJump and sampler.steps == 3
    x0 = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    out = sampler(gaussian_denoiser(DDPM("v"), x0, 0.0), torch.randn(2, 3, 8, 8), DDPM("v"))
    torch.testing.assert_close(out, x0.expand_as(out), atol=1e-5, rtol=1e-5)


def test_kinds_name_one_sampler_each():
    """tools/sampler_table.py and the test report name a sampler by its kind."""
    assert {DDPMAncestral, DDIM, DPMSolverPP2M, Euler, Heun} <= set(SAMPLERS)
    assert len({cls.kind for cls in SAMPLERS}) == len(SAMPLERS)


def test_eta_belongs_to_ddim_alone():
    """Ancestral DDPM is DDIM at eta = 1 (test_ddim_limits); the ODE solvers are deterministic."""
    assert [cls for cls in SAMPLERS if "eta" in inspect.signature(cls).parameters] == [DDIM]
    with pytest.raises(TypeError, match="eta"):
        DPMSolverPP2M(steps=2, eta=0.5)
