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
from pipeline.errors import TilesegError

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


def compute(*objs: Any, label: str, progress: bool = True) -> tuple[Any, ...]:
    """Compute Dask collections on the current client (or the local scheduler), with a progress bar.

    Returns the computed results in order, like ``dask.compute``.
    """
    client = current_client()
    if progress:
        print(f"[tileseg] {label}", flush=True)
    if client is not None:
        futures = client.compute(list(objs))
        if progress:
            from distributed import progress as dprogress

            dprogress(futures, notebook=False)
            print(flush=True)
        return tuple(client.gather(futures))
    if progress:
        from dask.diagnostics import ProgressBar

        ctx: Any = ProgressBar(minimum=0.5)
    else:
        ctx = nullcontext()
    with ctx:
        return dask.compute(*objs)
