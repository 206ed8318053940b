"""The fast paths give the eager results: channels-last weights and torch.compile, in both modules."""

from __future__ import annotations

import pytest
import torch

from ldm.autoencoder.loss import AutoencoderLoss
from ldm.autoencoder.module import AutoencoderKL
from ldm.autoencoder.vae import VAE
from ldm.speed import speed_up
from tests.test_guards import _batches
from tests.test_latent_diffusion import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
COMPILE = {"backend": "aot_eager"}  # the graph capture and autograd of torch.compile; inductor's codegen is benchmarked


def _loss_and_grads(model: torch.nn.Module, loss_fn) -> tuple[torch.Tensor, list[torch.Tensor]]:
    loss = loss_fn()
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    return loss.detach(), grads


@pytest.mark.parametrize("fast", [{"channels_last": True}, {"compile": COMPILE}], ids=["channels_last", "compile"])
def test_latent_diffusion_fast_paths_agree_with_eager(fast: dict) -> None:
    batch = _batches(1)[0]
    model = tiny_model().train()
    loss = lambda: model.diffusion_loss(batch, torch.Generator().manual_seed(0)).mean()  # noqa: E731
    eager = _loss_and_grads(model.backbone, loss)
    speed_up(model.backbone, **fast)
    faster = _loss_and_grads(model.backbone, loss)
    torch.testing.assert_close(faster[0], eager[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(faster[1], eager[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert list(model.backbone.state_dict()) == list(tiny_model().backbone.state_dict())  # names unchanged


def test_autoencoder_options_build_the_fast_paths() -> None:
    torch.manual_seed(0)
    vae = VAE(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, latent_channels=4, norm_groups=4)
    loss = AutoencoderLoss(perceptual_weight=0.0, disc_start=0, disc_layers=1, disc_channels=8)
    x = _batches(1)[0]["image"]
    with torch.no_grad():
        eager = vae(x, sample=False)[0]
        model = AutoencoderKL(vae, loss, channels_last=True, compile=COMPILE)
        assert model.vae.decoder.conv_out.weight.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(model.vae(x, sample=False)[0], eager, rtol=1e-4, atol=1e-5)
