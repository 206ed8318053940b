"""Tiny models for direct (no CLI) tests, the objectives and samplers the tests sweep, and state comparisons."""

from __future__ import annotations

from functools import partial

import torch

from ldm.autoencoder.codec import LatentCodec
from ldm.autoencoder.loss import AutoencoderLoss
from ldm.autoencoder.module import AutoencoderKL
from ldm.autoencoder.vae import VAE
from ldm.backbones.unet import UNet
from ldm.conditioning.conditioner import Conditioner
from ldm.conditioning.label import ClassEmbedder
from ldm.data.synthetic import SHAPES
from ldm.diffusion import samplers
from ldm.diffusion.module import LatentDiffusion
from ldm.diffusion.objectives import DDPM, FlowMatching
from ldm.diffusion.samplers import DPMSolverPP2M, Sampler


OBJECTIVES = {
    "ddpm-eps-scaled_linear": lambda: DDPM("eps"),
    "ddpm-eps-linear": lambda: DDPM("eps", "linear", beta_start=1e-4, beta_end=0.02),
    "ddpm-v-cosine": lambda: DDPM("v", "cosine"),
    "ddpm-x0-scaled_linear": lambda: DDPM("x0"),
    "ddpm-v-ztsnr": lambda: DDPM("v", zero_terminal_snr=True),
    "ddpm-x0-cosine-ztsnr": lambda: DDPM("x0", "cosine", zero_terminal_snr=True),
    "flow-uniform": lambda: FlowMatching("uniform"),
    "flow-logit_normal-shift3": lambda: FlowMatching(shift=3.0),
}
SAMPLERS = [cls for cls in Sampler.__subclasses__() if cls.__module__ == samplers.__name__]  # the shipped ones


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the module's state dict."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(a: torch.nn.Module | dict, b: torch.nn.Module | dict, without: tuple[str, ...] = ()) -> None:
    """Equal states (modules' or given dicts), bit for bit, but for keys ending in ``without``, which ``a`` lacks."""
    a, b = (state(m) if isinstance(m, torch.nn.Module) else m for m in (a, b))
    b = {k: v for k, v in b.items() if not k.endswith(without)}
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def tiny_vae() -> VAE:
    """An f=2 VAE with 4 latent channels: the stage-1 network of the tiny models."""
    return VAE(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, latent_channels=4, norm_groups=4)


def tiny_model() -> LatentDiffusion:
    """Class-conditional, f=2 random codec, 2-step DPM-Solver++ sampling; every output layer non-zero."""
    torch.manual_seed(0)
    codec = LatentCodec(tiny_vae(), scale=1.0)
    backbone = partial(UNet, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                       num_heads=2, norm_groups=8)
    model = LatentDiffusion(backbone, codec, Conditioner([ClassEmbedder(len(SHAPES), 32)]),
                            sampler=DPMSolverPP2M(steps=2), ema_decay=0.9, cfg_scale=2.0)
    with torch.no_grad():  # the UNet starts zeroed at its outputs (predicts 0): give it a real function
        for p in model.backbone.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return model.eval()


def image_batches(n: int, nan_at: int | None = None) -> list[dict[str, torch.Tensor]]:
    """``n`` class-labelled batches of two random 16 px images; a NaN pixel in batch ``nan_at``."""
    batches = []
    for i in range(n):
        image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(i)) * 2 - 1
        if i == nan_at:
            image[0, 0, 0, 0] = float("nan")  # one bad pixel: a NaN latent, loss and gradient
        batches.append({"image": image, "label": torch.tensor([i % 6, (i + 1) % 6])})
    return batches


def tiny_autoencoder(**options) -> AutoencoderKL:
    """A tiny autoencoder whose discriminator trains from the first batch."""
    torch.manual_seed(0)
    return AutoencoderKL(tiny_vae(), AutoencoderLoss(perceptual_weight=0.0, disc_start=0, disc_layers=1, disc_channels=8), **options)
