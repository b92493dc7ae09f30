"""Fakes for the `inspect watch` tests: detectors with a controlled cost, failures and completeness
checks, frame writers, and a subprocess entry point for the crash and signal tests:

    python tests/watch_fakes.py OUT FOLDER [--after keep|move|delete] [--once] [--cost-ms MS] ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from diffinspect.data.image import Preprocess
from diffinspect.scoring.detector import Scored
from diffinspect.store.reader import ResultsReader, count_frames

MARKER = 250  # the last MARKER_ROWS rows of every test frame: a half-written frame lacks them
MARKER_ROWS = 2
THRESHOLD = 100.0  # score = mean brightness of the frame body; above 100 is NG


def frame_bytes(value: int, size: int = 16, ext: str = ".png") -> bytes:
    img = np.full((size, size), value, np.uint8)
    img[-MARKER_ROWS:] = MARKER
    ok, buf = cv2.imencode(ext, img)
    assert ok
    return buf.tobytes()


def write_frame(path: Path, value: int, size: int = 16) -> Path:
    path.write_bytes(frame_bytes(value, size, path.suffix))
    return path


def wait_for(cond, timeout: float = 10.0) -> None:  # noqa: ANN001
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("timed out")
        time.sleep(0.02)


def n_rows(out: Path) -> int:
    """Rows so far, read while the watcher writes (0 before its database exists)."""
    return count_frames(out / "results.db")


def db_rows(out: Path) -> list[dict]:
    """Every row of OUT/results.db in id order, read by the store's reader as the outputs read them."""
    with ResultsReader(out / "results.db") as db:
        return db.rows()


def jsonl_rows(out: Path) -> list[dict]:
    """The lines of the mirror OUT/results.jsonl."""
    with open(out / "results.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class FakeDetector:
    """Score = mean brightness of the body; a few ms per batch; optionally fails, hangs or checks
    that every frame it sees is complete (its marker rows present)."""

    threshold = THRESHOLD
    pixel_threshold = 1.0
    health = None

    def __init__(self, name: str = "diffusion", cost_s: float = 0.002, fail_after: int | None = None,
                 hang_s: float = 0.0, nan: bool = False, check_marker: bool = True,
                 scored_log: str | None = None) -> None:
        self.name = name
        self.backend = "fake" if name == "diffusion" else "copod"
        self.preprocess = Preprocess(color="gray", image_size=8)
        self.cost_s, self.fail_after, self.hang_s, self.nan = cost_s, fail_after, hang_s, nan
        self.check_marker = check_marker
        self.scored_log = scored_log
        self.seen = 0
        self.calls = 0
        self.incomplete = 0
        self.batch_sizes: list[int] = []
        self._lock = threading.Lock()

    def score(self, frames: list[np.ndarray]) -> Scored:
        with self._lock:
            self.calls += 1
            if self.fail_after is not None and self.seen + len(frames) > self.fail_after:
                raise RuntimeError("CUDA error: device lost (fake)")
        if self.hang_s:
            time.sleep(self.hang_s)
        time.sleep(self.cost_s)
        scores = []
        for f in frames:
            assert f.dtype == np.uint8 and f.ndim == 3
            if self.check_marker and f[-MARKER_ROWS:].mean() < MARKER - 10:
                self.incomplete += 1
            scores.append(float("nan") if self.nan else float(f[:-MARKER_ROWS].mean()))
        with self._lock:
            self.seen += len(frames)
            self.batch_sizes.append(len(frames))
        if self.scored_log:  # O_APPEND: one line per call survives a kill -9 whole or not at all
            fd = os.open(self.scored_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.write(fd, f"{len(frames)}\n".encode())
            os.close(fd)
        maps = None if self.name == "copod" else np.zeros((len(frames), 8, 8), np.float32)
        return Scored(np.asarray(scores, np.float64), maps)


class Factory:
    """A detector factory that counts calls and can raise on some of them."""

    def __init__(self, fail_first: int = 0, **kwargs: object) -> None:
        self.kwargs = kwargs
        self.fail_first = fail_first
        self.made: list[FakeDetector] = []
        self.calls = 0

    def __call__(self) -> FakeDetector:
        self.calls += 1
        if self.calls <= self.fail_first:
            raise RuntimeError("no accelerator (fake)")
        det = FakeDetector(**self.kwargs)
        self.made.append(det)
        return det


def main(argv: list[str] | None = None) -> int:
    from diffinspect.line.watch import WatchOptions, run_watch
    from diffinspect.logs import show_stamped

    show_stamped()  # the watcher's warnings on stderr, as `inspect watch --quiet` shows them
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("folders", nargs="+")
    p.add_argument("--after", default="keep")
    p.add_argument("--once", action="store_true")
    p.add_argument("--cost-ms", type=float, default=2.0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--stable-ms", type=float, default=100.0)
    p.add_argument("--scored-log")
    a = p.parse_args(argv)
    primary = Factory(cost_s=a.cost_ms / 1000, scored_log=a.scored_log)
    fallback = Factory(name="copod", cost_s=0.001, scored_log=a.scored_log)
    opts = WatchOptions(batch=a.batch, after=a.after, once=a.once, quiet=True, stable_ms=a.stable_ms,
                        settle_ms=500, empty_ms=300, rescan_seconds=0.5, overlays="none")
    summary = run_watch([Path(f) for f in a.folders], Path(a.out), primary, fallback, opts)
    print(f"SUMMARY frames={summary.frames} fallback={summary.fallback}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
