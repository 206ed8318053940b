"""Stable Diffusion in and out: SD single files load into our UNet, codec and text embedder, and a model
leaves as an SD single file and as a diffusers pipeline folder that diffusers reads and samples as we do.

The default run uses the real SD 1.x / 2.x block layouts at reduced width (UNet model_channels 32, text
towers 64 wide, VAE 32 wide) on 64 px images; ``-m slow`` runs the same checks at full size (random weights).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.autoencoder.codec import LatentCodec
from ldm.autoencoder.vae import VAE
from ldm.backbones.unet import UNet
from ldm.conditioning.conditioner import Conditioner
from ldm.conditioning.label import ClassEmbedder
from ldm.conditioning.open_clip import OpenCLIP, create_clip
from ldm.conditioning.text import OpenCLIPTextEmbedder
from ldm.convert.clip_text import CLIP_HEAD, EOS
from ldm.convert.sd_unet import unet_to_sd
from ldm.convert.unet import unet_from_diffusers
from ldm.diffusion.init_weights import load_init_weights
from ldm.diffusion.module import LatentDiffusion
from ldm.diffusion.objectives import DDPM
from ldm.diffusion.samplers import DDIM, Sampler
from ldm.export.diffusers import (
    clip_tokenizer,
    diffusers_vae,
    save_diffusers,
    scheduler,
)
from ldm.export.sd import save_sd_checkpoint
from ldm.export.text_to_image import TextToImage, linear_projections
from ldm.weights.io import WeightsError
from tests.sd_models import REDUCED, SIZE, VERSION, sd_model
from tests.tiny_models import SAMPLERS, assert_same_state
from tests.tiny_modules import OneJump

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a photo of a cat", "a large red circle in the top left"]
FULL = {
    "sd1": {"unet": {"num_heads": 8}, "vae": {}, "text": None},
    "sd2": {"unet": {"head_dim": 64}, "vae": {}, "text": None},
}


def initial_noise(count: int, height: int = SIZE, width: int = SIZE) -> torch.Tensor:
    """What LatentDiffusion.generate draws for samples 0..count-1 (seed 0) of (height, width) images."""
    return torch.stack([torch.randn(4, height // 8, width // 8, generator=torch.Generator().manual_seed(i))
                        for i in range(count)])


def ours_and_diffusers(model: LatentDiffusion, folder: Path, prompts: list[str], height: int, width: int) -> tuple:
    """(our generate, the exported pipeline from the same noise): images (B, 3, height, width) in [0, 1]."""
    pipeline = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert isinstance(pipeline, StableDiffusionPipeline)
    pipeline.set_progress_bar_config(disable=True)
    ours = (model.generate({"caption": prompts, "target_size": torch.tensor([[height, width]] * len(prompts))}) + 1) / 2
    theirs = pipeline(prompts, height=height, width=width, num_inference_steps=model.sampler.steps,
                      guidance_scale=model.hparams.cfg_scale, latents=initial_noise(len(prompts), height, width),
                      output_type="pt").images
    return ours, theirs


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, LatentDiffusion, Path]:
    """(version, a reduced random model, a folder with its diffusers export and its SD file sd.safetensors)."""
    model = sd_model(request.param, REDUCED[request.param])
    out = tmp_path_factory.mktemp(request.param)
    save_diffusers(model, out / "diffusers", SIZE)
    save_sd_checkpoint(model, out / "sd.safetensors")
    return request.param, model, out


# --- the original layout ----------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_original_unet_layout_is_what_diffusers_converts(version: str) -> None:
    ours = UNet(4, 4, 64, None, **REDUCED[version]["unet"])
    original = unet_to_sd(ours.state_dict(), linear_projections(ours))
    converted = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in original.items()},
                                            {"layers_per_block": 2})
    back = unet_from_diffusers(converted)
    assert back.keys() == ours.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
    assert original["input_blocks.1.1.proj_in.weight"].ndim == (2 if version == "sd2" else 4)  # SD 2 linear, SD 1 conv


def test_sd_file_round_trip_is_exact(exported: tuple) -> None:
    version, model, out = exported
    loaded = sd_model(version, REDUCED[version], weights=str(out / "sd.safetensors"), seed=1)
    assert_same_state(loaded.backbone, model.backbone)
    assert_same_state(loaded.codec, model.codec)
    assert_same_state(loaded.conditioner, model.conditioner, CLIP_HEAD if version == "sd1" else ())  # SD 1.x: none


def test_sd_file_keys_are_all_accounted_for(exported: tuple, tmp_path: Path) -> None:
    version, model, out = exported
    state = load_file(out / "sd.safetensors")
    ignored = {"model_ema.decay": torch.tensor(0.9999), "model_ema.diffusion_modelout0weight": torch.zeros(2),
               "alphas_cumprod": torch.ones(1000), "betas": torch.ones(1000), "logvar": torch.zeros(1000)}
    buffer = "transformer.text_model.embeddings.position_ids" if version == "sd1" else "model.attn_mask"
    ignored[f"cond_stage_model.{buffer}"] = torch.zeros(77, 77)
    save_file({**state, **ignored}, tmp_path / "full.safetensors")
    sd_model(version, REDUCED[version], weights=str(tmp_path / "full.safetensors"))  # loads: ignored by name

    fresh = sd_model(version, REDUCED[version])
    broken = {**state, "stray.weight": torch.zeros(1)}
    del broken["model.diffusion_model.out.2.bias"]
    save_file(broken, tmp_path / "broken.safetensors")
    with pytest.raises(WeightsError, match=r"broken\.safetensors .*missing keys: conv_out\.bias; unexpected keys: stray\.weight"):
        load_init_weights(fresh.backbone, fresh.conditioner, tmp_path / "broken.safetensors")

    text = {k: v for k, v in state.items() if k.startswith("cond_stage_model.")}
    dropped = next(k for k in text if k.endswith(("k_proj.weight", "in_proj_weight")))
    del text[dropped]
    save_file(text, tmp_path / "text.safetensors")
    with pytest.raises(WeightsError, match=r"text\.safetensors \(its cond_stage_model\.\*\) does not fit .*resblocks\.\d\.attn"):
        create_clip(VERSION[version]["clip"], str(tmp_path / "text.safetensors"), "pretrained", text_cfg=REDUCED[version]["text"],
                    text_only=True)


def test_an_sd_file_gives_a_text_tower_only(exported: tuple) -> None:
    version, _, out = exported
    with pytest.raises(WeightsError, match="holds a text tower, and pretrained needs a whole CLIP"):
        create_clip(VERSION[version]["clip"], str(out / "sd.safetensors"), "pretrained", text_cfg=REDUCED[version]["text"])
    if version == "sd1":  # OpenAI's tower in SD 1.x files comes without CLIP's projection
        with pytest.raises(ValueError, match="no projection head"):
            OpenCLIPTextEmbedder(OpenCLIP(VERSION[version]["clip"], str(out / "sd.safetensors"), text_cfg=REDUCED[version]["text"]),
                                 output="pooled")


@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_text_tower_from_transformers_clip_gives_its_hidden_states(version: str, tmp_path: Path) -> None:
    """A transformers CLIPTextModel in an SD 1.x file, read as open_clip: the last or penultimate layer, normed."""
    v, text = VERSION[version], REDUCED[version]["text"]
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=text["width"], intermediate_size=4 * text["width"],
                            num_hidden_layers=text["layers"], num_attention_heads=text["heads"], max_position_embeddings=77,
                            hidden_act="quick_gelu", eos_token_id=EOS)
    reference = CLIPTextModel(config).eval()
    tower = getattr(reference, "text_model", reference)
    state = {f"cond_stage_model.transformer.text_model.{k.removeprefix('text_model.')}": v
             for k, v in reference.state_dict().items()}
    save_file(state, tmp_path / "sd1-text.safetensors")
    embedder = OpenCLIPTextEmbedder(OpenCLIP("ViT-L-14-quickgelu", str(tmp_path / "sd1-text.safetensors"), text_cfg=text),
                                    layer=v["layer"], pad="end_of_text")
    ids = clip_tokenizer(embedder)(PROMPTS + [""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = reference(ids, output_hidden_states=True).hidden_states[-1 if v["layer"] == "last" else -2]
        expected = tower.final_layer_norm(hidden)
    got = embedder({"caption": PROMPTS + [""]}, (8, 8))
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_tokenizer_matches_open_clip(exported: tuple) -> None:
    version, model, _ = exported
    text = model.conditioner.embedders[0]
    captions = ["a photo of a cat", "", "A Large RED circle,  in the top-left.", "naïve café, 3 cats don't", "x " * 100]
    ids = clip_tokenizer(text)(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    expected = text.tokenizer(captions)
    if version == "sd1":  # padded with the end-of-text token, as the embedder pads
        expected = expected.masked_fill((expected == EOS).cumsum(1) > 0, EOS)
    assert torch.equal(ids, expected)


# --- diffusers ---------------------------------------------------------------------------------------
def test_diffusers_pipeline_samples_as_we_do_at_any_aspect_ratio(exported: tuple) -> None:
    """Our DDIM 20 steps with guidance 5 and diffusers' StableDiffusionPipeline from the export, same noise, at a
    size the export was not written for and whose height is not its width (16x8 latents, 2x1 at the last level)."""
    _, model, out = exported
    ours, theirs = ours_and_diffusers(model, out / "diffusers", PROMPTS, 2 * SIZE, SIZE)
    assert ours.shape == (len(PROMPTS), 3, 2 * SIZE, SIZE) and ours.std() > 0.05
    torch.testing.assert_close(theirs, ours, atol=1e-3, rtol=0)


def test_diffusers_reads_our_sd_file(exported: tuple) -> None:
    """diffusers' own single-file loader, given the export's configs, gives our UNet and the export's weights."""
    _, model, out = exported
    unet = UNet2DConditionModel.from_single_file(out / "sd.safetensors", config=str(out / "diffusers"), subfolder="unet",
                                                 local_files_only=True)
    torch.manual_seed(3)
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 77, model.conditioner.context_dim)
    with torch.no_grad():
        expected = model.backbone(x, t.float(), context)
        got = unet(x, t, encoder_hidden_states=context).sample
    assert expected.abs().mean() > 1e-2
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    whole = StableDiffusionPipeline.from_single_file(out / "sd.safetensors", config=str(out / "diffusers"), local_files_only=True)
    reference = StableDiffusionPipeline.from_pretrained(out / "diffusers", local_files_only=True)
    for part in ("unet", "vae", "text_encoder"):
        assert_same_state(getattr(whole, part), getattr(reference, part))


