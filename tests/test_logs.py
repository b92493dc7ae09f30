"""The CLI shows the library's log records as the plain lines the commands always printed."""

from __future__ import annotations

import io
import logging

import pytest
from rich.console import Console

from diffinspect.logs import ROOT, show_on, show_stamped


@pytest.fixture(autouse=True)
def _root_logger_restored():
    """Each test points diffinspect's root logger at its own output: put back its handlers and level after."""
    logger = logging.getLogger(ROOT)
    saved = logger.handlers[:], logger.level
    yield
    logger.handlers[:], logger.level = saved


def test_records_show_as_plain_lines_and_warnings_say_so():
    out = io.StringIO()
    show_on(Console(file=out, width=30))
    logging.getLogger("diffinspect.export.api").info("  model.onnx ok [openvino:CPU, 3.4 s]")
    logging.getLogger("diffinspect.train.api").warning("the model trained only 4 steps")
    logging.getLogger("diffinspect.train.api").debug("not shown at the default level")
    # no markup read from the message, no wrapping of a long line by rich, one line a record
    assert out.getvalue().splitlines() == ["  model.onnx ok [openvino:CPU, 3.4 s]",
                                           "warning: the model trained only 4 steps"]


def test_service_lines_are_time_stamped_and_keep_a_bad_file_name_readable():
    import os
    import re

    out = io.StringIO()
    bad = os.fsdecode(b"/cam/bad\xff.png")  # a name that is not UTF-8, as Python reads it
    show_stamped(out)
    logging.getLogger("diffinspect.line.commit").warning(f"could not move {bad}: [Errno 28]")
    logging.getLogger("diffinspect.line.supervisor").info("diffusion detector ready (fake)")
    logging.getLogger("diffinspect.line.watch").debug("not shown at the default level")
    lines = out.getvalue().splitlines()
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}"
    assert len(lines) == 2
    assert re.fullmatch(stamp + r" WARNING could not move /cam/bad\\xff\.png: \[Errno 28\]", lines[0]), lines[0]
    assert re.fullmatch(stamp + r" INFO diffusion detector ready \(fake\)", lines[1]), lines[1]


def test_the_console_prints_a_bad_file_name_readably():
    import os

    out = io.StringIO()
    show_on(Console(file=out, width=80))
    logging.getLogger("diffinspect.line.commit").warning(os.fsdecode(b"overlay of bad\xfe.png not written"))
    assert out.getvalue().splitlines() == ["warning: overlay of bad\\xfe.png not written"]


def test_warn_once_says_a_key_once_per_run(caplog):
    from diffinspect.line.say import WarnOnce

    log = logging.getLogger("diffinspect.line.commit")
    run1, run2 = WarnOnce(), WarnOnce()
    for _ in range(3):
        run1(log, "overlay:OSError", "overlay not written (OSError: disk full)")
    run1(log, "db:OSError", "cannot commit results")
    run2(log, "overlay:OSError", "overlay not written (OSError: disk full)")
    assert caplog.messages == ["overlay not written (OSError: disk full)", "cannot commit results",
                               "overlay not written (OSError: disk full)"]


def test_the_cli_bar_draws_every_progress_call_as_a_row_per_task():
    from diffinspect.cli import _Bar

    with _Bar(minutes=10) as bar:
        bar("training", 30, None, loss=0.0125, seconds=12.0)
        bar("reading [good] images", 1, 2)  # a name with brackets is text, not markup
        bar("reading [good] images", 2, 2)
        rows = {t.description: t for t in bar.bar.tasks}
    assert rows["training"].total is None and rows["training"].completed == 30
    assert rows["training"].fields["info"] == "loss 0.0125  2.50 it/s  0.2/10 min"
    assert rows["reading \\[good] images"].finished and rows["reading \\[good] images"].fields["info"] == ""
