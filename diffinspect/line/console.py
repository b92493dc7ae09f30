"""What `inspect watch` tells its user: warnings, one line per frame (quiet/service mode) or a live
table (interactive)."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from diffinspect.scoring.record import Record, storable

if TYPE_CHECKING:  # the view reads lanes and counters; neither needs the console at import time
    from diffinspect.line.counters import Stats
    from diffinspect.line.lane import Lane


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


class View:
    """The live table of the interactive mode."""

    def __init__(self, stats: Stats, lanes: list[Lane], roots: list[Path], queue_size: int,
                 waiting: Callable[[], int]) -> None:
        self.stats, self.lanes, self.roots = stats, lanes, roots
        self.queue_size, self.waiting = queue_size, waiting

    def table(self):  # noqa: ANN201
        from rich.table import Table

        s = self.stats
        p50, p99 = s.percentiles(last=2000)
        c = s.counts
        t = Table(title=f"inspect watch: {', '.join(r.name for r in self.roots)}", show_header=False)
        t.add_column(style="bold")
        t.add_column()
        t.add_row("frames", f"{sum(c.values())}")
        t.add_row("OK / NG / error", f"[green]{c['ok']}[/] / [red]{c['ng']}[/] / [yellow]{c['error']}[/]")
        t.add_row("frames/s, last 10 s / while scoring", f"{s.rate():.1f} / {s.busy_rate():.1f}")
        t.add_row("latency p50 / p99", "-" if p50 is None else f"{p50:.0f} / {p99:.0f} ms")
        t.add_row("scored by fallback", f"{s.fallback}")
        depth = sum(lane.queue.qsize() for lane in self.lanes)
        t.add_row("queue", f"{depth} / {self.queue_size * len(self.lanes)} (+{self.waiting()} waiting)")
        for lane in self.lanes:
            t.add_row(f"detector {', '.join(f.name for f in lane.folders)}", lane.supervisor.state())
        t.add_row("last NG", s.last_ng or "-")
        return t


def describe(exc: BaseException) -> str:
    """An exception in one line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
