"""Small building blocks shared by the encoder and decoder: RMSNorm, rotary embedding, attention.

Owns the numerics that must match the reference bit for bit in fp32 (RMSNorm in fp32, RoPE angles
in fp32, half-split rotation); it must not know about checkpoints or batching policy.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Qwen2's RMSNorm: normalise in fp32, scale in the input dtype."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        dtype = hidden.dtype
        hidden = hidden.float()
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * hidden.to(dtype)


class RotaryEmbedding(nn.Module):
    """Default RoPE over the full head dimension with the half-split (rotate_half) layout."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [N] -> (cos, sin) [N, head_dim] in ``dtype``; angles computed in fp32.

        The inverse frequencies are recomputed (64 numbers) rather than stored, so a model built on
        the meta device needs no buffer fix-up after loading."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=positions.device).float()
        inv_freq = 1.0 / (self.theta ** (exponents / self.head_dim))  # [head_dim / 2]
        freqs = positions.float()[:, None] * inv_freq[None, :]  # [N, head_dim / 2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [N, head_dim]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def embedding(rows: int, dim: int) -> nn.Embedding:
    """An embedding table without random initialisation: every table is filled from the checkpoint,
    and initialising on the meta device would pull in torch's slow Python reference kernels."""
    return nn.Embedding(rows, dim, _weight=torch.empty(rows, dim))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, head_dim], cos/sin [N, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
