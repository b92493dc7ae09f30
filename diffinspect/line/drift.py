"""Drift alarms: is the line still the line the threshold was calibrated on?

The conformal threshold bounds the false-reject rate only while new good parts resemble the
calibration parts. Each alarm is an anytime-valid test of "the line's frames are exchangeable with the
calibration frames", watched over an unbounded stream: under no change, P(any false alarm, ever) <=
1 / lam for all alarms together (lam: [watch] alarm_lambda, default 1000), however long the
line runs. The old per-window tests (p < 1e-4 at every frame) made a false alarm certain over months.

Per frame, each health signal (scoring/health.py) gets a conformal p-value: its rank among the
calibration frames' values and every value the monitor has learnt since (a Bag), ties broken at
random. Under no change these p-values are independent and uniform (exchangeability). A bet on the
event "p <= a" (or "1 - p <= a": the other side) pays f = 1 - beta + beta * [event] / a, whose mean is 1,
so the product of a stream's payoffs is a test martingale. An alarm's e-process averages such products
over the levels LEVELS, sides, bet sizes BETS and every start time s (weight s^-e - (s + 1)^-e, e =
START_TAIL), so a change that begins after any length of good running is caught as soon as the evidence
since the change outweighs the start's weight (the delay grows with the log of the time since the
monitor started). By Ville's inequality a signal's mixture ever reaches T with probability at most 1 / T.

- "lighting changed": brightness and contrast, either side;
- "out of focus": sharpness, the low side;
- "camera moved": the two pose offsets, either side;
- "score drift: re-calibrate": per detector, OK parts' scores above fixed calibration ranks (SCORE_LEVELS).
  OK parts cannot join a bag of calibration scores (they lack the NG tail), so here the bet's event
  probability is bounded as the threshold is: the exceedance rate of the j-th largest of n calibration
  scores is Beta(j, n + 1 - j) over calibration sets, at most its 1 - delta quantile but for a delta
  share of them; among OK parts an event above a rank is no likelier (the NG tail leaves both).

Budget: with m signals and detectors, each mixture raises at T = 2 m lam (Ville, union over them), and
the score ranks' bounds share the other half of 1 / lam.

Raise and clear: an alarm raises when its e-process reaches T, then watches a fresh e-process (started
afresh at each crossing) and stops learning its signals' values (a changed view must not become the
reference); it clears after CLEAR_AFTER frames in which the fresh one did not reach T. From a clear on,
the same guarantee holds for the next monitoring period when the frames the bags learnt from were good:
if the line is back to the calibration distribution, the alarm raises again with probability at most
its share of 1 / lam. This all assumes good frames are exchangeable draws (not the order of a line
that, say, warms up slowly: that is a change too).
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffinspect.config import ALARM_LAMBDA
from diffinspect.logs import storable
from diffinspect.scoring.health import HealthProfile, measure
from diffinspect.scoring.record import Record
from diffinspect.scoring.threshold import binom_sf
from diffinspect.store import BANDS_FILE
from diffinspect.store.results import ResultStore

log = logging.getLogger(__name__)
LAMBDA = ALARM_LAMBDA  # the default of [watch] alarm_lambda: P(any false alarm, ever) <= 1 / LAMBDA
LEVELS = (0.01, 0.05, 0.2, 0.5)  # nominal event rates the health bets watch (ranks j ~ level * (n + 1))
SCORE_LEVELS = (0.1, 0.2, 0.5)  # for OK parts' scores: below any sensible threshold's rank
BETS = (0.2, 0.5, 0.9)  # bet sizes: small for faint changes, large for blatant ones
START_TAIL = 0.1  # start time s weighs s^-e - (s+1)^-e: a change after t frames costs about (1 + e) log t
CLEAR_AFTER = 50  # frames without new evidence before a raised alarm clears
GRID = 4096  # bins of a signal's conformal bag (over three times the calibration range)
MIN_SCORES = 20  # calibration scores a detector needs for its score-drift alarm
SHOWN = 50  # recent values summarized in an alarm's detail
ALARMS = {"lighting": "lighting changed", "focus": "out of focus", "camera": "camera moved",
          "score": "score drift: re-calibrate"}
TESTS = {"lighting": (("brightness", "both"), ("contrast", "both")), "focus": (("sharpness", "low"),),
         "camera": (("offset_x", "both"), ("offset_y", "both"))}
HOLD_KINDS = ("lighting", "focus", "camera")  # the camera is wrong: on_alarm = "hold" holds its verdicts


def exceedance_bound(r: int, n: int, delta: float = 1e-3) -> float:
    """Upper (1 - delta) quantile of Beta(r, n + 1 - r): the rate at which new values fall beyond the
    r-th most extreme of n calibration values, bounded for all but a delta share of calibration sets.
    Uses P(Beta(r, n+1-r) <= p) = P(Binomial(n, p) >= r); bisection, no scipy in the runtime."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if binom_sf(r, n, mid) < 1.0 - delta:
            lo = mid
        else:
            hi = mid
    return hi


