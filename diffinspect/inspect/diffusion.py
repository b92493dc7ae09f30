"""The diffusion detector: preprocessing, batching and the calibrated statistics around a backend."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffinspect.data.image import Preprocess
from diffinspect.inspect.detector import Scored

CALIBRATION_FILE = "calibration.npz"


@dataclass
class Stats:
    """Per-pixel normalization of each map term, measured on good images: (K, S, S) float32."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def identity(cls, terms: int, size: int) -> Stats:
        return cls(np.zeros((terms, size, size), np.float32), np.ones((terms, size, size), np.float32))

    @classmethod
    def fit(cls, raw: np.ndarray, prior: float = 8.0) -> Stats:
        """Mean and std per pixel over raw (N, K, S, S); the variance is shrunk toward each term's
        frame-wide variance (weight `prior` images) so a few calibration images give stable maps."""
        raw = raw.astype(np.float64)
        n = raw.shape[0]
        mean = raw.mean(0)
        var = raw.var(0)
        pooled = var.mean(axis=(1, 2), keepdims=True)
        var = (n * var + prior * pooled) / (n + prior)
        std = np.sqrt(np.maximum(var, 1e-12))
        return cls(mean.astype(np.float32), std.astype(np.float32))


def fit_frames(frames: list[np.ndarray], preprocess: Preprocess) -> np.ndarray:
    """Decoded frames of any size -> (N, S, S, C) uint8 at model size, with the model's channel count."""
    channels = 3 if preprocess.color == "rgb" else 1
    out = []
    for f in frames:
        if f.ndim == 2:
            f = f[:, :, None]
        if f.shape[2] != channels:
            f = np.repeat(f[:, :, :1], 3, axis=2) if channels == 3 else f.mean(2, keepdims=True).astype(np.uint8)
        out.append(preprocess.fit(f))
    return np.stack(out)


class DiffusionDetector:
    name = "diffusion"

    def __init__(self, engine, preprocess: Preprocess, stats: Stats, threshold: float,
                 pixel_threshold: float | None, calibration_n: int = 0, false_reject_rate: float | None = None,
                 batch_size: int = 16):
        self.engine = engine
        self.backend = engine.name
        self.preprocess = preprocess
        self.stats = stats
        self.threshold = threshold
        self.pixel_threshold = pixel_threshold
        self.calibration_n = calibration_n
        self.false_reject_rate = false_reject_rate
        self.batch_size = batch_size

    def run_fitted(self, fitted: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(maps, scores, raw) for frames already at model size, in batches."""
        outs = [self.engine.run(fitted[i:i + self.batch_size], self.stats.mean, self.stats.std)
                for i in range(0, len(fitted), self.batch_size)]
        return tuple(np.concatenate(parts) for parts in zip(*outs, strict=True))  # type: ignore[return-value]

    def score(self, frames: list[np.ndarray]) -> Scored:
        maps, scores, _ = self.run_fitted(fit_frames(frames, self.preprocess))
        return Scored(scores=scores.astype(np.float64), maps=maps)
