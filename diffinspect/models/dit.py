"""Diffusion Transformer (Peebles & Xie 2023) on pixels, conditioned on the timestep only.

patchify → + fixed 2-D sin-cos position embedding → DiT blocks with adaLN-Zero → final layer →
unpatchify. Every modulation and the final projection start at zero, so each block starts as the
identity and the network as "predict ε = 0", the initialization the DiT paper found trains best.

Patch size (see `dit_patch_size`): attention cost grows with the square of the token count, so the
CPU sizes (tiny, small) keep the token grid at about 16×16 (patch 2 at 32 px, 4 at 64 px, 8 above);
base, meant for a GPU, uses a grid twice as fine (patch 2 up to 64 px, 4 up to 128 px, 8 above).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffinspect.data.image import ImageSize, input_hw
from diffinspect.models.common import TimestepEmbedding, attention


@dataclass(frozen=True)
class DiTConfig:
    depth: int
    width: int
    heads: int
    grid: int  # target token grid side; the patch size follows from it and the image size
    mlp_ratio: float = 4.0


DIT_SIZES = {
    "tiny": DiTConfig(depth=2, width=64, heads=2, grid=16),
    "small": DiTConfig(depth=6, width=128, heads=2, grid=16),
    "base": DiTConfig(depth=12, width=384, heads=6, grid=32),
}


def dit_patch_size(size: str, image_size: ImageSize) -> int:
    """Smallest of 2, 4, 8 that keeps the token count at or below the size's target grid² (8 at most)."""
    from diffinspect.models import equivalent_side

    grid, side = DIT_SIZES[size].grid, equivalent_side(image_size)
    for p in (2, 4):
        if side <= grid * p + 1e-9:
            return p
    return 8


def sincos_pos_embed(width: int, grid: int | tuple[int, int]) -> np.ndarray:
    """(rows·cols, width) fixed 2-D sin-cos embedding of a token grid (one side, or (rows, cols)): half
    the channels encode the row, half the column."""
    quarter = width // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    gh, gw = input_hw(grid)
    rows, cols = np.meshgrid(np.arange(gh, dtype=np.float64), np.arange(gw, dtype=np.float64), indexing="ij")

    def embed(coord: np.ndarray) -> np.ndarray:
        out = coord.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([embed(rows), embed(cols)], axis=1).astype(np.float32)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = attention(qkv[0], qkv[1], qkv[2])  # (n, heads, length, d)
        return self.proj(out.transpose(1, 2).reshape(n, length, width))


class DiTBlock(nn.Module):
    """Pre-norm transformer block; the timestep sets shift, scale and gate of both branches (adaLN-Zero)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width)
        )
        self.ada = nn.Linear(width, 6 * width)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(c)).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Linear(width, 2 * width)
        self.linear = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(F.silu(c)).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    kind = "dit"

    def __init__(self, size: str, image_size: ImageSize, channels: int) -> None:
        super().__init__()
        cfg = DIT_SIZES[size]
        self.size, self.image_size, self.channels = size, image_size, channels
        self.height, self.width = input_hw(image_size)
        self.patch = dit_patch_size(size, image_size)
        self.grid = (self.height // self.patch, self.width // self.patch)  # token rows, columns
        width = cfg.width
        self.patch_embed = nn.Conv2d(channels, width, self.patch, stride=self.patch)
        # A buffer for this image size, not a weight: kept out of the state dict and never trained.
        pos = torch.from_numpy(sincos_pos_embed(width, self.grid))[None]
        self.register_buffer("pos_embed", pos, persistent=False)
        self.time_embed = TimestepEmbedding(256, width)
        self.blocks = nn.ModuleList(DiTBlock(width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final = FinalLayer(width, self.patch * self.patch * channels)
        # Blocks whose tokens `features` returns: at 1/3, 2/3 and the full depth (deduplicated).
        self.feature_blocks = sorted({max(1, cfg.depth * k // 3) for k in (1, 2, 3)})
        self._init_weights()

    def _init_weights(self) -> None:
        # Xavier for every linear layer and the patch projection (treated as a linear map of the patch),
        # as in the DiT reference; then zero the adaLN modulations and the output (adaLN-Zero).
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.ada.weight)
            nn.init.zeros_(block.ada.bias)
        for layer in (self.final.ada, self.final.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed

    def _to_map(self, tokens: torch.Tensor) -> torch.Tensor:
        n, _, width = tokens.shape
        return tokens.transpose(1, 2).reshape(n, width, *self.grid)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) noised images, t: (N,) float timesteps → predicted ε, same shape as x."""
        c = self.time_embed(t)
        h = self._tokens(x)
        for block in self.blocks:
            h = block(h, c)
        h = self.final(h, c)  # (N, rows·cols, p·p·C)
        n, p, (gh, gw) = h.shape[0], self.patch, self.grid
        h = h.reshape(n, gh, gw, p, p, self.channels).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(n, self.channels, gh * p, gw * p)

    def features(self, x: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
        """Token features after the blocks in `feature_blocks`, as (N, width, H/p, W/p) maps."""
        c = self.time_embed(t)
        h = self._tokens(x)
        out = []
        for i, block in enumerate(self.blocks[: self.feature_blocks[-1]], start=1):
            h = block(h, c)
            if i in self.feature_blocks:
                out.append(self._to_map(h))
        return out