def test_vae_folds_per_channel_statistics_into_its_weights() -> None:
    """Latent statistics per channel (our stage-1 exports) leave diffusers' VAE with scaling_factor 1."""
    torch.manual_seed(0)
    vae = VAE(base_channels=32, channel_mult=(1, 2), num_res_blocks=1)
    vae.set_latent_stats(torch.randn(4), torch.rand(4) + 0.5)
    codec = LatentCodec(vae)
    theirs = diffusers_vae(codec, 32).eval()
    assert theirs.config.scaling_factor == 1.0
    x, z = torch.rand(2, 3, 16, 16) * 2 - 1, torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x).latent_dist.mean, codec.vae.encode(x).mode().sub(codec.mean).div(codec.std),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(theirs.decode(z).sample.clamp(-1, 1), codec.decode(z), atol=1e-5, rtol=0)
    assert diffusers_vae(LatentCodec(vae, scale=0.18215), 32).config.scaling_factor == pytest.approx(0.18215)


def test_sd_file_folds_per_channel_statistics_at_sds_scale(tmp_path: Path) -> None:
    """An SD file of a model whose codec has per-channel statistics (our stage-1 exports): SD tools read it at a
    fixed 0.18215, and the latents they see are the model's own (the statistics folded into the VAE's weights)."""
    model = sd_model("sd1", REDUCED["sd1"])
    generator = torch.Generator().manual_seed(0)
    model.codec.vae.set_latent_stats(torch.randn(4, generator=generator), torch.rand(4, generator=generator) + 0.5)
    model.codec = LatentCodec(model.codec.vae)  # normalised by the statistics, not a scale
    save_sd_checkpoint(model, tmp_path / "sd.safetensors")
    loaded = sd_model("sd1", REDUCED["sd1"], weights=str(tmp_path / "sd.safetensors"), seed=1).codec  # scale 0.18215
    x, z = torch.rand(2, 3, SIZE, SIZE, generator=generator) * 2 - 1, torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=generator)
    encoded = model.codec.encode(x, torch.Generator().manual_seed(1))
    assert encoded.std() > 0.1
    torch.testing.assert_close(loaded.encode(x, torch.Generator().manual_seed(1)), encoded, atol=2e-4, rtol=0)
    torch.testing.assert_close(loaded.decode(z), model.codec.decode(z), atol=2e-4, rtol=0)


