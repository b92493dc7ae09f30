"""Logging: library modules log through the standard `logging` module, each under its own name in the
`diffinspect` hierarchy (`logging.getLogger(__name__)`); the command line shows those records on its
rich console. Tests read them with pytest's caplog, notebooks with any handler they like."""

from __future__ import annotations

import logging

from rich.console import Console
from rich.text import Text

ROOT = "diffinspect"


class ConsoleHandler(logging.Handler):
    """One plain line a record on a rich console: no markup is read from messages ("[openvino:CPU]" is
    text), warnings start with "warning:". Printing through the console keeps a live progress bar below
    the lines."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = Text(self.format(record))
            if record.levelno >= logging.WARNING:
                line = Text.assemble(("warning: ", "yellow"), line)
            # soft_wrap: the terminal wraps a long line, so a path or a copied command stays whole
            self.console.print(line, soft_wrap=True, highlight=False)
        except Exception:  # noqa: BLE001 - logging's own rule: a failing handler never ends the program
            self.handleError(record)


def show_on(console: Console, level: int = logging.INFO) -> None:
    """Show diffinspect's log records on `console` (the CLI's stderr), one plain line each."""
    logger = logging.getLogger(ROOT)
    logger.handlers[:] = [ConsoleHandler(console)]
    logger.setLevel(level)
