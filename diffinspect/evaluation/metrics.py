"""Evaluation metrics: image AUROC/AP, pixel AUROC, AUPRO, and the line's figures at the calibrated threshold.

Every function returns None where the metric is undefined (one class only, no ground-truth regions), so
reports say "not defined" instead of printing a misleading number.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

FPR_LIMIT = 0.3  # AUPRO is integrated up to 30 % false-positive rate, as in the MVTec AD protocol


def _two_classes(labels: np.ndarray) -> bool:
    return labels.size > 0 and 0 < int(labels.sum()) < labels.size


def image_auroc(labels: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float | None:
    """Area under the ROC curve of image scores; labels are True for defective images."""
    y = np.asarray(labels, dtype=bool)
    return float(roc_auc_score(y, np.asarray(scores, dtype=np.float64))) if _two_classes(y) else None


def image_ap(labels: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float | None:
    """Average precision of image scores, defective as the positive class."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    return float(average_precision_score(y, s)) if _two_classes(y) else None


def f1_max(labels: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float | None:
    """Best F1 over all thresholds: tuned on the test set itself, so optimistic (comparison with papers)."""
    y = np.asarray(labels, dtype=bool)
    if not _two_classes(y):
        return None
    precision, recall, _ = precision_recall_curve(y, np.asarray(scores, dtype=np.float64))
    denom = precision + recall
    f1 = np.where(denom > 0, 2 * precision * recall / np.where(denom > 0, denom, 1), 0.0)
    return float(f1.max())


def threshold_metrics(labels: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray,
                      threshold: float | None) -> dict[str, float | int | None]:
    """What the line sees at a fixed threshold (NG strictly above it, as `inspector.label_for`)."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    keys = ("false_reject_rate", "miss_rate", "precision", "recall", "f1")
    if threshold is None:
        return dict.fromkeys(keys)
    ng = s > threshold
    tp, fp = int((ng & y).sum()), int((ng & ~y).sum())
    fn, tn = int((~ng & y).sum()), int((~ng & ~y).sum())
    n_good, n_bad = tn + fp, tp + fn
    recall = tp / n_bad if n_bad else None
    precision = tp / (tp + fp) if tp + fp else None
    if precision is None or recall is None:
        f1 = None
    else:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "false_reject_rate": fp / n_good if n_good else None,  # good parts labelled NG
        "miss_rate": fn / n_bad if n_bad else None,  # defective parts labelled OK
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
    }


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A boolean mask on another pixel grid. Nearest neighbour keeps it binary (no invented soft edges)."""
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m[..., 0]
    m = m > 0
    if m.shape == tuple(shape):
        return m
    out = cv2.resize(m.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return out > 0


def _aligned(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray | None],
             warnings: list[str] | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pairs (map, boolean mask) on the map's grid; a None mask means a good image (no defect pixels)."""
    if len(maps) != len(masks):
        raise ValueError(f"{len(maps)} maps but {len(masks)} masks")
    pairs = []
    resized = set()
    for amap, mask in zip(maps, masks, strict=True):
        amap = np.asarray(amap, dtype=np.float32)
        if amap.ndim == 3:
            amap = amap[..., 0]
        if mask is None:
            m = np.zeros(amap.shape, dtype=bool)
        else:
            if np.asarray(mask).shape[:2] != amap.shape:
                resized.add((np.asarray(mask).shape[:2], amap.shape))
            m = resize_mask(mask, amap.shape)
        pairs.append((amap, m))
    if warnings is not None:
        for (src, dst) in sorted(resized):
            warnings.append(f"ground-truth masks resized from {src[1]}x{src[0]} to the {dst[1]}x{dst[0]} "
                            "anomaly-map grid with nearest-neighbour interpolation")
    return pairs


def pixel_auroc(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray | None],
                warnings: list[str] | None = None) -> float | None:
    """ROC AUC over every pixel of every image (defect pixels positive, all others negative)."""
    pairs = _aligned(maps, masks, warnings)
    if not pairs:
        return None
    y = np.concatenate([m.ravel() for _, m in pairs])
    s = np.concatenate([a.ravel() for a, _ in pairs])
    return float(roc_auc_score(y, s)) if _two_classes(y) else None


def pro_curve(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray | None],
              warnings: list[str] | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-region-overlap curve: (FPR over defect-free pixels, mean overlap of GT regions) per threshold.

    Exact, without a threshold grid: the overlap of region r at threshold t is |{p in r: s_p >= t}| / |r|, so
    the mean over R regions is a sum over defect pixels of weight 1 / (R |r|), accumulated in score order.
    Regions are 8-connected components of each image's mask. Returns None without regions or good pixels.
    """
    pairs = _aligned(maps, masks, warnings)
    scores, weights, negative = [], [], []
    region_sizes: list[np.ndarray] = []
    region_ids: list[np.ndarray] = []
    offset = 0
    for amap, m in pairs:
        n_labels, labels = cv2.connectedComponents(m.astype(np.uint8), connectivity=8)
        # Label 0 is background; shift the others so region ids are unique across images.
        sizes = np.bincount(labels.ravel(), minlength=n_labels)[1:]
        ids = np.where(labels > 0, labels - 1 + offset, -1).ravel()
        offset += n_labels - 1
        region_sizes.append(sizes)
        region_ids.append(ids)
        scores.append(amap.ravel().astype(np.float64))
        negative.append(~m.ravel())
    n_regions = offset
    if not pairs or n_regions == 0:
        return None
    all_sizes = np.concatenate(region_sizes).astype(np.float64)
    for ids in region_ids:
        w = np.zeros(ids.size, dtype=np.float64)
        inside = ids >= 0
        w[inside] = 1.0 / (n_regions * all_sizes[ids[inside]])
        weights.append(w)
    s = np.concatenate(scores)
    w = np.concatenate(weights)
    neg = np.concatenate(negative)
    n_neg = int(neg.sum())
    if n_neg == 0:
        return None
    order = np.argsort(-s, kind="stable")
    s, w, neg = s[order], w[order], neg[order]
    # One curve point per distinct score: pixels tied at a threshold enter together.
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    fpr = np.r_[0.0, np.cumsum(neg)[last_of_tie] / n_neg]
    pro = np.r_[0.0, np.minimum(np.cumsum(w)[last_of_tie], 1.0)]
    return fpr, pro


def aupro(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray | None], fpr_limit: float = FPR_LIMIT,
          warnings: list[str] | None = None) -> float | None:
    """Area under the PRO curve up to fpr_limit (trapezoid, interpolated at the limit), divided by fpr_limit.

    1.0 for a map that ranks every defect pixel above every defect-free pixel; 0.0 when it ranks them below.
    """
    curve = pro_curve(maps, masks, warnings)
    if curve is None:
        return None
    fpr, pro = curve
    inside = fpr <= fpr_limit
    x, y = fpr[inside], pro[inside]
    if x[-1] < fpr_limit and inside.sum() < fpr.size:
        # Linear interpolation between the last point inside and the first beyond the limit.
        j = int(inside.sum())
        x0, x1, y0, y1 = fpr[j - 1], fpr[j], pro[j - 1], pro[j]
        y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        x, y = np.r_[x, fpr_limit], np.r_[y, y_lim]
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))
    return area / fpr_limit
