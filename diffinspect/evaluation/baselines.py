"""Classical baselines measured next to the diffusion model (as in arXiv 2412.07539: IForest, OCSVM, COPOD).

One contract, as PyOD and scikit-learn detectors keep it: `fit(X)`, `decision_function(X)` (higher = more
anomalous) and `threshold_`, set by the split-conformal rule on a held-out share of the good training
images so the baselines are judged at the same kind of threshold as the product.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from sklearn.decomposition import PCA
from sklearn.ensemble import IsolationForest
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import OneClassSVM

from diffinspect import DiffinspectError
from diffinspect.scoring.copod import EcdfCopod
from diffinspect.scoring.threshold import conformal_threshold, min_calibration_size

KINDS = ("iforest", "ocsvm", "copod")
MIN_TRAIN = 4  # below this there is nothing to fit and nothing to calibrate on


class _OneClass:
    """One of the three kinds on a feature matrix, with scores oriented higher = more anomalous."""

    def __init__(self, kind: str, seed: int) -> None:
        if kind not in KINDS:
            raise DiffinspectError(f"baseline kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.seed = seed

    def fit(self, X: np.ndarray) -> _OneClass:
        if self.kind == "iforest":
            self.model = IsolationForest(random_state=self.seed).fit(X)
        elif self.kind == "ocsvm":
            # The RBF kernel with gamma="scale" assumes comparable feature scales: standardize first.
            self.model = make_pipeline(StandardScaler(), OneClassSVM(nu=0.1, gamma="scale")).fit(X)
        else:
            # The runtime's COPOD (scores each row against the fit set alone, as PyOD does for a batch of
            # one), so the baseline and the fallback are one implementation.
            self.model = EcdfCopod(X)
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        if self.kind == "copod":
            return self.model.score(X)
        # scikit-learn's convention is higher = more normal.
        return -np.asarray(self.model.decision_function(X), dtype=np.float64)


class _Calibrated:
    """Holds out a share of the good training rows, fits on the rest, sets threshold_ conformally."""

    def __init__(self, kind: str, alpha: float, calib_share: float, seed: int) -> None:
        self.kind = kind
        self.false_reject_rate = alpha  # target; the effective one is alpha_ (see _split)
        self.calib_share = calib_share
        self.seed = seed
        self.threshold_: float | None = None
        self.alpha_: float = alpha
        self.calibration_n: int = 0

    def _split(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if n < MIN_TRAIN:
            raise DiffinspectError(f"baseline {self.kind} needs at least {MIN_TRAIN} good training images, "
                                   f"got {n}")
        need = min_calibration_size(self.false_reject_rate)
        # At least enough held-out images for the requested bound, but never more than half the set.
        n_cal = min(max(round(self.calib_share * n), need), n // 2)
        if n_cal < need:
            # Too few images for the requested bound: use the tightest one n_cal allows (reported as alpha_).
            self.alpha_ = 1.0 / (n_cal + 1)
        order = np.random.default_rng(self.seed).permutation(n)
        self.calibration_n = n_cal
        return order[n_cal:], order[:n_cal]

    def _calibrate(self, cal_scores: np.ndarray) -> None:
        self.threshold_ = conformal_threshold(cal_scores, self.alpha_)


class EmbeddingBaseline(_Calibrated):
    """A baseline on given feature vectors (e.g. the COPOD fallback's classical embeddings)."""

    def __init__(self, kind: str, alpha: float = 0.05, calib_share: float = 0.2, seed: int = 0) -> None:
        super().__init__(kind, alpha, calib_share, seed)
        self._model = _OneClass(kind, seed)

    def fit(self, X: np.ndarray) -> EmbeddingBaseline:
        X = np.asarray(X, dtype=np.float64)
        fit_idx, cal_idx = self._split(len(X))
        self._model.fit(X[fit_idx])
        self._calibrate(self._model.decision_function(X[cal_idx]))
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        return self._model.decision_function(np.asarray(X, dtype=np.float64))


class PixelBaseline(_Calibrated):
    """A baseline on downscaled grayscale pixels reduced by PCA (fitted on the good training images only)."""

    def __init__(self, kind: str, size: int = 64, n_components: int = 50, alpha: float = 0.05,
                 calib_share: float = 0.2, seed: int = 0) -> None:
        super().__init__(kind, alpha, calib_share, seed)
        self.size = size
        self.n_components = n_components
        self._model = _OneClass(kind, seed)

    def pixels(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        """uint8 frames (H, W, C) of any size -> (N, size*size) float32 in [0, 1]."""
        out = np.empty((len(frames), self.size * self.size), dtype=np.float32)
        for i, f in enumerate(frames):
            g = f if f.ndim == 2 else (f[..., 0] if f.shape[2] == 1 else cv2.cvtColor(f, cv2.COLOR_RGB2GRAY))
            # INTER_AREA averages when shrinking instead of skipping pixels (no aliasing of fine texture).
            interp = cv2.INTER_AREA if min(g.shape[:2]) > self.size else cv2.INTER_LINEAR
            out[i] = cv2.resize(g, (self.size, self.size), interpolation=interp).ravel() / 255.0
        return out

    def _as_pixels(self, X: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        # Either frames, or rows already made by .pixels() (lets callers stream a large training set).
        if isinstance(X, np.ndarray) and X.ndim == 2 and X.shape[1] == self.size * self.size:
            return X.astype(np.float32, copy=False)
        return self.pixels(list(X))

    def fit(self, X: Sequence[np.ndarray] | np.ndarray) -> PixelBaseline:
        P = self._as_pixels(X)
        fit_idx, cal_idx = self._split(len(P))
        # n centred rows span at most n-1 directions; a further component has ~0 variance and would be
        # blown up into pure noise by the OCSVM's standardization.
        k = max(1, min(self.n_components, len(fit_idx) - 1, P.shape[1]))
        # "auto" picks ARPACK here, far slower on these short, wide matrices than a full SVD up to a
        # few thousand rows; beyond that the randomized solver is.
        solver = "full" if len(fit_idx) <= 3000 else "randomized"
        self.pca_ = PCA(n_components=k, svd_solver=solver, random_state=self.seed).fit(P[fit_idx])
        self._model.fit(self.pca_.transform(P[fit_idx]))
        self._calibrate(self._model.decision_function(self.pca_.transform(P[cal_idx])))
        return self

    def decision_function(self, X: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        return self._model.decision_function(self.pca_.transform(self._as_pixels(X)))
