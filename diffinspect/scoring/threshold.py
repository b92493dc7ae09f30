"""The threshold rule, in one place: conformal order statistics of good parts' scores.

Two guarantees, for new good parts exchangeable with the n calibration parts:
- marginal (split-conformal): the threshold is the ceil((n+1)(1-alpha))-th smallest score; on average over
  calibration sets, P(score > threshold) <= alpha (and >= alpha - 1/(n+1)), whatever the score distribution.
  The rate of one calibration set's threshold scatters around alpha: at n = 99 and alpha = 1 % it is above
  alpha for about 37 % of calibration sets.
- calibration-conditional: the k-th smallest score, with k the smallest rank such that
  P(Binomial(n, 1 - alpha) >= k) <= delta. The rate of the k-th smallest score is 1 - U_(k) with
  U_(k) ~ Beta(k, n - k + 1), and P(1 - U_(k) > alpha) = P(Binomial(n, 1 - alpha) >= k): with confidence
  1 - delta over the calibration draw, this threshold rejects at most alpha of good parts. It needs
  n >= log(delta) / log(1 - alpha) (299 at 1 % and 95 %).

Fused detectors (K scores per part) use the best-rank rule: min_rank_p (full-conformal, marginal) and
its conditional form, min_rank_cutoffs and peel_p (Tukey's statistically equivalent blocks, see there).
"""

from __future__ import annotations

import math

import numpy as np

from diffinspect import DiffinspectError
from diffinspect.bundle import Calibration

CONFIDENCE_DELTA = 0.05  # the conditional bound holds for all but this share of calibration sets


