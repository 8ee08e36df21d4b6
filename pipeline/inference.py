"""Tiled U-Net inference on Dask: every window of the global grid runs exactly once.

Design note "Windows are owned, then spill over": a window belongs to the chunk that holds
its first in-raster pixel (``max(origin, 0)`` along each axis). Step 1, one task per chunk
(keys ``tileseg-unet-*``), reads the chunk's windows' pixels from the store, runs the model on
them and returns their fixed-point weighted sums (:func:`pipeline.blend.window_sums`) over
the chunk grown by the windows' spill-over (at most ``W - 1`` px to the bottom and right).
Step 2, one task per chunk (keys ``tileseg-blend-*``), adds the parts of the step-1 blocks
that fall on the chunk (its own and those of the chunks above and to the left whose windows
reach into it) and normalises by the summed weights.

The earlier way, "chunk recomputes its windows", ran every window touching a chunk in that
chunk's task, so a window straddling chunk borders ran 2 or 4 times: with 512 px chunks and
256 px windows at 25 % overlap, 16 windows per chunk instead of about 7 (README "Performance").

Because the sums are integers, a pixel's result is bit-identical for every chunking, and
equal to :func:`pipeline.blend.blend_region` on the whole raster.

Axis order: images (band, y, x); probabilities (class, y, x).
"""

from __future__ import annotations

import threading
from functools import partial

import dask
import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

from pipeline.apply import in_chunk
from pipeline.blend import WindowGrid, normalise_sums, window_sums, window_weights

GPU_RESOURCES = {"resources": {"GPU": 1}}


def _bounds(chunks: tuple[int, ...]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(chunks)]).astype(np.int64)


def owned_origins(origins: np.ndarray, bounds: np.ndarray) -> list[np.ndarray]:
    """Split one axis' window ``origins`` among the chunks with edges ``bounds`` (len n + 1):
    a window belongs to the chunk holding ``max(origin, 0)``. Returns n arrays (possibly empty)."""
    first = np.maximum(origins, 0)
    return [origins[(first >= bounds[i]) & (first < bounds[i + 1])] for i in range(len(bounds) - 1)]


def spill_extent(owned: np.ndarray, start: int, window: int, size: int) -> int:
    """End (exclusive) of the pixels that a chunk's windows ``owned`` cover along an axis,
    the chunk starting at ``start``; ``start`` when it owns no window."""
    return start if len(owned) == 0 else min(size, int(owned[-1]) + window)


_TORCH_THREADS = threading.Lock()
_torch_threads_set = False


