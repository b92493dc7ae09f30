"""What `inspect watch` says besides its log records: one line per frame in quiet (service) mode, warnings
said once per run, and an exception in one line.

Warnings and notices are log records of each module's logger (diffinspect/logs.py shows them). The
per-frame lines are not: they are the watcher's output on stdout, one per committed row whatever the log
level, for a service journal or a pipe to read, while the records go to stderr. So they have their own
small writer here.

Every part of the watcher uses this module, so it imports nothing of line/ (no import circle).
"""

from __future__ import annotations

import logging
import sys
import threading

from diffinspect.logs import stamp
from diffinspect.scoring.record import Record

_lock = threading.Lock()  # lanes commit from their own threads: their lines never interleave


def print_rows(rows: list[Record]) -> None:
    """The quiet mode's line per frame on stdout (a commit hook)."""
    if not rows:
        return
    lines = []
    for r in rows:
        if r.status == "error":
            what = f"error  {r.error}"
        elif r.score is None:  # held unscored: an unknown product
            what = f"{r.status:<6} {r.hold_reason}"
        else:
            via = f" [fallback: {r.fallback_reason}]" if r.fallback_reason else ""
            what = f"{r.status:<6} score={r.score:.4f} thr={r.threshold:.4f} {r.detector}/{r.backend}{via}"
        lines.append(f"{stamp(r.scored_at)} {what} {r.latency_ms:.0f}ms {r.path}")  # paths made storable
    with _lock:
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()


class WarnOnce:
    """`warn_once(log, key, msg)`: a warning said once per run (thread-safe), so a failure that repeats on
    every frame or every pass is said the first time only, under a key such as "overlay:OSError"."""

    def __init__(self) -> None:
        self._said: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, log: logging.Logger, key: str, msg: str) -> None:
        with self._lock:
            if key in self._said:
                return
            self._said.add(key)
        log.warning(msg)


def describe(exc: BaseException) -> str:
    """An exception in one line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
