"""The one denoiser interface every backbone implements (DESIGN.md: The Backbone interface)."""

from __future__ import annotations

from torch import Tensor, nn


class Backbone(nn.Module):
    """A denoiser over latents; the diffusion model never knows which one it holds.

    Subclasses take ``in_channels, out_channels, context_dim, vector_dim`` as their first four
    constructor arguments, in that order: LatentDiffusion fills them (it alone knows the latent,
    concat, token and vector sizes), and a backbone YAML holds only the remaining knobs. They set
    ``size_multiple``, the number the latent's sides must be multiples of, and declare in
    ``block_types`` the classes of their repeated blocks: sharded training (``ldm.training.fsdp``)
    makes each such block one FSDP unit and checkpoints its activations.
    """

    size_multiple: int = 1
    block_types: tuple[type[nn.Module], ...] = ()  # repeated blocks; none: the backbone is one FSDP unit

    def forward(
        self,
        x: Tensor,  # (B, C_in, H, W) noisy latent, concat conditioning stacked on C
        t: Tensor,  # (B,) float timesteps, on the objective's scale
        context: Tensor | None = None,  # (B, L, D_ctx) tokens for cross-attention
        vector: Tensor | None = None,  # (B, D_vec) global conditioning
    ) -> Tensor:  # (B, C_out, H, W)
        raise NotImplementedError

    def inflate(self, image_weights: dict[str, Tensor]) -> dict[str, Tensor]:
        """The weights of the image backbone this one is built on, made this one's (``load_init_weights`` on an
        image file); as they are, unless a video backbone's layers read several frames at once (VideoUNet)."""
        return image_weights
