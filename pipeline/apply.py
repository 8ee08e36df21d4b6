"""Dask glue: per-chunk kernels mapped over chunked arrays.

Each function here builds a lazy Dask array or reduction whose blocks are the
store's chunks; nothing is computed or written here. Blocks that must read files
(ingest, ground truth) call ``pipeline.io`` functions inside their tasks, so no
worker ever holds more than a chunk.

Axis order: images are (band, y, x), label rasters (y, x).
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np

from pipeline.grid import Grid, block_window, bbox_mask, chunk_sizes
from pipeline.io.raster import BandSource, read_onto_grid, read_window
from pipeline.io.vector import area_window, rasterize_window
from pipeline.metrics import EXCLUSION_REASONS, chunk_counts, error_codes, exclusion_codes
from pipeline.segment.classical import Expression, KMeansModel, histogram


def _meta(dtype: Any) -> np.ndarray:
    return np.empty((0,) * 2, dtype=dtype)


def _read_block(
    sources: list[BandSource], grid: Grid, resampling: str, nodata: float | None, dtype: str, block_info=None
) -> np.ndarray:
    window = block_window(block_info[None]["array-location"])
    out = np.empty((len(sources), int(window.height), int(window.width)), dtype=dtype)
    i = 0
    while i < len(sources):  # read consecutive bands of one file together
        j = i
        while j + 1 < len(sources) and sources[j + 1].path == sources[i].path:
            j += 1
        group = sources[i : j + 1]
        out[i : j + 1] = read_onto_grid(
            group[0].path,
            [s.index for s in group],
            grid,
            window,
            resampling=resampling,
            src_nodata=nodata if nodata is not None else group[0].nodata,
            dst_nodata=nodata,
            src_grid=group[0].grid,
        )
        i = j + 1
    return out


def read_image(sources: list[BandSource], grid: Grid, chunk: int, resampling: str, nodata: float | None) -> da.Array:
    """Lazy (band, y, x) image of all ``sources`` on ``grid``, chunked (all bands, chunk, chunk).

    dtype: the common numpy dtype of the sources (``np.result_type``).
    """
    dtype = np.result_type(*[np.dtype(s.dtype) for s in sources]).name
    chunks = ((len(sources),), chunk_sizes(grid.height, chunk), chunk_sizes(grid.width, chunk))
    return da.map_blocks(
        _read_block,
        sources,
        grid,
        resampling,
        nodata,
        dtype,
        chunks=chunks,
        dtype=dtype,
        meta=np.empty((0, 0, 0), dtype=dtype),
        token="tileseg-read",
    )


def valid_mask(image: da.Array, band_idx: list[int], nodata: float | None) -> da.Array:
    """(y, x) bool: True where none of the bands ``band_idx`` equals ``nodata``."""
    if nodata is None:
        return da.ones(image.shape[1:], chunks=image.chunks[1:], dtype=bool)
    if np.isnan(nodata):
        return ~da.isnan(image[band_idx]).any(axis=0)
    return ~(image[band_idx] == nodata).any(axis=0)


def index_image(image: da.Array, band_names: list[str], expr: Expression) -> da.Array:
    """Lazy float64 (y, x) spectral index from a band expression."""
    idx = [band_names.index(n) for n in expr.names]

    def kernel(block: np.ndarray) -> np.ndarray:
        return expr.evaluate({n: block[k] for k, n in enumerate(expr.names)})

    return da.map_blocks(kernel, image[idx], drop_axis=0, dtype=np.float64, meta=_meta(np.float64))


def finite_range(values: da.Array, valid: da.Array) -> tuple[da.Array, da.Array]:
    """Lazy (min, max) of ``values`` over valid, finite pixels (NaN when there is none)."""
    ok = valid & da.isfinite(values)
    masked = da.where(ok, values, np.nan)
    return da.nanmin(masked), da.nanmax(masked)


def global_histogram(values: da.Array, valid: da.Array, edges: np.ndarray) -> da.Array:
    """Lazy int64 histogram of valid, finite pixels over fixed ``edges``: sum of per-chunk counts."""
    nbins = len(edges) - 1

    def kernel(v: np.ndarray, ok: np.ndarray) -> np.ndarray:
        return histogram(v, ok & np.isfinite(v), edges)[None, None, :]

    per_chunk = da.map_blocks(kernel, values, valid, new_axis=2, chunks=(1, 1, nbins), dtype=np.int64)
    return per_chunk.sum(axis=(0, 1))


def threshold_labels(values: da.Array, valid: da.Array, threshold: float, nodata: int) -> da.Array:
    """uint8 (y, x): 1 where ``values > threshold``, 0 elsewhere, ``nodata`` where invalid or non-finite."""

    def kernel(v: np.ndarray, ok: np.ndarray) -> np.ndarray:
        out = (v > threshold).astype(np.uint8)
        out[~(ok & np.isfinite(v))] = nodata
        return out

    return da.map_blocks(kernel, values, valid, dtype=np.uint8, meta=_meta(np.uint8))


def sample_pixels(image: da.Array, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random pixel positions over the WHOLE raster, independent of the chunking.

    Returns:
        (rows, cols), each int64 (m,) with m = min(n, pixels), sorted row-major.
    """
    h, w = image.shape[1:]
    rng = np.random.default_rng(seed)
    flat = np.sort(rng.choice(h * w, size=min(n, h * w), replace=False))
    return flat // w, flat % w


