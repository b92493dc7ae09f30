"""What `inspect watch` tells its user: warnings and, in quiet (service) mode, one line per frame.

Every part of the watcher says things, so this module imports nothing of line/ (no import circle).
"""

from __future__ import annotations

import sys
import threading
import time

from diffinspect.scoring.record import Record, storable


class Say:
    """Warnings and (in quiet mode) one line per frame; safe from any thread."""

    def __init__(self, quiet: bool) -> None:
        from rich.console import Console

        self.quiet = quiet
        self.console = Console(stderr=True)
        self._lock = threading.Lock()
        self._once: set[str] = set()

    def warn(self, msg: str) -> None:
        msg = storable(msg)  # a file name that is not UTF-8 must not break the console
        if self.quiet:
            self._line(sys.stderr, f"{_now()} WARNING {msg}")
        else:
            # escaped: file names and receivers' error texts may hold brackets rich would read as markup
            self.console.print(f"[yellow]warning:[/] {_escape(msg)}", highlight=False, soft_wrap=True)

    def warn_once(self, key: str, msg: str) -> None:
        if key not in self._once:
            self._once.add(key)
            self.warn(msg)

    def info(self, msg: str) -> None:
        msg = storable(msg)
        if self.quiet:
            self._line(sys.stderr, f"{_now()} INFO {msg}")
        else:
            self.console.print(_escape(msg), highlight=False, soft_wrap=True)

    def rows(self, rows: list[Record]) -> None:
        if not self.quiet or not rows:
            return
        lines = []
        for r in rows:
            if r.status == "error":
                what = f"error  {r.error}"
            elif r.score is None:  # held unscored: an unknown product
                what = f"{r.status:<6} {r.hold_reason}"
            else:
                via = f" [fallback: {r.fallback_reason}]" if r.fallback_reason else ""
                what = (f"{r.status:<6} score={r.score:.4f} thr={r.threshold:.4f} "
                        f"{r.detector}/{r.backend}{via}")
            lines.append(f"{_now(r.scored_at)} {what} {r.latency_ms:.0f}ms {r.path}")
        self._line(sys.stdout, "\n".join(lines))

    def _line(self, stream, text: str) -> None:  # noqa: ANN001
        with self._lock:
            stream.write(text + "\n")
            stream.flush()


def _now(t: float | None = None) -> str:
    t = time.time() if t is None else t
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1000):03d}"


def describe(exc: BaseException) -> str:
    """An exception in one line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