def _share_cpus_with_other_tasks() -> None:
    """On Dask's threaded scheduler, give each concurrent task ``cpus / threads`` torch threads.

    Several tasks each running torch on every core oversubscribe the CPUs; on 2 cores two
    tasks with one torch thread each ran the sample model 12 % faster than one task with two
    (README "Performance"). Distributed workers need nothing: their nanny already sets
    ``OMP_NUM_THREADS=1``-style limits per worker thread.
    """
    global _torch_threads_set
    with _TORCH_THREADS:
        if _torch_threads_set:
            return
        _torch_threads_set = True
        if dask.config.get("scheduler", None) not in (None, "threads", "threading"):
            return
        try:
            from distributed import get_worker

            get_worker()
            return  # inside a distributed worker
        except (ImportError, ValueError):
            pass
        import torch

        from pipeline.io.files import usable_cpus

        tasks = dask.config.get("num_workers", None) or usable_cpus()
        torch.set_num_threads(max(1, usable_cpus() // tasks))


def _owned_sums(store: str, band_idx: list[int], shape: tuple[int, int], oy: np.ndarray, ox: np.ndarray,
                rows: tuple[int, int], cols: tuple[int, int], wgrid: WindowGrid, kind: str, model_path: str,
                device: str, batch_size: int, nodata: float | None, n_classes: int) -> np.ndarray:  # fmt: skip
    from pipeline.io.store import read_region
    from pipeline.segment.unet import cached_model, normalise, predict_probabilities

    if device == "cpu":
        _share_cpus_with_other_tasks()
    net, spec = cached_model(model_path, device)

    def predict(batch: np.ndarray) -> np.ndarray:
        valid = None if nodata is None else ~(batch == nodata).all(axis=1)
        return predict_probabilities(net, normalise(batch, spec, valid), device)

    return window_sums(
        lambda a, b, c, d: read_region(store, band_idx, a, b, c, d),
        shape, oy, ox, rows, cols, wgrid, window_weights(wgrid.window, kind), predict, n_classes, batch_size,
    )  # fmt: skip


def _combine(rows: tuple[int, int], cols: tuple[int, int], origins: list[tuple[int, int]],
             *parts: np.ndarray) -> np.ndarray:  # fmt: skip
    """Chunk [r0, r1) x [c0, c1): add the step-1 blocks ``parts`` (whose top-left pixels are
    ``origins``) where they fall on it, in integers, then normalise."""
    (r0, r1), (c0, c1) = rows, cols
    acc = np.zeros((parts[0].shape[0], r1 - r0, c1 - c0), np.int64)
    for (pr, pc), part in zip(origins, parts):
        ya, yb = max(r0, pr), min(r1, pr + part.shape[1])
        xa, xb = max(c0, pc), min(c1, pc + part.shape[2])
        if ya < yb and xa < xb:
            acc[:, ya - r0 : yb - r0, xa - c0 : xb - c0] += part[:, ya - pr : yb - pr, xa - pc : xb - pc]
    return normalise_sums(acc)


def unet_probabilities(
    store: str,
    image: da.Array,
    band_idx: list[int],
    wgrid: WindowGrid,
    kind: str,
    model_path: str,
    device: str,
    batch_size: int,
    nodata: float | None,
    n_classes: int,
    where: str = "segment (unet)",
    gpu: bool = False,
) -> da.Array:
    """Lazy float32 (class, y, x) blended probabilities, chunked like ``image`` in (y, x).

    Two tasks per chunk (see the module docstring): the model runs in the first, which
    reads its windows' pixels straight from the store, so no image block travels between
    tasks; the second adds neighbours' spill-over and normalises. The model is loaded
    once per process (:func:`pipeline.segment.unet.cached_model`).

    Args:
        gpu: the inference tasks ask for a ``GPU`` resource (``dask.annotate``), so they run
            on GPU workers only, one at a time per worker; the sums go anywhere.
    """
    h, w = image.shape[1:]
    rch, cch = image.chunks[1], image.chunks[2]
    rb, cb = _bounds(rch), _bounds(cch)
    own_y = owned_origins(wgrid.origins(h), rb)
    own_x = owned_origins(wgrid.origins(w), cb)
    ext_y = [spill_extent(o, int(rb[i]), wgrid.window, h) for i, o in enumerate(own_y)]
    ext_x = [spill_extent(o, int(cb[j]), wgrid.window, w) for j, o in enumerate(own_x)]
    token = tokenize(store, image.name, band_idx, wgrid, kind, model_path, device, batch_size, nodata, n_classes)
    sums_name, out_name = f"tileseg-unet-{token}", f"tileseg-blend-{token}"
    owned = in_chunk(_owned_sums, where)
    combine = in_chunk(_combine, where)

    def located(fn: in_chunk, i: int, j: int) -> partial:  # errors name the chunk and its window
        loc = [(0, n_classes), (int(rb[i]), int(rb[i + 1])), (int(cb[j]), int(cb[j + 1]))]
        return partial(fn, block_info={None: {"chunk-location": (0, i, j), "array-location": loc}})

    step1: dict = {}
    step2: dict = {}
    for i in range(len(rch)):
        for j in range(len(cch)):
            rows, cols = (int(rb[i]), ext_y[i]), (int(cb[j]), ext_x[j])
            step1[(sums_name, i, j)] = (located(owned, i, j), store, band_idx, (h, w), own_y[i], own_x[j], rows, cols, wgrid, kind,
                                        model_path, device, batch_size, nodata, n_classes)  # fmt: skip
    for i in range(len(rch)):
        for j in range(len(cch)):
            r0, r1, c0, c1 = int(rb[i]), int(rb[i + 1]), int(cb[j]), int(cb[j + 1])
            # chunks whose windows reach this one: at or above and left of it, spilling past r0 / c0
            src = [(a, b) for a in range(i + 1) for b in range(j + 1) if ext_y[a] > r0 and ext_x[b] > c0]
            step2[(out_name, 0, i, j)] = (located(combine, i, j), (r0, r1), (c0, c1), [(int(rb[a]), int(cb[b])) for a, b in src],
                                          *[(sums_name, a, b) for a, b in src])  # fmt: skip
    layers = {sums_name: MaterializedLayer(step1, annotations=GPU_RESOURCES if gpu else None),
              out_name: MaterializedLayer(step2)}  # fmt: skip
    graph = HighLevelGraph(layers, {sums_name: set(), out_name: {sums_name}})
    return da.Array(graph, out_name, chunks=((n_classes,), rch, cch), dtype=np.float32,
                    meta=np.empty((0, 0, 0), np.float32))  # fmt: skip