def gather_pixels(image: da.Array, rows: np.ndarray, cols: np.ndarray) -> da.Array:
    """Lazy (m, band) values of ``image`` at the given pixel positions."""
    return da.moveaxis(image, 0, -1).vindex[rows, cols]


def kmeans_labels(
    image: da.Array,
    band_idx: list[int],
    model: KMeansModel,
    valid: da.Array,
    nodata: int,
    mapping: np.ndarray | None = None,
) -> da.Array:
    """uint8 (y, x) cluster ids (or class ids through ``mapping``), ``nodata`` where invalid."""
    lut = None if mapping is None else np.asarray(mapping, dtype=np.uint8)

    def kernel(block: np.ndarray, ok: np.ndarray) -> np.ndarray:
        ids = model.predict(block)
        out = (lut[ids] if lut is not None else ids).astype(np.uint8)
        out[~ok] = nodata
        return out

    return da.map_blocks(kernel, image[band_idx], valid, drop_axis=0, dtype=np.uint8, meta=_meta(np.uint8))


def _raster_block(path, block_info=None) -> np.ndarray:
    return read_window(path, block_window(block_info[None]["array-location"]))


def read_band(path: str, chunks: tuple[tuple[int, ...], tuple[int, ...]], dtype: str) -> da.Array:
    """Lazy (y, x) band 1 of a raster file on its own grid, read window by window."""
    return da.map_blocks(_raster_block, path, chunks=chunks, dtype=dtype, meta=_meta(dtype), token="tileseg-pred")


#: Value of raster ground truth on the prediction grid where it is unlabeled (the file's
#: nodata, NaN, outside the file, or a value missing from the class map): never a class id.
GT_UNLABELED = -1


def _gt_vector_block(path, class_column, lookup, grid, nodata, line_buffer, block_info=None) -> np.ndarray:
    window = block_window(block_info[None]["array-location"])
    return rasterize_window(path, class_column, lookup, grid, window, nodata, line_buffer)


def map_values(values: np.ndarray, lookup: dict[int, int], missing: int) -> np.ndarray:
    """int64 array of ``lookup[v]`` for each value, ``missing`` where ``v`` is not a key."""
    uniq, inverse = np.unique(values, return_inverse=True)
    table = np.array([lookup.get(int(u), missing) for u in uniq], dtype=np.int64)
    return table[inverse].reshape(values.shape)


def _gt_raster_block(path, grid, src_nodata, lookup, block_info=None) -> np.ndarray:
    window = block_window(block_info[None]["array-location"])
    arr = read_onto_grid(path, [1], grid, window, "nearest", src_nodata=src_nodata, dst_nodata=src_nodata)[0]
    bad = (arr == src_nodata) if src_nodata is not None else np.zeros(arr.shape, dtype=bool)
    if arr.dtype.kind == "f":
        bad |= ~np.isfinite(arr)
        arr = np.where(bad, 0, arr)
    out = arr.astype(np.int64)
    if lookup is not None:
        out = map_values(out, lookup, GT_UNLABELED)
    out[bad] = GT_UNLABELED
    return out


