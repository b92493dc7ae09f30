"""Drift alarms: is the line still the line the threshold was calibrated on?

The conformal threshold bounds the false-reject rate only while new good parts resemble the
calibration parts. Each alarm below is a statistical test on the last `window` frames against what
calibration recorded on good parts (scoring/health.py), raised when its p-value falls below
RAISE_P = 1e-4 and cleared (hysteresis) when it rises above CLEAR_P = 1e-2:

- "lighting changed": Mann-Whitney rank-sum test of the window's brightness and of its contrast
  against the calibration frames' values (two-sided, Bonferroni over the two);
- "out of focus": the same test on sharpness, one-sided (the window is less sharp);
- "camera moved": the offset of the window's mean frame against the reference frame by phase
  correlation. Good windows' offsets (resampled at calibration from good frames held out from the
  reference) are modelled as a 2-D Gaussian, whose length has a Rayleigh tail P(d > r) =
  exp(-r^2 / 2 sigma^2). Offsets under MIN_MOVE of the frame side never count: parts are placed
  that loosely on most lines, and per-part crops (as in public datasets) shift their mean that much;
- "score drift: re-calibrate": the number of OK parts in the window scoring above the calibration
  score quantile q (level SCORE_LEVEL), binomial test against p0, the rate a good part exceeds q.
  Conformal ranks give P(score > q) <= r/(n+1) over calibration draws; for the calibration set
  at hand that rate is Beta(r, n+1-r) distributed, so p0 is its 99.9 % quantile (a good part above
  q is at most that likely, except for one calibration set in a thousand). Among OK parts the share
  is no higher (the NG tail is excluded from both sides).

Under no change each test evaluation raises with probability below 1e-4 (for the rank tests when the
line frames are exchangeable with the calibration frames; for the alignment test under its Gaussian
approximation). Tests run every frame on overlapping windows, so false alarms per 10,000 frames are
at most about one per test; bench/drift.py measures the real rate, far lower.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffinspect.scoring.health import SCORE_LEVEL, HealthProfile, align, measure
from diffinspect.scoring.record import Record, storable
from diffinspect.store import BANDS_FILE
from diffinspect.store.results import ResultStore

RAISE_P = 1e-4
CLEAR_P = 1e-2
CALIBRATION_DELTA = 1e-3
MIN_MOVE = 0.05  # of the frame side
MIN_TEST = 20  # frames in a window before the rank and binomial tests speak
ALARMS = {"lighting": "lighting changed", "focus": "out of focus", "camera": "camera moved",
          "score": "score drift: re-calibrate"}
HOLD_KINDS = ("lighting", "focus", "camera")  # the camera is wrong: on_alarm = "hold" holds its verdicts


def normal_sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def rank_sum_p(window: np.ndarray, calibration_sorted: np.ndarray, side: str) -> tuple[float, float]:
    """(p-value, AUC) of the Mann-Whitney test that the window comes from the calibration distribution.

    side: "two", "less" (window values lower) or "greater". AUC is P(window value > calibration value).
    Normal approximation with a continuity correction (exact enough for windows of 20 and more)."""
    w = np.asarray(window, np.float64)
    m, n = w.size, calibration_sorted.size
    below = np.searchsorted(calibration_sorted, w, side="left")
    upto = np.searchsorted(calibration_sorted, w, side="right")
    u = float((below + 0.5 * (upto - below)).sum())  # pairs with the window value above, ties half
    mean = m * n / 2.0
    sd = math.sqrt(m * n * (m + n + 1) / 12.0)
    auc = u / (m * n)
    if sd == 0:
        return 1.0, auc
    if side == "less":
        p = normal_sf((mean - u - 0.5) / sd)
    elif side == "greater":
        p = normal_sf((u - mean - 0.5) / sd)
    else:
        p = min(1.0, 2.0 * normal_sf((abs(u - mean) - 0.5) / sd))
    return p, auc


def binom_sf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) >= k)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
             for i in range(k, n + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def exceedance_bound(r: int, n: int, delta: float = CALIBRATION_DELTA) -> float:
    """Upper (1 - delta) quantile of Beta(r, n + 1 - r): the rate at which new values exceed the r-th
    largest of n calibration values, bounded for all but a delta share of calibration sets.
    Uses P(Beta(r, n+1-r) <= p) = P(Binomial(n, p) >= r); bisection, no scipy in the runtime."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if binom_sf(r, n, mid) < 1.0 - delta:
            lo = mid
        else:
            hi = mid
    return hi


@dataclass
class AlarmEvent:
    kind: str  # lighting | focus | camera | score
    name: str  # what the engineer reads: "lighting changed", ...
    state: str  # raised | cleared
    detail: str
    at: float


