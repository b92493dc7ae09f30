"""Where a frame's time goes: seconds per pipeline stage, summed over a run, as data.

A stage is timed with one `perf_counter` pair per frame or batch, never per pixel and never as a log
line, so the clock stays on. `inspect watch` keeps one clock per run (its summary's `stages`), and
bench/throughput.py reads it to say which stage to work on next.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

# In the order a frame meets them.
DECODE = "decode"  # read the file and decode it to uint8 pixels
HEALTH = "health"  # the frame's health signals for the drift alarms
PREPROCESS = "preprocess"  # colour, ROI, resize (or tiles) to the model input
MODEL = "model"  # the scoring graph on its engine (the COPOD fallback: embedding and scoring)
MAP = "map"  # map post-processing: tiles stitched, scores checked and labelled, p-values, map on the frame grid
FRAME_TERM = "frame term"  # the frame-level term: classical embedding, its score, the fusion
OVERLAY = "overlay"  # render and write the overlay image
COMMIT = "commit"  # the row's transaction, the hooks, the file's disposal
STAGES = (DECODE, HEALTH, PREPROCESS, MODEL, MAP, FRAME_TERM, OVERLAY, COMMIT)


class StageClock:
    """Seconds spent per stage, and the frames done; safe from any thread. A stage only some frames
    meet (overlays, the fallback) is averaged over all frames done: what sizing a line needs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = {}
        self.frames = 0

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def add_all(self, seconds: dict[str, float]) -> None:
        for stage, s in seconds.items():
            self.add(stage, s)

    def count(self, frames: int) -> None:
        """Frames done (in `inspect watch`: rows committed)."""
        with self._lock:
            self.frames += frames

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0)

    def ms_per_frame(self) -> dict[str, float]:
        """Milliseconds per frame done of each stage, in pipeline order. Stages run on different
        threads and overlap, so their sum is the work per frame, not its latency."""
        with self._lock:
            known = [s for s in STAGES if s in self.seconds] + sorted(set(self.seconds) - set(STAGES))
            return {s: 1000 * self.seconds[s] / max(self.frames, 1) for s in known}


class Split:
    """A detector's own split of one batch: `with split(stage):` blocks, read back as `seconds`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0
