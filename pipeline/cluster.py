"""Choosing the Dask cluster, and computing with a progress bar.

tileseg never schedules tiles itself: per-chunk work is a Dask graph, computed by
whatever ``dask.distributed`` client is current, or by Dask's local scheduler when there
is none. :func:`dask_client` picks the cluster from :class:`~pipeline.config.DaskConfig`:

1. ``scheduler_address`` set: connect to that scheduler (dask-jobqueue, Kubernetes, a
   ``dask scheduler`` started by hand, ...) and leave it running afterwards;
2. else, with worker processes, ``gpu_workers: auto`` and GPUs present: one worker
   process per GPU, each seeing only its own GPU (``CUDA_VISIBLE_DEVICES``) and offering
   the resource ``GPU=1``; U-Net inference tasks ask for that resource
   (:func:`gpu_workers_present`), so each GPU runs one inference task at a time;
3. else, with ``scheduler: auto`` (the default) or ``threads``: no cluster at all, Dask's
   threaded scheduler in this process with ``n_workers`` x ``threads_per_worker`` threads.
   Its cost per task is far lower (no scheduler round trip, no pickling, no worker
   start-up), which the benchmarks showed bounding every stage on one machine (README
   "Performance"); there is no dashboard;
4. else (``scheduler: distributed``) a ``LocalCluster`` of ``n_workers`` x ``threads_per_worker``.

Workers of an existing cluster may offer ``GPU`` resources too (``dask worker
--resources GPU=1``); the U-Net tasks then ask for them in the same way.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from typing import Any

import dask

from pipeline.config import DaskConfig
from pipeline.errors import ChunkError, TilesegError, io_failure
from pipeline.io.files import usable_cpus

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


def gpu_count() -> int:
    """Number of CUDA GPUs visible to this process (``torch.cuda.device_count()``).

    Without an NVIDIA driver (no ``/dev/nvidiactl``) it is 0 without importing torch,
    which takes seconds.
    """
    if not os.path.exists("/dev/nvidiactl"):
        return 0
    import torch

    return int(torch.cuda.device_count())


def gpu_worker_specs(n_gpus: int, cfg: DaskConfig, visible: str | None = None) -> dict[str, dict[str, Any]]:
    """``SpecCluster`` worker specs: one ``Nanny`` worker process per GPU.

    Worker ``gpu-<i>`` sees only GPU i (``CUDA_VISIBLE_DEVICES`` set to the i-th entry of
    ``visible``, this process's own ``CUDA_VISIBLE_DEVICES``, or to ``i``), so ``cuda``
    inside it is that GPU, and offers the resource ``GPU=1``. Threads and memory limit per
    worker come from ``cfg``.
    """
    from distributed import Nanny

    ids = [v.strip() for v in visible.split(",")] if visible else [str(i) for i in range(n_gpus)]
    return {
        f"gpu-{i}": {
            "cls": Nanny,
            "options": {
                "nthreads": cfg.threads_per_worker,
                "memory_limit": cfg.memory_limit,
                "resources": {"GPU": 1},
                "env": {"CUDA_VISIBLE_DEVICES": ids[i]},
                "silence_logs": logging.CRITICAL,
            },
        }
        for i in range(n_gpus)
    }


def gpu_workers_present(client: Any | None = None) -> bool:
    """True when the current (or given) client's cluster has a worker offering a ``GPU`` resource."""
    client = client or current_client()
    if client is None:
        return False
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    return any((w.get("resources") or {}).get("GPU", 0) > 0 for w in workers.values())


def _gpu_cluster(cfg: DaskConfig) -> Any | None:
    """A SpecCluster of GPU workers (:func:`gpu_worker_specs`) when ``cfg`` allows one and GPUs are present."""
    if cfg.gpu_workers == "off" or not cfg.processes:
        return None
    n = gpu_count()
    if n == 0:
        return None
    from distributed import Scheduler, SpecCluster

    log.info("%d GPU(s): one Dask worker per GPU, each with the resource GPU=1", n)
    return SpecCluster(
        workers=gpu_worker_specs(n, cfg, os.environ.get("CUDA_VISIBLE_DEVICES")),
        scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0"}},
        silence_logs=logging.CRITICAL,
    )


def resolved_scheduler(cfg: DaskConfig) -> str:
    """``cfg.scheduler``, with ``auto`` resolved: ``distributed`` when a scheduler address is
    given or tileseg would start GPU workers (``gpu_workers: auto``, worker processes, GPUs
    present), else ``threads`` (on one CPU machine the threaded scheduler ran every benchmark
    case faster than a LocalCluster of processes: README "Performance")."""
    if cfg.scheduler != "auto":
        return cfg.scheduler
    if cfg.scheduler_address or (cfg.gpu_workers == "auto" and cfg.processes and gpu_count() > 0):
        return "distributed"
    return "threads"


#: Seconds to wait for an existing scheduler (``dask.scheduler_address``) to answer.
CONNECT_TIMEOUT_S = 20


@contextmanager
def dask_client(cfg: DaskConfig) -> Iterator[Any]:
    """Start (or connect to) the Dask cluster described by ``cfg`` for the duration of a block.

    With ``cfg.scheduler_address`` it connects to that scheduler and leaves it running
    afterwards; otherwise it starts one worker per GPU when there are GPUs (see the module
    docstring), else a ``LocalCluster``, and closes it at the end. The dashboard link is logged.
    With ``cfg.scheduler == "threads"`` (the default ``auto`` on a machine without GPUs and
    without a scheduler address, see :func:`resolved_scheduler`) it starts nothing and yields
    None: Dask's threaded scheduler runs the block's computations (``n_workers *
    threads_per_worker`` threads).

    Raises:
        ClusterError: the scheduler cannot be reached.
    """
    from distributed import Client, LocalCluster

    if resolved_scheduler(cfg) == "threads":  # no cluster: Dask's local threaded scheduler (compute() uses it)
        n = cfg.n_workers * cfg.threads_per_worker
        log.info("Dask: threaded scheduler in this process, %d threads", n)
        with dask.config.set(scheduler="threads", num_workers=n):
            yield None
        return
    # distributed logs every scheduler, nanny and worker event at INFO; a run shows warnings only
    dlog = logging.getLogger("distributed")
    level = dlog.level
    dlog.setLevel(logging.WARNING)
    cluster = None
    try:
        try:
            if cfg.scheduler_address:
                log.info("Dask: connecting to the scheduler at %s (up to %d s)", cfg.scheduler_address,
                         CONNECT_TIMEOUT_S)  # fmt: skip
                client = Client(cfg.scheduler_address, timeout=f"{CONNECT_TIMEOUT_S}s")
                if not client.scheduler_info().get("workers"):
                    log.warning("the Dask scheduler at %s has no workers yet: the stages wait until workers join "
                                "(`dask worker %s`, or the cluster's autoscaling)", cfg.scheduler_address,
                                cfg.scheduler_address)  # fmt: skip
            elif (cluster := _gpu_cluster(cfg)) is not None:
                client = Client(cluster)
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


class _LogLines:
    """A stream for Dask's progress bars when stdout is not a terminal (a log file, a pipe,
    a Prefect worker's log): a redraw (``\r`` + bar) becomes a line of its own at most every
    :data:`LOG_PROGRESS_EVERY_S` (and at 100 %), instead of thousands of redraws joined into
    one line; erase codes are dropped. The bars keep their own redraw interval, so a stage
    ends when its work does (a 10 s interval made Dask's bar wait for its timer thread)."""

    def __init__(self, out: Any) -> None:
        import time

        self._out, self._clock, self._last = out, time.monotonic, float("-inf")

    def write(self, text: str) -> int:
        if text.startswith("\r"):
            now = self._clock()
            if now - self._last >= LOG_PROGRESS_EVERY_S or "100%" in text:
                self._last = now
                self._out.write(text[1:] + "\n")
        elif text.strip() and not text.startswith("\33["):
            self._out.write(text)
        return len(text)

    def flush(self) -> None:
        self._out.flush()


#: Seconds between two progress lines when stdout is not a terminal (see :class:`_LogLines`).
LOG_PROGRESS_EVERY_S = 10.0


def _killed(exc: BaseException, label: str) -> ChunkError:
    """distributed's ``KilledWorker`` (a task's workers died ``allowed_failures + 1`` times) as
    a one-line :class:`ChunkError` naming the computation and the chunk, (y, x) as in
    :func:`pipeline.apply.chunk_error`, and the usual causes."""
    task, last, allowed = exc.args[:3] if len(exc.args) >= 3 else (exc.args[0] if exc.args else "?", "?", 0)
    where = f"chunk {tuple(task[-2:])} of {task[0]}" if isinstance(task, tuple) and len(task) >= 3 else f"task {task}"
    n = int(allowed) + 1
    return ChunkError(
        f"{label}: {n} Dask worker{'s' if n > 1 else ''} died running {where} (the last: "
        f"{getattr(last, 'address', last)}), so the scheduler gave up on it: out of memory (raise "
        "dask.memory_limit, or lower ingest.chunk_size), or stopped; the workers' logs say which"
    )


def _compute_in_order(objs: tuple[Any, ...], label: str, progress: bool) -> tuple[Any, ...]:
    client = current_client()
    if progress:
        print(f"[tileseg] {label}", flush=True)
    terminal = sys.stdout.isatty()
    if client is not None:
        futures = client.compute(list(objs))
        try:
            if progress:
                from contextlib import redirect_stdout

                from distributed import progress as dprogress

                if terminal:
                    dprogress(futures, notebook=False)
                    print(flush=True)
                else:  # distributed's bar writes to sys.stdout itself
                    with redirect_stdout(_LogLines(sys.stdout)):
                        dprogress(futures, notebook=False)
            return tuple(client.gather(futures))
        except BaseException as exc:
            from distributed import KilledWorker

            _settle(client, futures)
            if not isinstance(exc, KilledWorker):
                raise
            failure = _killed(exc, label)
        raise failure  # outside `except`: a plain one-line error
    if progress:
        from dask.diagnostics import ProgressBar

        ctx: Any = ProgressBar(minimum=0.5, out=None if terminal else _LogLines(sys.stdout))
    else:
        ctx = nullcontext()
    if dask.config.get("scheduler", None) not in (None, "threads", "threading"):
        with ctx:
            return dask.compute(*objs)
    # Dask's threaded scheduler returns on the first failed task while its pool still runs
    # others; a private pool is shut down (waiting for those, cancelling queued ones) before
    # the error reaches the caller, which may then delete the partial output they write to.
    pool = ThreadPoolExecutor(dask.config.get("num_workers", None) or usable_cpus())
    try:
        with ctx:
            return dask.compute(*objs, scheduler="threads", pool=pool)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
