"""Rotary position embeddings in the interleaved-pair (complex) layout of Mistral checkpoints.

Adjacent features (2i, 2i+1) of each head form one complex number that is rotated by the angle
position * freq_i. Angles and the rotation are computed in fp32.
"""

from __future__ import annotations

import torch


def rope_freqs(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """Base frequencies 1/theta**(2i/d), i < d/2."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))


def rope_angles_1d(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """(T,) integer positions -> (T, head_dim/2) angles."""
    return positions.float()[:, None] * rope_freqs(head_dim, theta, positions.device)[None, :]


def rope_angles_2d(grid_sizes: list[tuple[int, int]], head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """Angles for the patches of several images, row-major, positions restarting at (0, 0) per image.

    Height uses the even-indexed base frequencies, width the odd-indexed ones:
    angle(h, w) = cat(h * freqs[::2], w * freqs[1::2]) -> (sum(h*w), head_dim/2).
    """
    freqs = rope_freqs(head_dim, theta, device)
    per_image = []
    for h, w in grid_sizes:
        rows = torch.arange(h, device=device, dtype=torch.float32)
        cols = torch.arange(w, device=device, dtype=torch.float32)
        ang_h = (rows[:, None] * freqs[None, ::2])[:, None, :].expand(h, w, -1)  # (h, w, d/4)
        ang_w = (cols[:, None] * freqs[None, 1::2])[None, :, :].expand(h, w, -1)  # (h, w, d/4)
        per_image.append(torch.cat([ang_h, ang_w], dim=-1).reshape(h * w, -1))
    return torch.cat(per_image, dim=0)


def rope_rotation(angles: torch.Tensor) -> torch.Tensor:
    """(T, head_dim/2) angles -> (T, 1, head_dim/2) unit complex64 rotations. Made once per forward
    and shared by every layer's q and k (per layer it was 4 extra kernels, 160 a step at 40 layers)."""
    return torch.polar(torch.ones_like(angles), angles)[:, None, :]


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """x: (T, n_heads, head_dim); rotation: `rope_rotation` of its angles. Rotates interleaved pairs."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (T, h, d/2)
    return torch.view_as_real(xc * rotation).flatten(-2).type_as(x)
