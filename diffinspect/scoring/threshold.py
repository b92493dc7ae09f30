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
