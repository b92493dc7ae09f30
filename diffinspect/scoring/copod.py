"""The COPOD fallback: classical embeddings scored by an empirical-copula outlier score.

It keeps the line going when the diffusion path cannot run, needs no accelerator and no trained
network, and is fitted from good frames only.

COPOD (Li et al., ICDM 2020) scores a point by how far into the tails of each feature's empirical
distribution it lies: per dimension, the left tail probability F(x) = P(X <= x) and the right tail
probability P(X >= x) from the fit set, -log of each, a skewness-corrected tail (left for features
skewed left, right otherwise), and the per-dimension maximum of the skew-corrected tail and the mean of
both tails, summed over dimensions (pyod's aggregation; the paper's Algorithm 1 takes the maximum of
the three sums instead, which scores a part that is extreme on both sides in different features lower).

Why the scoring is written here rather than calling pyod's COPOD.decision_function: pyod (checked on
3.6) concatenates the fit set with the batch being scored and recomputes the ECDFs and skewness on that
union, so a frame's score depends on the other frames in its batch (and a batch of many defective
frames dilutes its own tails). Here every new frame is scored alone against the fit set: the ECDF of
a new value z over the n fit values is (#{X <= z} + 1) / (n + 1), which is exactly what pyod computes
for a batch of one (the skewness sign, too, comes from the fit set alone; pyod's includes the new
point, which can flip it on a near-symmetric feature), so batch and single-frame scores agree. It
also keeps the runtime free of the pyod import (slow to import, and it pulls in matplotlib).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from diffinspect import DiffinspectError
from diffinspect.bundle import Fallback
from diffinspect.data.image import Preprocess
from diffinspect.scoring.detector import Scored
from diffinspect.scoring.features import FEATURE_SIZE, FEATURE_VERSION, SCALE_DIM, SCALES, embed_frames, embedding_dim
from diffinspect.scoring.threshold import check_calibration_size, conformal_threshold, min_calibration_size

if TYPE_CHECKING:
    from diffinspect.scoring.health import HealthProfile

EMBEDDINGS_FILE = "embeddings.npy"
# The calibration parts' scores against the fit set: the fallback's verdicts rank among them for their
# p-values. A bundle calibrated before they were kept has none (its fallback verdicts carry no p-value).
SCORES_FILE = "fallback_scores.npy"
MIN_FIT = 20  # below this the ECDF tails are too coarse (resolution 1/(n+1)) to separate anything
_CHUNK_ELEMENTS = 4_000_000  # bound the (batch, n_fit, dims) comparison to a few MB at a time


class EcdfCopod:
    """COPOD with the fit set fixed: new points never change the ECDFs they are scored against.

    On any feature matrix (the fallback's embeddings, the evaluation baselines' features);
    `score` is higher for more anomalous rows."""

    def __init__(self, embeddings: np.ndarray) -> None:
        x = np.asarray(embeddings, dtype=np.float64)
        # Robust standardization (median / IQR). COPOD itself is invariant to it (ECDF ranks and the
        # sign of the skewness survive any increasing affine map per feature), so it changes no score;
        # it keeps the stored numbers well scaled for other detectors reading the same set, and a
        # zero IQR (constant feature) falls back to scale 1 instead of dividing by zero.
        self.center = np.median(x, axis=0)
        q75, q25 = np.percentile(x, [75.0, 25.0], axis=0)
        iqr = q75 - q25
        self.scale = np.where(iqr > 0, iqr, 1.0)
        self.fit = self._standardize(x)
        self.n = self.fit.shape[0]
        d = self.fit - self.fit.mean(axis=0)
        m2, m3 = (d ** 2).mean(axis=0), (d ** 3).mean(axis=0)
        skew = np.divide(m3, m2 ** 1.5, out=np.zeros_like(m3), where=m2 > 1e-24)
        self.skew_sign = np.sign(skew)

    def _standardize(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.center) / self.scale

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        z = self._standardize(embeddings)
        out = np.empty(z.shape[0], dtype=np.float64)
        step = max(1, _CHUNK_ELEMENTS // max(1, self.fit.size))
        for start in range(0, z.shape[0], step):
            out[start:start + step] = self._score_chunk(z[start:start + step])
        return out

    def _score_chunk(self, z: np.ndarray) -> np.ndarray:
        below = (self.fit[None, :, :] <= z[:, None, :]).sum(axis=1)
        above = (self.fit[None, :, :] >= z[:, None, :]).sum(axis=1)
        # The +1 counts the new point in its own ECDF: tail probabilities never reach 0 (finite log),
        # and the score equals pyod's for a batch of one.
        left = -np.log((below + 1.0) / (self.n + 1.0))
        right = -np.log((above + 1.0) / (self.n + 1.0))
        s = self.skew_sign
        skewed = left * -np.sign(s - 1) + right * np.sign(s + 1)  # left if skew < 0, right if > 0, both if 0
        return np.maximum(skewed, (left + right) / 2.0).sum(axis=1)


class CopodDetector:
    """The fallback detector: classical embeddings of ROI crops, COPOD score, conformal threshold."""

    name = "copod"
    backend = "copod"
    pixel_threshold: float | None = None  # COPOD gives no anomaly map

    def __init__(self, embeddings: np.ndarray, threshold: float, preprocess: Preprocess, *,
                 feature_size: int = FEATURE_SIZE, false_reject_rate: float | None = None,
                 n_calibration: int = 0, feature_version: int = FEATURE_VERSION) -> None:
        emb = np.asarray(embeddings, dtype=np.float32)
        dim = embedding_dim(feature_version)
        if emb.ndim != 2 or emb.shape[1] != dim or emb.shape[0] < 1:
            raise DiffinspectError(f"COPOD fit set must be (n, {dim}) embeddings, got {emb.shape}")
        if not np.isfinite(emb).all():
            raise DiffinspectError("COPOD fit set holds non-finite embeddings")
        self.embeddings = emb  # the fit set, kept as float32 so a saved copy rebuilds the same model
        self.threshold = float(threshold)
        self.preprocess = preprocess
        self.feature_size = int(feature_size)
        self.feature_version = int(feature_version)  # the embedding recipe the fit set was made with
        self.false_reject_rate = false_reject_rate
        self.n_calibration = int(n_calibration)
        self.calibration_scores: np.ndarray | None = None  # kept in the bundle as SCORES_FILE
        self.guarantee: str | None = None  # the threshold's guarantee in words; set by the loader
        self.calibration_embeddings: np.ndarray | None = None
        self.health: HealthProfile | None = None  # set by the loader from the bundle
        self.calibration_index: np.ndarray | None = None  # fit_copod: the calibration frames among its input
        # COPOD reads the feature size's own statistics only: it adds every feature's tail evidence with
        # one weight, and the coarser scales, which the frame term's whitened detectors weigh for
        # themselves, would thin out a small defect's few moved features (tests/test_fallback.py).
        self._model = EcdfCopod(emb[:, :SCALE_DIM])

    def embed(self, frames: list[np.ndarray]) -> np.ndarray:
        """Raw classical embeddings (N, D) float32 of the frames' ROI crops (what the fit set holds)."""
        # Only the ROI crop here: the embedding resizes to its own size, and skipping the model's
        # resize keeps detail (and the aspect handling) independent of the diffusion input size.
        return embed_frames([self.preprocess.crop_roi(f) for f in frames], self.feature_size, self.feature_version)

    def score_embeddings(self, embeddings: np.ndarray) -> np.ndarray:
        """COPOD scores (N,) float64 of embeddings against the fit set; higher is more anomalous."""
        emb = np.asarray(embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.embeddings.shape[1]:
            raise DiffinspectError(f"expected (n, {self.embeddings.shape[1]}) embeddings, got {emb.shape}")
        return self._model.score(emb[:, :SCALE_DIM])

    def score(self, frames: list[np.ndarray]) -> Scored:
        return Scored(scores=self.score_embeddings(self.embed(frames)), maps=None)

    def save(self, folder: str | Path) -> Fallback:
        """Write the fit set to folder/embeddings.npy (no pickle); return its manifest record."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / EMBEDDINGS_FILE, self.embeddings, allow_pickle=False)
        return Fallback(threshold=self.threshold, file=EMBEDDINGS_FILE, detector=self.name,
                        false_reject_rate=self.false_reject_rate, n_calibration=self.n_calibration,
                        n_fit=int(self.embeddings.shape[0]), feature_size=self.feature_size,
                        feature_version=self.feature_version, embedding_dim=int(self.embeddings.shape[1]))

    @classmethod
    def load(cls, path: str | Path, record: Fallback, preprocess: Preprocess) -> CopodDetector:
        """Rebuild the detector from its fit set (the embeddings file, as a bundle hands it out after
        verifying its checksum) and record; the refit is deterministic, so scores match."""
        if record.feature_version not in SCALES:
            raise DiffinspectError(f"COPOD fallback was fitted on feature recipe v{record.feature_version}, which "
                                   f"this version does not compute: run `inspect calibrate` again")
        try:
            emb = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DiffinspectError(f"cannot read COPOD embeddings {path}: {exc}") from None
        if record.n_fit is not None and record.n_fit != emb.shape[0]:
            raise DiffinspectError(f"{path} holds {emb.shape[0]} embeddings, the manifest says {record.n_fit}")
        return cls(emb, record.threshold, preprocess, feature_size=record.feature_size,
                   false_reject_rate=record.false_reject_rate, n_calibration=record.n_calibration,
                   feature_version=record.feature_version)


def scores_npy(scores: np.ndarray) -> bytes:
    """SCORES_FILE's content: the calibration scores as a float64 .npy (no pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(scores, np.float64).ravel(), allow_pickle=False)
    return buf.getvalue()


def load_scores(path: Path, n_calibration: int) -> np.ndarray | None:
    """SCORES_FILE's scores, or None when they do not fit the fallback they claim to calibrate."""
    try:
        scores = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    scores = np.asarray(scores, np.float64).ravel()
    ok = scores.size and scores.size == n_calibration and np.isfinite(scores).all()
    return scores if ok else None


def fit_copod(frames: list[np.ndarray], preprocess: Preprocess, false_reject_rate: float = 0.01, *,
              feature_size: int = FEATURE_SIZE, calibration_fraction: float = 0.5, seed: int = 0) -> CopodDetector:
    """Fit the fallback on good frames and set its threshold for the target false-reject rate.

    The frames are split at random (seeded) into a fit part, whose embeddings become COPOD's ECDFs,
    and a calibration part, scored against the fit part exactly as a new frame will be; the conformal
    threshold comes from those scores. The returned detector is the one fitted on the fit part ONLY.
    Refitting on all frames would make every calibration frame part of the ECDFs it was scored
    against: its tails shrink towards the bulk, its score drops below what an unseen good frame gets,
    the threshold comes out too low and the false-reject rate on the line exceeds the target. Keeping
    the fit part fixed, calibration scores and future good frames are exchangeable given that fit set,
    so P(good frame rejected) <= rate holds (split-conformal). Using every frame in both roles with a
    valid bound needs full or cross-conformal methods (per-frame re-ranking, or a 2x looser bound).
    """
    min_calibration_size(false_reject_rate)  # refuses a rate outside (0, 1) before embedding anything
    check_calibration_size(len(frames), false_reject_rate, extra=MIN_FIT, what="good images",
                           purpose="fit the COPOD fallback")
    if not 0.0 < calibration_fraction < 1.0:
        raise DiffinspectError(f"calibration fraction must be between 0 and 1, got {calibration_fraction}")
    emb = embed_frames([preprocess.crop_roi(f) for f in frames], feature_size)
    return fit_copod_embeddings(emb, preprocess, false_reject_rate, feature_size=feature_size,
                                calibration_fraction=calibration_fraction, seed=seed)


def fit_copod_embeddings(emb: np.ndarray, preprocess: Preprocess, false_reject_rate: float = 0.01, *,
                         feature_size: int = FEATURE_SIZE, calibration_fraction: float = 0.5,
                         seed: int = 0) -> CopodDetector:
    """fit_copod on the frames' embeddings (N, D), already computed."""
    n = len(emb)
    need_cal = min_calibration_size(false_reject_rate)
    check_calibration_size(n, false_reject_rate, extra=MIN_FIT, what="good images", purpose="fit the COPOD fallback")
    # Calibration gets at least what the rate needs; the fit part gets at least MIN_FIT.
    n_cal = min(max(need_cal, math.ceil(n * calibration_fraction)), n - MIN_FIT)
    # A random split, not the file order: frames often arrive in time order, and a drift between the
    # first and second half would make the calibration part unlike both the fit part and the line.
    order = np.random.default_rng(seed).permutation(n)
    cal_idx, fit_idx = np.sort(order[:n_cal]), np.sort(order[n_cal:])
    det = CopodDetector(emb[fit_idx], threshold=math.inf, preprocess=preprocess, feature_size=feature_size,
                        false_reject_rate=false_reject_rate, n_calibration=n_cal)
    scores = det.score_embeddings(emb[cal_idx])
    det.threshold = conformal_threshold(scores, false_reject_rate)
    det.calibration_scores = scores
    det.calibration_index = cal_idx  # which frames calibrated it (suspects.py names them)
    return det
