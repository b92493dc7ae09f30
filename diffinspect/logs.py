"""Logging: library modules log through the standard `logging` module, each under its own name in the
`diffinspect` hierarchy (`logging.getLogger(__name__)`); the command line shows those records on its
rich console. Tests read them with pytest's caplog, notebooks with any handler they like."""

from __future__ import annotations

import logging

from rich.console import Console

ROOT = "diffinspect"


def show_on(console: Console, level: int = logging.INFO) -> None:
    """Show diffinspect's log records on `console` (the CLI's stderr), one plain line each."""
    from rich.logging import RichHandler

    handler = RichHandler(console=console, show_time=False, show_path=False, markup=False,
                          highlighter=None, keywords=[])
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger(ROOT)
    logger.handlers[:] = [handler]
    logger.setLevel(level)
