"""Counters of `inspect watch`: rows by status, rate and latency, for the live view and the summary."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from diffinspect.scoring.record import Record


@dataclass
class WatchSummary:
    scored: int  # frames with a score (ok + ng + hold)
    ok: int
    ng: int
    error: int
    fallback: int  # of the scored frames, those scored by the fallback
    fps: float  # rows per second while scoring: first frame taken to last row committed
    latency_p50_ms: float | None  # first seen -> row written, over the last 100,000 frames
    latency_p99_ms: float | None
    max_queue_depth: int  # high-water mark of the bounded scoring queues
    elapsed_s: float
    hold: int = 0  # scored while an alarm held the camera (on_alarm = "hold")
    uncommitted: int = 0  # --once: frames whose row could not be committed (scored again on the next start)
    archived: int = 0  # rows retention moved from results.db to OUT/archive/
    low_space: bool = False  # OUT was below the free-space floor at the end
    products: dict[str, dict[str, int]] = field(default_factory=dict)  # [watch.products]: rows by status each
    stages: dict[str, float] = field(default_factory=dict)  # ms per frame by stage (scoring/stages.py)

    @property
    def frames(self) -> int:
        return self.scored + self.error


class Stats:
    """Running counts and latencies of committed rows; safe from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts = {"ok": 0, "ng": 0, "error": 0, "hold": 0}
        self.by_product: dict[str, dict[str, int]] = {}  # the same counts per product, for frames that have one
        self.fallback = 0
        self.latencies: deque[float] = deque(maxlen=100_000)
        self.recent: deque[tuple[float, int]] = deque()  # (time, rows) over the last 10 s
        self.first: float | None = None
        self.last: float | None = None
        self.last_ng: str | None = None

    def started(self) -> None:
        with self._lock:
            if self.first is None:
                self.first = time.monotonic()

    def record(self, rows: list[Record]) -> None:
        now = time.monotonic()
        with self._lock:
            for r in rows:
                self.counts[r.status] += 1
                if r.product is not None:
                    counts = self.by_product.setdefault(r.product, dict.fromkeys(self.counts, 0))
                    counts[r.status] += 1
                self.fallback += r.status != "error" and r.fallback_reason is not None
                self.latencies.append(r.latency_ms or 0.0)
                if r.status == "ng":
                    self.last_ng = r.path
            self.last = now
            self.recent.append((now, len(rows)))
            while self.recent and self.recent[0][0] < now - 10:
                self.recent.popleft()

    def rate(self, window: float = 10.0) -> float:
        """Rows per second over the last `window` seconds (or since the first frame, if sooner)."""
        now = time.monotonic()
        with self._lock:
            if self.first is None:
                return 0.0
            span = min(window, now - self.first)
            rows = sum(n for t, n in self.recent if t >= now - window)
        return rows / span if span > 0 else 0.0

    def busy_rate(self) -> float:
        """Rows per second from the first frame taken to the last row committed: what the exit line
        and the live view both call "while scoring"."""
        with self._lock:
            span = (self.last - self.first) if self.first is not None and self.last is not None else 0.0
            return sum(self.counts.values()) / span if span > 0 else 0.0

    def percentiles(self, last: int | None = None) -> tuple[float | None, float | None]:
        with self._lock:
            lat = list(self.latencies)[-last:] if last else list(self.latencies)
        if not lat:
            return None, None
        p50, p99 = np.percentile(np.asarray(lat), [50, 99])
        return float(p50), float(p99)

    def summary(self, max_queue: int, elapsed: float) -> WatchSummary:
        p50, p99 = self.percentiles()
        c = self.counts
        return WatchSummary(scored=c["ok"] + c["ng"] + c["hold"], ok=c["ok"], ng=c["ng"], error=c["error"],
                            fallback=self.fallback, fps=self.busy_rate(),
                            latency_p50_ms=p50, latency_p99_ms=p99, max_queue_depth=max_queue,
                            elapsed_s=elapsed, hold=c["hold"],
                            products={k: dict(v) for k, v in self.by_product.items()})
