"""Dask glue: per-chunk kernels mapped over chunked arrays.

Each function here builds a lazy Dask array or reduction whose blocks are the
store's chunks; nothing is computed or written here. Blocks that must read files
(ingest, ground truth) call ``pipeline.io`` functions inside their tasks, so no
worker ever holds more than a chunk.

Axis order: images are (band, y, x), label rasters (y, x).

Errors raised inside a per-chunk kernel are re-raised by :class:`in_chunk` with the
stage, the chunk (block index and pixel window) and the input named in the message,
keeping a :class:`~pipeline.errors.TilesegError`'s own type (so its ``OSError`` /
``ValueError`` mixin too); anything else becomes a ``RasterIOError`` (an ``OSError``) or a
:class:`~pipeline.errors.ChunkError`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.utils import has_keyword

from pipeline.errors import ChunkError, InputError, RasterIOError, TilesegError
from pipeline.grid import Grid, block_window, bbox_mask, chunk_sizes
from pipeline.io.raster import BandSource, read_onto_grid, read_window
from pipeline.io.vector import area_window, rasterize_window
from pipeline.metrics import EXCLUSION_REASONS, chunk_counts, error_codes, exclusion_codes
from pipeline.nodata import missing
from pipeline.segment.classical import Expression, KMeansModel, histogram, integer_bin_edges


def _meta(dtype: Any) -> np.ndarray:
    return np.empty((0,) * 2, dtype=dtype)


def _location(block_info: dict | None) -> tuple[tuple[int, int], tuple[tuple[int, int], tuple[int, int]]] | None:
    """(block index (i, j), ((r0, r1), (c0, c1))) in (y, x) of a block, from Dask's ``block_info``
    (the first input's, else the output's); None when Dask gave none (meta inference)."""
    if not block_info:
        return None
    info = block_info.get(0) or block_info.get(None)
    if not info or "chunk-location" not in info:
        return None
    i, j = info["chunk-location"][-2:]
    (r0, r1), (c0, c1) = info["array-location"][-2:]
    return (int(i), int(j)), ((int(r0), int(r1)), (int(c0), int(c1)))


def chunk_error(exc: Exception, where: str, block_info: dict | None) -> TilesegError:
    """``exc`` re-made with ``where`` (stage and input) and the chunk's index and pixel window
    in front of its message, e.g. ``segment (kmeans) of store s.zarr, chunk (1, 2) rows
    512:1024 cols 1024:1536: ...``.

    A :class:`TilesegError` keeps its type; another ``OSError`` becomes a ``RasterIOError``
    (both keep ``errno``); anything else a :class:`ChunkError` whose message starts with the
    original type's name.
    """
    loc = _location(block_info)
    ctx = where if loc is None else f"{where}, chunk {loc[0]} rows {loc[1][0][0]}:{loc[1][0][1]} " \
                                   f"cols {loc[1][1][0]}:{loc[1][1][1]}"  # fmt: skip
    if isinstance(exc, TilesegError):
        cls, text = type(exc), str(exc)
    else:
        cls = RasterIOError if isinstance(exc, OSError) else ChunkError
        text = f"{type(exc).__name__}: {exc}"
    try:
        err = cls(f"{ctx}: {text}")
    except Exception:  # a subclass with another constructor
        return ChunkError(f"{ctx}: {type(exc).__name__}: {text}")
    if isinstance(err, OSError) and isinstance(exc, OSError):
        err.errno = exc.errno  # a full disk stays a full disk (no retries; see flows.retry)
    return err


class in_chunk:  # noqa: N801 - used like a function
    """Wrap a per-chunk kernel so that its errors name ``where`` and the chunk (see :func:`chunk_error`).

    The wrapper always takes Dask's ``block_info`` and passes it on only when ``fn`` wants it.
    It is a plain class (not a closure) so that it pickles to Dask workers.
    """

    def __init__(self, fn: Callable[..., Any], where: str):
        self.fn, self.where = fn, where
        self.__name__ = getattr(fn, "__name__", "kernel")  # Dask names the keys after it
        self._info = has_keyword(fn, "block_info")

    def __call__(self, *args: Any, block_info: dict | None = None, **kwargs: Any) -> Any:
        try:
            if self._info:
                return self.fn(*args, block_info=block_info, **kwargs)
            return self.fn(*args, **kwargs)
        except Exception as exc:
            if getattr(exc, "_tileseg_chunk", False):
                raise
            err = chunk_error(exc, self.where, block_info)
            err._tileseg_chunk = True  # type: ignore[attr-defined]
            raise err from exc


def _read_block(
    sources: list[BandSource], grid: Grid, resampling: str, nodata: float | None, dtype: str,
    session: str | None = None, block_info=None,
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
            session=session,
        )
        i = j + 1
    return out


def read_image(sources: list[BandSource], grid: Grid, chunk: int, resampling: str, nodata: float | None,
               where: str = "ingest", session: str | None = None) -> da.Array:  # fmt: skip
    """Lazy (band, y, x) image of all ``sources`` on ``grid``, chunked (all bands, chunk, chunk).

    dtype: the common numpy dtype of the sources (``np.result_type``). ``where`` names the
    stage in the errors of a chunk (see :class:`in_chunk`). With ``session`` (an id unique to
    this computation) each Dask thread keeps the files open from one chunk to the next
    (:func:`pipeline.io.raster.read_onto_grid`).
    """
    dtype = np.result_type(*[np.dtype(s.dtype) for s in sources]).name
    chunks = ((len(sources),), chunk_sizes(grid.height, chunk), chunk_sizes(grid.width, chunk))
    return da.map_blocks(
        in_chunk(_read_block, where),
        sources,
        grid,
        resampling,
        nodata,
        dtype,
        session,
        chunks=chunks,
        dtype=dtype,
        meta=np.empty((0, 0, 0), dtype=dtype),
        token="tileseg-read",
    )


def valid_mask(image: da.Array, band_idx: list[int], nodata: float | None) -> da.Array:
    """(y, x) bool: True where none of the bands ``band_idx`` is missing (equal to ``nodata``,
    or not finite in a float raster: :func:`pipeline.nodata.missing`)."""
    if nodata is None and image.dtype.kind != "f":
        return da.ones(image.shape[1:], chunks=image.chunks[1:], dtype=bool)
    return ~missing(image[band_idx], nodata).any(axis=0)


def read_store_image(store: str, shape: tuple[int, int, int], chunks: tuple[tuple[int, ...], ...], dtype: Any,
                     where: str, bands: list[int] | None = None) -> da.Array:  # fmt: skip
    """Lazy (band, y, x) ``image`` of a tileseg store, read chunk by chunk straight from zarr
    (:func:`pipeline.io.store.read_region`), with ``chunks`` as stored (in y, x), so a damaged
    chunk is reported with its index and window (see :class:`in_chunk`).

    Args:
        bands: the store's bands to read, in this order (default: all): a method using 1 of
            13 bands holds and passes on only that one. (zarr still decodes the whole chunk:
            storing each band as an inner chunk of a shard made single-band reads 2 times
            faster but the U-Net's reads of 10 of 13 bands across chunk borders 30 % slower;
            README "Performance", tried and not kept.)
    """
    from pipeline.io.store import read_region

    bands = list(range(shape[0])) if bands is None else list(bands)

    def read(block_info=None) -> np.ndarray:
        (r0, r1), (c0, c1) = block_info[None]["array-location"][1:]
        return read_region(store, bands, r0, r1, c0, c1)

    return da.map_blocks(in_chunk(read, where), chunks=((len(bands),), *chunks[1:]), dtype=dtype,
                         meta=np.empty((0, 0, 0), dtype=dtype), token="tileseg-image")  # fmt: skip


def finite_range(values: da.Array, valid: da.Array) -> tuple[da.Array, da.Array]:
    """Lazy (min, max) of ``values`` over valid, finite pixels (NaN when there is none)."""
    ok = valid & da.isfinite(values)
    masked = da.where(ok, values, np.nan)
    return da.nanmin(masked), da.nanmax(masked)


def global_histogram(values: da.Array, valid: da.Array, edges: np.ndarray, where: str = "segment") -> da.Array:
    """Lazy int64 histogram of valid, finite pixels over fixed ``edges``: sum of per-chunk counts."""
    nbins = len(edges) - 1

    def kernel(v: np.ndarray, ok: np.ndarray) -> np.ndarray:
        return histogram(v, ok & np.isfinite(v), edges)[None, None, :]

    per_chunk = da.map_blocks(in_chunk(kernel, where), values, valid, new_axis=2, chunks=(1, 1, nbins),
                              dtype=np.int64)  # fmt: skip
    return per_chunk.sum(axis=(0, 1))


# Fused index passes (segment's threshold method). Each maps one kernel over whole (band, y, x)
# blocks of the image, so reading a chunk and everything done with it is ONE task; composing
# a separate index pass, valid_mask, finite_range, ... instead made 3 to 6 tasks per chunk, and the
# Otsu benchmark's profile showed the scheduler's per-task cost, not the arithmetic, bounding segment.
class IndexKernel:
    """Per-chunk kernel: ``expr`` over a (band, y, x) block of an image with ``band_names`` ->
    float64 (y, x), NaN where any band it uses is ``nodata`` or the result is not finite.
    A plain class, so it pickles to Dask workers."""

    def __init__(self, expr: Expression, band_names: list[str], nodata: float | None):
        self.expr, self.nodata = expr, nodata
        self.idx = [band_names.index(n) for n in expr.names]

    def __call__(self, block: np.ndarray) -> np.ndarray:
        used = block[self.idx]
        v = self.expr.evaluate(dict(zip(self.expr.names, used)))
        bad = ~np.isfinite(v)
        if self.nodata is not None:
            bad |= missing(used, self.nodata).any(axis=0)
        return np.where(bad, np.nan, v)

    def integer_band(self, block: np.ndarray) -> tuple[np.ndarray, np.ndarray | None] | None:
        """For a bare 8- or 16-bit integer band (the expression is one band name): the band's
        (y, x) values as stored and a bool (y, x) mask of its nodata pixels (None without
        nodata); None otherwise.

        The histogram and labels of such a band are computed on the integers themselves
        (``np.bincount``, an integer comparison) instead of through the float64 index, which the
        Otsu benchmark's profile showed to be most of the segment stage's numpy time; the
        results are equal (see :func:`index_histogram`, :func:`index_labels`)."""
        if self.expr.band is None or block.dtype.kind not in "iu" or block.dtype.itemsize > 2:
            return None
        values = block[self.idx[0]]
        if self.nodata is None or np.isnan(self.nodata):  # an integer band holds no NaN
            return values, None
        return values, values == self.nodata


def _integer_split(threshold: float, dtype: np.dtype) -> int | None:
    """For integer ``dtype``: ``k = floor(threshold)``, so that ``v > threshold`` iff ``v > k``
    for every integer v, clipped to the dtype's range minus one (-1 below it means "all",
    None means "none": no value of the dtype exceeds ``threshold``)."""
    info = np.iinfo(dtype)
    if np.isnan(threshold) or threshold >= info.max:
        return None
    return max(int(np.floor(threshold)), int(info.min) - 1)


def index_range(image: da.Array, index: IndexKernel, where: str = "segment") -> da.Array:
    """Lazy float64 (chunks y, chunks x, 2): per chunk, min and max of the valid index values
    (NaN, NaN for a chunk without any); the caller reduces them (``np.nanmin`` / ``np.nanmax``)."""

    def kernel(block: np.ndarray) -> np.ndarray:
        v = index(block)
        ok = v[~np.isnan(v)]
        return (np.array([ok.min(), ok.max()]) if ok.size else np.full(2, np.nan))[None, None, :]

    return da.map_blocks(in_chunk(kernel, where), image, drop_axis=0, new_axis=2, chunks=(1, 1, 2),
                         dtype=np.float64, meta=np.empty((0, 0, 0)))  # fmt: skip


def index_histogram(image: da.Array, index: IndexKernel, edges: np.ndarray, where: str = "segment") -> da.Array:
    """Lazy int64 (len(edges) - 1,) histogram of the valid index values over fixed ``edges``:
    the sum of per-chunk counts."""

    def kernel(block: np.ndarray) -> np.ndarray:
        band = index.integer_band(block)
        if band is not None and np.array_equal(edges, integer_bin_edges(block.dtype)):
            values, bad = band  # one unit bin per value of the dtype: count the integers directly
            v = values if bad is None else values[~bad]
            lowest = int(np.iinfo(values.dtype).min)
            v = v.ravel() if lowest == 0 else v.astype(np.int64).ravel() - lowest
            return np.bincount(v, minlength=len(edges) - 1).astype(np.int64)[None, None, :]
        v = index(block)
        return histogram(v, ~np.isnan(v), edges)[None, None, :]

    per_chunk = da.map_blocks(in_chunk(kernel, where), image, drop_axis=0, new_axis=2, chunks=(1, 1, len(edges) - 1),
                              dtype=np.int64, meta=np.empty((0, 0, 0), dtype=np.int64))  # fmt: skip
    return per_chunk.sum(axis=(0, 1))


def index_labels(image: da.Array, index: IndexKernel, threshold: float, nodata: int,
                 where: str = "segment") -> da.Array:  # fmt: skip
    """Lazy uint8 (y, x): 1 where the index > ``threshold``, 0 elsewhere, ``nodata`` where it is invalid."""

    def kernel(block: np.ndarray) -> np.ndarray:
        band = index.integer_band(block)
        if band is not None:  # integers: v > threshold iff v > floor(threshold), no float64 copy
            values, bad = band
            split = _integer_split(threshold, values.dtype)
            if split is None:
                out = np.zeros(values.shape, np.uint8)
            elif split < np.iinfo(values.dtype).min:
                out = np.ones(values.shape, np.uint8)
            else:
                out = (values > values.dtype.type(split)).view(np.uint8)
            if bad is not None:
                out[bad] = nodata
            return out
        v = index(block)
        with np.errstate(invalid="ignore"):
            out = (v > threshold).astype(np.uint8)
        out[np.isnan(v)] = nodata
        return out

    return da.map_blocks(in_chunk(kernel, where), image, drop_axis=0, dtype=np.uint8, meta=_meta(np.uint8))


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
    where: str = "segment",
) -> da.Array:
    """uint8 (y, x) cluster ids (or class ids through ``mapping``), ``nodata`` where invalid."""
    lut = None if mapping is None else np.asarray(mapping, dtype=np.uint8)

    def kernel(block: np.ndarray, ok: np.ndarray) -> np.ndarray:
        ids = model.predict(block)
        out = (lut[ids] if lut is not None else ids).astype(np.uint8)
        out[~ok] = nodata
        return out

    return da.map_blocks(in_chunk(kernel, where), image[band_idx], valid, drop_axis=0, dtype=np.uint8,
                         meta=_meta(np.uint8))  # fmt: skip


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
        fractional = arr != np.floor(arr)
        if fractional.any():  # astype would truncate 1.5 to class 1 without a word
            raise InputError(f"values that are not whole class ids (for example {arr[fractional][0]:g}); give a "
                             "ground-truth raster of integer class ids")  # fmt: skip
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
    where = f"reading ground truth {path}"
    if is_vector:
        return da.map_blocks(
            in_chunk(_gt_vector_block, where), path, class_column, lookup, grid, nodata, line_buffer,
            chunks=chunks, dtype=np.uint8, meta=_meta(np.uint8), token="tileseg-gt",
        )  # fmt: skip
    return da.map_blocks(
        in_chunk(_gt_raster_block, where), path, grid, nodata, lookup,
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
    """Lazy bool (y, x): False where EVERY band of ``image`` (band, y, x) is missing (equal to
    ``nodata``, or not finite in a float raster: :func:`pipeline.nodata.missing`)."""
    if nodata is None and image.dtype.kind != "f":
        return da.ones(image.shape[1:], chunks=image.chunks[1:], dtype=bool)
    return ~missing(image, nodata).all(axis=0)


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


def argmax_valid_labels(out: da.Array, nodata: int, where: str = "segment (unet)") -> da.Array:
    """uint8 (y, x) labels from :func:`pipeline.inference.unet_probabilities`' (K + 1, y, x)
    output: the most probable of the K classes (lowest id on ties), ``nodata`` where the last
    channel (validity) is 0. One task per chunk."""

    def kernel(p: np.ndarray) -> np.ndarray:
        labels = np.argmax(p[:-1], axis=0).astype(np.uint8)
        labels[p[-1] <= 0.5] = nodata
        return labels

    return da.map_blocks(in_chunk(kernel, where), out, drop_axis=0, dtype=np.uint8, meta=_meta(np.uint8))


def any_band_valid(image: da.Array, nodata: float | None) -> da.Array:
    """(y, x) bool: True where at least one band is not missing (:func:`image_valid`)."""
    return image_valid(image, nodata)


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


def write_chunks(labels: da.Array, probabilities: da.Array | None, writer: Callable[..., None],
                 where: str = "segment") -> da.Array:  # fmt: skip
    """Lazy status array whose block (i, j) writes chunk (i, j) of ``labels`` (y, x) and, if
    given, of ``probabilities`` (class, y, x), through ``writer``, then holds 1.

    ``writer(index, window, labels_block, probabilities_block)`` gets the block index
    (i, j) and the pixel window ((r0, r1), (c0, c1)) (see :class:`pipeline.io.store.ChunkWriter`).
    Dask blocks must equal the storage chunks, so every task writes whole chunks that no
    other task writes (design note "Writing chunks safely").

    Returns:
        int8 array of shape (nby, nbx), or (1, nby, nbx) with probabilities, one element per chunk.
    """
    nby, nbx = labels.numblocks
    out_chunks: tuple[tuple[int, ...], ...] = ((1,) * nby, (1,) * nbx)
    if probabilities is not None:
        out_chunks = ((1,),) + out_chunks

    def write(lab: np.ndarray, *probs: np.ndarray, block_info=None) -> np.ndarray:
        index, window = _location(block_info)  # type: ignore[misc]
        writer(index, window, lab, probs[0] if probs else None)
        return np.ones((1,) * len(out_chunks), np.int8)

    args = [labels] + ([probabilities] if probabilities is not None else [])
    return da.map_blocks(in_chunk(write, where), *args, chunks=out_chunks, dtype=np.int8,
                         meta=np.empty((0,) * len(out_chunks), np.int8), token="tileseg-write")  # fmt: skip


def _rows_done(*_: Any) -> None:
    """A row of chunks is written (and the rows above it): the chain's link, holds nothing."""
    return None


