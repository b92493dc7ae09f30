"""How the library speaks to its user: log records and progress.

Library modules log through the standard `logging` module, each under its own name in the `diffinspect`
hierarchy (`logging.getLogger(__name__)`). The command line shows those records on its rich console
(`show_on`), or, for a service such as `inspect watch --quiet`, as time-stamped plain lines on stderr
(`show_stamped`). Tests read them with pytest's caplog, notebooks with any handler they like.

Long work reports progress through one callback convention, `Progress`; the command line draws it as a
bar, a library caller may pass anything callable or nothing.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Protocol, TextIO

if TYPE_CHECKING:
    from rich.console import Console

ROOT = "diffinspect"


class Progress(Protocol):
    """`progress(task, done, total, **detail)`: `done` of `total` units of the named task (total None: of
    unknown length); detail holds named figures such as loss=0.012 or seconds=31.5 (on the run's clock)."""

    def __call__(self, task: str, done: int, total: int | None, **detail: float) -> None: ...


def storable(text: str | None) -> str | None:
    """Text a log line, SQLite and JSON can hold. A file name that is not valid UTF-8 reaches Python with
    its bad bytes as lone surrogates, which sqlite3 and a UTF-8 stream refuse; those bytes are written as
    \\xNN instead, so the name stays readable and distinct (a frame's identity also holds its size and
    mtime_ns)."""
    if text is None:
        return None
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return os.fsencode(text).decode("utf-8", "backslashreplace")
    except UnicodeError:  # a lone surrogate that no file name produced
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def stamp(t: float | None = None) -> str:
    """Local time to the millisecond, as the lines of a service log start: 2026-03-01T06:00:00.125."""
    t = time.time() if t is None else t
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1000):03d}"


class ConsoleHandler(logging.Handler):
    """One plain line a record on a rich console: no markup is read from messages ("[openvino:CPU]" is
    text), warnings start with "warning:". Printing through the console keeps a live progress bar or
    table below the lines."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        from rich.text import Text

        try:
            line = Text(storable(self.format(record)))
            if record.levelno >= logging.WARNING:
                line = Text.assemble(("warning: ", "yellow"), line)
            # soft_wrap: the terminal wraps a long line, so a path or a copied command stays whole
            self.console.print(line, soft_wrap=True, highlight=False)
        except Exception:  # noqa: BLE001 - logging's own rule: a failing handler never ends the program
            self.handleError(record)


class StampedHandler(logging.StreamHandler):
    """`2026-03-01T06:00:00.125 WARNING message`: a service log's line a record, on `stream`, or on
    stderr as it is when the record comes (redirected, or captured by a test)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream)
        self.fixed = stream

    def format(self, record: logging.LogRecord) -> str:
        return f"{stamp(record.created)} {record.levelname} {storable(record.getMessage())}"

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = self.fixed or sys.stderr  # under the handler's lock: handle() holds it
        super().emit(record)


def show_on(console: Console, level: int = logging.INFO) -> None:
    """Show diffinspect's log records on `console` (the CLI's stderr), one plain line each."""
    _show(ConsoleHandler(console), level)


def show_stamped(stream: TextIO | None = None, level: int = logging.INFO) -> None:
    """Show diffinspect's log records as time-stamped lines on `stream` (default: stderr)."""
    _show(StampedHandler(stream), level)


def _show(handler: logging.Handler, level: int) -> None:
    logger = logging.getLogger(ROOT)
    logger.handlers[:] = [handler]
    logger.setLevel(level)


def console() -> Console:
    """The console diffinspect's records show on (a live view draws there, so the lines appear above it);
    a fresh stderr console where none does."""
    from rich.console import Console

    for handler in logging.getLogger(ROOT).handlers:
        if isinstance(handler, ConsoleHandler):
            return handler.console
    return Console(stderr=True)
