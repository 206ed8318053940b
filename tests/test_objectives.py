"""Schedules, objectives and loss weightings against their formulas."""

from __future__ import annotations

import json
import math

import pytest
import torch
from jsonargparse import ArgumentParser

from ldm.diffusion import prediction
from ldm.diffusion import schedules as S
from ldm.diffusion.objectives import DDPM, FlowMatching
from ldm.diffusion.prediction import X0, Eps, Prediction, V, Velocity
from ldm.diffusion.weighting import MinSNR


def test_linear_schedules():
    b = S.linear_betas(1000, 1e-4, 0.02)
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)
    s = S.scaled_linear_betas(1000, 0.00085, 0.012)
    assert s[0].item() == pytest.approx(0.00085) and s[-1].item() == pytest.approx(0.012)
    step = s.sqrt().diff()
    torch.testing.assert_close(step, step[:1].expand_as(step))  # linear in sqrt(beta)


def test_cosine_schedule_matches_closed_form():
    betas = S.cosine_betas(1000)
    abar = torch.cumprod(1 - betas, 0)
    t = torch.arange(1, 1001, dtype=torch.float64)
    f = lambda t: torch.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    torch.testing.assert_close(abar[:900], (f(t) / f(torch.zeros(1, dtype=torch.float64)))[:900])
    assert betas.max().item() == pytest.approx(0.999)  # the last betas are clipped


@pytest.mark.parametrize("betas", [S.scaled_linear_betas(1000), S.linear_betas(1000), S.cosine_betas(1000)])
def test_zero_terminal_snr(betas):
    abar = torch.cumprod(1 - betas, 0)
    rescaled = S.rescale_zero_terminal_snr(abar)
    assert rescaled[-1].item() == 0.0
    assert rescaled[0].item() == pytest.approx(abar[0].item(), rel=1e-12)
    assert (rescaled.diff() < 0).all()


def test_ztsnr_objective_starts_from_pure_noise():
    obj = DDPM("v", zero_terminal_snr=True)
    alpha, sigma = obj.alpha_sigma(obj.sampling_times(10))
    assert alpha[0].item() == 0.0 and sigma[0].item() == 1.0


def test_eps_with_zero_terminal_snr_is_refused():
    with pytest.raises(ValueError, match="prediction='v'"):
        DDPM("eps", zero_terminal_snr=True)


def test_time_spacings():
    assert S.trailing_timesteps(10, 3).tolist() == [9, 6, 2, -1]  # starts at the last step whatever the steps
    torch.testing.assert_close(S.shifted_linear_times(4), torch.linspace(1, 0, 5))
    torch.testing.assert_close(S.shifted_linear_times(4, 3.0), S.shift_time(torch.linspace(1, 0, 5), 3.0))


def test_shift_time():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(S.shift_time(t, 1.0), t)
    torch.testing.assert_close(S.shift_time(t, 3.0), 3 * t / (1 + 2 * t))
    assert S.shift_time(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)


def test_prediction_round_trip(objective):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 16, 3, 4, 4, dtype=torch.float64, generator=g)
    t = objective.sample_t(16, generator=g)
    x_t = objective.add_noise(x0, noise, t)
    alpha, sigma = (a.view(-1, 1, 1, 1) for a in objective.alpha_sigma(t))
    torch.testing.assert_close(x_t, alpha * x0 + sigma * noise)
    x0_hat, eps_hat = objective.to_x0_eps(objective.target(x0, noise, t), x_t, t)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, noise)


def test_sampling_times_run_noise_to_clean(objective):
    times = objective.sampling_times(7)
    assert times.shape == (8,)
    alpha, sigma = objective.alpha_sigma(times)
    assert alpha[-1].item() == 1.0 and sigma[-1].item() == 0.0
    assert sigma[0].item() > 0.99 and (sigma.diff() < 0).all()


def test_sample_t_is_reproducible(objective):
    a = objective.sample_t(64, generator=torch.Generator().manual_seed(1))
    b = objective.sample_t(64, generator=torch.Generator().manual_seed(1))
    assert a.shape == (64,) and torch.equal(a, b)
    alpha, sigma = objective.alpha_sigma(a)
    assert ((sigma > 0) & (sigma <= 1) & (alpha >= 0)).all()


def test_uniform_loss_is_mse_and_zero_at_target(objective):
    g = torch.Generator().manual_seed(0)
    x0, noise, pred = torch.randn(3, 8, 2, 4, 4, generator=g)
    t = objective.sample_t(8, generator=g)
    target = objective.target(x0, noise, t)
    torch.testing.assert_close(objective.loss(pred, x0, noise, t), (pred - target).pow(2).mean((1, 2, 3)))
    assert objective.loss(target, x0, noise, t).abs().max().item() < 1e-10


