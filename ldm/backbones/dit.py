"""DiT: a transformer denoiser over latent patches with adaLN-Zero conditioning (Peebles & Xie 2023)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldm.backbones.base import Backbone
from ldm.nn.layers import Attention, FeedForward, TimestepEmbedder


def sincos_embed(pos: Tensor, dim: int) -> Tensor:
    """Fixed sin-cos features of positions (N,) -> (N, dim) float64 (Vaswani et al. 2017, Sec. 3.5)."""
    omega = 10000.0 ** -(torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))  # (D/2,)
    angles = pos.reshape(-1, 1) * omega  # (N, D/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)  # (N, D)


@functools.lru_cache(maxsize=16)
def sincos_pos_embed(dim: int, h: int, w: int, base_size: int | None, device: torch.device) -> Tensor:
    """Fixed 2D sin-cos embedding of an (h, w) token grid -> (h*w, dim), row-major like the tokens.

    The first half of the channels encodes the column, the second half the row (as DiT/MAE do).
    With ``base_size`` each axis is rescaled to span ``base_size`` positions whatever its length
    (diffusers' PatchEmbed), so a model trained on one grid sees familiar positions on another.
    """
    ys, xs = (torch.arange(n, dtype=torch.float64) / (1.0 if base_size is None else n / base_size) for n in (h, w))
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # (h, w) each
    return torch.cat([sincos_embed(grid_x, dim // 2), sincos_embed(grid_y, dim // 2)], dim=1).to(device, torch.float32)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """Adaptive layer-norm affine: x * (1 + scale) + shift, per sample (DiT Sec. 3.2)."""
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    """Self-attention and MLP, each modulated and gated by the conditioning (adaLN-Zero), with an
    optional ungated cross-attention to context tokens in between (PixArt-alpha)."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float, context_dim: int | None) -> None:
        super().__init__()
        head_dim = width // num_heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, num_heads, head_dim, qkv_bias=True)
        self.cross_attn = (
            Attention(width, num_heads, head_dim, context_dim=context_dim, qkv_bias=True) if context_dim else None
        )
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = FeedForward(width, mlp_ratio, activation="gelu")
        self.modulation = nn.Linear(width, 6 * width)  # c -> shift, scale, gate for attention and MLP

    def forward(self, x: Tensor, c: Tensor, context: Tensor | None, pos: Tensor | None = None,
                rotary: Tensor | None = None) -> Tensor:
        """``pos`` (T, D), if given, is added to the self-attention's input alone: the video DiT's frame
        positions, which leave the residual stream (and so the image model, frame by frame) as it is.
        ``rotary`` (T, head_dim / 2): RoPE angles of the tokens for the self-attention (the joint video DiT)."""
        mod = self.modulation(F.silu(c))[:, None]  # (B, 1, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)  # 6 x (B, 1, D)
        h = modulate(self.norm1(x), shift_msa, scale_msa)  # (B, T, D)
        x = x + gate_msa * self.attn(h if pos is None else h + pos, rotary=rotary)  # (B, T, D)
        if self.cross_attn is not None:
            x = x + self.cross_attn(x, context)  # (B, T, D)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (B, T, D)


class FinalLayer(nn.Module):
    """Modulated layer norm and a linear map from each token to its patch of output channels."""

    def __init__(self, width: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(width, 2 * width)  # c -> shift, scale
        self.linear = nn.Linear(width, patch_size * patch_size * out_channels)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.modulation(F.silu(c))[:, None].chunk(2, dim=-1)  # 2 x (B, 1, D)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, T, p*p*C_out)


class DiT(Backbone):
    """Diffusion transformer on latent patches (Peebles & Xie 2023), behind the Backbone interface.

    The timestep embedding plus a projection of ``vector`` (class, pooled text, size) is the
    conditioning c that modulates every block; ``context`` tokens, when the model has a
    ``context_dim``, are read by a cross-attention in each block.
    """

    block_types = (DiTBlock,)
    block_type: type[DiTBlock] = DiTBlock  # the class of self.blocks; the video DiT extends it with a temporal block

    def __init__(
        self,
        in_channels: int,  # latent channels, concat conditioning included
        out_channels: int,  # predicted channels: the latent's (no learned variance)
        context_dim: int | None,  # token width for cross-attention; None: no cross-attention
        vector_dim: int | None,  # width of the global conditioning vector; None: none
        patch_size: int = 2,  # side of the square latent patch that becomes one token
        width: int = 384,  # token width D
        depth: int = 12,  # number of transformer blocks
        num_heads: int = 6,  # attention heads (width must divide evenly)
        mlp_ratio: float = 4.0,  # MLP hidden width / D
        gradient_checkpointing: bool = False,  # recompute each block's activations in backward
        pos_embed_base_size: int | None = None,  # grid side positions are rescaled to; None: token index
        time_freq_shift: float = 0.0,  # timestep frequency spacing; 1 reproduces diffusers' DiT
    ) -> None:
        super().__init__()
        if width % num_heads or width % 4:
            raise ValueError(f"DiT width {width} must be divisible by num_heads ({num_heads}) and by 4")
        self.patch_size = self.size_multiple = patch_size
        self.out_channels = out_channels
        self.width = width
        self.pos_embed_base_size = pos_embed_base_size
        self.gradient_checkpointing = gradient_checkpointing
        self.patch_embed = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)
        self.time_embed = TimestepEmbedder(256, width, flip_sin_to_cos=True, downscale_freq_shift=time_freq_shift)
        self.vector_embed = nn.Linear(vector_dim, width) if vector_dim else None
        self.blocks = nn.ModuleList(self.block_type(width, num_heads, mlp_ratio, context_dim) for _ in range(depth))
        self.final = FinalLayer(width, patch_size, out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation; with it the untrained model predicts exactly zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # The patch embedding is a linear map of each flattened patch: initialise it as one.
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.width, -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.time_embed.linear_1.weight, std=0.02)
        nn.init.normal_(self.time_embed.linear_2.weight, std=0.02)
        # adaLN-Zero (DiT Sec. 3.2): the layers producing shift/scale/gate start at zero, so every
        # gate is 0 and every block is the identity map at initialisation; training opens the
        # residual branches gradually. Zeroing the final layer as well makes the first prediction 0.
        # The cross-attention output starts at zero too, so text enters gradually (PixArt-alpha).
        for block in (m for m in self.modules() if isinstance(m, DiTBlock)):
            nn.init.zeros_(block.modulation.weight)
            nn.init.zeros_(block.modulation.bias)
            if block.cross_attn is not None:
                nn.init.zeros_(block.cross_attn.to_out.weight)
                nn.init.zeros_(block.cross_attn.to_out.bias)
        for layer in (self.final.modulation, self.final.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self,
        x: Tensor,  # (B, C_in, H, W)
        t: Tensor,  # (B,)
        context: Tensor | None = None,  # (B, L, D_ctx)
        vector: Tensor | None = None,  # (B, D_vec)
    ) -> Tensor:  # (B, C_out, H, W)
        self._check(x, context, vector)
        p, h, w = self.patch_size, x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        tokens = self._tokens(x)  # (B, T, D)
        c = self._conditioning(t, vector)  # (B, D)
        for block in self.blocks:
            tokens = self._run(block, tokens, c, context)  # (B, T, D)
        out = self.final(tokens, c)  # (B, T, p*p*C_out)
        return rearrange(out, "b (h w) (p q c) -> b c (h p) (w q)", h=h, w=w, p=p, q=p)  # (B, C_out, H, W)

    def _check(self, x: Tensor, context: Tensor | None, vector: Tensor | None) -> None:
        """Raise a ValueError unless the latent's sides divide into patches and the conditioning fits the model."""
        name, p = type(self).__name__, self.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"{name} latent size {tuple(x.shape[-2:])} is not divisible by patch_size {p}")
        if (context is None) != (self.blocks[0].cross_attn is None):
            raise ValueError(f"{name} takes `context` exactly when it was built with a context_dim")
        if (vector is None) != (self.vector_embed is None):
            raise ValueError(f"{name} takes `vector` exactly when it was built with a vector_dim")

    def _tokens(self, x: Tensor) -> Tensor:
        """Patches of a latent (B, C_in, H, W) -> tokens with their grid positions (B, h*w, D), row-major."""
        grid = self.patch_embed(x)  # (B, D, h, w)
        pos = sincos_pos_embed(self.width, *grid.shape[-2:], self.pos_embed_base_size, x.device)  # (T, D)
        # contiguous: a sum keeps its first operand's (transposed) strides, and every LayerNorm would copy them
        return rearrange(grid, "b d h w -> b (h w) d").contiguous() + pos.to(grid.dtype)  # (B, T, D)

    def _conditioning(self, t: Tensor, vector: Tensor | None) -> Tensor:
        """The vector c that modulates every block: timestep embedding plus the projected ``vector``, (B, D)."""
        c = self.time_embed(t)  # (B, D)
        return c if self.vector_embed is None else c + self.vector_embed(vector)  # (B, D)

    def _run(self, block: nn.Module, *args: Tensor | None) -> Tensor:
        """Call a block, through activation checkpointing when enabled and training."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)
