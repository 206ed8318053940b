"""load_init_weights: our stage-2 layout (EMA first, frozen parts kept), diffusers' UNet and class DiT."""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldm.autoencoder.codec import LatentCodec
from ldm.autoencoder.vae import VAE
from ldm.backbones.dit import DiT
from ldm.backbones.unet import UNet
from ldm.conditioning.conditioner import Conditioner
from ldm.conditioning.label import ClassEmbedder
from ldm.conditioning.open_clip import OpenCLIP
from ldm.conditioning.text import OpenCLIPTextEmbedder
from ldm.convert.unet import unet_from_diffusers
from ldm.diffusion.init_weights import load_init_weights
from ldm.diffusion.module import LatentDiffusion
from ldm.weights.io import WeightsError
from tests.backbones import TINY, diffusers_dit, diffusers_twin, inputs, randomize, tiny_dit


def stage2(seed: int, classes: int = 3, ema: bool = True) -> LatentDiffusion:
    """A tiny LatentDiffusion: UNet backbone, a frozen random OpenCLIP text encoder and a trained ClassEmbedder."""
    torch.manual_seed(seed)
    codec = LatentCodec(VAE(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, latent_channels=4, norm_groups=4),
                        scale=1.0)
    text = OpenCLIPTextEmbedder(clip=OpenCLIP(random_init=True, seed=seed, text_cfg={"width": 32, "layers": 1, "heads": 2, "context_length": 8}))
    conditioner = Conditioner([text, ClassEmbedder(classes, 8)])
    model = LatentDiffusion(partial(UNet, **TINY), codec, conditioner, ema_decay=0.9 if ema else None)
    randomize(model.backbone, seed)
    if ema:
        randomize(model.ema.module, seed + 100)  # an EMA unlike the trained weights
    return model


def lightning_checkpoint(model: LatentDiffusion, path: Path) -> Path:
    """What Lightning writes: the module's state dict, filtered by its on_save_checkpoint, among other entries."""
    checkpoint = {"state_dict": model.state_dict(), "epoch": 3, "global_step": 12}
    model.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


