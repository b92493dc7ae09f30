"""The CLI shows the library's log records as the plain lines the commands always printed."""

from __future__ import annotations

import io
import logging

from rich.console import Console

from diffinspect.logs import ROOT, show_on


def test_records_show_as_plain_lines_and_warnings_say_so():
    out = io.StringIO()
    logger = logging.getLogger(ROOT)
    saved = logger.handlers[:], logger.level
    try:
        show_on(Console(file=out, width=30))
        logging.getLogger("diffinspect.export.api").info("  model.onnx ok [openvino:CPU, 3.4 s]")
        logging.getLogger("diffinspect.train.api").warning("the model trained only 4 steps")
        logging.getLogger("diffinspect.train.api").debug("not shown at the default level")
    finally:
        logger.handlers[:], logger.level = saved[0], saved[1]
    # no markup read from the message, no wrapping of a long line by rich, one line a record
    assert out.getvalue().splitlines() == ["  model.onnx ok [openvino:CPU, 3.4 s]",
                                           "warning: the model trained only 4 steps"]
