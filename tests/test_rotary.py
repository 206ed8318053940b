"""Rotary positions: the attention score depends on the tokens' offsets only, axis by axis."""

import pytest
import torch

from ldm.nn.rotary import axis_channels, rotary_angles, rotate


def test_axis_channels_split_a_head_evenly():
    assert axis_channels(32, 3) == [12, 10, 10]
    assert axis_channels(64, 2) == [32, 32]
    with pytest.raises(ValueError, match="even head_dim of at least 6, got 5"):
        axis_channels(5, 3)


def test_scores_depend_on_offsets_not_on_positions():
    """One query and one key vector at every token of a (4, 3, 5) grid: the rotated product of two tokens is the
    same for every pair with the same offset (frame, row, column), and differs between offsets."""
    sizes, head_dim = (4, 3, 5), 12
    angles = rotary_angles(head_dim, sizes, torch.device("cpu"))  # (60, 6)
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, head_dim, generator=generator, dtype=torch.float64).float()
    scores = rotate(q.expand(60, -1), angles) @ rotate(k.expand(60, -1), angles).T  # (60, 60)
    coords = torch.cartesian_prod(*(torch.arange(n) for n in sizes))  # (60, 3), row-major like the tokens
    offsets = (coords[:, None] - coords[None]).reshape(-1, 3)  # (3600, 3)
    by_offset: dict[tuple[int, ...], list[float]] = {}
    for offset, score in zip(offsets.tolist(), scores.flatten().tolist()):
        by_offset.setdefault(tuple(offset), []).append(score)
    assert all(max(s) - min(s) < 1e-4 for s in by_offset.values())
    assert by_offset[(1, 0, 0)][0] != pytest.approx(by_offset[(-1, 0, 0)][0], abs=1e-3)  # a frame later is not earlier
    assert by_offset[(0, 0, 2)][0] != pytest.approx(by_offset[(0, 0, -2)][0], abs=1e-3)


def test_rotation_matches_complex_multiplication():
    """Channel pairs (i, i + d/2) turn as the complex numbers x_i + i x_{i+d/2} times e^{i angle}."""
    angles = rotary_angles(8, (3, 2), torch.device("cpu"))  # (6, 4): the first axis turns 4 channels, the second 4
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    z = torch.complex(x[:, :4], x[:, 4:]) * torch.polar(torch.ones_like(angles), angles)
    torch.testing.assert_close(rotate(x, angles), torch.cat([z.real, z.imag], dim=1))
    frame, row = torch.cartesian_prod(torch.arange(3), torch.arange(2)).T.float()
    torch.testing.assert_close(angles[:, 0], frame)  # the first frequency of each axis is 1: the angle is the coordinate
    torch.testing.assert_close(angles[:, 2], row)
