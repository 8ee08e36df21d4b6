"""Retries of the I/O stages: only for errors that may pass (a flaky network file system,
an object store that times out), never for bad config or bad input.

Prefect retries a task whose ``retry_condition_fn`` returns True, after the delays in
``retry_delay_seconds`` (Prefect's ``exponential_backoff``: factor x 2**n seconds, with
``retry_jitter_factor`` spreading them). A retried stage starts again from scratch, which
is safe because every stage publishes its outputs under temporary names and renames them
last (see README, "Outputs never look complete when they are not").
"""

from __future__ import annotations

import errno
from typing import Any

from prefect.tasks import exponential_backoff

#: Retries of an I/O stage (ingest reading inputs; stitch and evaluate writing outputs).
IO_RETRIES = 3
#: Delays before retries 1, 2, 3: 10, 20, 40 s (before jitter).
IO_RETRY_DELAYS = exponential_backoff(backoff_factor=10)
#: Jitter: each delay is drawn at random up to 1.5 x its value, averaging the value, so that
#: parallel runs do not retry in lock-step (Prefect's clamped Poisson interval).
IO_RETRY_JITTER = 0.5

#: Errors of the OSError family that do not pass by waiting.
PERMANENT_OS_ERRORS: tuple[type[OSError], ...] = (
    FileNotFoundError,  # includes pipeline.errors.MissingFileError
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
)

#: errno values that waiting does not fix: a full disk or quota, a file size limit, a
#: read-only filesystem, missing permissions (kept by ``pipeline.errors.io_failure``).
PERMANENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def is_transient(exc: BaseException | None) -> bool:
    """Whether a stage that raised ``exc`` is worth running again.

    True for the ``OSError`` family (``pipeline.errors.RasterIOError``, GDAL and zarr
    read or write failures, ``ConnectionError``, ``TimeoutError``) except the permanent
    ones in :data:`PERMANENT_OS_ERRORS`. False for everything else, in particular
    ``ConfigError`` and ``InputError`` (``ValueError``s: the same input fails again).
    """
    if exc is None or not isinstance(exc, OSError):
        return False
    if isinstance(exc, PERMANENT_OS_ERRORS):
        return False
    return exc.errno not in PERMANENT_ERRNOS


def retry_on_io_error(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry when the failed state holds a transient I/O error.

    Args:
        task, task_run: the Prefect task and its run (unused).
        state: the task run's ``Failed`` state; its data (or result) is the raised exception.
    """
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:  # the result cannot be read back: do not guess
            return False
    return is_transient(exc if isinstance(exc, BaseException) else None)


def io_retry_options() -> dict[str, Any]:
    """Keyword arguments of ``@task`` for an I/O stage (retries, backoff, jitter, condition)."""
    return {
        "retries": IO_RETRIES,
        "retry_delay_seconds": IO_RETRY_DELAYS,
        "retry_jitter_factor": IO_RETRY_JITTER,
        "retry_condition_fn": retry_on_io_error,
    }
