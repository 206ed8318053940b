"""The fast paths give the eager results: channels-last weights and torch.compile, in both modules; a new
input shape compiles once (static shapes, also when latent sides change); gradient clipping with fused optimizers."""

from __future__ import annotations

import copy
import shutil

import lightning as L
import pytest
import torch
import torch._inductor.config
from lightning.pytorch.callbacks import LambdaCallback
from torch._dynamo.testing import CompileCounter
from torch.utils.data import DataLoader

from ldm.autoencoder.module import AutoencoderKL
from ldm.backbones.unet import UNet
from ldm.training import module as training_module
from ldm.training.speed import channels_last_pays, channels_last_weights, clip_gradients, speed_up
from tests.backbones import TINY, inputs, randomize
from tests.tiny_models import image_batches, tiny_autoencoder, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
COMPILE = {"backend": "aot_eager"}  # the graph capture and autograd of torch.compile (inductor's codegen: slow test)


@pytest.fixture
def fresh_dynamo():
    """Each test compiles from scratch: no code cached by an earlier test's compile."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _loss_and_grads(model: torch.nn.Module, loss_fn) -> tuple[torch.Tensor, list[torch.Tensor]]:
    loss = loss_fn()
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    return loss.detach(), grads


@pytest.mark.parametrize("fast", [{"channels_last": True}, {"compile": COMPILE}], ids=["channels_last", "compile"])
def test_latent_diffusion_fast_paths_agree_with_eager(fast: dict) -> None:
    batch = image_batches(1)[0]
    model = tiny_model().train()
    loss = lambda: model.diffusion_loss(batch, torch.Generator().manual_seed(0)).mean()  # noqa: E731
    eager = _loss_and_grads(model.backbone, loss)
    speed_up(model.backbone, **fast)
    faster = _loss_and_grads(model.backbone, loss)
    torch.testing.assert_close(faster[0], eager[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(faster[1], eager[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert list(model.backbone.state_dict()) == list(tiny_model().backbone.state_dict())  # names unchanged


def test_autoencoder_options_build_the_fast_paths(fresh_dynamo) -> None:
    """``channels_last`` reaches the discriminator; the VAE keeps NCHW weights (speed_up's per-module choice)."""
    x = image_batches(1)[0]["image"]
    with torch.no_grad():
        eager = tiny_autoencoder().vae(x, sample=False)[0]
        with pytest.warns(UserWarning, match="channels_last: VAE keeps its NCHW weights"):
            model = tiny_autoencoder(channels_last=True, compile=COMPILE)
        assert channels_last_weights(model.loss.discriminator) and not channels_last_weights(model.vae)
        torch.testing.assert_close(model.vae(x, sample=False)[0], eager, rtol=1e-4, atol=1e-5)


def test_channels_last_is_chosen_per_module_where_it_measured_faster() -> None:
    """The UNet goes channels-last; SD's autoencoder, which measured no faster with it (README, Performance),
    stays NCHW and says so; a module without the class attribute goes channels-last by default."""
    model = tiny_model()
    speed_up(model.backbone, channels_last=True)
    assert channels_last_pays(model.backbone) and channels_last_weights(model.backbone)
    with pytest.warns(UserWarning, match="channels_last: VAE keeps its NCHW weights"):
        speed_up(model.codec.vae, channels_last=True)
    assert not channels_last_pays(model.codec.vae) and not channels_last_weights(model.codec.vae)
    conv = torch.nn.Conv2d(2, 3, 3)
    speed_up(conv, channels_last=True)
    assert channels_last_weights(conv)


@pytest.mark.parametrize("dynamic", ["default", None], ids=["default: static, one compile per shape",
                                                           "dynamic: null, dynamic after a recompile"])
def test_each_new_shape_compiles_once_unless_torch_is_left_to_make_it_dynamic(dynamic: str | None, fresh_dynamo) -> None:
    """README: each new input shape compiles once (static kernels); ``dynamic: null`` leaves it to torch, which
    recompiles once and then marks the changing size dynamic. Counted through the module's own option."""
    counter = CompileCounter()  # a backend that counts the graphs it is given and runs them eagerly
    model = tiny_autoencoder(compile={"backend": counter} | ({} if dynamic == "default" else {"dynamic": dynamic}))
    images = torch.rand(5, 3, 16, 16) * 2 - 1
    compiles = []
    with torch.no_grad():
        for batch in (4, 3, 2, 5):  # the first batch, then smaller and larger ones
            model.vae(images[:batch], sample=False)
            compiles.append(counter.frame_count)
    first = compiles[0]
    assert first > 0
    assert compiles == ([first, 2 * first, 2 * first, 2 * first] if dynamic is None else [first * n for n in (1, 2, 3, 4)])


@pytest.mark.slow  # inductor generates and compiles C++ for every shape's kernels: minutes on 2 CPU cores
@pytest.mark.skipif(shutil.which("cc") is None, reason="inductor needs a C compiler (cc) on the CPU")
def test_inductor_trains_the_unet_through_changing_latent_sides(fresh_dynamo) -> None:
    """``compile: true`` on aspect-ratio buckets: batches whose latent sides change one after the other train
    compiled as they do eagerly (with torch's automatic dynamic shapes, inductor fails on these shapes)."""
    model = randomize(UNet(4, 4, 12, None, **TINY | {"attention_levels": [0, 1]}))
    compiled = copy.deepcopy(model)
    speed_up(compiled, compile=True)
    for batch_size, height, width in ((2, 8, 8), (1, 8, 8), (2, 8, 12), (2, 12, 8)):
        batch = inputs(batch_size, height, width, vector=False)
        losses = [net(**batch).square().mean() for net in (model, compiled)]
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-6)
        losses[1].backward()


