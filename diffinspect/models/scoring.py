"""The scoring graph: from a batch of uint8 frames at model size to a normalized anomaly map and a score.

One torch module, exported whole to ONNX, so every backend computes the same thing:

    x in [-1, 1] -> x_t* = sqrt(ab) x + sqrt(1 - ab) eps (fixed, seeded eps) -> DDIM back to x0_hat
    -> per-pixel terms (L1, 1 - SSIM, denoiser feature distance, patch distance to the good parts'
       patches, models/patches.py, on the denoiser's or a backbone's features) -> z-score with calibration
    statistics (graph inputs, so re-calibrating needs no re-export) -> weighted sum (the sharp map)
    -> image score = mean of the top-k pixels of the sharp map (+ a whole-frame term);
    the map users see is the sharp map Gaussian-blurred.

The score reads the sharp map because blurring dilutes small defects (lower image AUROC); the blurred
map gives the better pixel AUROC and the more readable heatmap (bench/ablation.py measures both).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from diffinspect.data.image import input_hw
from diffinspect.models.patches import PatchGaussian
from diffinspect.models.recipe import Recipe
from diffinspect.models.schedule import NoiseSchedule, ddim_step, x0_from_eps


def gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def separable_blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Depthwise Gaussian blur of (N, C, H, W) with reflect padding."""
    c, r = x.shape[1], kernel.numel() // 2
    kx = kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1)
    ky = kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), kx, groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), ky, groups=c)


def ssim_map(a: torch.Tensor, b: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Per-pixel SSIM of images in [0, 1], channel mean: (N, H, W)."""
    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = separable_blur(a, kernel), separable_blur(b, kernel)
    var_a = separable_blur(a * a, kernel) - mu_a**2
    var_b = separable_blur(b * b, kernel) - mu_b**2
    cov = separable_blur(a * b, kernel) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean(1)


class ScoringGraph(nn.Module):
    """Frames (N, H, W, C) uint8 + statistics (K, H, W) -> map (N, H, W), score (N,), raw (N, K, H, W)."""

    def __init__(
        self, denoiser: nn.Module, schedule: NoiseSchedule, recipe: Recipe, steps: int | None = None,
        patches: PatchGaussian | None = None, backbone: nn.Module | None = None,
    ):
        super().__init__()
        self.denoiser = denoiser.eval()
        self.recipe = recipe
        self.patches = patches
        self.backbone = backbone  # set: the patch term reads its features (models/backbone.py)
        # The patch term needs statistics fitted on this denoiser's features: without them it is left out.
        self.weights = {k: v for k, v in recipe.weights().items() if k != "patch" or patches is not None}
        c, (h, w) = denoiser.channels, input_hw(denoiser.image_size)
        gen = torch.Generator().manual_seed(recipe.seed)
        self.register_buffer(
            "noise", torch.randn(recipe.noise_draws, c, h, w, generator=gen), persistent=False
        )
        path = schedule.ddim_alphas(recipe.t_star, steps or recipe.steps)
        self.path = [(float(t), float(a), float(ap)) for t, a, ap in path]
        self.register_buffer("ssim_kernel", gaussian_kernel(1.5), persistent=False)
        self.register_buffer("blur_kernel", gaussian_kernel(recipe.blur_sigma), persistent=False)

    @property
    def term_names(self) -> list[str]:
        return list(self.weights)

    @staticmethod
    def to_input(frames: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, C) -> float (N, C, H, W) in [-1, 1]."""
        return frames.permute(0, 3, 1, 2).float() / 127.5 - 1.0

    def reconstruct(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """DDIM from t* back to 0, starting from x noised with the given fixed noise."""
        t0, ab0, _ = self.path[0]
        xt = math.sqrt(ab0) * x + math.sqrt(1 - ab0) * noise
        x0 = x
        for t, ab, ab_prev in self.path:
            eps = self.denoiser(xt, torch.full((x.shape[0],), t, device=x.device))
            x0 = x0_from_eps(xt, eps, ab).clamp(-1, 1)
            xt = ddim_step(xt, eps, ab, ab_prev) if ab_prev < 1.0 else x0
        return x0

    def raw_terms(self, frames: torch.Tensor) -> torch.Tensor:
        """Unnormalized per-pixel terms (N, K, H, W), mean over the noise draws."""
        x = self.to_input(frames)
        total = None
        for d in range(self.noise.shape[0]):
            rec = self.reconstruct(x, self.noise[d : d + 1].expand_as(x))
            terms = torch.stack(self._terms(x, rec), 1)
            total = terms if total is None else total + terms
        return total / self.noise.shape[0]

    def _terms(self, x: torch.Tensor, rec: torch.Tensor) -> list[torch.Tensor]:
        out = []
        if "pixel" in self.weights:
            out.append((x - rec).abs().mean(1) / 2)
        if "ssim" in self.weights:
            out.append(1 - ssim_map((x + 1) / 2, (rec + 1) / 2, self.ssim_kernel))
        n, size = x.shape[0], x.shape[-2:]
        both: list[torch.Tensor] = []
        if "feature" in self.weights or ("patch" in self.weights and self.backbone is None):
            # x and its rebuild go through the encoder as one batch. Keep it so: in an INT8 export the two
            # halves then share every quantizer, so equal inputs round alike and the small feature distance
            # survives INT8 (export/onnx_graph.py); one call of twice the batch is also faster than two.
            both = self.denoiser.features(torch.cat([x, rec]), torch.zeros(2 * n, device=x.device))
        if "feature" in self.weights:
            out.append(self.feature_distance(both, n, size))
        if "patch" in self.weights:
            assert self.patches is not None
            dist = self.patches(self.backbone(x) if self.backbone is not None else [f[:n] for f in both])
            out.append(F.interpolate(dist[:, None], size=size, mode="bilinear", align_corners=False)[:, 0])
        return out

    @staticmethod
    def feature_distance(both: list[torch.Tensor], n: int, size: torch.Size) -> torch.Tensor:
        """Cosine distance between the denoiser's encoder features (t = 0) of x, the first n of the batch
        `both`, and of its rebuild, the last n."""
        dist = 0
        for f in both:
            d = 1 - F.cosine_similarity(f[:n], f[n:], dim=1, eps=1e-6)
            dist = dist + F.interpolate(d[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        return dist / len(both)

    def combine(self, raw: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """z-score each term per pixel, weight and sum: the sharp map (N, H, W) the image score reads."""
        z = (raw - mean) / std
        w = torch.tensor(list(self.weights.values()), device=raw.device).view(1, -1, 1, 1)
        return (z * w).sum(1) / w.sum()

    def smooth(self, zmap: torch.Tensor) -> torch.Tensor:
        """The Gaussian-blurred map users see (overlays, pixel metrics)."""
        return separable_blur(zmap[:, None], self.blur_kernel)[:, 0]

    def image_score(self, amap: torch.Tensor) -> torch.Tensor:
        flat = amap.flatten(1)
        k = max(1, int(self.recipe.top_k * flat.shape[1]))
        score = flat.topk(k, dim=1).values.mean(1)
        if self.recipe.frame_weight > 0:
            score = score + self.recipe.frame_weight * flat.mean(1)
        return score

    def forward(self, frames: torch.Tensor, mean: torch.Tensor, std: torch.Tensor):
        """(map, score, raw terms); the raw terms let any backend (re)compute calibration statistics."""
        raw = self.raw_terms(frames)
        zmap = self.combine(raw, mean, std)
        return self.smooth(zmap), self.image_score(zmap), raw
