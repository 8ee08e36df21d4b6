"""Tiled U-Net inference on Dask: every window of the global grid runs exactly once.

Design note "Windows are owned, then spill over", with the windows grouped by the grid rather
than by chunk: the grid's windows are cut into *window blocks* of ``by x bx`` windows, one
model batch each (:func:`pipeline.blend.block_shape`). Step 1, one task per window block
(keys ``tileseg-unet-*``), reads the block's pixels from the store, runs the model on its
windows and returns their weighted sums over the block's extent
(:func:`pipeline.blend.window_sums`). Step 2, one task per store chunk (keys
``tileseg-blend-*``), adds the sums of the blocks that overlap the chunk, in block order, and
normalises by the summed weights.

Why: the earlier way, "chunk recomputes its windows", ran every window touching a chunk in
that chunk's task, so a window straddling chunk borders ran 2 or 4 times (16 windows per
512 px chunk for 256 px windows at 25 % overlap, instead of about 7), and a chunk's windows
rarely filled whole batches (9 windows are 2 batches of 8: 7 padded windows computed for
nothing). Blocks of one batch waste nothing except at the raster's edges (README "Performance").

A window's block, and so its batch and its place in the additions, is the same for every
chunking, so the probabilities are bit-identical for any chunking, and equal to
:func:`pipeline.blend.blend_region` on the whole raster.

Axis order: images (band, y, x); probabilities (class, y, x).
"""

from __future__ import annotations

import contextlib
import threading
from functools import partial

import dask
import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

from pipeline.apply import in_chunk
from pipeline.blend import WindowGrid, add_blocks, block_shape, normalise_sums, window_blocks, window_sums, window_weights
from pipeline.grid import column_strips
from pipeline.nodata import missing

GPU_RESOURCES = {"resources": {"GPU": 1}}


def _bounds(chunks: tuple[int, ...]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(chunks)]).astype(np.int64)


#: Serialises the model calls of a process's tasks when each call uses every core (a compiled
#: model on the CPU, see :func:`_block_sums`).
_MODEL_LOCK = threading.Lock()