@pytest.mark.slow  # inductor generates and compiles C++ for every kernel: minutes on 2 CPU cores
@pytest.mark.skipif(shutil.which("cc") is None, reason="inductor needs a C compiler (cc) on the CPU")
def test_inductor_trains_the_autoencoder_with_its_discriminator_as_eager(fresh_dynamo, monkeypatch) -> None:
    """``compile: true`` (the default inductor backend) with ``channels_last``: a fit of the autoencoder and its
    discriminator (two optimizers) runs compiled graphs and logs the eager run's losses."""
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)  # the posterior draws eager's noise

    def fit(model: AutoencoderKL) -> list[dict[str, float]]:
        logs = []
        trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.callbacks.append(LambdaCallback(on_train_batch_end=lambda t, *_: logs.append(
            {k: v.item() for k, v in t.callback_metrics.items() if k.startswith("train/")})))
        trainer.fit(model, DataLoader(image_batches(2), batch_size=None))
        return logs

    eager = fit(tiny_autoencoder())
    counts = torch._dynamo.utils.counters
    counts.clear()
    compiled = fit(tiny_autoencoder(compile=True, channels_last=True))
    assert counts["stats"]["unique_graphs"] >= 2 and counts["frames"]["ok"] >= 2  # the VAE's and the discriminator's
    assert [list(s) for s in compiled] == [list(s) for s in eager] and "train/d" in eager[0]
    for ours, theirs in zip(compiled, eager):
        for name in ours:
            torch.testing.assert_close(ours[name], theirs[name], rtol=2e-3, atol=1e-4, msg=name)


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
    calls = []
    monkeypatch.setattr(training_module, "clip_gradients",
                        lambda o, v, a, s, model=None: calls.append((type(o), v)) or clip_gradients(o, v, a, s, model=model))
    trainer = dict(max_steps=2, precision=precision, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, limit_val_batches=0)
    fused = lambda params: torch.optim.Adam(params, lr=1e-4, fused=True)  # noqa: E731
    L.Trainer(**trainer).fit(tiny_autoencoder(optimizer=fused, disc_optimizer=fused, grad_clip=0.25),
                             DataLoader(image_batches(1), batch_size=None))
    assert calls == [(torch.optim.Adam, 0.25)] * 2
    calls.clear()
    model = tiny_model()
    model.optimizer = lambda params: torch.optim.AdamW(params, lr=1e-4, fused=True)
    L.Trainer(**trainer, gradient_clip_val=0.5).fit(model, DataLoader(image_batches(2), batch_size=None))
    assert calls == [(torch.optim.AdamW, 0.5)] * 2
