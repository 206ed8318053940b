"""The fast paths give the eager results: channels-last weights and torch.compile, in both modules."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from ldm.autoencoder.loss import AutoencoderLoss
from ldm.autoencoder.module import AutoencoderKL
from ldm.autoencoder.vae import VAE
from ldm.training.speed import clip_gradients, speed_up
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


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_clip_gradients_unscales_for_a_fused_optimizer(algorithm: str) -> None:
    """Lightning refuses to clip for fused optimizers under AMP; ours clips the true gradients, and the
    scaler's fused step then gives the update of clipping and stepping unscaled gradients."""
    def step(scaler: torch.amp.GradScaler | None) -> torch.Tensor:
        torch.manual_seed(0)
        layer = torch.nn.Linear(4, 3)
        opt = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)
        loss = layer(torch.randn(8, 4)).pow(2).sum() * 10
        (scaler.scale(loss) if scaler else loss).backward()
        clip_gradients(opt, 0.5, algorithm, scaler)
        grads = [p.grad for p in layer.parameters()]
        bound = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if algorithm == "norm" \
            else torch.stack([g.abs().max() for g in grads]).max()
        assert bound <= 0.5 + 1e-6
        scaler.step(opt) if scaler else opt.step()
        return torch.cat([p.detach().flatten() for p in layer.parameters()])

    torch.testing.assert_close(step(torch.amp.GradScaler("cpu", init_scale=1024.0)), step(None))


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_both_modules_clip_with_the_fused_default_optimizers(precision: str, monkeypatch) -> None:
    """The autoencoder's ``grad_clip`` (each of its two optimizers) and the trainer's ``gradient_clip_val`` for
    stage 2 reach ``clip_gradients``, fused AdamW and bf16 included."""
    import lightning as L

    from ldm import speed

    calls = []
    clip = speed.clip_gradients
    for module in ("ldm.autoencoder.module", "ldm.diffusion.module"):
        monkeypatch.setattr(f"{module}.clip_gradients", lambda o, v, a, s: calls.append((type(o), v)) or clip(o, v, a, s))
    trainer = dict(max_steps=2, precision=precision, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, limit_val_batches=0)
    vae = VAE(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, latent_channels=4, norm_groups=4)
    loss = AutoencoderLoss(perceptual_weight=0.0, disc_start=0, disc_layers=1, disc_channels=8)
    fused = lambda params: torch.optim.Adam(params, lr=1e-4, fused=True)  # noqa: E731
    L.Trainer(**trainer).fit(AutoencoderKL(vae, loss, optimizer=fused, disc_optimizer=fused, grad_clip=0.25),
                             DataLoader(_batches(1), batch_size=None))
    assert calls == [(torch.optim.Adam, 0.25)] * 2
    calls.clear()
    model = tiny_model()
    model.optimizer = lambda params: torch.optim.AdamW(params, lr=1e-4, fused=True)
    L.Trainer(**trainer, gradient_clip_val=0.5).fit(model, DataLoader(_batches(2), batch_size=None))
    assert calls == [(torch.optim.AdamW, 0.5)] * 2