def _share_cpus_with_other_tasks(one_call_at_a_time: bool = False) -> None:
    """On Dask's threaded scheduler, give each concurrent task ``cpus / threads`` torch threads,
    or every CPU with ``one_call_at_a_time`` (the caller then holds :data:`_MODEL_LOCK` around
    each model call).

    Several tasks each running torch on every core oversubscribe the CPUs; on 2 cores two
    tasks with one torch thread each ran the sample model 12 to 16 % faster than one task with two
    (README "Performance"). A compiled model is the other way round: two threads with one torch
    thread each ran 3.47 batches/s, one call at a time with two torch threads 5.02 (eager: 3.51
    and 3.71). Called in every task: torch's intra-op thread count is kept per OS thread
    (OpenMP), so setting it once in one Dask thread leaves the others at all cores.
    Distributed workers need nothing: their nanny already limits OpenMP to one thread.
    """
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

    tasks = 1 if one_call_at_a_time else dask.config.get("num_workers", None) or usable_cpus()
    want = max(1, usable_cpus() // tasks)
    if torch.get_num_threads() != want:
        torch.set_num_threads(want)


def _block_sums(store: str, band_idx: list[int], shape: tuple[int, int], oy: np.ndarray, ox: np.ndarray,
                rows: tuple[int, int], cols: tuple[int, int], wgrid: WindowGrid, kind: str, model_path: str,
                device: str, batch_size: int, nodata: float | None, n_classes: int,
                compile: bool = False) -> np.ndarray:  # fmt: skip
    """One window block's task: float32 (K + 2, rows, cols), the block's weighted sums
    (:func:`pipeline.blend.window_sums`) and its pixels' validity, from one store read."""
    from pipeline.io.store import read_region
    from pipeline.segment.unet import cached_model, predict_probabilities

    # a compiled model on the CPU: one model call at a time on every core, while the other
    # tasks read and add sums (README "Performance", case 3 with compile)
    serial = compile and device == "cpu"
    if device == "cpu":
        _share_cpus_with_other_tasks(one_call_at_a_time=serial)
    net, spec = cached_model(model_path, device, compile)

    def predict(batch: np.ndarray) -> np.ndarray:
        valid = None if nodata is None and batch.dtype.kind != "f" else ~missing(batch, nodata).all(axis=1)
        with _MODEL_LOCK if serial else contextlib.nullcontext():  # normalised on the device
            return predict_probabilities(net, batch, device, as_tensor=True, spec=spec, valid=valid, nodata=nodata)

    read: dict = {}

    def read_once(a: int, b: int, c: int, d: int) -> np.ndarray:
        read["at"], read["data"] = (a, c), read_region(store, band_idx, a, b, c, d)
        return read["data"]

    sums = window_sums(read_once, shape, oy, ox, rows, cols, wgrid, window_weights(wgrid.window, kind), predict,
                       n_classes, batch_size)  # fmt: skip
    # one more channel: 1 where any model band has data (the labels' validity), from the same read
    (a, c), (r0, r1), (c0, c1) = read["at"], rows, cols
    block = read["data"][:, r0 - a : r1 - a, c0 - c : c1 - c]
    valid = ~missing(block, nodata).all(axis=0)
    return np.concatenate([sums, valid[None].astype(np.float32)])


def _combine(rows: tuple[int, int], cols: tuple[int, int], origins: list[tuple[int, int]],
             *parts: np.ndarray) -> np.ndarray:  # fmt: skip
    """Chunk [r0, r1) x [c0, c1): the window blocks' sums that fall on it, added in block
    order, normalised: float32 (K + 1, r1-r0, c1-c0), the K probabilities then the validity
    (1 where any model band has data, else 0)."""
    total = add_blocks(rows, cols, origins, list(parts))
    return np.concatenate([normalise_sums(total[:-1]), (total[-1:] > 0).astype(np.float32)])


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
    strip_px: int | None = None,
    compile: bool = False,
) -> da.Array:
    """Lazy float32 (class + 1, y, x): blended probabilities of the K classes, then the
    validity (1.0 where any of the model's bands has data, 0.0 where all are ``nodata``),
    chunked like ``image`` in (y, x). The validity comes from the pixels the inference reads
    anyway, so the labels need no other pass over the image.

    One inference task per window block of ``batch_size`` windows, which reads its pixels
    straight from the store (no image block travels between tasks), and one task per chunk
    that adds the blocks' sums falling on it and normalises (see the module docstring). The
    model is loaded once per process (:func:`pipeline.segment.unet.cached_model`).

    Args:
        gpu: the inference tasks ask for a ``GPU`` resource (an annotation of their graph layer), so they run
            on GPU workers only, one at a time per worker; the sums go anywhere.
        strip_px: the chunk columns form vertical strips at most this wide
            (:func:`pipeline.grid.column_strips`; None: one strip). Each strip has its own
            copies of the window blocks it needs (keys ``(name, p, q, strip)``), so a block on a
            strip border runs once per strip and no block is kept waiting for a later strip:
            computed strip after strip (:func:`pipeline.apply.chunk_tasks` with the strips of
            the same ``strip_px``), the blocks alive are bounded by the strip's width, not the
            raster's.
            Every copy of a block computes the same windows in the same batch, so the result
            does not change.
        compile: run the model through ``torch.compile`` (:func:`pipeline.segment.unet.cached_model`).
    """
    h, w = image.shape[1:]
    rch, cch = image.chunks[1], image.chunks[2]
    rb, cb = _bounds(rch), _bounds(cch)
    by, bx = block_shape(batch_size)
    blocks_y = window_blocks(wgrid.origins(h), by, wgrid.window, h)
    blocks_x = window_blocks(wgrid.origins(w), bx, wgrid.window, w)
    token = tokenize(store, image.name, band_idx, wgrid, kind, model_path, device, batch_size, nodata, n_classes,
                     strip_px, compile)
    sums_name, out_name = f"tileseg-unet-{token}", f"tileseg-blend-{token}"
    block_sums = in_chunk(_block_sums, where)
    combine = in_chunk(_combine, where)

    def located(fn: in_chunk, rows: tuple[int, int], cols: tuple[int, int], index: tuple[int, int]) -> partial:
        loc = [(0, n_classes + 1), rows, cols]  # errors name the block or chunk and its pixel window
        return partial(fn, block_info={None: {"chunk-location": (0, *index), "array-location": loc}})

    ys0, ys1 = np.array([b[1] for b in blocks_y]), np.array([b[2] for b in blocks_y])
    xs0, xs1 = np.array([b[1] for b in blocks_x]), np.array([b[2] for b in blocks_x])
    step1: dict = {}
    strip_of: dict[int, int] = {}
    for k, (j0, j1) in enumerate(column_strips(cch, strip_px)):
        strip_of.update({j: k for j in range(j0, j1)})
        for q in np.flatnonzero((xs0 < cb[j1]) & (xs1 > cb[j0])):  # the blocks this strip's chunks need
            ox, x0, x1 = blocks_x[q]
            for p, (oy, y0, y1) in enumerate(blocks_y):
                step1[(sums_name, p, int(q), k)] = (located(block_sums, (y0, y1), (x0, x1), (p, int(q))), store,
                                                    band_idx, (h, w), oy, ox, (y0, y1), (x0, x1), wgrid, kind,
                                                    model_path, device, batch_size, nodata, n_classes,
                                                    compile)  # fmt: skip
    step2: dict = {}
    for i in range(len(rch)):
        r0, r1 = int(rb[i]), int(rb[i + 1])
        ps = np.flatnonzero((ys0 < r1) & (ys1 > r0))
        for j in range(len(cch)):
            c0, c1 = int(cb[j]), int(cb[j + 1])
            qs = np.flatnonzero((xs0 < c1) & (xs1 > c0))
            src = [(int(p), int(q)) for p in ps for q in qs]
            step2[(out_name, 0, i, j)] = (located(combine, (r0, r1), (c0, c1), (i, j)), (r0, r1), (c0, c1),
                                          [(int(ys0[p]), int(xs0[q])) for p, q in src],
                                          *[(sums_name, p, q, strip_of[j]) for p, q in src])  # fmt: skip
    layers = {sums_name: MaterializedLayer(step1, annotations=GPU_RESOURCES if gpu else None),
              out_name: MaterializedLayer(step2)}  # fmt: skip
    graph = HighLevelGraph(layers, {sums_name: set(), out_name: {sums_name}})
    return da.Array(graph, out_name, chunks=((n_classes + 1,), rch, cch), dtype=np.float32,
                    meta=np.empty((0, 0, 0), np.float32))  # fmt: skip
