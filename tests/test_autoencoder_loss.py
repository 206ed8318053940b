"""Stage-1 loss: PatchGAN discriminator, offline LPIPS, and the adaptive-weight autoencoder loss."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from torchvision.models import vgg

from ldm.autoencoder.discriminator import (
    ActNorm,
    NLayerDiscriminator,
    hinge_d_loss,
    vanilla_d_loss,
)
from ldm.autoencoder.loss import AutoencoderLoss
from ldm.autoencoder.lpips import build_lpips
from ldm.weights.io import WeightsError
from tests.assets import asset

DISC_START = 10


def _loss(**overrides) -> AutoencoderLoss:
    """A tiny loss for 16 px images: 2-layer, 8-channel PatchGAN, no LPIPS unless asked."""
    kwargs = dict(perceptual_weight=0.0, disc_layers=2, disc_channels=8, disc_start=DISC_START, logvar_init=0.3)
    return AutoencoderLoss(**{**kwargs, **overrides})


def _batch(seed: int = 0):
    """A one-conv 'decoder' (its weight is the last layer), a latent, target images in [-1, 1] and per-sample KL."""
    torch.manual_seed(seed)
    decoder = nn.Conv2d(4, 3, 3, padding=1)
    z = torch.randn(2, 4, 16, 16)
    inputs = torch.rand(2, 3, 16, 16) * 2 - 1
    kl = torch.rand(2) * 100
    return decoder, z, inputs, kl


@pytest.fixture(scope="module")
def lpips_loss() -> AutoencoderLoss:
    return _loss(perceptual_weight=1.0, disc_start=0, lpips_random_init=True)


def _count_calls(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


# ---- discriminator -------------------------------------------------------------------------------


def test_discriminator_patch_logits_and_init():
    torch.manual_seed(0)
    disc = NLayerDiscriminator()
    assert disc(torch.randn(2, 3, 32, 32)).shape == (2, 1, 2, 2)  # 32 -> 16 -> 8 -> 4 -> 3 -> 2
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in disc.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == 5 and len(norms) == 3
    conv_weights = torch.cat([m.weight.flatten() for m in convs])
    assert conv_weights.std().item() == pytest.approx(0.02, rel=0.05)
    assert conv_weights.mean().abs() < 1e-3
    norm_weights = torch.cat([m.weight for m in norms])
    assert norm_weights.mean().item() == pytest.approx(1.0, abs=0.01)
    assert norm_weights.std().item() == pytest.approx(0.02, rel=0.2)
    assert all(m.bias is None or not m.bias.any() for m in convs + norms)
    assert all(m.bias is None for m in convs[1:4])  # BatchNorm follows these


def test_actnorm_discriminator_initialises_on_first_batch():
    torch.manual_seed(0)
    disc = NLayerDiscriminator(in_channels=3, channels=8, n_layers=2, use_actnorm=True)
    norms = [m for m in disc.modules() if isinstance(m, ActNorm)]
    assert len(norms) == 2 and not any(isinstance(m, nn.BatchNorm2d) for m in disc.modules())
    outputs = []
    norms[0].register_forward_hook(lambda _m, _i, out: outputs.append(out.detach().clone()))
    disc(torch.randn(4, 3, 16, 16) * 3 + 1)
    std, mean = torch.std_mean(outputs[0], dim=(0, 2, 3))
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-5, rtol=0)
    torch.testing.assert_close(std, torch.ones_like(std), atol=1e-4, rtol=0)
    scale = norms[0].scale.detach().clone()
    disc(torch.randn(4, 3, 16, 16))  # a second batch does not re-initialise
    assert bool(norms[0].initialized) and torch.equal(norms[0].scale, scale)


def test_d_loss_formulas_on_known_logits():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    # hinge: relu(1 - real) = [0, 0.5], relu(1 + fake) = [0, 1.5]
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.75))
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
    expected = 0.5 * ((softplus(-2.0) + softplus(-0.5)) / 2 + (softplus(-2.0) + softplus(0.5)) / 2)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected)


# ---- LPIPS ---------------------------------------------------------------------------------------


def test_lpips_random_trunk_is_frozen_and_separates(lpips_loss):
    lpips = lpips_loss.perceptual_loss
    lpips_loss.train()
    assert not lpips.training and not any(p.requires_grad for p in lpips.parameters())
    assert all((lin.model[-1].weight >= 0).all() for lin in lpips.lins)  # the package's calibration, not a random init
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).requires_grad_()
    assert torch.equal(lpips(x, x), torch.zeros(2))
    distance = lpips(x, y)  # (B,)
    assert distance.shape == (2,) and (distance > 0).all()
    distance.sum().backward()
    assert y.grad.abs().sum() > 0  # a loss: gradients reach the reconstruction


def test_lpips_state_dict_roundtrip_is_exact(lpips_loss, tmp_path):
    lpips = lpips_loss.perceptual_loss
    path = tmp_path / "lpips.pt"
    torch.save(lpips.state_dict(), path)
    loaded = build_lpips("vgg", str(path))
    torch.manual_seed(1)
    x, y = torch.rand(2, 2, 3, 16, 16) * 2 - 1
    assert torch.equal(loaded(x, y), lpips(x, y))


def test_lpips_loads_torchvision_vgg16(tmp_path):
    torch.manual_seed(0)
    features = vgg.make_layers(vgg.cfgs["D"])  # VGG16's trunk, random here: stands for a local vgg16-397923af.pth
    whole_model = {f"features.{k}": v for k, v in features.state_dict().items()} | {"classifier.6.bias": torch.zeros(8)}
    paths = tmp_path / "features.pth", tmp_path / "vgg16.safetensors"
    torch.save(features.state_dict(), paths[0])
    save_file(whole_model, str(paths[1]))
    for path in paths:
        lpips = build_lpips("vgg", str(path))
        assert torch.equal(lpips.net.slice1[0].weight, features[0].weight)
        assert torch.equal(lpips.net.slice5[-2].bias, features[28].bias)


@pytest.mark.parametrize("content", ["unrelated", "wrong_shape", "not_a_dict"])
def test_lpips_bad_weights_file_names_it(lpips_loss, tmp_path, content):
    state = {k: v.clone() for k, v in lpips_loss.perceptual_loss.state_dict().items()}
    bad = {
        "unrelated": {"encoder.weight": torch.zeros(3)},
        "wrong_shape": {**state, "net.slice1.0.weight": torch.zeros(64, 3, 1, 1)},
        "not_a_dict": torch.zeros(3),
    }[content]
    path = tmp_path / f"{content}.pt"
    torch.save(bad, path)
    with pytest.raises(WeightsError, match=re.escape(str(path))):
        build_lpips("vgg", str(path))


def _example(name: str) -> torch.Tensor:
    """An upstream LPIPS example image (1, 3, 64, 64) in [-1, 1], as ``lpips.im2tensor`` makes it."""
    path = asset(f"lpips/examples/{name}", "test_lpips_random_trunk_is_frozen_and_separates")
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].float() / 127.5 - 1


@pytest.mark.parametrize("net, trunk, expected", [("alex", "alexnet_features.pth", (0.722, 0.138)),
                                                  ("vgg", "vgg16_features.pth", (0.5686, 0.4217))])
def test_lpips_with_imagenet_trunks_gives_the_published_distances(net, trunk, expected):
    path = asset(f"lpips/{trunk}", "test_lpips_loads_torchvision_vgg16")
    lpips = build_lpips(net, str(path))
    ref, p0, p1 = (_example(f"ex_{name}.png") for name in ("ref", "p0", "p1"))
    assert lpips(torch.cat([ref, ref]), torch.cat([p0, p1])).tolist() == pytest.approx(expected, abs=1e-3)


# ---- autoencoder / discriminator losses -----------------------------------------------------------


def test_no_lpips_network_when_perceptual_weight_is_zero():
    assert _loss().perceptual_loss is None


def test_gan_term_is_zero_and_discriminator_unused_before_disc_start():
    loss = _loss()
    calls = _count_calls(loss.discriminator)
    decoder, z, inputs, kl = _batch()
    recon = decoder(z)
    total, logs = loss.autoencoder_loss(inputs, recon, kl, decoder.weight, global_step=DISC_START - 1)
    assert calls[0] == 0
    assert logs["g"] == 0 and logs["d_weight"] == 0
    assert torch.equal(total, logs["nll"] + loss.kl_weight * logs["kl"])

    total, logs = loss.autoencoder_loss(inputs, recon, kl, decoder.weight, global_step=DISC_START)
    assert calls[0] == 1
    assert logs["g"] != 0 and logs["d_weight"] > 0
    gan = total - (logs["nll"] + loss.kl_weight * logs["kl"])
    torch.testing.assert_close(gan, logs["d_weight"] * loss.disc_factor * logs["g"], rtol=0, atol=1e-3)  # total ~ 1e3


def test_adaptive_weight_is_the_gradient_norm_ratio():
    loss = _loss(disc_weight=0.7, disc_factor=0.5)
    decoder, z, inputs, kl = _batch(1)
    recon = decoder(z)
    total, logs = loss.autoencoder_loss(inputs, recon, kl, decoder.weight, global_step=DISC_START)

    nll = ((inputs - recon).abs() / math.exp(0.3) + 0.3).sum() / 2
    g = -loss.discriminator(recon).mean()
    (nll_grad,) = torch.autograd.grad(nll, decoder.weight, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g, decoder.weight)
    d_weight = 0.7 * nll_grad.norm() / (g_grad.norm() + 1e-4)
    torch.testing.assert_close(logs["nll"], nll.detach())
    torch.testing.assert_close(logs["kl"], kl.mean())
    torch.testing.assert_close(logs["d_weight"], d_weight)
    torch.testing.assert_close(total, nll + 1e-6 * kl.mean() + d_weight * 0.5 * g)


def test_without_a_graph_the_gan_term_is_logged_but_left_out():
    loss = _loss()
    decoder, z, inputs, kl = _batch()
    with torch.inference_mode():  # as in Lightning's validation loop
        total, logs = loss.autoencoder_loss(inputs, decoder(z), kl, decoder.weight, global_step=DISC_START)
    assert logs["g"] != 0 and logs["d_weight"] == 0
    assert torch.equal(total, logs["nll"] + loss.kl_weight * logs["kl"])


def test_autoencoder_backward_leaves_discriminator_grads_none():
    loss = _loss()
    decoder, z, inputs, kl = _batch()
    total, _ = loss.autoencoder_loss(inputs, decoder(z), kl, decoder.weight, global_step=DISC_START)
    total.backward()
    assert all(p.grad is None for p in loss.discriminator.parameters())
    assert all(p.requires_grad for p in loss.discriminator.parameters())  # restored after the call
    assert decoder.weight.grad is not None and loss.logvar.grad is not None


@pytest.mark.parametrize("disc_loss", ["hinge", "vanilla"])
def test_discriminator_loss_touches_only_the_discriminator(disc_loss):
    loss = _loss(disc_loss=disc_loss, disc_factor=0.5)
    decoder, z, inputs, kl = _batch()
    recon = decoder(z)
    d, logs = loss.discriminator_loss(inputs, recon, global_step=DISC_START)
    d.backward()
    assert decoder.weight.grad is None
    assert all(p.grad is not None for p in loss.discriminator.parameters())
    d_fn = hinge_d_loss if disc_loss == "hinge" else vanilla_d_loss
    with torch.no_grad():  # train-mode BatchNorm uses batch statistics: the same logits again
        expected = 0.5 * d_fn(loss.discriminator(inputs), loss.discriminator(recon))
    torch.testing.assert_close(d.detach(), expected)
    assert set(logs) == {"d", "logits_real", "logits_fake"}

    d, logs = loss.discriminator_loss(inputs, recon, global_step=DISC_START - 1)
    assert d == 0 and torch.isfinite(logs["logits_real"])


def test_bf16_autocast_matches_fp32(lpips_loss):
    decoder, z, inputs, kl = _batch()
    recon = decoder(z)
    total, logs = lpips_loss.autoencoder_loss(inputs, recon, kl, decoder.weight, global_step=0)
    d, d_logs = lpips_loss.discriminator_loss(inputs, recon, global_step=0)
    assert logs["perceptual"] > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # fp32 tensors in: autocast is off inside, so every term matches fp32 to rounding
        total_amp, logs_amp = lpips_loss.autoencoder_loss(inputs, recon, kl, decoder.weight, global_step=0)
        d_amp, _ = lpips_loss.discriminator_loss(inputs, recon, global_step=0)
        # a bf16 decoder output in: finite and close
        recon_bf16 = decoder(z)
        total_bf16, _ = lpips_loss.autoencoder_loss(inputs, recon_bf16, kl, decoder.weight, global_step=0)
    assert recon_bf16.dtype == torch.bfloat16
    for key in logs:
        torch.testing.assert_close(logs_amp[key], logs[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d_amp, d, rtol=1e-5, atol=1e-6)
    assert total_bf16.dtype == torch.float32 and torch.isfinite(total_bf16)
    torch.testing.assert_close(total_bf16, total, rtol=2e-2, atol=0)
    total_bf16.backward()
    assert torch.isfinite(decoder.weight.grad).all()
