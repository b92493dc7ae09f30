"""The threshold rule, in one place: split-conformal on scores of good parts.

With n calibration scores of good parts and a target false-reject rate alpha, the threshold is the
ceil((n+1)(1-alpha))-th smallest score. For a new good part exchangeable with the calibration parts,
P(score > threshold) <= alpha (and >= alpha - 1/(n+1)): the bound holds whatever the score distribution.
"""

from __future__ import annotations

import math

import numpy as np

from diffinspect import DiffinspectError


def min_calibration_size(alpha: float) -> int:
    """Smallest n for which the conformal rank ceil((n+1)(1-alpha)) is at most n."""
    _check_alpha(alpha)
    return math.ceil((1 - alpha) / alpha - 1e-9)


def check_calibration_size(n: int, alpha: float, *, extra: int = 0, what: str = "calibration images",
                           purpose: str = "", hint: str = "") -> None:
    """Refuse, in one line, n images too few to bound the false-reject rate at alpha.

    extra: images needed beyond calibration to fit the detector (COPOD), which `purpose` names."""
    need = min_calibration_size(alpha)
    if n < need + extra:
        split = f" ({need} to calibrate + {extra} to fit)" if extra else ""
        raise DiffinspectError(
            f"{n} {what} cannot {'both ' + purpose + ' and ' if extra else ''}bound the false-reject rate at "
            f"{alpha:g}: need at least {need + extra} good images{split} "
            f"({hint or 'or ask for a higher --false-reject-rate'})")


def conformal_threshold(scores: np.ndarray, alpha: float) -> float:
    """Image threshold bounding the false-reject rate of new good parts by alpha."""
    _check_alpha(alpha)
    scores = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    n = scores.size
    bad = int(np.count_nonzero(~np.isfinite(scores)))
    if bad:
        # np.sort puts NaN last: the threshold could land on it, and every part would then be OK.
        raise DiffinspectError(f"{bad} of {n} calibration scores are not finite numbers: the model or its "
                               "statistics are broken (retrain, or calibrate on another backend)")
    check_calibration_size(n, alpha)
    rank = math.ceil((n + 1) * (1 - alpha))
    return float(scores[rank - 1])


def describe_bound(n: int, alpha: float) -> str:
    """One sentence a line engineer can read, with n."""
    return (f"threshold set from {n} good images: a new good part is rejected with probability at most "
            f"{alpha:.3g} (split-conformal bound; holds when new parts resemble the calibration parts)")


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:  # also refuses NaN
        raise DiffinspectError(f"false-reject rate must be between 0 and 1, got {alpha}")


def min_rank_p(calibration: np.ndarray, scores: np.ndarray, calibration_ties: np.ndarray | None = None,
               ties: np.ndarray | None = None) -> np.ndarray:
    """Full-conformal p-values of the fused statistic "best rank over K detectors".

    calibration (K, n) and scores (K, m): K detectors' scores of n calibration parts and m new parts
    (higher = more anomalous). For each new part, the n + 1 parts (the calibration parts and it) are
    ranked per detector, rank 1 the highest score; a part's statistic is its best rank, and among equal
    best ranks the higher tie-break value (calibration_ties (n,), ties (m,), e.g. the summed scores) is
    the more extreme. The p-value is the share of the n + 1 parts at least as extreme as the new part.
    The statistic is a symmetric function of the n + 1 parts, so for a good part exchangeable with the
    calibration parts P(p <= alpha) <= alpha, with any K, and p can reach 1 / (n + 1): n >= 1 / alpha
    - 1 is enough. Without a tie-break, the K parts that are rank 1 in some detector tie, and p cannot
    go below K / (n + 1) (the Bonferroni union of K split-conformal p-values has the same need)."""
    cal = np.asarray(calibration, np.float64)
    s = np.nan_to_num(np.asarray(scores, np.float64), nan=np.inf)  # a NaN score is treated as extreme
    k, n = cal.shape
    cal_ties = np.zeros(n) if calibration_ties is None else np.asarray(calibration_ties, np.float64)
    new_ties = np.zeros(s.shape[1]) if ties is None else np.nan_to_num(np.asarray(ties, np.float64), nan=np.inf)
    ordered = np.sort(cal, axis=1)
    at_least = np.stack([n - np.searchsorted(ordered[j], cal[j], side="left") for j in range(k)])  # (K, n)
    new_rank = 1 + np.stack([n - np.searchsorted(ordered[j], s[j], side="left") for j in range(k)]).min(0)
    # A calibration part's rank among the n + 1 grows by one where the new part scores at least as high.
    cal_rank = (at_least[:, None, :] + (s[:, :, None] >= cal[:, None, :])).min(0)  # (m, n)
    new_rank = new_rank[:, None]
    extreme = (cal_rank < new_rank) | ((cal_rank == new_rank) & (cal_ties[None, :] >= new_ties[:, None]))
    return (1 + extreme.sum(1)) / (n + 1)


def min_rank_threshold(n: int, alpha: float) -> float:
    """Threshold on -log(min_rank_p) that rejects exactly when p <= alpha: halfway (in p) between the
    largest p-value level <= alpha and the next, so a tie-break smaller than the gap cannot cross it."""
    check_calibration_size(n, alpha)
    return float(-np.log((math.floor(alpha * (n + 1) + 1e-9) + 0.5) / (n + 1)))


def tie_break_room(n: int) -> float:
    """Largest tie-break that keeps every score of one p-value level on its side of min_rank_threshold:
    adjacent levels m / (n + 1) < (m + 1) / (n + 1) are at least log((n + 1) / (n + 0.5)) apart from it."""
    return 0.9 * math.log((n + 1) / (n + 0.5))
