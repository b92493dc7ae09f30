"""A Gaussian on the classical frame embeddings: the frame-level term that joins the diffusion score.

Good parts' embeddings (scoring/features.py), standardized per feature, are modelled as one Gaussian
whose covariance is shrunk toward a multiple of the identity by the Ledoit-Wolf rule (no parameter to
tune: the shrinkage comes from the data, large when the fit set is small against the 218 features).
A frame's score is its squared Mahalanobis distance. Unlike COPOD, which looks at each feature alone,
it sees features that move together and a part that breaks their usual relation (a texture statistic
that no longer matches the brightness, say). The README's accuracy section compares the two on the
shared sets (bench/accuracy.py).

NearestEmbedding measures in the same whitened space, but to the nearest good parts instead of to
their mean: where good parts come in several looks (lighting series, surface batches) one Gaussian
spans them all and takes in what lies between; the nearest neighbours do not (bench/frame_detectors.py).
"""

from __future__ import annotations

import numpy as np

from diffinspect import DiffinspectError


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, float]:
    """(shrunk covariance, shrinkage) of centred rows x (n, p): Ledoit & Wolf (2004), "A well-conditioned
    estimator for large-dimensional covariance matrices", with the sample covariance divided by n."""
    n, p = x.shape
    cov = x.T @ x / n
    mu = np.trace(cov) / p
    x2 = x**2
    # Squared Frobenius distance of the sample covariance to mu * I, and the variance of its entries.
    delta = (np.sum(cov**2) - 2 * mu * np.trace(cov) + p * mu**2) / p
    beta = (np.sum(x2.T @ x2) / n - np.sum(cov**2)) / (p * n)
    shrinkage = 0.0 if delta <= 0 else float(min(beta, delta) / delta)
    shrunk = (1 - shrinkage) * cov
    shrunk.flat[:: p + 1] += shrinkage * mu
    return shrunk, shrinkage


class GaussianEmbedding:
    """Squared Mahalanobis distance of embeddings to good parts' embeddings (higher = more anomalous)."""

    def __init__(self, embeddings: np.ndarray) -> None:
        x = np.asarray(embeddings, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 2 or not np.isfinite(x).all():
            raise DiffinspectError(f"the Gaussian frame term needs at least 2 finite embeddings, got {x.shape}")
        self.mean = x.mean(axis=0)
        std = x.std(axis=0)
        self.scale = np.where(std > 1e-12, std, 1.0)  # a constant feature carries no information
        cov, self.shrinkage = ledoit_wolf((x - self.mean) / self.scale)
        # Symmetric inverse through the eigenbasis: the shrunk covariance is positive definite.
        values, vectors = np.linalg.eigh(cov)
        self.whiten = vectors / np.sqrt(np.maximum(values, 1e-12))

    def whitened(self, embeddings: np.ndarray) -> np.ndarray:
        return ((np.asarray(embeddings, dtype=np.float64) - self.mean) / self.scale) @ self.whiten

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        return np.sum(self.whitened(embeddings) ** 2, axis=1)


class NearestEmbedding:
    """Mean whitened distance of embeddings to their `neighbours` nearest good parts' embeddings.

    A copy of a fit embedding is scored against the others (an exact match is not a neighbour), so
    the fit set scores itself as unseen parts would, which the frame term's robust scale reads."""

    # One neighbour ranks best, but a part photographed again (an exposure series) then finds its own twin
    # in memory; a few neighbours cost little (bench/frame_detectors.py --neighbours).
    NEIGHBOURS = 5

    def __init__(self, embeddings: np.ndarray, neighbours: int = NEIGHBOURS) -> None:
        self.space = GaussianEmbedding(embeddings)
        self.memory = self.space.whitened(embeddings)
        # Fewer good parts than that: as many as there are, but the query itself.
        self.neighbours = max(1, min(neighbours, len(self.memory) - 1))
        self.norms = np.sum(self.memory**2, axis=1)

    def score(self, embeddings: np.ndarray, exclude: np.ndarray | None = None, batch: int = 256) -> np.ndarray:
        """exclude: (queries, fit embeddings) True where a query may not use that good part (evaluation:
        photos of the same physical part, which a line never has in memory)."""
        out = []
        for i in range(0, len(embeddings), batch):
            q = self.space.whitened(embeddings[i:i + batch])
            d2 = np.sum(q**2, axis=1)[:, None] + self.norms[None] - 2 * q @ self.memory.T
            d2[d2 <= 1e-9 * (1.0 + self.norms[None])] = np.inf  # the query itself
            if exclude is not None:
                d2[exclude[i:i + batch]] = np.inf
            near = np.partition(d2, self.neighbours - 1, axis=1)[:, :self.neighbours]
            near[np.isinf(near)] = 0.0  # a query equal to every good part is as good as they are
            out.append(np.sqrt(np.maximum(near, 0.0)).mean(axis=1))
        return np.concatenate(out) if out else np.zeros(0)