def binom_sf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) >= k), from log terms (no scipy in the runtime)."""
    if k <= 0:
        return 1.0
    if k > n or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
             for i in range(k, n + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def min_calibration_size(alpha: float, delta: float | None = None) -> int:
    """Smallest n for which the rule has a rank at most n: the conformal rank ceil((n+1)(1-alpha))
    (delta None), or the conditional one, which needs (1 - alpha)^n <= delta."""
    _check_alpha(alpha)
    if delta is None:
        return math.ceil((1 - alpha) / alpha - 1e-9)
    _check_delta(delta)
    return math.ceil(math.log(delta) / math.log1p(-alpha) - 1e-9)


def conditional_rank(n: int, alpha: float, delta: float = CONFIDENCE_DELTA) -> int:
    """Smallest k with P(Binomial(n, 1 - alpha) >= k) <= delta (k <= n; check the size first)."""
    check_calibration_size(n, alpha, delta=delta)
    lp, lq = math.log1p(-alpha), math.log(alpha)
    tail, k = 0.0, n + 1
    while k > 1:  # add pmf(k - 1) while the tail stays within delta
        i = k - 1
        term = math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq)
        if tail + term > delta:
            break
        tail, k = tail + term, i
    return k


def check_calibration_size(n: int, alpha: float, *, extra: int = 0, what: str = "calibration images",
                           purpose: str = "", hint: str = "", delta: float | None = None) -> None:
    """Refuse, in one line, n images too few to bound the false-reject rate at alpha (with confidence
    1 - delta for the conditional bound).

    extra: images needed beyond calibration to fit the detector (COPOD), which `purpose` names."""
    need = min_calibration_size(alpha, delta)
    if n < need + extra:
        split = f" ({need} to calibrate + {extra} to fit)" if extra else ""
        confidence = "" if delta is None else f" with {1 - delta:.3g} confidence"
        raise DiffinspectError(
            f"{n} {what} cannot {'both ' + purpose + ' and ' if extra else ''}bound the false-reject rate at "
            f"{alpha:g}{confidence}: need at least {need + extra} good images{split} "
            f"({hint or 'or ask for a higher --false-reject-rate'})")


def conformal_threshold(scores: np.ndarray, alpha: float) -> float:
    """Image threshold bounding the false-reject rate of new good parts by alpha, on average."""
    _check_alpha(alpha)
    scores = _sorted_finite(scores)
    check_calibration_size(scores.size, alpha)
    return float(scores[math.ceil((scores.size + 1) * (1 - alpha)) - 1])


def conditional_threshold(scores: np.ndarray, alpha: float, delta: float = CONFIDENCE_DELTA) -> float:
    """Image threshold whose own false-reject rate is at most alpha, with confidence 1 - delta."""
    scores = _sorted_finite(scores)
    return float(scores[conditional_rank(scores.size, alpha, delta) - 1])


def _sorted_finite(scores: np.ndarray) -> np.ndarray:
    scores = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    bad = int(np.count_nonzero(~np.isfinite(scores)))
    if bad:
        # np.sort puts NaN last: the threshold could land on it, and every part would then be OK.
        raise DiffinspectError(f"{bad} of {scores.size} calibration scores are not finite numbers: the model or "
                               "its statistics are broken (retrain, or calibrate on another backend)")
    return scores


RULES = {("split", False): "split-conformal", ("best-rank", False): "full-conformal best-rank",
         ("split", True): "calibration-conditional order statistic",
         ("best-rank", True): "calibration-conditional best-rank (peeled blocks)"}


def describe_bound(n: int, alpha: float, rule: str = "split", delta: float | None = None) -> str:
    """What the threshold guarantees, in one line with n, naming the rule that set it: rule "split"
    (one score) or "best-rank" (fused detectors); delta: the calibration-conditional threshold at
    confidence 1 - delta, which also keeps the average bound (it is the more careful threshold), so both
    are said. The one wording of the guarantees: `inspect calibrate` and `info`, the evaluation report and
    the station page all show this."""
    holds = f"on average over calibration sets, at most {alpha:.3g} of good parts are rejected"
    if delta is not None:
        holds += f"; with {1 - delta:.0%} confidence, at most {alpha:.3g} of good parts are rejected by this threshold"
    return (f"threshold set from {n} good images ({RULES[rule, delta is not None]} rule): {holds} "
            "(when new parts resemble the calibration parts)")


def guarantee(cal: Calibration) -> str:
    """describe_bound for a bundle's calibration record (the diffusion detector's threshold)."""
    rule = "best-rank" if cal.frame_term is not None and cal.frame_term.rule == "minp" else "split"
    delta = None if cal.confidence is None else 1 - cal.confidence
    return describe_bound(cal.n, cal.false_reject_rate, rule, delta)


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:  # also refuses NaN
        raise DiffinspectError(f"false-reject rate must be between 0 and 1, got {alpha}")


def _check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise DiffinspectError(f"the confidence must be between 0 and 1 (exclusive), got {1 - delta}")


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
    go below K / (n + 1) (the Bonferroni union of K split-conformal p-values has the same need).
    The guarantee is marginal (on average over calibration sets); min_rank_cutoffs is the conditional
    form of the rule."""
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
    """Threshold on -log(min_rank_p) that rejects exactly when p <= alpha."""
    check_calibration_size(n, alpha)
    return level_threshold(n, math.floor(alpha * (n + 1) + 1e-9))


def level_threshold(n: int, level: int) -> float:
    """Threshold on -log(p), p in {1, ..., n + 1} / (n + 1), that rejects exactly when p <= level / (n + 1):
    halfway (in p) between that level and the next, so a tie-break smaller than the gap cannot cross it."""
    return float(-np.log((level + 0.5) / (n + 1)))


def tie_break_room(n: int) -> float:
    """Largest tie-break that keeps every score of one p-value level on its side of min_rank_threshold:
    adjacent levels m / (n + 1) < (m + 1) / (n + 1) are at least log((n + 1) / (n + 0.5)) apart from it."""
    return 0.9 * math.log((n + 1) / (n + 0.5))