class EProcess:
    """Average over bets x BETS sizes x start times of betting products (see the module docstring).

    bounds: per bet, the most probability its event can have on good frames; the bet pays 1 / bound."""

    def __init__(self, bounds: Sequence[float]) -> None:
        sizes = np.array(BETS)[None, :]
        self._win = np.log1p(sizes * (1.0 / np.asarray(bounds, float)[:, None] - 1.0))  # (bets, sizes)
        self._lose = np.broadcast_to(np.log1p(-sizes), self._win.shape)
        self.restart()

    def restart(self) -> None:
        self.t = 0
        self._log_a = np.full(self._win.shape, -np.inf)  # log of the started products' weighted sum

    def update(self, hits: np.ndarray) -> None:
        """One frame: which bets' events happened."""
        self.t += 1
        start = math.log(self.t ** -START_TAIL - (self.t + 1.0) ** -START_TAIL)  # this frame's start weight
        self._log_a = np.logaddexp(self._log_a, start) + np.where(hits[:, None], self._win, self._lose)

    @property
    def value(self) -> float:
        """The e-value now: started products plus the weight of start times still to come."""
        top = float(self._log_a.max())
        if top > 700.0:  # past e^700 a float says no more
            return math.inf
        if not math.isfinite(top):
            return (self.t + 1.0) ** -START_TAIL
        started = math.exp(top) * float(np.exp(self._log_a - top).sum()) / self._log_a.size
        return started + (self.t + 1.0) ** -START_TAIL


class Bag:
    """The calibration values of a signal and the line's values learnt since, as counts on a fixed grid
    (bounded memory; a value's bin is its conformity score, ties broken at random): conformal p-values."""

    def __init__(self, calibration: np.ndarray) -> None:
        cal = calibration[np.isfinite(calibration)]
        lo, hi = (float(cal.min()), float(cal.max())) if cal.size else (0.0, 1.0)
        pad = (hi - lo) or 1.0
        self._lo, self._step = lo - pad, 3 * pad / GRID
        self.counts = np.zeros(GRID + 2, np.int64)  # with a bin below and one above the grid
        np.add.at(self.counts, [self._bin(v) for v in cal], 1)
        self.n = int(cal.size)

    def _bin(self, v: float) -> int:
        return int(min(max(math.floor((v - self._lo) / self._step) + 1, 0), GRID + 1))

    def p_low(self, v: float, u: float) -> float:
        """Share of the bag with v at least as low (ties: u in [0, 1) of them): uniform on good frames."""
        b = self._bin(v)
        return (float(self.counts[:b].sum()) + u * (float(self.counts[b]) + 1.0)) / (self.n + 1.0)

    def add(self, v: float) -> None:
        self.counts[self._bin(v)] += 1
        self.n += 1


class _Alarm:
    """One e-process: bets on one or more signals' (or one detector's scores') events."""

    def __init__(self, kind: str, signals: tuple[str, ...], bounds: list[float]) -> None:
        self.kind, self.signals = kind, signals
        self.process = EProcess(bounds)
        self.raised_at: int | None = None  # frame count of the last crossing while raised


