"""A DiT over clips: the image DiT's blocks on each frame, each followed by a temporal block at each position."""

from __future__ import annotations

from typing import Any

from einops import rearrange
from torch import Tensor

from ldm.backbones.dit import DiT, DiTBlock
from ldm.backbones.temporal import TemporalDiTBlock, check_clip, check_frame_patch, frame_pos_embed
from ldm.nn.rotary import rotary_angles


def _repeat(n: int, *per_clip: Tensor | None) -> list[Tensor | None]:
    """Each clip's conditioning for each of its n frames or n token positions: rows repeated in place."""
    return [None if a is None else a.repeat_interleave(n, dim=0) for a in per_clip]


class SpatioTemporalBlock(DiTBlock):
    """The image DiT block over the tokens of each frame (its weights, its names), then ``temporal`` over the
    frames at each token position: factorised space-time attention (ViViT, Arnab et al. 2021, model 3, with a
    whole adaLN block for each factor as in Latte, Ma et al. 2024, variant 1)."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float, context_dim: int | None) -> None:
        super().__init__(width, num_heads, mlp_ratio, context_dim)
        self.temporal = TemporalDiTBlock(width, num_heads, mlp_ratio, context_dim)

    def forward(self, x: Tensor, c: Tensor, context: Tensor | None) -> Tensor:
        """x: (B, T, L, D) tokens of T frames; c: (B, D) and context: (B, L_ctx, D_ctx) per clip."""
        b, frames, length, width = x.shape
        x = super().forward(x.flatten(0, 1), *_repeat(frames, c, context))  # (B*T, L, D), each frame as the image model sees it
        x = rearrange(x, "(b t) l d -> (b l) t d", t=frames)  # (B*L, T, D)
        frame_pos = frame_pos_embed(width, frames, x.device).to(x.dtype)  # (T, D)
        x = self.temporal(x, *_repeat(length, c, context), frame_pos)  # (B*L, T, D)
        return rearrange(x, "(b l) t d -> b t l d", b=b)  # (B, T, L, D)


class VideoDiT(DiT):
    """DiT on latent clips (B, C, T, H, W) with factorised space/time attention; any T x H x W.

    Its state dict is the image DiT's plus ``blocks.<i>.temporal.*``: built from an image DiT's weights
    (``LatentDiffusion.init_weights``), the temporal blocks start as identities and it is that DiT frame
    by frame. Tokens carry the image DiT's 2D grid positions; each temporal block adds 1D sin-cos frame
    positions to its attention's input and, gated, to the tokens, so a model trained on some number of frames
    runs on others. With ``frame_patch`` k > 1 a token covers k frames: clips of a multiple of k frames, and no
    image DiT's weights, whose patches are one frame's.
    """

    block_types = (SpatioTemporalBlock,)
    block_type = SpatioTemporalBlock

    def __init__(self, in_channels: int, out_channels: int, context_dim: int | None, vector_dim: int | None,
                 frame_patch: int = 1, **dit_options: Any) -> None:
        """``frame_patch``: the consecutive frames one token covers (1: one frame's patch, as the image DiT); the
        image DiT's knobs (patch_size, width, depth, ...) otherwise. With k > 1 each token embeds k frames'
        patches at once and unembeds them (ViViT's tubelet embedding, Arnab et al. 2021, Sec. 3.2; the spacetime
        patches of Latte and Sora): k times fewer tokens, and the patch embedding sees the order of its frames."""
        k = check_frame_patch(frame_patch)
        super().__init__(in_channels * k, out_channels * k, context_dim, vector_dim, **dit_options)
        self.frame_patch = frame_patch
        self.out_channels = out_channels

    def forward(
        self,
        x: Tensor,  # (B, C_in, T, H, W)
        t: Tensor,  # (B,)
        context: Tensor | None = None,  # (B, L, D_ctx)
        vector: Tensor | None = None,  # (B, D_vec)
    ) -> Tensor:  # (B, C_out, T, H, W)
        self._check(x, context, vector)
        (b, _, frames, height, width), p, k = x.shape, self.patch_size, self.frame_patch
        tokens = self._tokens(rearrange(x, "b c (t k) h w -> (b t) (k c) h w", k=k))  # (B*T/k, L, D)
        tokens = rearrange(tokens, "(b t) l d -> b t l d", b=b)  # (B, T/k, L, D)
        c = self._conditioning(t, vector)  # (B, D)
        tokens = self._mix(tokens, c, context, (height // p, width // p))  # (B, T/k, L, D)
        out = self.final(tokens.flatten(1, 2), c)  # (B, T/k*L, p*p*k*C_out)
        return rearrange(out, "b (t h w) (p q k c) -> b c (t k) (h p) (w q)",
                         t=frames // k, h=height // p, w=width // p, p=p, q=p, k=k)  # (B, C_out, T, H, W)

    def _check(self, x: Tensor, context: Tensor | None, vector: Tensor | None) -> None:
        """The image DiT's checks on a latent clip whose frames divide into tokens' frames."""
        check_clip(self, x)
        super()._check(x, context, vector)

    def _mix(self, tokens: Tensor, c: Tensor, context: Tensor | None, grid: tuple[int, int]) -> Tensor:
        """The blocks over the clip's tokens (B, T, L, D) on a (h, w) token grid -> (B, T, L, D)."""
        for block in self.blocks:
            tokens = self._run(block, tokens, c, context)  # (B, T, L, D)
        return tokens


class JointVideoDiT(VideoDiT):
    """A video DiT whose blocks attend over all of a clip's tokens at once (joint space-time attention, as
    CogVideoX and Wan), with 3-D rotary positions (frame, row, column) in every self-attention.

    Factorised attention reaches "one frame later, a few tokens over" only in two hops, and its models came out
    nearly symmetric under playing a clip backwards (README: Video). Here one attention compares any two tokens
    by their offsets in time and space. With one-frame tokens the 8-block model learnt the motion's sign on the
    CPU shapes runs in 6,000 steps; with two-frame tokens (``frame_patch`` 2), whose embedding is not symmetric in
    time from the first step, in the 30-minute budget (4,311 steps, every clip moving the prompted way). With
    one-frame tokens its state dict is the image DiT's (the same blocks, no temporal ones), so an image DiT's
    weights load into it, but joint attention over the frames is not that image model frame by frame: it starts
    from the image model rather than equal to it.
    """

    block_types = (DiTBlock,)
    block_type = DiTBlock

    def _mix(self, tokens: Tensor, c: Tensor, context: Tensor | None, grid: tuple[int, int]) -> Tensor:
        b, frames = tokens.shape[:2]
        head_dim = self.width // self.blocks[0].attn.heads
        rotary = rotary_angles(head_dim, (frames, *grid), tokens.device)  # (T*L, head_dim/2)
        joint = tokens.flatten(1, 2)  # (B, T*L, D)
        for block in self.blocks:
            joint = self._run(block, joint, c, context, None, rotary)  # (B, T*L, D)
        return joint.unflatten(1, (frames, -1))  # (B, T, L, D)
