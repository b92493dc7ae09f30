"""Patch features the denoiser learned from the product, scored against the good parts' patches.

The denoiser's encoder has learned what the product looks like. Its outputs (U-Net: the levels at 1/2,
1/4 and 1/8 of the input; DiT: its token maps), each averaged over 3 x 3 neighbours and brought to one
grid, describe every patch with its surroundings: the patch embedding (PatchCore's recipe, on our own
features at t = 0 instead of ImageNet's; a backbone the user supplies, models/backbone.py, brings
those). Good parts' embeddings are modelled by one Gaussian per patch position (PaDiM), on a fixed,
seeded subset of the channels (the covariance grows with their square); a patch's distance to it is
its term in the anomaly map. bench/patch_features.py measures this against a shared Gaussian, a
nearest-neighbour memory and feature-space reconstruction error.

The statistics (mean, whitening matrix per position) are fitted on the training images when the bundle
is written (train/patches.py) and live in the bundle file PATCH_FILE; the scoring graph holds them as
constants, like the weights they were fitted with.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffinspect.models.recipe import PATCH_FILE  # noqa: F401  (the bundle file these statistics live in)

PATCH_DIMS = 64  # channels kept per embedding: 64 x 64 per position keeps the file and the graph small
# Which map's grid the embeddings are on: the denoiser's second (the U-Net's 1/4 level; a DiT's token maps
# share one grid), a backbone's first (ResNet layer2 at 1/8 of its input, PatchCore's grid).
DENOISER_GRID, BACKBONE_GRID = 1, 0


def patch_embedding(feats: list[torch.Tensor], grid: int = DENOISER_GRID) -> torch.Tensor:
    """Feature maps (N, C_i, h_i, w_i) -> patch embeddings (N, sum C_i, h, w) on the grid of map `grid`."""
    size = feats[min(grid, len(feats) - 1)].shape[-2:]
    return torch.cat([F.interpolate(F.avg_pool2d(f, 3, 1, 1, count_include_pad=False), size=size,
                                    mode="bilinear", align_corners=False) for f in feats], 1)


def channel_subset(total: int, dims: int = PATCH_DIMS, seed: int = 0) -> np.ndarray:
    """The channels kept, sorted: all of them when there are at most `dims`."""
    if total <= dims:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, dims, replace=False))


class PatchGaussian(nn.Module):
    """Mahalanobis distance of each patch embedding to the good patches at its position: (N, h, w)."""

    def __init__(self, channels: np.ndarray, mean: np.ndarray, whiten: np.ndarray, grid: int = DENOISER_GRID) -> None:
        super().__init__()
        self.grid = grid
        self.register_buffer("channels", torch.as_tensor(channels, dtype=torch.long), persistent=False)
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32), persistent=False)  # (P, D)
        self.register_buffer("whiten", torch.as_tensor(whiten, dtype=torch.float32), persistent=False)  # (P, D, D)

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], grid: int = DENOISER_GRID) -> PatchGaussian:
        return cls(arrays["channels"], arrays["mean"], arrays["whiten"], grid)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        emb = patch_embedding(feats, self.grid)[:, self.channels]
        n, d, h, w = emb.shape
        z = emb.flatten(2).transpose(1, 2) - self.mean  # (N, P, D)
        white = torch.einsum("npd,pde->npe", z, self.whiten)
        return (white * white).sum(-1).clamp_min(1e-12).sqrt().view(n, h, w)
