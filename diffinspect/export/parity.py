"""Parity of an exported model with torch: same frames, same calibration statistics, compare outputs.

The frames are the calibration images plus, for each, a copy with a synthetic defect pasted on
(seeded, `data.anomalies.anomaly_set`). Good parts alone score within a narrow band, and the ranks
inside it are set by differences as small as those INT8 arithmetic adds, so a small model's good-only
rank correlation can sit visibly below the one with defects pasted on. With the defective copies the
rank correlation measures what the line depends on, frames ordered as torch orders them across good and
defective parts; the good-only figure is reported beside it.
"""

from __future__ import annotations

import numpy as np

from diffinspect.data.anomalies import MIN_SIDE, anomaly_set

MIN_RANK_CORRELATION = 0.99
SEED = 0


def parity_frames(good: np.ndarray, seed: int = SEED) -> np.ndarray:
    """Good frames (N, H, W, C) followed by one pasted-defect copy of each (when S allows it)."""
    if min(good.shape[1:3]) < MIN_SIDE:
        return good
    bad, _ = anomaly_set(list(good), np.random.default_rng(seed))
    return np.concatenate([good, np.stack(bad).reshape(good.shape)])


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho (average ranks for ties); nan when either side is constant."""
    from scipy.stats import rankdata

    ra, rb = rankdata(a), rankdata(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def compare(ref: tuple[np.ndarray, ...], got: tuple[np.ndarray, ...], n_good: int) -> dict[str, float | int]:
    """Figures of `got` (maps, scores, ...) against the torch reference `ref`."""
    ref_maps, ref_scores = ref[0].astype(np.float64), ref[1].astype(np.float64)
    maps, scores = got[0].astype(np.float64), got[1].astype(np.float64)
    return {
        "images": len(ref_scores), "good_images": n_good,
        "max_abs_map_diff": float(np.max(np.abs(maps - ref_maps))),
        "map_correlation": float(np.corrcoef(maps.ravel(), ref_maps.ravel())[0, 1]),
        "score_rank_correlation": rank_correlation(scores, ref_scores),
        "score_rank_correlation_good": rank_correlation(scores[:n_good], ref_scores[:n_good]),
        "max_abs_score_diff": float(np.max(np.abs(scores - ref_scores))),
    }


def passes(figures: dict) -> bool:
    rho = figures["score_rank_correlation"]
    return bool(np.isfinite(rho) and rho >= MIN_RANK_CORRELATION)


def describe(figures: dict) -> str:
    return (f"max |Δmap| {figures['max_abs_map_diff']:.3g}, map corr {figures['map_correlation']:.4f}, "
            f"score rank corr {figures['score_rank_correlation']:.4f} "
            f"(good only {figures['score_rank_correlation_good']:.4f}) on {figures['images']} images")
