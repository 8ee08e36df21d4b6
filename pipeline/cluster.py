"""Choosing the Dask cluster, and computing with a progress bar.

tileseg never schedules tiles itself: per-chunk work is a Dask graph, computed by
whatever ``dask.distributed`` client is current (a LocalCluster started here, or an
existing scheduler named in config), or by Dask's local scheduler when there is none.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import dask

from pipeline.config import DaskConfig
from pipeline.errors import TilesegError, io_failure

log = logging.getLogger("tileseg")


class ClusterError(TilesegError, ConnectionError):
    """The Dask scheduler could not be reached or started."""


def current_client() -> Any | None:
    """The current ``distributed.Client``, or None when none is running."""
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


@contextmanager
def dask_client(cfg: DaskConfig) -> Iterator[Any]:
    """Start (or connect to) the Dask cluster described by ``cfg`` for the duration of a block.

    With ``cfg.scheduler_address`` it connects to that scheduler and leaves it running
    afterwards; otherwise it starts a ``LocalCluster`` and closes it at the end.
    The dashboard link is logged.

    Raises:
        ClusterError: the scheduler cannot be reached.
    """
    from distributed import Client, LocalCluster

    # distributed logs every scheduler, nanny and worker event at INFO; a run shows warnings only
    dlog = logging.getLogger("distributed")
    level = dlog.level
    dlog.setLevel(logging.WARNING)
    cluster = None
    try:
        try:
            if cfg.scheduler_address:
                client = Client(cfg.scheduler_address, timeout="20s")
            else:
                cluster = LocalCluster(
                    n_workers=cfg.n_workers,
                    threads_per_worker=cfg.threads_per_worker,
                    memory_limit=cfg.memory_limit,
                    processes=cfg.processes,
                    dashboard_address=":0",
                    silence_logs=logging.CRITICAL,  # a failing task is reported once, as our one-line error
                )
                client = Client(cluster)
        except OSError as exc:
            where = cfg.scheduler_address or "a LocalCluster"
            raise ClusterError(f"cannot start or reach the Dask scheduler at {where}: {exc}") from None
        log.info("Dask dashboard: %s", client.dashboard_link)
        try:
            yield client
        finally:
            # An in-process scheduler logs the cancelled progress-bar feed of a finished
            # computation as an ERROR while closing; nothing is lost, so hide that one moment.
            logging.getLogger("distributed.scheduler").setLevel(logging.CRITICAL)
            client.close()
    finally:
        if cluster is not None:
            cluster.close()
        logging.getLogger("distributed.scheduler").setLevel(logging.NOTSET)
        dlog.setLevel(level)


def _executing(dask_worker: Any) -> int:
    state = dask_worker.state
    return len(state.executing) + len(state.long_running)


def _settle(client: Any, futures: list[Any], timeout: float = 60.0) -> None:
    """Cancel ``futures`` and wait until no worker is still executing a task (bounded).

    A cancelled task that is already running keeps running on its worker thread; a
    caller that removes a half-written output right after a failure would race with it
    (a chunk written after the removal re-creates the folder). Waiting for the workers
    to go idle closes that window.
    """
    import time

    client.cancel(futures)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if sum(client.run(_executing).values()) == 0:
                return
        except Exception:  # a worker died or the cluster is closing: nothing left to wait for
            return
        time.sleep(0.1)
    log.warning("tasks of a failed computation were still running after %.0f s", timeout)


def compute(*objs: Any, label: str, progress: bool = True, writes: Any = None) -> tuple[Any, ...]:
    """Compute Dask collections on the current client (or the local scheduler), with a progress bar.

    Returns the computed results in order, like ``dask.compute``. When a task fails,
    the remaining tasks are cancelled and running ones are waited for, so that the caller
    can clean up partial outputs safely.

    Args:
        writes: the output the computation writes (a path), named in the error when an
            OS error (disk full, permissions) escapes a task.

    Raises:
        RasterIOError: an OS error while writing ``writes``.
        Whatever a task raised, otherwise.
    """
    try:
        return _compute(objs, label, progress)
    except TilesegError:
        raise
    except OSError as exc:
        if writes is None:
            raise
        failure = io_failure("writing", writes, exc)
    raise failure  # outside `except`: a plain one-line error


def _by_type(objs: tuple[Any, ...]) -> list[int]:
    """Positions of ``objs`` with objects of one collection type next to each other (types
    in order of first appearance, objects in order within a type).

    Dask 2026.8 returns the results of a mixed ``compute(array, delayed, array)`` grouped
    by type (array, array, delayed) instead of in argument order; with the objects
    already grouped that way, the order is right, and :func:`_compute` restores the
    caller's order.
    """
    first: dict[type, int] = {}
    for i, o in enumerate(objs):
        first.setdefault(type(o), i)
    return sorted(range(len(objs)), key=lambda i: (first[type(objs[i])], i))


def _compute(objs: tuple[Any, ...], label: str, progress: bool) -> tuple[Any, ...]:
    order = _by_type(objs)
    results = _compute_in_order(tuple(objs[i] for i in order), label, progress)
    out: list[Any] = [None] * len(objs)
    for pos, i in enumerate(order):
        out[i] = results[pos]
    return tuple(out)


def _compute_in_order(objs: tuple[Any, ...], label: str, progress: bool) -> tuple[Any, ...]:
    client = current_client()
    if progress:
        print(f"[tileseg] {label}", flush=True)
    if client is not None:
        futures = client.compute(list(objs))
        try:
            if progress:
                from distributed import progress as dprogress

                dprogress(futures, notebook=False)
                print(flush=True)
            return tuple(client.gather(futures))
        except BaseException:
            _settle(client, futures)
            raise
    if progress:
        from dask.diagnostics import ProgressBar

        ctx: Any = ProgressBar(minimum=0.5)
    else:
        ctx = nullcontext()
    with ctx:
        return dask.compute(*objs)
