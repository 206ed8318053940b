"""Tiny backbones, their diffusers twins and random weights: shared by the backbone, denoiser, video and FSDP tests."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from diffusers import DiTTransformer2DModel, UNet2DConditionModel

from ldm.backbones.dit import DiT

CONFIGS = Path(__file__).parents[1] / "configs" / "backbone"
TINY = yaml.safe_load((CONFIGS / "unet-tiny.yaml").read_text())["init_args"]  # the tiny UNet's knobs


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Non-zero weights everywhere (replacing zero inits), so that outputs depend on every parameter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model


def diffusers_twin(knobs: dict, context_dim: int, vector_dim: int | None, linear_projection: bool) -> UNet2DConditionModel:
    """diffusers' UNet2DConditionModel with the architecture of ``UNet(4, 4, context_dim, vector_dim, **knobs)``."""
    widths = [knobs["model_channels"] * m for m in knobs["channel_mult"]]
    attn = [i in knobs["attention_levels"] for i in range(len(widths))]
    head_dim = knobs.get("head_dim")
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(widths),
        layers_per_block=knobs["num_res_blocks"],
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        cross_attention_dim=context_dim,
        # diffusers' attention_head_dim is the number of heads for SD-1.x-style configs
        attention_head_dim=knobs["num_heads"] if head_dim is None else tuple(w // head_dim for w in widths),
        transformer_layers_per_block=knobs.get("transformer_depth", 1),
        norm_num_groups=knobs["norm_groups"],
        use_linear_projection=linear_projection,
        class_embed_type=None if vector_dim is None else "projection",
        projection_class_embeddings_input_dim=vector_dim,
    ).eval()


def tiny_dit(context_dim: int | None = 12, vector_dim: int | None = 10, **kwargs) -> DiT:
    return DiT(4, 4, context_dim, vector_dim, **{"width": 32, "depth": 2, "num_heads": 2, **kwargs})


def inputs(batch: int = 2, height: int = 8, width: int = 8, context: bool = True, vector: bool = True) -> dict:
    return {
        "x": torch.randn(batch, 4, height, width),
        "t": torch.rand(batch) * 1000,
        "context": torch.randn(batch, 5, 12) if context else None,
        "vector": torch.randn(batch, 10) if vector else None,
    }


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