def _collected(collect: Callable[[list, list], Any], _chain_end: None, values: list, more: list) -> Any:
    """The task after the chain (:func:`chunk_tasks` with ``collect``)."""
    return collect(values, more)


def chunk_tasks(status: da.Array, todo: list[tuple[int, int]], strips: list[tuple[int, int]] | None = None,
                extra: dict[tuple[int, int], list] | None = None,
                collect: Callable[[list, list], Any] | None = None) -> Any:  # fmt: skip
    """One Dask ``Delayed`` that writes the chunks (i, j) in ``todo``, from :func:`write_chunks`'
    status array, in row-major order of priority (strip after strip with ``strips``: runs
    [j0, j1) of chunk columns from :func:`pipeline.grid.column_strips`).

    Computing it runs only those chunks' tasks (and what they depend on): a resumed run
    builds no task for a finished chunk. The graph is optimized with Dask's blockwise fusion
    (per-chunk kernels merge into one task, keeping their annotations, such as a GPU
    resource) but without low-level fusion, which would drop the annotations
    (``optimization.fuse.active: False``); the Delayed shares that layered graph
    (``Array.to_delayed`` would collapse it into one layer, dropping them too).

    The Delayed is the end of a chain with one link per row of chunks (``tileseg-rows-*``:
    row i's link waits for row i's writes and row i - 1's link); with ``strips``, one link
    per row of each vertical strip of chunk columns, the strips one after the other. The links do no work; they
    make ``dask.order`` (which both the threaded and the distributed scheduler follow) finish
    the chunks row by row. Without them, a task that feeds several chunks (a U-Net window
    block: :mod:`pipeline.inference`) was kept alive in a band twice as tall: on a 4096 px
    wide raster 30 window blocks at the peak against 14 to 18 with the chain (README
    "Performance", case 4). Dask's order of independent outputs is not their order in the
    ``compute`` call, so the chain is what states it.

    Args:
        extra: chunk (i, j) -> more keys of ``status``' graph that the link of that chunk's
            row also waits for (say a task that needs this chunk and earlier ones).
        collect: a function of (the values of ``status``' blocks in ``todo`` order, the values
            of ``extra``'s keys in link order): when given, the Delayed is one more task after
            the chain that returns what ``collect`` returns. Computing other outputs of the
            same graph beside the chain would let ``dask.order`` run them in its own order
            again (it orders by all of a graph's outputs), so small per-chunk results
            that a caller needs are gathered this way, through the chain's end.

    Returns:
        A ``Delayed`` (None when ``todo`` is empty).
    """
    from dask.delayed import Delayed
    from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

    keys = status.__dask_keys__()
    more = [k for ks in (extra or {}).values() for k in ks]
    with dask.config.set({"optimization.fuse.active": False}):
        graph = status.__dask_optimize__(status.__dask_graph__(), [keys, more] if more else keys)
    lead = (0,) if status.ndim == 3 else ()
    first = (status.name, *lead, 0, 0)
    # blockwise fusion renames the output layer (the keys stay): find it
    layer = next(n for n in graph.layers if n.startswith(status.name) and first in graph.layers[n])
    needs = {layer} | {n for n, lay in graph.layers.items() if any(k in lay for k in more)}
    rows_name = f"tileseg-rows-{tokenize(status.name, todo, strips, extra, collect)}"
    chain: dict = {}
    prev: list = []
    gathered: list = []
    for k, (j0, j1) in enumerate(strips or [(0, status.numblocks[-1])]):
        for i in sorted({i for i, j in todo if j0 <= j < j1}):
            row = [j for ii, j in todo if ii == i and j0 <= j < j1]
            writes = [(status.name, *lead, i, j) for j in row]
            also = [key for j in row for key in (extra or {}).get((i, j), [])]
            gathered += also
            chain[(rows_name, k, i)] = (_rows_done, *prev, *writes, *also)
            prev = [(rows_name, k, i)]
    if collect is not None and prev:
        chain[(rows_name, "collect")] = (_collected, collect, prev[0], [(status.name, *lead, i, j) for i, j in todo],
                                         gathered)  # fmt: skip
        prev = [(rows_name, "collect")]
    graph = HighLevelGraph({**graph.layers, rows_name: MaterializedLayer(chain)},
                           {**graph.dependencies, rows_name: needs})  # fmt: skip
    return Delayed(prev[0], graph, layer=rows_name) if prev else None