def ground_truth(
    path: str,
    grid: Grid,
    chunks: tuple[tuple[int, ...], tuple[int, ...]],
    nodata: int | float | None,
    class_column: str | None = None,
    lookup: dict[str, int] | dict[int, int] | list[str] | None = None,
    is_vector: bool = False,
    line_buffer: float | None = None,
) -> da.Array:
    """Lazy (y, x) ground truth on ``grid``.

    Vectors: features rasterized (see :mod:`pipeline.io.vector`), uint8, ``nodata``
    where unlabeled; ``lookup`` maps class values (text) to ids.
    Rasters: reprojected with nearest neighbour, int64; ``nodata`` is the file's value
    meaning unlabeled (None: none); an optional ``lookup`` maps raster values to ids.
    Unlabeled pixels, pixels outside the file and values missing from ``lookup`` are
    ``GT_UNLABELED`` (-1).
    """
    if is_vector:
        return da.map_blocks(
            _gt_vector_block, path, class_column, lookup, grid, nodata, line_buffer,
            chunks=chunks, dtype=np.uint8, meta=_meta(np.uint8), token="tileseg-gt",
        )  # fmt: skip
    return da.map_blocks(
        _gt_raster_block, path, grid, nodata, lookup,
        chunks=chunks, dtype=np.int64, meta=_meta(np.int64), token="tileseg-gt",
    )  # fmt: skip


def area_mask(grid: Grid, chunks: tuple[tuple[int, ...], tuple[int, ...]], bbox: tuple[float, ...]) -> da.Array:
    """Lazy bool (y, x): pixel centre inside ``bbox`` (map units)."""

    def kernel(block_info=None) -> np.ndarray:
        return bbox_mask(grid, block_window(block_info[None]["array-location"]), bbox)

    return da.map_blocks(kernel, chunks=chunks, dtype=bool, meta=_meta(bool))


def polygon_area_mask(path: str, grid: Grid, chunks: tuple[tuple[int, ...], tuple[int, ...]]) -> da.Array:
    """Lazy bool (y, x): pixel centre inside any polygon of ``path``."""

    def kernel(block_info=None) -> np.ndarray:
        return area_window(path, grid, block_window(block_info[None]["array-location"]))

    return da.map_blocks(kernel, chunks=chunks, dtype=bool, meta=_meta(bool))


def raster_area_mask(path: str, grid: Grid, chunks: tuple[tuple[int, ...], tuple[int, ...]],
                     nodata: float | None) -> da.Array:  # fmt: skip
    """Lazy bool (y, x): the mask raster, reprojected with nearest neighbour, is non-zero,
    finite and not ``nodata``; pixels outside the mask raster are outside."""

    def kernel(block_info=None) -> np.ndarray:
        window = block_window(block_info[None]["array-location"])
        v = read_onto_grid(path, [1], grid, window, "nearest", src_nodata=nodata, dst_nodata=0)[0]
        inside = v != 0
        if nodata is not None:
            inside &= v != nodata
        if v.dtype.kind == "f":
            inside &= np.isfinite(v)
        return inside

    return da.map_blocks(kernel, chunks=chunks, dtype=bool, meta=_meta(bool))


def image_valid(image: da.Array, nodata: float | None) -> da.Array:
    """Lazy bool (y, x): False where EVERY band of ``image`` (band, y, x) is ``nodata`` (or NaN
    for a NaN nodata); True everywhere when there is no nodata value."""
    if nodata is None:
        return da.ones(image.shape[1:], chunks=image.chunks[1:], dtype=bool)
    if np.isnan(nodata):
        return ~da.isnan(image).all(axis=0)
    return ~(image == nodata).all(axis=0)


def confusion(
    gt: da.Array,
    pred: da.Array,
    n_classes: int,
    gt_nodata: int | None,
    pred_nodata: int | None,
    area: da.Array | None = None,
) -> da.Array:
    """Lazy global counts: flattened (K, K) confusion matrix then excluded counts (see
    :func:`pipeline.metrics.chunk_counts`), summed over chunks."""
    n = n_classes * n_classes + len(EXCLUSION_REASONS)

    def kernel(g: np.ndarray, p: np.ndarray, a: np.ndarray | None = None) -> np.ndarray:
        return chunk_counts(g, p, n_classes, gt_nodata, pred_nodata, a)[None, None, :]

    args = [gt, pred] + ([area] if area is not None else [])
    per_chunk = da.map_blocks(kernel, *args, new_axis=2, chunks=(1, 1, n), dtype=np.int64)
    return per_chunk.sum(axis=(0, 1))


def _unet_block(store, band_idx, shape, wgrid, kind, model_path, device, batch_size, nodata, n_classes,
                block_info=None) -> np.ndarray:  # fmt: skip
    from pipeline.blend import blend_region, window_weights
    from pipeline.io.store import read_region
    from pipeline.segment.unet import cached_model, normalise, predict_probabilities

    loc = block_info[None]["array-location"]
    (r0, r1), (c0, c1) = loc[1], loc[2]
    net, spec = cached_model(model_path, device)

    def predict(batch: np.ndarray) -> np.ndarray:
        valid = None if nodata is None else ~(batch == nodata).all(axis=1)
        return predict_probabilities(net, normalise(batch, spec, valid), device)

    probs = blend_region(
        lambda a, b, c, d: read_region(store, band_idx, a, b, c, d),
        shape, (r0, r1), (c0, c1), wgrid, window_weights(wgrid.window, kind), predict, n_classes, batch_size,
    )  # fmt: skip
    return probs.astype(np.float32)