def clone(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stage2_checkpoint_gives_the_ema_backbone_and_the_trained_conditioner(tmp_path):
    source, target = stage2(0), stage2(1)
    path = lightning_checkpoint(source, tmp_path / "last.ckpt")
    text = clone(target.conditioner.embedders[0])
    load_init_weights(target.backbone, target.conditioner, path)
    assert_same(clone(target.backbone), clone(source.ema.module))  # the weights that are sampled from
    assert_same(clone(target.conditioner.embedders[1]), clone(source.conditioner.embedders[1]))
    assert_same(clone(target.conditioner.embedders[0]), text)  # frozen: not in the checkpoint, kept as built


def test_trained_backbone_without_ema_and_no_conditioner_part(tmp_path):
    source, target = stage2(0, ema=False), stage2(1)
    path = tmp_path / "backbone.safetensors"
    save_file({f"backbone.{k}": v.contiguous() for k, v in source.backbone.state_dict().items()}, path)
    conditioner = clone(target.conditioner)
    load_init_weights(target.backbone, target.conditioner, path)
    assert_same(clone(target.backbone), clone(source.backbone))
    assert_same(clone(target.conditioner), conditioner)


def test_everything_is_checked_before_anything_loads(tmp_path):
    source, target = stage2(0), stage2(1, classes=4)
    path = lightning_checkpoint(source, tmp_path / "three-classes.ckpt")
    backbone = clone(target.backbone)
    with pytest.raises(WeightsError, match=r"three-classes\.ckpt does not fit this conditioner; mis-shaped keys: "
                                           r"embedders\.1\.embedding\.weight \(4, 8\) in file vs \(5, 8\) in model"):
        load_init_weights(target.backbone, target.conditioner, path)
    assert_same(clone(target.backbone), backbone)


@pytest.mark.parametrize("name", ["diffusion_pytorch_model.safetensors", "unet.pt"])
def test_diffusers_unet_file(tmp_path, name):
    state = diffusers_twin(TINY, 32, None, False).state_dict()
    if name.endswith(".safetensors"):
        save_file(state, tmp_path / name)
    else:
        torch.save(state, tmp_path / name)
    unet = UNet(4, 4, 32, None, **TINY)
    load_init_weights(unet, Conditioner([]), tmp_path / name)
    assert_same(clone(unet), unet_from_diffusers(state))


def test_unet_mismatch_names_the_file_and_the_keys(tmp_path):
    state = dict(UNet(4, 4, 32, None, **TINY).state_dict())
    del state["conv_in.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["conv_out.weight"] = torch.zeros(3, 32, 3, 3)
    save_file(state, tmp_path / "broken.safetensors")
    with pytest.raises(WeightsError, match=r"broken\.safetensors does not fit this UNet; missing keys: conv_in\.bias; "
                                           r"unexpected keys: extra\.weight; mis-shaped keys: conv_out\.weight "
                                           r"\(3, 32, 3, 3\) in file vs \(4, 32, 3, 3\) in model"):
        load_init_weights(UNet(4, 4, 32, None, **TINY), Conditioner([]), tmp_path / "broken.safetensors")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_bare_dit_weights_round_trip(tmp_path, suffix):
    model = randomize(tiny_dit()).eval()
    path = tmp_path / f"dit{suffix}"
    state_dict = {k: v.contiguous() for k, v in model.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state_dict, path)
    else:
        torch.save(state_dict, path)
    restored = tiny_dit().eval()
    load_init_weights(restored, Conditioner([]), path)
    batch = inputs()
    with torch.no_grad():
        assert torch.equal(restored(**batch), model(**batch))
    with pytest.raises(WeightsError, match=re.escape(f"{path} does not fit this DiT; unexpected keys: blocks.0.cross")):
        load_init_weights(tiny_dit(context_dim=None), Conditioner([]), path)


def save_diffusers_dit(path: Path, tie_embedders: bool = True) -> torch.nn.Module:
    reference = diffusers_dit(tie_embedders)  # 10 classes, width 32, learned sigma (8 output channels)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, path)
    return reference


def diffusers_sized_dit() -> DiT:
    """The DiT LatentDiffusion builds for diffusers_dit's weights: 4 latent channels out, vector = its width."""
    return DiT(4, 4, None, 32, patch_size=2, width=32, depth=2, num_heads=2, pos_embed_base_size=4, time_freq_shift=1.0)


def test_diffusers_dit_fills_the_backbone_and_the_class_embedder(tmp_path):
    reference = save_diffusers_dit(tmp_path / "dit.safetensors")
    ours, conditioner = diffusers_sized_dit(), Conditioner([ClassEmbedder(10, 32)])
    load_init_weights(ours, conditioner, tmp_path / "dit.safetensors")
    x, t, labels = torch.randn(3, 4, 8, 8), torch.tensor([0, 250, 999]), torch.tensor([1, 7, 10])  # 10: null class
    with torch.no_grad():
        expected = reference(x, t, labels).sample[:, :4]  # the eps half; the learned variance is dropped
        vector = conditioner({"label": labels}, (8, 8), drop=False).vector  # (B, 32)
        actual = ours.eval()(x, t.float(), vector=vector)
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("embedders, message", [
    ([], r"holds a DiT class table \(10 classes \+ null\) for one ClassEmbedder, but the conditioner has 0"),
    ([ClassEmbedder(10, 16), ClassEmbedder(10, 16)], "but the conditioner has 2"),
    ([ClassEmbedder(9, 32)], r"does not fit the conditioner's ClassEmbedder; mis-shaped keys: embedding\.weight "
                             r"\(11, 32\) in file vs \(10, 32\) in model"),
], ids=["none", "two", "nine-classes"])
def test_diffusers_dit_class_table_must_fit_one_class_embedder(tmp_path, embedders, message):
    save_diffusers_dit(tmp_path / "dit.safetensors")
    with pytest.raises(WeightsError, match=re.escape(str(tmp_path / "dit.safetensors")) + ".*" + message):
        load_init_weights(diffusers_sized_dit(), Conditioner(embedders), tmp_path / "dit.safetensors")


def test_diffusers_dit_with_untied_embedders_names_the_file(tmp_path):
    save_diffusers_dit(tmp_path / "untied.safetensors", tie_embedders=False)
    path = tmp_path / "untied.safetensors"
    with pytest.raises(WeightsError, match=r"untied\.safetensors: per-block timestep/class embedders differ"):
        load_init_weights(diffusers_sized_dit(), Conditioner([ClassEmbedder(10, 32)]), path)