class _SignalAlarm(_Alarm):
    """Health signals: exact conformal p-values against calibration and the frames learnt since."""

    def __init__(self, kind: str, tests: tuple[tuple[str, str], ...], profile: HealthProfile) -> None:
        self.bags = {s: Bag(profile.values[s]) for s, _ in tests}
        which, low, levels = [], [], []
        for i, (_, sides) in enumerate(tests):
            for side in ("low", "high"):
                if sides in ("both", side):
                    which += [i] * len(LEVELS)
                    low += [side == "low"] * len(LEVELS)
                    levels += list(LEVELS)
        self._which, self._low, self._levels = np.array(which), np.array(low), np.array(levels)
        super().__init__(kind, tuple(s for s, _ in tests), levels)

    def hits(self, signals: dict[str, float], rng: np.random.Generator) -> np.ndarray | None:
        values = [signals.get(s, math.nan) for s in self.signals]
        if not all(v is not None and math.isfinite(v) for v in values):
            return None  # no bet on a frame that misses a signal
        p = np.array([self.bags[s].p_low(v, rng.random()) for s, v in zip(self.signals, values, strict=True)])
        if self.raised_at is None:  # a changed view must not become the reference
            for s, v in zip(self.signals, values, strict=True):
                self.bags[s].add(v)
        p = p[self._which]
        return np.where(self._low, p, 1.0 - p) <= self._levels


class _ScoreAlarm(_Alarm):
    """OK parts' scores of one detector above fixed calibration ranks (bounds hold with 1 - delta)."""

    def __init__(self, detector: str, calibration: np.ndarray, delta: float) -> None:
        cal = np.sort(calibration[np.isfinite(calibration)])
        n = cal.size
        ranks = sorted({max(1, math.floor(level * (n + 1))) for level in SCORE_LEVELS})
        self._cutoffs = np.array([cal[n - j] for j in ranks])
        super().__init__("score", (detector,), [exceedance_bound(j, n, delta) for j in ranks])

    def hits(self, score: float) -> np.ndarray:
        return score > self._cutoffs


@dataclass
class AlarmEvent:
    kind: str  # lighting | focus | camera | score
    name: str  # what the engineer reads: "lighting changed", ...
    state: str  # raised | cleared
    detail: str
    at: float


class DriftMonitor:
    """Anytime-valid drift alarms over one lane's frames; `update` returns the alarms raised or
    cleared by a frame. lam: P(any false alarm, ever) <= 1 / lam under no change."""

    def __init__(self, profile: HealthProfile, lam: float = LAMBDA, seed: int = 0) -> None:
        self.profile, self.lam = profile, lam
        self._rng = np.random.default_rng(seed)  # the conformal p-values' tie-breaks
        self._signal_alarms = [_SignalAlarm(k, v, profile) for k, v in TESTS.items()]
        scores = {d: s for d, s in profile.scores.items() if np.isfinite(s).sum() >= MIN_SCORES}
        # Every signal and detector is one family of bets (a martingale of its own): Ville for each at
        # T = 2 m lam, and the score ranks' calibration bounds share the other half of 1 / lam.
        m = sum(len(a.signals) for a in self._signal_alarms) + len(scores)
        self.level = 2.0 * lam * m
        delta = 1.0 / (2.0 * lam * max(1, len(scores) * len(SCORE_LEVELS)))
        self._score_alarms = {d: _ScoreAlarm(d, s, delta) for d, s in scores.items()}
        self._recent = {s: deque(maxlen=SHOWN) for a in self._signal_alarms for s in a.signals}
        self._medians = {s: float(np.median(v[np.isfinite(v)])) if np.isfinite(v).any() else math.nan
                         for s, v in profile.values.items()}
        self.frames = 0
        self.open: dict[str, AlarmEvent] = {}

    @property
    def _alarms(self) -> list[_Alarm]:
        return [*self._signal_alarms, *self._score_alarms.values()]

    def update(self, signals: dict[str, float] | None, detector: str | None = None, status: str | None = None,
               score: float | None = None, at: float | None = None) -> list[AlarmEvent]:
        at = time.time() if at is None else at
        self.frames += 1
        out: list[AlarmEvent] = []
        if signals is not None:
            for s, dq in self._recent.items():
                v = signals.get(s)
                if v is not None and math.isfinite(v):
                    dq.append(v)
            for alarm in self._signal_alarms:
                hits = alarm.hits(signals, self._rng)
                if hits is not None:
                    alarm.process.update(hits)
                    out += self._transition(alarm, at)
        scored = self._score_alarms.get(detector or "")
        if scored is not None and status == "ok" and score is not None and math.isfinite(score):
            scored.process.update(scored.hits(score))
            out += self._transition(scored, at)
        return out

    def _transition(self, alarm: _Alarm, at: float) -> list[AlarmEvent]:
        e = alarm.process.value
        if e >= self.level:
            alarm.process.restart()
            alarm.raised_at = self.frames
            if alarm.kind not in self.open:
                self.open[alarm.kind] = AlarmEvent(alarm.kind, ALARMS[alarm.kind], "raised", self._detail(alarm, e), at)
                return [self.open[alarm.kind]]
        elif alarm.raised_at is not None and self.frames - alarm.raised_at >= CLEAR_AFTER:
            alarm.raised_at = None
            if alarm.kind in self.open and not any(a.raised_at is not None for a in self._alarms
                                                   if a.kind == alarm.kind):
                del self.open[alarm.kind]
                return [AlarmEvent(alarm.kind, ALARMS[alarm.kind], "cleared", self._detail(alarm, e), at)]
        return []

    def _detail(self, alarm: _Alarm, e: float) -> str:
        evidence = f"evidence {min(e, 1e300):.3g} (raised at {self.level:.3g}: false alarm rate 1/{self.lam:g})"
        if alarm.kind == "score":
            return f"OK parts of {alarm.signals[0]} score higher than at calibration; {evidence}"
        parts = []
        for s in alarm.signals:
            recent = self._recent[s]
            now = f"{float(np.median(recent)):.3g}" if recent else "-"
            parts.append(f"{s} median {now} (calibrated {self._medians.get(s, math.nan):.3g})")
        return ", ".join(parts) + f"; {evidence}"