def test_ddpm_times():
    obj = DDPM(num_timesteps=1000)
    assert obj.sampling_times(4).tolist() == [999, 749, 499, 249, -1]  # trailing spacing, then the clean end
    t = obj.sample_t(1000, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() <= 999 and torch.equal(t, t.round())
    assert torch.equal(obj.model_time(t), t)


def test_flow_times():
    obj = FlowMatching(shift=2.0)
    t = torch.rand(5)
    torch.testing.assert_close(obj.model_time(t), 1000 * t)
    torch.testing.assert_close(obj.sampling_times(4), S.shift_time(torch.linspace(1, 0, 5), 2.0))


def test_logit_normal_times():
    t = FlowMatching("logit_normal", logit_mean=0.5).sample_t(20000, generator=torch.Generator().manual_seed(0))
    assert ((t > 0) & (t < 1)).all()
    assert t.median().item() == pytest.approx(torch.sigmoid(torch.tensor(0.5)).item(), abs=0.01)


def test_shift_moves_training_times():
    t = FlowMatching("uniform", shift=3.0).sample_t(20000, generator=torch.Generator().manual_seed(0))
    assert t.median().item() == pytest.approx(0.75, abs=0.01)  # shift_time(0.5, 3)


def test_ddpm_draws_step_fractions_as_flow_draws_times():
    """Uniform steps stay torch.randint's (runs reproduce); logit-normal shifted steps are the flow times' fractions."""
    torch.manual_seed(0)
    steps = DDPM("v", "cosine").sample_t(64)
    torch.manual_seed(0)
    assert torch.equal(steps, torch.randint(0, 1000, (64,)).float())
    shifted = DDPM("v", "cosine", time_sampling="logit_normal", shift=3.0)
    t = shifted.sample_t(20000, generator=torch.Generator().manual_seed(0))
    flow = FlowMatching("logit_normal", shift=3.0).sample_t(20000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, (flow * 1000).floor().clamp(max=999))
    assert t.median().item() == pytest.approx(750, abs=10)  # shift_time(0.5, 3) of the schedule
    assert torch.equal(shifted.sampling_times(4), DDPM().sampling_times(4))  # the path and its sampling unchanged


@pytest.mark.parametrize(
    "prediction, formula",
    [
        ("eps", lambda snr: snr.clamp(max=5) / snr),
        ("v", lambda snr: snr.clamp(max=5) / (snr + 1)),
        ("x0", lambda snr: snr.clamp(max=5)),
    ],
)
def test_min_snr_weight(prediction, formula):
    obj = DDPM(prediction, weighting=MinSNR(5.0))
    g = torch.Generator().manual_seed(0)
    x0, noise, pred = torch.randn(3, 64, 2, 4, 4, generator=g)
    t = torch.linspace(0, 999, 64).round()
    abar = torch.cumprod(1 - S.scaled_linear_betas(1000), 0)[t.long()]
    snr = (abar / (1 - abar)).float()
    mse = (pred - obj.target(x0, noise, t)).pow(2).mean((1, 2, 3))
    torch.testing.assert_close(obj.loss(pred, x0, noise, t), mse * formula(snr))


def test_min_snr_on_flow_weights_the_x0_error():
    obj = FlowMatching("uniform", weighting=MinSNR(5.0))
    g = torch.Generator().manual_seed(0)
    x0, noise, pred = torch.randn(3, 32, 2, 4, 4, generator=g)
    t = torch.linspace(0.01, 0.99, 32)
    x0_hat, _ = obj.to_x0_eps(pred, obj.add_noise(x0, noise, t), t)
    snr = ((1 - t) / t) ** 2
    torch.testing.assert_close(obj.loss(pred, x0, noise, t), snr.clamp(max=5) * (x0_hat - x0).pow(2).mean((1, 2, 3)))


PREDICTIONS = [cls for cls in Prediction.__subclasses__() if cls.__module__ == prediction.__name__]  # the shipped ones


@pytest.mark.parametrize("cls", PREDICTIONS, ids=lambda cls: cls.name)
@pytest.mark.parametrize("path", ["variance-preserving", "flow"])
def test_prediction_inverts_on_any_path(cls, path):
    """Each parameterisation is exact on both path families, which is what lets DDPM and flow share it."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 8, 3, 4, 4, dtype=torch.float64, generator=g)
    u = torch.rand(8, 1, 1, 1, dtype=torch.float64, generator=g) * 0.98 + 0.01
    alpha, sigma = ((1 - u).sqrt(), u.sqrt()) if path == "variance-preserving" else (1 - u, u)
    x0_hat, eps_hat = cls().to_x0_eps(cls().target(x0, noise, alpha, sigma), alpha * x0 + sigma * noise, alpha, sigma)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, noise)


def test_predictions_by_name_instance_or_class_path():
    assert [type(DDPM(name).prediction) for name in ("eps", "v", "x0", "velocity")] == [Eps, V, X0, Velocity]
    assert type(FlowMatching().prediction) is Velocity and type(DDPM(V()).prediction) is V
    with pytest.raises(ValueError, match="unknown prediction 'vee': one of .*'v'"):
        DDPM("vee")
    parser = ArgumentParser()
    parser.add_class_arguments(DDPM, "objective")
    config = parser.parse_args(["--objective.prediction", json.dumps({"class_path": "ldm.diffusion.prediction.V"})])
    assert type(parser.instantiate(config).objective.prediction) is V  # jsonargparse sees DDPM's keyword
    assert parser.parse_args(["--objective.prediction", "v"]).objective.prediction == "v"  # YAML's `prediction: v`


def test_eps_is_refused_where_the_path_starts_from_pure_noise():
    with pytest.raises(ValueError, match="prediction='v'"):
        FlowMatching(prediction="eps")
    FlowMatching(prediction="x0")  # x0 and v are defined at alpha = 0


def test_flow_matching_with_another_prediction_keeps_its_path():
    """x0-prediction on the rectified flow path: same times and noisy samples, another target."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 3, 4, 4, generator=g)
    t = torch.tensor([0.1, 0.4, 0.7, 1.0])
    velocity, x0_pred = FlowMatching("uniform"), FlowMatching("uniform", prediction="x0")
    torch.testing.assert_close(x0_pred.add_noise(x0, noise, t), velocity.add_noise(x0, noise, t))
    torch.testing.assert_close(x0_pred.target(x0, noise, t), x0)
    torch.testing.assert_close(velocity.target(x0, noise, t), noise - x0)
    torch.testing.assert_close(x0_pred.to_x0_eps(x0, x0_pred.add_noise(x0, noise, t), t)[1], noise)
