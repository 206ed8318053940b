"""The Stable Diffusion UNet backbone: shapes, init, checkpointing, CLI building, diffusers parity."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import yaml
from diffusers import UNet2DConditionModel
from jsonargparse import ArgumentParser

from ldm.backbones.base import Backbone
from ldm.backbones.unet import UNet
from ldm.backbones.unet_blocks import ResBlock
from ldm.convert.unet import unet_from_diffusers
from tests.backbones import CONFIGS, TINY, diffusers_twin, randomize

# SD-1.x's block pattern (attention on all but the last level) with SD-2's fixed head width,
# two transformer blocks per SpatialTransformer and a vector embedding.
TINY_SD_STYLE = {**TINY, "attention_levels": [0], "head_dim": 8, "transformer_depth": 2}


@pytest.mark.parametrize(
    "knobs, vector_dim, linear_projection",
    [(TINY, None, False), (TINY_SD_STYLE, 12, True)],
    ids=["unet-tiny.yaml", "sd-style-head-dim-vector"],
)
def test_matches_diffusers(knobs: dict, vector_dim: int | None, linear_projection: bool) -> None:
    reference = diffusers_twin(knobs, 32, vector_dim, linear_projection)
    ours = UNet(4, 4, 32, vector_dim, **knobs).eval()
    ours.load_state_dict(unet_from_diffusers(reference.state_dict()), strict=True)
    torch.manual_seed(2)
    x, t, context = torch.randn(2, 4, 16, 16), torch.tensor([3.5, 721.25]), torch.randn(2, 7, 32)
    vector = None if vector_dim is None else torch.randn(2, vector_dim)
    with torch.no_grad():
        expected = reference(x, t, encoder_hidden_states=context, class_labels=vector).sample
        got = ours(x, t, context, vector)
    assert expected.abs().mean() > 1e-2  # the comparison is not between two near-zero outputs
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_sd15_config_has_the_sd15_architecture() -> None:
    with torch.device("meta"):
        reference = UNet2DConditionModel(cross_attention_dim=768)  # diffusers' defaults are SD-1.x's UNet
        ours = UNet(4, 4, 768, None, **yaml.safe_load((CONFIGS / "unet-sd15.yaml").read_text())["init_args"])
    expected = {k: v.shape for k, v in unet_from_diffusers(reference.state_dict()).items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == expected
    assert sum(p.numel() for p in ours.parameters()) == 859_520_964


@pytest.mark.parametrize(
    "context_dim, vector_dim, size",
    [(None, None, (16, 16)), (32, None, (16, 16)), (32, 12, (16, 16)), (None, 12, (8, 24))],
)
def test_output_has_the_latent_shape(context_dim: int | None, vector_dim: int | None, size: tuple[int, int]) -> None:
    unet = randomize(UNet(6, 4, context_dim, vector_dim, **TINY), seed=1, std=0.1)
    x = torch.randn(2, 6, *size)
    context = None if context_dim is None else torch.randn(2, 5, context_dim)
    vector = None if vector_dim is None else torch.randn(2, vector_dim)
    out = unet(x, torch.rand(2) * 1000, context, vector)
    assert out.shape == (2, 4, *size)
    assert out.isfinite().all()


def test_rejects_conditioning_it_was_not_built_for_and_odd_sides() -> None:
    unet = UNet(4, 4, 32, None, **TINY)
    t = torch.rand(2)
    with pytest.raises(ValueError, match="context_dim=32"):
        unet(torch.randn(2, 4, 8, 8), t)
    with pytest.raises(ValueError, match="vector_dim=None"):
        unet(torch.randn(2, 4, 8, 8), t, torch.randn(2, 3, 32), torch.randn(2, 12))
    with pytest.raises(ValueError, match="multiples of 2"):
        unet(torch.randn(2, 4, 8, 9), t, torch.randn(2, 3, 32))


def test_predicts_zero_at_init() -> None:
    unet = UNet(4, 4, 32, 12, **TINY)
    out = unet(torch.randn(2, 4, 16, 16), torch.rand(2) * 1000, torch.randn(2, 5, 32), torch.randn(2, 12))
    assert torch.count_nonzero(out) == 0


def test_gradient_checkpointing_recomputes_with_the_same_output_and_gradients() -> None:
    torch.manual_seed(3)
    x, t, context = torch.randn(2, 4, 16, 16), torch.rand(2) * 1000, torch.randn(2, 5, 32)
    results = []
    for enabled in (False, True):
        unet = randomize(UNet(4, 4, 32, None, **TINY, gradient_checkpointing=enabled), seed=1, std=0.1).train()
        calls = []
        next(m for m in unet.modules() if isinstance(m, ResBlock)).register_forward_hook(lambda *_: calls.append(1))
        out = unet(x, t, context)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad for n, p in unet.named_parameters()}, len(calls)))
    (out_plain, grads_plain, calls_plain), (out_ckpt, grads_ckpt, calls_ckpt) = results
    assert (calls_plain, calls_ckpt) == (1, 2)  # checkpointing really re-ran the block in backward
    torch.testing.assert_close(out_ckpt, out_plain)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, msg=name)


def test_jsonargparse_builds_it_as_a_backbone_callable() -> None:
    """How LatentDiffusion receives it: a callable that it calls with the dimensions it alone knows."""
    parser = ArgumentParser(exit_on_error=False)
    # sub_configs lets the value be a YAML file's path, as LightningCLI's model arguments allow
    parser.add_argument("--backbone", type=Callable[[int, int, int | None, int | None], Backbone], sub_configs=True)
    from_file = parser.parse_args([f"--backbone={CONFIGS / 'unet-tiny.yaml'}"])
    from_dict = parser.parse_object({"backbone": {"class_path": "ldm.backbones.unet.UNet", "init_args": TINY}})
    assert from_file.backbone.init_args == from_dict.backbone.init_args
    build = parser.instantiate_classes(from_file).backbone
    unet = build(4, 4, 32, None)
    assert isinstance(unet, UNet)
    assert unet.context_dim == 32 and unet.vector_embedding is None
    assert len(unet.down_blocks) == 2 and unet.conv_in.out_channels == TINY["model_channels"]
    assert unet.down_blocks[0].attentions is None and unet.down_blocks[1].attentions is not None
    unconditional = build(4, 4, None, None)
    assert not hasattr(unconditional.mid_block.attentions[0].transformer_blocks[0], "attn2")
