"""DiT backbone: shapes, adaLN-Zero init, parity with diffusers, checkpointing, presets."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from torch.utils.checkpoint import checkpoint

import ldm.backbones.dit as dit_module
from ldm.backbones.dit import DiT, sincos_pos_embed
from ldm.convert.dit import dit_from_diffusers

PRESETS = sorted((Path(__file__).parents[1] / "configs" / "backbone").glob("dit-*.yaml"))


def tiny_dit(context_dim: int | None = 12, vector_dim: int | None = 10, **kwargs) -> DiT:
    return DiT(4, 4, context_dim, vector_dim, **{"width": 32, "depth": 2, "num_heads": 2, **kwargs})


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-zero weights everywhere, so that outputs depend on every parameter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model


def inputs(batch: int = 2, height: int = 8, width: int = 8, context: bool = True, vector: bool = True) -> dict:
    return {
        "x": torch.randn(batch, 4, height, width),
        "t": torch.rand(batch) * 1000,
        "context": torch.randn(batch, 5, 12) if context else None,
        "vector": torch.randn(batch, 10) if vector else None,
    }


@pytest.mark.parametrize("patch_size", [2, 4, 8])
@pytest.mark.parametrize("size", [(16, 16), (16, 32), (24, 8)])
@pytest.mark.parametrize("context,vector", [(True, True), (False, False), (True, False), (False, True)])
def test_output_shape(patch_size, size, context, vector):
    model = tiny_dit(12 if context else None, 10 if vector else None, patch_size=patch_size, depth=1)
    out = model(**inputs(2, *size, context=context, vector=vector))
    assert out.shape == (2, 4, *size)


def test_learned_sigma_doubles_output_channels():
    out = DiT(4, 8, None, None, width=32, depth=1, num_heads=2)(torch.randn(1, 4, 8, 12), torch.ones(1))
    assert out.shape == (1, 8, 8, 12)


def test_context_and_vector_reach_the_output():
    model = randomize(tiny_dit()).eval()
    batch = inputs()
    with torch.no_grad():
        out = model(**batch)
        for name in ("context", "vector", "t"):
            changed = model(**{**batch, name: batch[name] + 1})
            assert not torch.allclose(out, changed), name


def test_initial_output_is_exactly_zero():
    out = tiny_dit()(**inputs(height=8, width=16))
    assert torch.count_nonzero(out) == 0


def test_indivisible_size_and_missing_conditioning_are_rejected():
    model = tiny_dit(patch_size=4)
    with pytest.raises(ValueError, match="not divisible by patch_size 4"):
        model(**inputs(height=8, width=10))
    with pytest.raises(ValueError, match="context"):
        model(**inputs(context=False))
    with pytest.raises(ValueError, match="vector"):
        model(**inputs(vector=False))


def test_position_embedding_is_computed_not_stored():
    model = tiny_dit()
    assert not any("pos" in name for name in model.state_dict())
    ours = sincos_pos_embed(32, 3, 5, 4, torch.device("cpu"))  # non-square grid, rescaled to 4 positions
    assert torch.allclose(ours, get_2d_sincos_pos_embed(32, (3, 5), base_size=4).float(), atol=1e-6)
    ours = sincos_pos_embed(32, 6, 6, None, torch.device("cpu"))  # plain token indices
    assert torch.allclose(ours, get_2d_sincos_pos_embed(32, 6, base_size=6).float(), atol=1e-6)


def diffusers_dit(tie_embedders: bool = True) -> DiTTransformer2DModel:
    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_eps=1e-6,  # DiT's own LayerNorm eps
    )
    if tie_embedders:  # one shared t/y embedding, as in converted facebookresearch checkpoints
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    return model.eval()


@pytest.mark.parametrize("size", [8, 16])  # the trained grid, and a larger one with rescaled positions
def test_parity_with_diffusers(size):
    reference = diffusers_dit()
    state_dict, class_table = dit_from_diffusers(reference.state_dict())
    assert class_table.shape == (11, 32)  # 10 classes + the null class
    ours = DiT(4, 8, None, 32, patch_size=2, width=32, depth=2, num_heads=2, pos_embed_base_size=4, time_freq_shift=1.0)
    ours.load_state_dict(state_dict)
    x, t, labels = torch.randn(3, 4, size, size), torch.tensor([0, 250, 999]), torch.tensor([1, 7, 10])
    with torch.no_grad():
        expected = reference(x, t, labels).sample
        actual = ours.eval()(x, t.float(), vector=torch.nn.functional.embedding(labels, class_table))
    assert expected.abs().mean() > 0.1
    assert torch.allclose(actual, expected, atol=1e-4)


def test_converter_rejects_differing_block_embedders():
    with pytest.raises(ValueError, match=r"transformer_blocks\.1\.norm1\.emb\.timestep_embedder"):
        dit_from_diffusers(diffusers_dit(tie_embedders=False).state_dict())


def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch):
    calls = []

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(dit_module, "checkpoint", counting_checkpoint)
    plain = randomize(tiny_dit())
    checkpointed = tiny_dit(gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    batch = inputs()
    for model in (plain, checkpointed):
        model(**batch).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name
    assert len(calls) == 2  # once per block, in the checkpointed model only


def test_bf16_autocast_forward_is_finite():
    model = randomize(tiny_dit())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs(height=8, width=16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_presets_hold_only_backbone_knobs(preset):
    config = yaml.safe_load(preset.read_text())
    assert config["class_path"] == "ldm.backbones.dit.DiT"
    assert not {"in_channels", "out_channels", "context_dim", "vector_dim"} & config["init_args"].keys()
    inspect.signature(DiT).bind(4, 4, None, None, **config["init_args"])


def test_tiny_preset_builds_and_runs():
    config = yaml.safe_load((PRESETS[0].parent / "dit-tiny.yaml").read_text())
    model = DiT(4, 4, 12, 10, **config["init_args"])
    assert model(**inputs()).shape == (2, 4, 8, 8)
