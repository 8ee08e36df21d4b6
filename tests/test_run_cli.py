"""`tileseg run`'s console: Prefect's run tracebacks are left out (the one-line error says
it), while the record stays whole for the handler that sends it to the Prefect server.
The subprocess test of a failing run is in tests/test_deploy.py (it reads the server's logs)."""

from __future__ import annotations

import logging
import sys

from pipeline.errors import InputError


def test_console_formatter_drops_the_traceback_and_leaves_the_record_whole():
    from flows.cli import _WithoutTraceback

    try:
        raise InputError("expression 'B99' uses bands ['B99'] that the raster lacks")
    except InputError:
        record = logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, "Task run failed: %s",
                                   ("InputError",), sys.exc_info())  # fmt: skip
    full = logging.Formatter("%(levelname)s %(message)s").format(record)  # as the API handler formats it
    assert "Traceback" in full and "B99" in full
    short = _WithoutTraceback(logging.Formatter("%(levelname)s %(message)s")).format(record)
    assert short == "ERROR Task run failed: InputError"
    assert record.exc_info is not None and "Traceback" in record.exc_text  # untouched for the other handlers
