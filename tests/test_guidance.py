"""Classifier-free guidance and the shared backbone call."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from ldm.backbones.base import Backbone
from ldm.conditioning.conditioning import Conditioning
from ldm.diffusion.guidance import CFGDenoiser, predict
from ldm.diffusion.objectives import DDPM, FlowMatching


class FakeBackbone(Backbone):
    """Output depends on every input; records each call."""

    def __init__(self, out_channels: int = 2) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.calls: list[dict[str, Tensor | None]] = []

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None, vector: Tensor | None = None) -> Tensor:
        self.calls.append({"x": x, "t": t, "context": context, "vector": vector})
        out = x[:, : self.out_channels] * x.shape[1] + t.view(-1, 1, 1, 1) / 1000  # (B, C_out, H, W)
        return out + context.mean((1, 2)).view(-1, 1, 1, 1) + vector.square().mean(1).view(-1, 1, 1, 1)


def conditioning(seed: int, batch: int = 3) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    crossattn, vector = torch.randn(batch, 5, 4, generator=g), torch.randn(batch, 6, generator=g)
    return Conditioning(crossattn, vector, torch.randn(batch, 1, 4, 4, generator=g))


def test_predict_stacks_concat_and_passes_context_and_vector():
    model, cond, x, t = FakeBackbone(), conditioning(0), torch.randn(3, 2, 4, 4), torch.rand(3)
    out = predict(model, x, t, cond)
    (call,) = model.calls
    torch.testing.assert_close(call["x"], torch.cat([x, cond.concat], 1))
    assert call["t"] is t and call["context"] is cond.crossattn and call["vector"] is cond.vector
    assert out.shape == x.shape


def test_predict_without_concat_passes_the_latent_as_is():
    model, x = FakeBackbone(), torch.randn(3, 2, 4, 4)
    predict(model, x, torch.rand(3), Conditioning(torch.randn(3, 5, 4), torch.randn(3, 6)))
    assert model.calls[0]["x"] is x


@pytest.mark.parametrize("objective", [DDPM("v"), FlowMatching()], ids=["ddpm-v", "flow"])
@pytest.mark.parametrize("uncond", [None, conditioning(1)], ids=["no-uncond", "uncond"])
def test_scale_one_is_the_conditional_model_in_one_pass(objective, uncond):
    model, cond, x, t = FakeBackbone(), conditioning(0), torch.randn(3, 2, 4, 4), objective.sample_t(3)
    x0, eps = CFGDenoiser(model, objective, cond, uncond, scale=1.0)(x, t)
    assert len(model.calls) == 1 and model.calls[0]["x"].shape[0] == 3
    ref_x0, ref_eps = objective.to_x0_eps(predict(FakeBackbone(), x, objective.model_time(t), cond), x, t)
    assert torch.equal(x0, ref_x0) and torch.equal(eps, ref_eps)


@pytest.mark.parametrize("objective", [DDPM("eps"), FlowMatching(shift=3.0)], ids=["ddpm-eps", "flow"])
def test_guided_prediction_combines_in_one_doubled_pass(objective):
    model, cond, uncond = FakeBackbone(), conditioning(0), conditioning(1)
    x, t, scale = torch.randn(3, 2, 4, 4), objective.sample_t(3), 4.5
    x0, eps = CFGDenoiser(model, objective, cond, uncond, scale)(x, t)
    (call,) = model.calls
    assert call["x"].shape[0] == 6
    torch.testing.assert_close(call["t"], objective.model_time(torch.cat([t, t])))
    t_model = objective.model_time(t)
    pred_c, pred_u = predict(FakeBackbone(), x, t_model, cond), predict(FakeBackbone(), x, t_model, uncond)
    ref_x0, ref_eps = objective.to_x0_eps(pred_u + scale * (pred_c - pred_u), x, t)  # Ho & Salimans 2022, Eq. 6
    torch.testing.assert_close(x0, ref_x0)
    torch.testing.assert_close(eps, ref_eps)