# ---------------------------------------------------------------------------------------------
# In `inspect watch`: one DriftHub per run, one LaneDrift per lane


@dataclass
class Health:
    """A frame's signals, measured when it is decoded, against the profile of the detector's bundle."""

    signals: dict[str, float]
    profile: HealthProfile

    def json(self) -> str:
        return json.dumps({k: round(v, 6) if math.isfinite(v) else None for k, v in self.signals.items()})


class DriftHub:
    """Frame health and drift alarms for one `inspect watch` run: a LaneDrift per lane measures each
    frame when it is decoded; `on_commit` (a commit hook) feeds the committed rows, in commit order,
    to their lane's monitor. Alarms go to the events table of results.db and to the console. A failure
    here costs a warning, never a frame or its row."""

    MAX_PENDING = 100_000  # measured frames whose row has not come yet (never committed: bounded)

    def __init__(self, out: Path, store: ResultStore, lam: float = LAMBDA) -> None:
        self.out, self.store, self.lam = out, store, lam
        self._pending: dict[tuple[str, int, int], tuple[LaneDrift, Health]] = {}
        self._lanes: dict[Path, LaneDrift] = {}
        self._lock = threading.Lock()
        self._failed = False

    def lane(self, folders: list[Path]) -> LaneDrift:
        lane = LaneDrift(self, [str(f) for f in folders])
        self._lanes.update(dict.fromkeys(folders, lane))
        return lane

    def held(self, folder: Path, product: str | None = None) -> str | None:
        """The names of the lighting, focus and camera alarms open for a camera folder and product ("; "-joined),
        or None. Read by the folder's own lane at commit, the thread that opens and clears them."""
        lane = self._lanes.get(folder)
        monitor = None if lane is None else lane.monitors.get(product)
        open_ = {} if monitor is None else monitor.open
        return "; ".join(ALARMS[k] for k in HOLD_KINDS if k in open_) or None

    def on_commit(self, rows: list[Record]) -> None:
        try:
            with self._lock:
                found = [(self._pending.pop((r.path, r.size, r.mtime_ns), None), r) for r in rows]
            events: list[tuple[str, AlarmEvent]] = []
            for entry, row in found:
                if entry is not None and row.status != "error":
                    lane, health = entry
                    events += [(lane.where(row.product), e) for e in lane.observe(health, row)]
            if events:
                self.store.add_events([(e.at, e.kind, e.name, e.state, e.detail, where) for where, e in events])
                for where, e in events:
                    level = logging.WARNING if e.state == "raised" else logging.INFO
                    log.log(level, f"ALARM {e.name}: {e.state} on {where} ({e.detail})")
        except Exception as exc:
            self.fail(exc)

    def remember(self, key: tuple[str, int, int], lane: LaneDrift, health: Health) -> None:
        with self._lock:
            if len(self._pending) >= self.MAX_PENDING:
                self._pending.pop(next(iter(self._pending)))
            self._pending[key] = (lane, health)

    def publish_bands(self, folder: str, profile: HealthProfile) -> None:
        """The calibrated bands the station page draws behind the health signals."""
        bands = {k: list(v) for k, v in profile.bands().items()}

        def update(data: dict) -> None:
            data.setdefault("lanes", {})[folder] = bands
            data["bands"] = bands
        self._update_station(update)

    def publish_guarantee(self, folders: list[str], detector: str, sentence: str) -> None:
        """What the threshold of a camera's detector guarantees (threshold.describe_bound), for the page."""
        def update(data: dict) -> None:
            for folder in folders:
                data.setdefault("guarantees", {}).setdefault(folder, {})[detector] = sentence
        self._update_station(update)

    def _update_station(self, update: Callable[[dict], None]) -> None:
        """OUT/station.json (store.BANDS_FILE), what the station page reads beside results.db, replaced whole."""
        path = self.out / BANDS_FILE
        with self._lock:
            try:
                data = json.loads(path.read_text()) if path.is_file() else {}
            except (OSError, ValueError):
                data = {}
            if not (isinstance(data, dict) and all(isinstance(data.get(k, {}), dict) for k in ("lanes", "guarantees"))):
                data = {}  # not ours, or damaged: written afresh
            update(data)
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(data, indent=1))
            os.replace(tmp, path)

    def fail(self, exc: BaseException) -> None:
        if not self._failed:
            self._failed = True
            log.warning(f"frame health and drift alarms failed: {type(exc).__name__}: {exc}")


