"""Contaminated calibration sets: calibration images that look defective among the others.

Good parts picked by hand sometimes include a defective one. Its high score raises the threshold: the
false-reject bound still holds for good parts, but defects like it pass. Each calibration image gets a
p-value against the *other* calibration images (leave-one-out) and the images whose p-values survive the
Benjamini-Hochberg procedure at a false-discovery rate of 5 % are suspects: among the flagged images, on
average at most 5 % are good parts.

A rank p-value cannot flag anything here (the largest of n scores always has rank p 1/n, above BH's first
cut 0.05/n), so the tail beyond the others is modelled: peaks over a threshold, exponential excesses over
the others' (k+1)-th largest score, k = a fifth of them. For light (Gaussian-like) tails an exponential
tail is heavier, so the p-values are conservative there; a score far beyond the others' spread gets a
tiny one.

Dropping suspects (`inspect calibrate --exclude-suspects`) lowers the threshold. When they are defective,
that restores the miss rate; when a flagged image is a good part after all, the remaining set is no longer
exchangeable with the line and the false-reject rate may exceed its target a little: flagged images are
worth a look before they are dropped.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import numpy as np

SUSPECTS_FILE = "suspects.json"
FDR = 0.05
RULE = "leave-one-out exponential-tail p-values, Benjamini-Hochberg at a 5 % false-discovery rate"


@dataclass
class Suspect:
    image: str
    score: float
    p_value: float


def leave_one_out_p(scores: np.ndarray) -> np.ndarray:
    """Each score's p-value against the other scores (higher = more anomalous)."""
    s = np.asarray(scores, np.float64).ravel()
    n = s.size
    p = np.ones(n)
    if n < 3:
        return p
    order = np.argsort(s)
    ranked = s[order]
    for pos, i in enumerate(order):
        rest = np.delete(ranked, pos)  # sorted, without score i
        m = rest.size
        k = max(2, math.ceil(0.2 * m))
        at_least = m - np.searchsorted(rest, s[i], side="left")
        empirical = (1 + at_least) / (m + 1)
        u = rest[m - k - 1] if m > k else rest[0]
        beta = float(np.mean(rest[m - k:] - u))
        if s[i] <= u or beta <= 0:
            p[i] = empirical
        else:  # P(score > u) is about k / (m + 1); beyond u the excess is exponential with mean beta
            p[i] = k / (m + 1) * math.exp(-(s[i] - u) / beta)
    return p


def benjamini_hochberg(p: np.ndarray, q: float = FDR) -> np.ndarray:
    """Which hypotheses the Benjamini-Hochberg step-up procedure rejects at false-discovery rate q."""
    p = np.asarray(p, np.float64).ravel()
    n = p.size
    order = np.argsort(p)
    below = p[order] <= q * np.arange(1, n + 1) / max(n, 1)
    flagged = np.zeros(n, bool)
    if below.any():
        flagged[order[: np.nonzero(below)[0].max() + 1]] = True
    return flagged


def find_suspects(scores: np.ndarray, names: list[str], q: float = FDR) -> list[Suspect]:
    """The calibration images flagged as likely defective, most suspect first."""
    p = leave_one_out_p(scores)
    flagged = np.nonzero(benjamini_hochberg(p, q))[0]
    found = [Suspect(names[i], float(scores[i]), float(p[i])) for i in flagged]
    return sorted(found, key=lambda s: s.p_value)


def suspects_json(found: list[Suspect], excluded: list[Suspect] | None = None) -> bytes:
    """SUSPECTS_FILE: what calibrate flagged (among the images it kept) and what it dropped."""
    return json.dumps({"rule": RULE, "suspects": [asdict(s) for s in found],
                       "excluded": [asdict(s) for s in excluded or []]}, indent=1).encode()


def load_suspects(data: bytes) -> dict:
    """SUSPECTS_FILE's content: {"rule", "suspects", "excluded"} (lists of {image, score, p_value})."""
    raw = json.loads(data)
    return {"rule": raw.get("rule", RULE), "suspects": raw.get("suspects", []), "excluded": raw.get("excluded", [])}


def describe(found: list[Suspect], excluded: list[Suspect]) -> list[str]:
    """What `inspect calibrate` says about them, one line each."""
    lines = []
    if excluded:
        lines.append(f"excluded {len(excluded)} suspect calibration image(s) and recalibrated without them:")
        lines += [f"  {s.image} (score {s.score:.4g}, p = {s.p_value:.2g})" for s in excluded]
    if found:
        lines.append(f"{len(found)} calibration image(s) look defective ({RULE}); check them, or "
                     "calibrate again with --exclude-suspects:")
        lines += [f"  {s.image} (score {s.score:.4g}, p = {s.p_value:.2g})" for s in found]
    return lines