class DriftMonitor:
    """Rolling windows over one lane's frames; `update` returns alarms raised or cleared by a frame."""

    def __init__(self, profile: HealthProfile, window: int | None = None, raise_p: float = RAISE_P,
                 clear_p: float = CLEAR_P) -> None:
        self.profile = profile
        self.window = window or profile.window
        self.raise_p, self.clear_p = raise_p, clear_p
        self._cal = {k: np.sort(v[np.isfinite(v)]) for k, v in profile.values.items()}
        self._values = {k: deque(maxlen=self.window) for k in ("brightness", "contrast", "sharpness")}
        self._smalls: deque[np.ndarray] = deque(maxlen=profile.window)  # the null was fitted at this size
        self._sum = np.zeros_like(profile.reference, dtype=np.float64)
        self._exceed: deque[tuple[bool, float]] = deque(maxlen=self.window)
        self._quantiles: dict[str, tuple[float, float]] = {}
        for det in profile.scores:
            q = profile.score_quantile(det)
            if q is not None:
                self._quantiles[det] = (q[0], exceedance_bound(q[1], q[2]))
        self.open: dict[str, AlarmEvent] = {}
        self.last_p: dict[str, float] = {}

    def update(self, signals: dict[str, float] | None, small: np.ndarray | None, detector: str | None = None,
               status: str | None = None, score: float | None = None, at: float | None = None) -> list[AlarmEvent]:
        at = time.time() if at is None else at
        if signals is not None:
            for k, dq in self._values.items():
                v = signals.get(k)
                if v is not None and math.isfinite(v):
                    dq.append(float(v))
        if small is not None:
            if len(self._smalls) == self._smalls.maxlen:
                self._sum -= self._smalls[0]
            self._smalls.append(small)
            self._sum += small
        if status == "ok" and detector in self._quantiles and score is not None and math.isfinite(score):
            q, p0 = self._quantiles[detector]
            self._exceed.append((score > q, p0))
        events = []
        for kind, (p, detail) in self._tests().items():
            self.last_p[kind] = p
            events += self._transition(kind, p, detail, at)
        return events

    def _tests(self) -> dict[str, tuple[float, str]]:
        out: dict[str, tuple[float, str]] = {}
        b, c = self._values["brightness"], self._values["contrast"]
        if len(b) >= MIN_TEST and self._cal["brightness"].size and self._cal["contrast"].size:
            pb, _ = rank_sum_p(np.asarray(b), self._cal["brightness"], "two")
            pc, _ = rank_sum_p(np.asarray(c), self._cal["contrast"], "two")
            cal_b, cal_c = np.median(self._cal["brightness"]), np.median(self._cal["contrast"])
            out["lighting"] = (min(1.0, 2 * min(pb, pc)),
                               f"brightness median {np.median(b):.0f} (calibrated {cal_b:.0f}), "
                               f"contrast median {np.median(c):.1f} (calibrated {cal_c:.1f})")
        s = self._values["sharpness"]
        if len(s) >= MIN_TEST and self._cal["sharpness"].size:
            p, _ = rank_sum_p(np.asarray(s), self._cal["sharpness"], "less")
            cal_s = np.median(self._cal["sharpness"])
            out["focus"] = (p, f"sharpness median {np.median(s):.2f} (calibrated {cal_s:.2f})")
        if len(self._smalls) == self._smalls.maxlen:
            side = self.profile.reference.shape[1]
            dx, dy, _ = align(self.profile.reference, (self._sum / len(self._smalls)).astype(np.float32))
            d = math.hypot(dx, dy)
            p = 1.0 if d < MIN_MOVE * side else math.exp(-d * d / (2 * self.profile.offset_sigma ** 2))
            out["camera"] = (p, f"view offset {100 * dx / side:+.1f} %, {100 * dy / side:+.1f} % of the frame "
                                f"(good windows: {100 * self.profile.offset_sigma / side:.1f} % per axis)")
        if len(self._exceed) >= MIN_TEST:
            k = sum(e for e, _ in self._exceed)
            p0 = max(p for _, p in self._exceed)
            out["score"] = (binom_sf(k, len(self._exceed), p0),
                            f"{k} of the last {len(self._exceed)} OK parts above the calibration "
                            f"{SCORE_LEVEL:.0%} score quantile (expected at most {p0:.0%})")
        return out

    def _transition(self, kind: str, p: float, detail: str, at: float) -> list[AlarmEvent]:
        if kind not in self.open and p < self.raise_p:
            ev = AlarmEvent(kind, ALARMS[kind], "raised", f"{detail}; p = {p:.1e}", at)
            self.open[kind] = ev
            return [ev]
        if kind in self.open and p > self.clear_p:
            del self.open[kind]
            return [AlarmEvent(kind, ALARMS[kind], "cleared", f"{detail}; p = {p:.2g}", at)]
        return []


# ---------------------------------------------------------------------------------------------
# In `inspect watch`: one DriftHub per run, one LaneDrift per lane