def peel_blocks(n: int, alpha: float, delta: float = CONFIDENCE_DELTA) -> int:
    """How many calibration parts the conditional best-rank rule peels: n + 1 - k, k the conditional rank
    of one detector (the rule rejects a part that falls in the first peel_blocks blocks)."""
    return n + 1 - conditional_rank(n, alpha, delta)


def min_rank_cutoffs(calibration: np.ndarray, alpha: float, delta: float = CONFIDENCE_DELTA) -> np.ndarray:
    """The best-rank rule with the calibration-conditional guarantee: per-detector cutoffs (K,); a part
    is rejected when any detector's score is above its cutoff, and with confidence 1 - delta the rate of
    good parts rejected is at most alpha. The guarantee needs the same n as one detector, with any K,
    but every detector has a cutoff only once j >= K (before that, the later ones get +inf: they never
    reject).

    Why min_rank_p is not thresholded instead: its rejection set is not a fixed function of the part
    (each new part re-ranks the calibration parts), and for full-conformal p-values only the marginal
    bound is known to hold. Here the calibration parts are peeled in turn: detector 1's highest, then
    detector 2's highest of those left, ..., round after round, j = n + 1 - k times (k the conditional
    rank of one detector). This is Tukey's construction of statistically equivalent blocks: each peel
    removes a region whose share of good parts, for continuous scores, is one of the n + 1 Dirichlet(1,
    ..., 1) spacings, so the rejected share is Beta(j, n + 1 - j), exactly as for one detector's k-th
    smallest score. Ties only make it reject less (a strict > on the cutoff a tie-break would give)."""
    cal = np.asarray(calibration, np.float64)
    _sorted_finite(cal)
    k, n = cal.shape
    peeled, blocks = peel(cal), peel_blocks(n, alpha, delta)
    cutoffs = np.full(k, np.inf)
    for d in range(min(k, blocks)):  # each detector's last peel among the first `blocks`
        cutoffs[d] = peeled[d + k * ((blocks - 1 - d) // k)]
    return cutoffs


def peel_p(calibration: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The p-value of the peeled best-rank rule: the block t (1..n + 1) a new part falls in, over n + 1.

    Block t's region (any detector above its cutoff after t peels) grows with t, and holds a new good part
    with probability t / (n + 1) (the blocks' shares are exchangeable spacings), so P(p <= a) <= a: a
    split-conformal p-value, as the regions depend on the calibration parts alone. Rejecting when the
    part falls in the first j = peel_blocks blocks is the rule of min_rank_cutoffs: p <= j / (n + 1) <= alpha.
    One detector: (1 + #{calibration >= s}) / (n + 1), the split-conformal p-value. calibration (K, n),
    scores (K, m); a NaN score is treated as extreme."""
    cal = np.asarray(calibration, np.float64)
    s = np.nan_to_num(np.asarray(scores, np.float64), nan=np.inf)
    k, n = cal.shape
    peeled = peel(cal)
    block = np.full(s.shape[1], n + 1)
    for d in range(k):
        mine = peeled[d::k]  # detector d's peels, highest first
        above = len(mine) - np.searchsorted(mine[::-1], s[d], side="left")  # its peels >= the score
        # The part is above detector d's cutoff from d's next peel on (step d + k * above, 0-based).
        block = np.where(above < len(mine), np.minimum(block, d + k * above + 1), block)
    return block / (n + 1)


def peel(cal: np.ndarray) -> np.ndarray:
    """The score of each of the n peels in turn (peel t is detector t % K's highest part not yet peeled)."""
    k, n = cal.shape
    order = np.argsort(-cal, axis=1, kind="stable")
    removed = np.zeros(n, bool)
    nxt = [0] * k
    out = np.empty(n)
    for t in range(n):
        d = t % k
        while removed[order[d, nxt[d]]]:
            nxt[d] += 1
        i = order[d, nxt[d]]
        removed[i] = True
        out[t] = cal[d, i]
    return out
