"""Rotary position embeddings (RoPE, Su et al. 2021) over several axes, e.g. a clip's (frame, row, column).

Each axis rotates its own share of a head's channels by angles proportional to the token's coordinate on that
axis, so a query-key product depends on the two tokens' offsets, not on where they are: attention can prefer
"one frame later, two columns right" whatever the frame and column (3-D RoPE as CogVideoX and Wan use it).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


def axis_channels(head_dim: int, axes: int) -> list[int]:
    """How many of a head's channels each axis rotates: even shares, the first axis taking the remainder."""
    if head_dim % 2 or head_dim < 2 * axes:
        raise ValueError(f"rotary positions over {axes} axes need an even head_dim of at least {2 * axes}, got {head_dim}")
    share = 2 * (head_dim // (2 * axes))
    return [head_dim - share * (axes - 1)] + [share] * (axes - 1)


@functools.lru_cache(maxsize=16)
def rotary_angles(head_dim: int, sizes: tuple[int, ...], device: torch.device, base: float = 10000.0) -> Tensor:
    """Angles (N, head_dim / 2) for the N = prod(sizes) tokens of a grid in row-major order (last axis fastest)."""
    grids = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in sizes), indexing="ij")
    angles = []
    for coord, dim in zip(grids, axis_channels(head_dim, len(sizes))):
        freqs = base ** -(torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (dim/2,)
        angles.append(coord.reshape(-1, 1) * freqs)  # (N, dim/2)
    return torch.cat(angles, dim=1).to(device, torch.float32)  # (N, head_dim/2)


def rotate(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate channel pairs (i, i + d/2) of x (..., N, d) by angles (N, d/2) (GPT-NeoX's half-split layout)."""
    first, second = x.float().chunk(2, dim=-1)  # (..., N, d/2) each
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1).to(x.dtype)