@dataclass
class Health:
    """A frame's signals, measured when it is decoded, against the profile of the detector's bundle."""

    signals: dict[str, float]
    small: np.ndarray
    profile: HealthProfile

    def json(self) -> str:
        return json.dumps({k: round(v, 6) if math.isfinite(v) else None for k, v in self.signals.items()})


class DriftHub:
    """Frame health and drift alarms for one `inspect watch` run: a LaneDrift per lane measures each
    frame when it is decoded; `on_commit` (a commit hook) feeds the committed rows, in commit order,
    to their lane's monitor. Alarms go to the events table of results.db and to the console. A failure
    here costs a warning, never a frame or its row."""

    MAX_PENDING = 100_000  # measured frames whose row has not come yet (never committed: bounded)

    def __init__(self, out: Path, store: ResultStore, warn: Callable[[str], None], info: Callable[[str], None]
                 ) -> None:
        self.out, self.store, self.warn, self.info = out, store, warn, info
        self._pending: dict[tuple[str, int, int], tuple[LaneDrift, Health]] = {}
        self._lanes: dict[Path, LaneDrift] = {}
        self._lock = threading.Lock()
        self._failed = False

    def lane(self, folders: list[Path]) -> LaneDrift:
        lane = LaneDrift(self, ", ".join(str(f) for f in folders))
        self._lanes.update(dict.fromkeys(folders, lane))
        return lane

    def held(self, folder: Path) -> str | None:
        """The names of the lighting, focus and camera alarms open for a camera folder ("; "-joined), or
        None. Read by the folder's own lane at commit, the thread that opens and clears them."""
        lane = self._lanes.get(folder)
        open_ = {} if lane is None or lane.monitor is None else lane.monitor.open
        return "; ".join(ALARMS[k] for k in HOLD_KINDS if k in open_) or None

    def on_commit(self, rows: list[Record]) -> None:
        try:
            with self._lock:
                found = [(self._pending.pop((r.path, r.size, r.mtime_ns), None), r) for r in rows]
            events: list[tuple[LaneDrift, AlarmEvent]] = []
            for entry, row in found:
                if entry is not None and row.status != "error":
                    lane, health = entry
                    events += [(lane, e) for e in lane.observe(health, row)]
            if events:
                self.store.add_events([(e.at, e.kind, e.name, e.state, e.detail, lane.folder) for lane, e in events])
                for lane, e in events:
                    say = self.warn if e.state == "raised" else self.info
                    say(f"ALARM {e.name}: {e.state} on {lane.folder} ({e.detail})")
        except Exception as exc:
            self.fail(exc)

    def remember(self, key: tuple[str, int, int], lane: LaneDrift, health: Health) -> None:
        with self._lock:
            if len(self._pending) >= self.MAX_PENDING:
                self._pending.pop(next(iter(self._pending)))
            self._pending[key] = (lane, health)

    def publish_bands(self, folder: str, profile: HealthProfile) -> None:
        """OUT/station.json: the calibrated bands the station page draws behind the health signals."""
        path = self.out / BANDS_FILE
        with self._lock:
            try:
                data = json.loads(path.read_text()) if path.is_file() else {}
            except (OSError, ValueError):
                data = {}
            if not isinstance(data, dict) or not isinstance(data.get("lanes"), dict):
                data = {"lanes": {}}
            bands = {k: list(v) for k, v in profile.bands().items()}
            data["lanes"][folder] = bands
            data["bands"] = bands
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(data, indent=1))
            os.replace(tmp, path)

    def fail(self, exc: BaseException) -> None:
        if not self._failed:
            self._failed = True
            self.warn(f"frame health and drift alarms failed: {type(exc).__name__}: {exc}")


class LaneDrift:
    """One lane's rolling windows (its folders share a bundle, so one calibration to compare to)."""

    def __init__(self, hub: DriftHub, folder: str) -> None:
        self.hub, self.folder = hub, folder
        self.monitor: DriftMonitor | None = None

    def measure(self, key: tuple[str, int, int], frame: np.ndarray, profile: HealthProfile | None
                ) -> Health | None:
        """Called from the decode threads with the profile of the lane's detectors (None: no health)."""
        if profile is None:
            return None
        try:
            signals, small = measure(frame, profile.reference)
        except Exception as exc:  # an odd frame must not cost its row
            self.hub.fail(exc)
            return None
        health = Health(signals, small, profile)
        self.hub.remember((storable(key[0]), key[1], key[2]), self, health)  # the path as its row will hold it
        return health

    def observe(self, health: Health, row: Record) -> list[AlarmEvent]:
        if self.monitor is None or self.monitor.profile is not health.profile:
            self.monitor = DriftMonitor(health.profile)
            self.hub.publish_bands(self.folder, health.profile)
        return self.monitor.update(health.signals, health.small, row.detector, row.status, row.score, row.scored_at)