@pytest.mark.parametrize("objective, schedule", [(DDPM("eps"), "scaled_linear"), (DDPM("v", "cosine"), "squaredcos_cap_v2"),
                                                 (DDPM("eps", "linear", beta_start=1e-4, beta_end=0.02), "linear"),
                                                 (DDPM("v", zero_terminal_snr=True), None)])
@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda cls: cls.kind)
def test_scheduler_has_the_objectives_alphas(objective: DDPM, schedule: str | None, sampler: type[Sampler]) -> None:
    made = scheduler(objective, sampler())
    assert made.config.beta_schedule == schedule if schedule else made.config.trained_betas is not None
    assert made.config.timestep_spacing == "trailing"
    alpha = objective.alpha_sigma(torch.arange(objective.num_timesteps).float())[0]
    torch.testing.assert_close(made.alphas_cumprod.sqrt(), alpha, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("objective", [DDPM("eps"), DDPM("v"), DDPM("x0"), DDPM("velocity")], ids=lambda o: o.prediction.name)
def test_scheduler_takes_the_objectives_prediction(objective: DDPM) -> None:
    expected = {"eps": "epsilon", "v": "v_prediction", "x0": "sample", "velocity": None}[objective.prediction.name]
    if expected is None:  # diffusers' flow_prediction assumes flow sigmas: not this path
        with pytest.raises(ValueError, match="the prediction 'velocity' has no diffusers prediction_type"):
            scheduler(objective, DDIM())
    else:
        assert scheduler(objective, DDIM()).config.prediction_type == expected


def test_a_sampler_without_a_diffusers_scheduler_is_refused_in_a_sentence(exported: tuple) -> None:
    _, model, out = exported
    with pytest.raises(ValueError, match="^the sampler OneJump has no diffusers scheduler: export the model with"):
        scheduler(DDPM("eps"), OneJump())
    sampler, model.sampler = model.sampler, OneJump()
    try:
        with pytest.raises(ValueError, match="the sampler OneJump has no diffusers scheduler"):
            save_diffusers(model, out / "refused", SIZE)
        assert not (out / "refused").exists()
    finally:
        model.sampler = sampler


def test_only_text_to_image_unets_export() -> None:
    model = LatentDiffusion(partial(UNet, model_channels=16, channel_mult=(1, 2), attention_levels=(1,), num_heads=2,
                                    norm_groups=8), LatentCodec(VAE(base_channels=8, channel_mult=(1, 2), norm_groups=4), scale=1.0),
                            Conditioner([ClassEmbedder(3, 8)]))
    with pytest.raises(ValueError, match="not one OpenCLIPTextEmbedder of tokens; the UNet takes a vector"):
        TextToImage.of(model)


# --- full size (random weights), opt-in ---------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_full_size_round_trip_and_diffusers_parity(version: str, tmp_path: Path) -> None:
    model = sd_model(version, FULL[version])
    save_sd_checkpoint(model, tmp_path / "sd.safetensors")
    save_diffusers(model, tmp_path / "diffusers", SIZE)
    loaded = sd_model(version, FULL[version], weights=str(tmp_path / "sd.safetensors"), seed=1)
    assert_same_state(loaded.backbone, model.backbone)
    assert_same_state(loaded.codec, model.codec)
    assert_same_state(loaded.conditioner, model.conditioner, CLIP_HEAD if version == "sd1" else ())
    del loaded
    ours, theirs = ours_and_diffusers(model, tmp_path / "diffusers", PROMPTS[:1], SIZE, SIZE)
    torch.testing.assert_close(theirs, ours, atol=1e-3, rtol=0)
    unet = UNet2DConditionModel.from_single_file(tmp_path / "sd.safetensors", config=str(tmp_path / "diffusers"),
                                                 subfolder="unet", local_files_only=True)
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, model.conditioner.context_dim)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, encoder_hidden_states=context).sample, model.backbone(x, t.float(), context),
                                   atol=1e-5, rtol=0)
