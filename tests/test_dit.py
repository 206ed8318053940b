"""DiT backbone: shapes, adaLN-Zero init, positions and token order on any grid, parity with diffusers, checkpointing, presets."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import yaml
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from torch.utils.checkpoint import checkpoint

import ldm.backbones.dit as dit_module
from ldm.backbones.dit import DiT, sincos_pos_embed
from ldm.convert.dit import dit_from_diffusers
from tests.backbones import CONFIGS, diffusers_dit, inputs, randomize, tiny_dit

PRESETS = sorted(CONFIGS.glob("dit-*.yaml"))


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


def test_blocks_get_contiguous_tokens():
    """The patch embedding's transposed strides must not reach the residual stream: a sum keeps them, and every
    LayerNorm (forward and backward) would then copy its input (README, Performance)."""
    model, seen = tiny_dit(), []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda _, args: seen.append(args[0].is_contiguous()))
    model(**inputs(height=8, width=16))
    assert seen == [True] * len(model.blocks)


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


def mae_pos_embed(dim: int, h: int, w: int, base_size: int | None) -> np.ndarray:
    """MAE/DiT's ``get_2d_sincos_pos_embed`` in NumPy, for an (h, w) grid -> (h*w, dim), each axis rescaled
    to span ``base_size`` positions as diffusers' PatchEmbed does (``pos / (n / base_size)``)."""

    def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))  # (D/2,)
        out = np.einsum("m,d->md", pos.reshape(-1), omega)  # (M, D/2)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D)

    grid_h, grid_w = (np.arange(n, dtype=np.float64) / (1 if base_size is None else n / base_size) for n in (h, w))
    grid = np.stack(np.meshgrid(grid_w, grid_h))  # (2, h, w): w goes first
    return np.concatenate([sincos_1d(dim // 2, grid[0]), sincos_1d(dim // 2, grid[1])], axis=1)  # (h*w, D)


def test_position_embedding_is_computed_not_stored():
    assert not any("pos" in name for name in tiny_dit().state_dict())


@pytest.mark.parametrize("h,w,base_size", [(3, 5, None), (4, 8, 4), (8, 4, 2), (6, 6, None)])
def test_position_embedding_matches_mae_and_diffusers(h, w, base_size):
    ours = sincos_pos_embed(32, h, w, base_size, torch.device("cpu"))  # (h*w, D)
    assert torch.allclose(ours, torch.from_numpy(mae_pos_embed(32, h, w, base_size)).float(), atol=1e-6)
    if base_size is not None or h == w:  # diffusers always rescales each axis: plain indices only on a square
        theirs = get_2d_sincos_pos_embed(32, (h, w), base_size=base_size or h)
        assert torch.allclose(ours, theirs.float(), atol=1e-6)


def test_each_token_gets_its_own_row_and_column_on_a_non_square_grid():
    """Patchify, position embedding and unpatchify on a 12x24 latent (6x12 tokens). With the patch embedding and
    the output layer identities and every block the identity (adaLN-Zero at initialisation), the output is the
    input plus the sin-cos of each token's (row, column) spread over its patch as (p, q, c), diffusers' order."""
    p, c, (h, w) = 2, 4, (6, 12)
    width = p * p * c
    model = DiT(c, c, None, None, patch_size=p, width=width, depth=1, num_heads=2, pos_embed_base_size=4)
    eye = torch.eye(width)  # token channel (i * p + j) * c + k holds the patch's pixel (i, j) of channel k
    with torch.no_grad():
        model.patch_embed.weight.copy_(eye.reshape(width, p, p, c).permute(0, 3, 1, 2))
        model.final.linear.weight.copy_(eye)
    model.final.norm = torch.nn.Identity()
    x = torch.randn(1, c, h * p, w * p)
    with torch.no_grad():
        out = model(x, torch.ones(1))
    pos = mae_pos_embed(width, h, w, 4).reshape(h, w, p, p, c).transpose(4, 0, 2, 1, 3).reshape(c, h * p, w * p)
    torch.testing.assert_close(out[0] - x[0], torch.from_numpy(pos).float(), atol=1e-5, rtol=0)


class _Tokens(Exception):
    """Carries diffusers' DiT output tokens out of its forward, before its unpatchify."""


def diffusers_on_grid(reference: DiTTransformer2DModel, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """diffusers' DiT output on any latent grid. Its unpatchify assumes a square grid (the square root of the token
    count), so off the square: its own forward up to the last linear (positions rescaled per axis by its PatchEmbed),
    then its unpatchify at x's (h, w)."""
    p, c = reference.config.patch_size, reference.out_channels
    h, w = x.shape[-2] // p, x.shape[-1] // p
    if h == w:
        return reference(x, t, labels).sample

    def stop(module, args, output):
        raise _Tokens(output)

    handle = reference.proj_out_2.register_forward_hook(stop)
    try:
        reference(x, t, labels)
    except _Tokens as found:
        tokens = found.args[0]  # (B, h*w, p*p*C)
    finally:
        handle.remove()
    return torch.einsum("nhwpqc->nchpwq", tokens.reshape(-1, h, w, p, p, c)).reshape(-1, c, h * p, w * p)


# the trained 4x4 token grid, a larger one and non-square ones, positions rescaled to span 4 on each axis
@pytest.mark.parametrize("size", [(8, 8), (16, 16), (8, 16), (12, 4)])
def test_parity_with_diffusers(size):
    reference = diffusers_dit()
    state_dict, class_table = dit_from_diffusers(reference.state_dict())
    assert class_table.shape == (11, 32)  # 10 classes + the null class
    ours = DiT(4, 8, None, 32, patch_size=2, width=32, depth=2, num_heads=2, pos_embed_base_size=4, time_freq_shift=1.0)
    ours.load_state_dict(state_dict)
    x, t, labels = torch.randn(3, 4, *size), torch.tensor([0, 250, 999]), torch.tensor([1, 7, 10])
    with torch.no_grad():
        expected = diffusers_on_grid(reference, x, t, labels)
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
