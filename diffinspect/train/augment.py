"""Training augmentations, all off by default (see AugmentConfig for why)."""

from __future__ import annotations

import torch

from diffinspect.config import AugmentConfig


def augment_batch(x: torch.Tensor, aug: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """x: (N, C, H, W) in [-1, 1]. Random draws come from gen so runs stay deterministic."""
    n = x.shape[0]
    if aug.hflip:
        flip = torch.rand(n, generator=gen) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    if aug.vflip:
        flip = torch.rand(n, generator=gen) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(2), x)
    if aug.rot90 and x.shape[2] == x.shape[3]:
        k = torch.randint(0, 4, (n,), generator=gen)
        x = torch.stack([torch.rot90(xi, int(ki), dims=(1, 2)) for xi, ki in zip(x, k, strict=True)])
    if aug.shift > 0:
        s = aug.shift
        dx, dy = (torch.randint(-s, s + 1, (2, n), generator=gen)).tolist()
        x = torch.stack([torch.roll(xi, (a, b), dims=(1, 2)) for xi, a, b in zip(x, dy, dx, strict=True)])
    if aug.brightness > 0:
        b = (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * aug.brightness
        x = ((x + 1) * (1 + b) - 1).clamp(-1, 1)
    return x
