"""Fitting the patch statistics of the scoring graph's patch term (models/patches.py) on good images."""

from __future__ import annotations

import numpy as np
import torch

from diffinspect.models.patches import BACKBONE_GRID, DENOISER_GRID, channel_subset, patch_embedding
from diffinspect.models.scoring import ScoringGraph
from diffinspect.scoring.gaussian import ledoit_wolf


@torch.no_grad()
def fit_patch_statistics(denoiser: torch.nn.Module, images: np.ndarray, batch: int = 32,
                         backbone: torch.nn.Module | None = None) -> dict[str, np.ndarray]:
    """Good images at model size, (N, H, W, C) uint8 -> {channels, mean (P, D), whiten (P, D, D)}: per patch
    position, the mean embedding and the inverse square root of its Ledoit-Wolf covariance. The embeddings
    are the denoiser's encoder features at t = 0, or those of `backbone` (models/backbone.py) when given."""
    device = next(denoiser.parameters()).device
    parts = []
    for i in range(0, len(images), batch):
        x = ScoringGraph.to_input(torch.from_numpy(images[i:i + batch]).to(device))
        if backbone is not None:
            parts.append(patch_embedding(backbone(x), BACKBONE_GRID).cpu())
        else:
            parts.append(patch_embedding(denoiser.features(x, torch.zeros(x.shape[0], device=device)),
                                         DENOISER_GRID).cpu())
    emb = torch.cat(parts)
    channels = channel_subset(emb.shape[1])
    x = emb[:, channels].flatten(2).permute(2, 0, 1).double().numpy()  # (P, N, D)
    mean = x.mean(1)
    whiten = np.empty((x.shape[0], x.shape[2], x.shape[2]))
    for p in range(x.shape[0]):
        cov, _ = ledoit_wolf(x[p] - mean[p])
        values, vectors = np.linalg.eigh(cov)
        whiten[p] = vectors / np.sqrt(np.maximum(values, 1e-12))
    return {"channels": channels, "mean": mean.astype(np.float32), "whiten": whiten.astype(np.float32)}
