"""What the operators' reviews say about the line: measured rates with exact (Clopper-Pearson) intervals.

Two figures come from the reviewed rejects (each frame's latest review):

- the share of reviewed rejects that were good parts: x of n, with its exact interval;
- the false-reject rate the calibrated bound speaks of (good parts rejected / good parts inspected),
  since the first reviewed frame: the rejects of that span times the share above, over the OK frames of
  the span (less the reviewed misses) plus those false rejects. It grows with the share, so the share's
  interval carries over to it exactly, given the counts, when the reviewed rejects are a fair sample of
  the span's rejects (all of them, or a random pick).

The reviewed misses are OK frames a person found defective: the line's escapes.
"""

from __future__ import annotations

import math
from typing import Any

from diffinspect.store.reader import Tally

CONFIDENCE = 0.95
LAST = 10  # reviews and misses listed on the page


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (a, b > 0)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):  # where the fraction converges fast; the other side by symmetry
        return front * _fraction(a, b, x) / a
    return 1.0 - front * _fraction(b, a, 1.0 - x) / b


def _fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b), evaluated by the modified Lentz method."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 100_000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return h


def beta_quantile(q: float, a: float, b: float) -> float:
    """The x with I_x(a, b) = q, by bisection (I_x grows with x)."""
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if betainc(a, b, mid) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def clopper_pearson(x: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The exact two-sided interval for a binomial proportion after x successes in n trials."""
    if n <= 0:
        return 0.0, 1.0
    tail = (1.0 - confidence) / 2
    lo = 0.0 if x == 0 else beta_quantile(tail, x, n - x + 1)
    hi = 1.0 if x == n else beta_quantile(1.0 - tail, x + 1, n - x)
    return lo, hi


def summary(tally: Tally, counts_since: Any, bound: dict[str, Any] | None) -> dict[str, Any]:  # noqa: ANN401
    """The page's review figures from each frame's latest review (the store's Tally); counts_since(t) gives the
    frames by status scored since t (the store's seconds table)."""
    def frames(status: str, verdict: str) -> int:
        return tally.frames.get((status, verdict), 0)

    good, rejects, misses = frames("ng", "good"), frames("ng", "good") + frames("ng", "defect"), frames("ok", "defect")
    out: dict[str, Any] = {
        "reviews": sum(tally.frames.values()), "confidence": CONFIDENCE, "bound": bound,
        "rejects_reviewed": rejects, "good_rejects": good, "misses": misses,
        "last_misses": tally.last_misses[:LAST], "last": tally.last[:LAST],
        "good_share": None, "good_share_interval": None, "false_reject_rate": None, "false_reject_interval": None,
    }
    if not rejects:
        return out
    lo, hi = clopper_pearson(good, rejects)
    out |= {"good_share": good / rejects, "good_share_interval": [lo, hi]}
    since = tally.since
    c = counts_since(since)
    ok = max(0, c["ok"] - misses)  # every miss was scored since the earliest reviewed frame

    def rate(share: float) -> float:
        false_rejects = c["ng"] * share
        return false_rejects / (ok + false_rejects) if ok + false_rejects > 0 else 0.0

    out |= {"false_reject_rate": rate(good / rejects), "false_reject_interval": [rate(lo), rate(hi)],
            "since": since, "frames_since": {"ok": c["ok"], "ng": c["ng"]}}
    return out
