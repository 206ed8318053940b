"""Classifier-free guidance as a wrapper that turns a backbone into a sampler's denoiser."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ldm.conditioning.conditioning import Conditioning
from ldm.diffusion.objectives import Objective

BackboneFn = Callable[..., Tensor]  # called like Backbone.forward(x, t, context=, vector=)


def predict(backbone: BackboneFn, x: Tensor, t_model: Tensor, cond: Conditioning) -> Tensor:
    """The backbone's prediction for noisy latents x (B, C, H, W) at backbone times t_model (B,).

    The one place concat conditioning is stacked on the channels, shared by training and sampling.
    """
    if cond.concat is not None:
        x = torch.cat([x, cond.concat], 1)  # (B, C + C_concat, H, W)
    return backbone(x, t_model, context=cond.crossattn, vector=cond.vector)


class CFGDenoiser:
    """A sampler's denoiser (x_t, t) -> (x0_hat, eps_hat) with classifier-free guidance.

    Guidance combines the objective's predictions; since ``to_x0_eps`` is linear in the prediction
    and the weights sum to one, this equals guiding eps (or x0) for every objective.
    """

    def __init__(
        self,
        backbone: BackboneFn,
        objective: Objective,
        cond: Conditioning,  # conditioning of the batch to sample
        uncond: Conditioning | None = None,  # the "empty" conditioning, same fields as cond
        scale: float = 1.0,  # guidance scale; 1 is the conditional model alone
    ) -> None:
        self.backbone = backbone
        self.objective = objective
        self.cond = cond
        self.uncond = uncond
        self.scale = scale

    def __call__(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        t_model = self.objective.model_time(t)  # (B,)
        if self.uncond is None or self.scale == 1.0:
            pred = predict(self.backbone, x, t_model, self.cond)  # (B, C, H, W)
        else:
            cond = self.cond.cat_batch(self.uncond)  # (2B, ...): conditional first
            both = predict(self.backbone, torch.cat([x, x]), torch.cat([t_model, t_model]), cond)  # (2B, C, H, W)
            pred_cond, pred_uncond = both.chunk(2)  # (B, C, H, W) each
            pred = pred_uncond + self.scale * (pred_cond - pred_uncond)  # Ho & Salimans 2022, Eq. 6
        return self.objective.to_x0_eps(pred, x, t)
