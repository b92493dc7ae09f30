"""Building blocks shared by the U-Net and the DiT."""

from __future__ import annotations

import math

import torch
from torch import nn


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of a float timestep (Transformer style), then a 2-layer MLP.

    The frequency table is a non-persistent buffer: it is not a weight, so it stays out of the state
    dict, and precomputing it keeps `arange`/`exp` out of the exported graph.
    """

    def __init__(self, freq_dim: int, out_dim: int, max_period: float = 10000.0) -> None:
        super().__init__()
        half = freq_dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * half, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.float()[:, None] * self.freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=1))


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups of at least 4 channels (tiny models have few channels)."""
    groups = min(32, max(1, channels // 4))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=1e-6)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention over (B, heads, L, d) tensors.

    Plain matmul + softmax rather than F.scaled_dot_product_attention: it exports to the same few ONNX
    ops under both exporters and runs identically in onnxruntime and OpenVINO.
    """
    scale = q.shape[-1] ** -0.5
    w = torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1)
    return w @ v