def unet_probabilities(
    store: str,
    image: da.Array,
    band_idx: list[int],
    wgrid: Any,
    kind: str,
    model_path: str,
    device: str,
    batch_size: int,
    nodata: float | None,
    n_classes: int,
) -> da.Array:
    """Lazy float32 (class, y, x) blended probabilities, chunked like ``image`` in (y, x).

    Each task computes one output chunk by running every window of the global grid
    that touches it (reading the chunk plus the halo those windows need straight from
    the store), so the result does not depend on the chunking (see :mod:`pipeline.blend`).
    The model is loaded once per worker process (:func:`pipeline.segment.unet.cached_model`).
    """
    shape = image.shape[1:]
    chunks = ((n_classes,),) + image.chunks[1:]
    return da.map_blocks(
        _unet_block, store, band_idx, shape, wgrid, kind, model_path, device, batch_size, nodata, n_classes,
        chunks=chunks, dtype=np.float32, meta=np.empty((0, 0, 0), np.float32), token="tileseg-unet",
    )  # fmt: skip


def argmax_labels(probs: da.Array, valid: da.Array, nodata: int) -> da.Array:
    """uint8 (y, x): the most probable class (lowest id on ties), ``nodata`` where not valid."""

    def kernel(p: np.ndarray, ok: np.ndarray) -> np.ndarray:
        out = np.argmax(p, axis=0).astype(np.uint8)
        out[~ok] = nodata
        return out

    return da.map_blocks(kernel, probs, valid, drop_axis=0, dtype=np.uint8, meta=_meta(np.uint8))


def any_band_valid(image: da.Array, nodata: float | None) -> da.Array:
    """(y, x) bool: True where at least one band is not nodata."""
    if nodata is None:
        return da.ones(image.shape[1:], chunks=image.chunks[1:], dtype=bool)
    return (image != nodata).any(axis=0)


def evaluation(
    gt: da.Array,
    pred: da.Array,
    n_classes: int,
    gt_nodata: int | None,
    pred_nodata: int | None,
    area: da.Array | None,
    valid: da.Array | None,
    gt_ignore: list[int],
    pred_ignore: list[int],
    error_nodata: int,
) -> tuple[da.Array, da.Array]:
    """Lazy (counts, error map) of a whole evaluation, from one pass over the chunks.

    Returns:
        counts: int64 (K*K + len(EXCLUSION_REASONS),), the global confusion matrix and
            excluded counts summed over chunks (:func:`pipeline.metrics.chunk_counts`);
        error map: uint8 (y, x), chunked like ``pred`` (:func:`pipeline.metrics.error_codes`).
    Both read the same per-chunk exclusion codes, so computing them together reads and
    rasterizes every chunk once.
    """
    n = n_classes * n_classes + len(EXCLUSION_REASONS)
    extra = [a for a in (area, valid) if a is not None]

    def codes_kernel(g: np.ndarray, p: np.ndarray, *masks: np.ndarray) -> np.ndarray:
        it = iter(masks)
        a = next(it) if area is not None else None
        v = next(it) if valid is not None else None
        return exclusion_codes(g, p, n_classes, gt_nodata, pred_nodata, a, image_valid=v,
                               gt_ignore=gt_ignore, pred_ignore=pred_ignore)  # fmt: skip

    codes = da.map_blocks(codes_kernel, gt, pred, *extra, dtype=np.uint8, meta=_meta(np.uint8), token="tileseg-excl")

    def counts_kernel(g: np.ndarray, p: np.ndarray, c: np.ndarray) -> np.ndarray:
        return chunk_counts(g, p, n_classes, gt_nodata, pred_nodata, codes=c)[None, None, :]

    per_chunk = da.map_blocks(counts_kernel, gt, pred, codes, new_axis=2, chunks=(1, 1, n), dtype=np.int64)
    errors = da.map_blocks(error_codes, gt, pred, codes, pred_nodata, error_nodata, dtype=np.uint8,
                           meta=_meta(np.uint8), token="tileseg-errmap")  # fmt: skip
    return per_chunk.sum(axis=(0, 1)), errors