class LaneDrift:
    """One lane's monitors, one per product (its folders share a bundle per product, so one calibration to
    compare to): a changeover starts watching the new product's frames, it is not a drift."""

    def __init__(self, hub: DriftHub, folders: list[str]) -> None:
        self.hub, self.folders, self.folder = hub, folders, ", ".join(folders)
        self.monitors: dict[str | None, DriftMonitor] = {}
        self._said: set[tuple[str, str]] = set()  # (detector, guarantee) published for the station

    def where(self, product: str | None) -> str:
        """The camera folder(s), and the product: how alarms and bands name what they watch."""
        return self.folder if product is None else f"{self.folder} [{product}]"

    def scored_by(self, detector: str, guarantee: str | None) -> None:
        """A detector scored this lane's frames (its score thread): the station shows what its threshold
        guarantees, published once per detector and sentence."""
        if guarantee and (detector, guarantee) not in self._said:
            self._said.add((detector, guarantee))
            try:
                self.hub.publish_guarantee(self.folders, detector, guarantee)
            except Exception as exc:
                self.hub.fail(exc)

    def measure(self, key: tuple[str, int, int], frame: np.ndarray, profile: HealthProfile | None
                ) -> Health | None:
        """Called from the decode threads with the profile of the lane's detectors (None: no health)."""
        if profile is None:
            return None
        try:
            signals = measure(frame, profile.reference)
        except Exception as exc:  # an odd frame must not cost its row
            self.hub.fail(exc)
            return None
        health = Health(signals, profile)
        self.hub.remember((storable(key[0]), key[1], key[2]), self, health)  # the path as its row will hold it
        return health

    def observe(self, health: Health, row: Record) -> list[AlarmEvent]:
        monitor = self.monitors.get(row.product)
        if monitor is None or monitor.profile is not health.profile:
            monitor = self.monitors[row.product] = DriftMonitor(health.profile, self.hub.lam)
            self.hub.publish_bands(self.where(row.product), health.profile)
        return monitor.update(health.signals, row.detector, row.status, row.score, row.scored_at)
