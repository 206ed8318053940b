"""Autoencoder networks, posterior, latent statistics and checkpoint interop (diffusers, Stable Diffusion)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from ldm.autoencoder.posterior import DiagonalGaussian
from ldm.autoencoder.vae import (
    VAE,
    estimate_latent_stats,
    latent_moments,
    stats_from_moments,
)
from ldm.autoencoder.weights import load_vae_weights, save_vae_safetensors
from ldm.convert.vae import vae_from_diffusers, vae_from_sd, vae_to_sd
from ldm.weights.io import WeightsError

diffusers = pytest.importorskip("diffusers")

CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "autoencoder").glob("*.yaml"))
SMALL_SD = dict(base_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=2, latent_channels=4, norm_groups=32)


def vae_from_yaml(path: Path) -> VAE:
    config = yaml.safe_load(path.read_text())
    assert config["class_path"] == "ldm.autoencoder.vae.VAE"
    return VAE(**config["init_args"])


@pytest.fixture(scope="module")
def diffusers_vae() -> torch.nn.Module:
    """A randomly initialised diffusers AutoencoderKL with the SD layout at a small width."""
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        block_out_channels=(32, 64, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
    ).eval()


def tiny_vae(seed: int = 0) -> VAE:
    torch.manual_seed(seed)
    return VAE(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8).eval()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_shapes(path: Path) -> None:
    vae = vae_from_yaml(path).eval()
    x = torch.randn(1, 3, 16, 16)
    f = vae.downsample_factor
    with torch.no_grad():
        recon, posterior = vae(x)
    assert posterior.mean.shape == posterior.std.shape == (1, 4, 16 // f, 16 // f)
    assert recon.shape == x.shape
    assert vae.last_layer is vae.decoder.conv_out.weight
    if path.stem == "kl-f8":
        assert f == 8
        assert sum(p.numel() for p in vae.parameters()) == 83_653_863  # diffusers AutoencoderKL with the SD config


def test_deterministic_variant() -> None:
    vae = VAE(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, double_z=False, attn_bottleneck=False, norm_groups=8)
    posterior = vae.encode(torch.randn(2, 3, 8, 8))
    assert not any("attentions" in k for k in vae.state_dict())
    assert torch.equal(posterior.sample(), posterior.mode())
    assert torch.equal(posterior.kl(), torch.zeros(2))


def test_kl_matches_monte_carlo() -> None:
    gen = torch.Generator().manual_seed(0)
    params = torch.cat([torch.randn(2, 3, 2, 2, generator=gen), 0.5 * torch.randn(2, 3, 2, 2, generator=gen)], 1)
    n = 20000
    posterior = DiagonalGaussian(params.bfloat16().float().repeat(n, 1, 1, 1))  # (n * 2, 6, 2, 2)
    z = posterior.sample(gen)
    log_q = torch.distributions.Normal(posterior.mean, posterior.std).log_prob(z).flatten(1).sum(1)
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z).flatten(1).sum(1)
    mc = (log_q - log_p).view(n, 2).mean(0)
    exact = DiagonalGaussian(params.bfloat16()).kl()
    assert exact.dtype == torch.float32
    torch.testing.assert_close(mc, exact, rtol=0.03, atol=0.0)


def test_logvar_is_clamped() -> None:
    params = torch.cat([torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), -100.0)], 1)
    assert DiagonalGaussian(params).logvar.item() == -30.0


def test_diffusers_parity(diffusers_vae: torch.nn.Module) -> None:
    vae = VAE(**SMALL_SD).eval()
    vae.load_state_dict(vae_from_diffusers(diffusers_vae.state_dict()))
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs, ours = diffusers_vae.encode(x).latent_dist, vae.encode(x)
        torch.testing.assert_close(ours.mean, theirs.mean, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.std, theirs.std, rtol=0, atol=1e-5)
        torch.testing.assert_close(vae.decode(z), diffusers_vae.decode(z).sample, rtol=0, atol=1e-5)


def test_legacy_diffusers_attention_names(diffusers_vae: torch.nn.Module) -> None:
    legacy = {}
    for key, value in diffusers_vae.state_dict().items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f"attentions.0.{new}." in key:
                key, value = key.replace(new, old), value[..., None, None] if value.ndim == 2 else value
        legacy[key] = value
    converted = vae_from_diffusers(legacy)
    for key, value in vae_from_diffusers(diffusers_vae.state_dict()).items():
        assert torch.equal(converted[key], value), key


def test_sd_names_agree_with_diffusers_converter(diffusers_vae: torch.nn.Module) -> None:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ours = vae_from_diffusers(diffusers_vae.state_dict())
    sd = vae_to_sd(ours)
    assert all(k.startswith("first_stage_model.") for k in sd)
    # CompVis counts decoder levels from the finest: up.0 maps 64 -> 32 channels and has no upsampler
    assert sd["first_stage_model.decoder.up.0.block.0.conv1.weight"].shape == (32, 64, 3, 3)
    assert sd["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in sd
    reference = convert_ldm_vae_checkpoint(sd, diffusers_vae.config)
    expected = diffusers_vae.state_dict()
    assert reference.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(reference[key].reshape(value.shape), value), key


def test_sd_round_trip(diffusers_vae: torch.nn.Module) -> None:
    vae = tiny_vae()
    vae.set_latent_stats(torch.randn(4), torch.rand(4) + 0.5)
    ours = vae.state_dict()
    back = vae_from_sd(vae_to_sd(ours))
    assert back.keys() == ours.keys()
    for key, value in ours.items():
        if not key.startswith("latent_"):
            assert torch.equal(back[key], value), key
    standalone = {"loss.logvar": torch.zeros(()), **vae_to_sd(ours, prefix="")}  # a VAE-only CompVis checkpoint
    assert all(torch.equal(back[k], v) for k, v in vae_from_sd(standalone).items())
    direct = vae_from_diffusers(diffusers_vae.state_dict())
    via_sd = vae_from_sd(vae_to_sd(direct))
    assert all(torch.equal(via_sd[k], v) for k, v in direct.items())


def test_safetensors_export_reproduces_outputs(tmp_path: Path) -> None:
    vae = tiny_vae(seed=0)
    vae.set_latent_stats(torch.randn(4) + 1, torch.rand(4) + 2)
    path = tmp_path / "vae.safetensors"
    save_vae_safetensors(vae, path)
    loaded = tiny_vae(seed=1)
    load_vae_weights(loaded, path)
    for key, value in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert bool(loaded.latent_stats_estimated)
    x = torch.randn(1, 3, 16, 16)
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    with torch.no_grad():
        (recon_a, post_a), (recon_b, post_b) = vae(x, generator=gen_a), loaded(x, generator=gen_b)
    assert torch.equal(recon_a, recon_b) and torch.equal(post_a.mean, post_b.mean)


@pytest.mark.parametrize("layout", ["auto", "sd"])
def test_load_sd_ckpt(tmp_path: Path, layout: str) -> None:
    vae = tiny_vae(seed=0)
    path = tmp_path / "sd.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1), **vae_to_sd(vae.state_dict())}}, path)
    loaded = tiny_vae(seed=1)
    loaded.set_latent_stats(torch.randn(4), torch.rand(4) + 0.5)
    load_vae_weights(loaded, str(path), layout=layout)  # type: ignore[arg-type]
    for key, value in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key  # latent stats reset to the defaults


def test_load_errors_name_the_file(tmp_path: Path, diffusers_vae: torch.nn.Module) -> None:
    unrelated = tmp_path / "unrelated.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, unrelated)
    with pytest.raises(WeightsError, match=r"unrelated\.safetensors: no autoencoder weights found"):
        load_vae_weights(tiny_vae(), unrelated)
    other = tmp_path / "other_vae.safetensors"
    save_file({k: v.contiguous() for k, v in diffusers_vae.state_dict().items()}, other)
    expected = (
        r"other_vae\.safetensors does not fit this VAE \(diffusers layout\); missing keys: .*; unexpected keys: "
        r".*up_blocks.*; mis-shaped keys: encoder\.conv_in\.weight \(32, 3, 3, 3\) in file vs \(16, 3, 3, 3\)"
    )
    with pytest.raises(WeightsError, match=expected):
        load_vae_weights(tiny_vae(), other)
    truncated = tmp_path / "truncated.safetensors"
    save_file({k: v for k, v in tiny_vae().state_dict().items() if k != "quant_conv.bias"}, truncated)
    with pytest.raises(WeightsError, match=r"truncated\.safetensors does not fit this VAE \(ldm layout\); "
                                           r"missing keys: quant_conv\.bias$"):
        load_vae_weights(tiny_vae(), truncated, layout="ldm")


def test_latent_moments_add_across_batches_and_ranks_to_the_whole_sets_statistics() -> None:
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(b, 3, 5, 5, generator=gen) * torch.tensor([1.0, 2.0, 0.5])[:, None, None] + 3 for b in (1, 4, 2)]
    mean, std = stats_from_moments(sum(latent_moments(z) for z in batches))  # as an all-reduce of per-rank sums
    everything = torch.cat(batches)  # (7, 3, 5, 5)
    torch.testing.assert_close(mean, everything.mean((0, 2, 3)))
    torch.testing.assert_close(std, everything.std((0, 2, 3), correction=0))
    with pytest.raises(ValueError):
        stats_from_moments(torch.zeros(3, 3))


def test_estimated_statistics_come_from_posterior_samples_of_the_given_generator() -> None:
    vae = tiny_vae().eval()
    images = [torch.rand(2, 3, 16, 16) * 2 - 1 for _ in range(2)]
    first, again, other = (estimate_latent_stats(vae, images, torch.Generator().manual_seed(s)) for s in (1, 1, 2))
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first[0], other[0])
    with torch.no_grad():
        z = torch.cat([vae.encode(x).sample(g) for g in [torch.Generator().manual_seed(1)] for x in images])
    torch.testing.assert_close(first, (z.mean((0, 2, 3)), z.std((0, 2, 3), correction=0)))
