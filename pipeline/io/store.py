"""The chunked zarr v3 store: ``image`` (band, y, x) and ``labels`` (y, x) with georeferencing.

Georeferencing follows the CF/rioxarray convention: a scalar ``spatial_ref``
coordinate holding ``crs_wkt`` and ``GeoTransform``, each data variable naming it
in its ``grid_mapping`` attribute, and ``x``/``y`` coordinates of pixel centres.
``xarray.open_zarr(store)`` then gives ``.rio.crs`` and ``.rio.transform()`` back
exactly. Band names live in the ``band_names`` attribute of ``image`` (a JSON list;
zarr v3 warns on fixed-length string coordinates), nodata in ``nodata``.

Metadata is consolidated so that a plain ``xarray.open_zarr(store)`` opens quickly
and without warnings.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Iterator
from functools import lru_cache
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
from affine import Affine
from rasterio.crs import CRS

from pipeline.errors import InputError, RasterIOError
from pipeline.grid import Grid

IMAGE = "image"
LABELS = "labels"
PROBABILITIES = "probabilities"


def _georeference(ds: xr.Dataset, grid: Grid) -> xr.Dataset:
    import rioxarray  # noqa: F401  (registers the .rio accessor)

    if grid.crs_wkt is not None:
        ds = ds.rio.write_crs(CRS.from_wkt(grid.crs_wkt).to_wkt())
    ds = ds.rio.write_transform(grid.transform)
    for name in ds.data_vars:
        # grid_mapping as an attribute (not encoding): xarray then lists spatial_ref
        # in the variable's `coordinates`, so open_zarr restores it as a coordinate.
        ds[name].encoding.pop("grid_mapping", None)
        ds[name].attrs["grid_mapping"] = "spatial_ref"
    return ds


def _coords(grid: Grid) -> dict[str, Any]:
    return {"y": grid.y_centres(), "x": grid.x_centres()}


def _to_zarr(ds: xr.Dataset, path: Path, mode: str, encoding: dict[str, Any], write_empty_chunks: bool | None = None
             ) -> Any:  # fmt: skip
    if mode == "a":  # appending replaces the group's attributes: keep the store's (the ingest manifest)
        ds = ds.assign_attrs({**read_root_attrs(path), **ds.attrs})
    with warnings.catch_warnings():
        # zarr v3 warns that consolidated metadata is an extension; xarray relies on it.
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        return ds.to_zarr(path, mode=mode, zarr_format=3, consolidated=True, encoding=encoding, compute=False,
                          write_empty_chunks=write_empty_chunks)


def image_dataset(image: da.Array, grid: Grid, band_names: list[str], nodata: float | None) -> xr.Dataset:
    """Wrap a Dask array (band, y, x) into the store's georeferenced Dataset."""
    arr = xr.DataArray(
        image,
        dims=("band", "y", "x"),
        coords={"band": np.arange(1, len(band_names) + 1), **_coords(grid)},
        name=IMAGE,
        attrs={"band_names": list(band_names), "long_name": list(band_names)},
    )
    if nodata is not None:
        arr.attrs["nodata"] = nodata.item() if isinstance(nodata, np.generic) else nodata
    return _georeference(arr.to_dataset(), grid)


#: zstd level of the ``image`` array (zarr's default is level 3, see :func:`write_image`).
IMAGE_ZSTD_LEVEL = 1


def write_image(ds: xr.Dataset, path: Path, chunk: int) -> Any:
    """Prepare writing the image Dataset to a new store at ``path``; returns a Dask delayed to compute.

    Dask chunks must equal storage chunks (band, chunk, chunk) so each task writes
    whole zarr chunks that no other task writes.

    Two choices come from the ingest profile (``tests/benchmarks/bench_ingest.py``, README
    "Performance"), where zarr's chunk encoding and its per-chunk bookkeeping took about as
    much worker time as decoding the GeoTIFF:

    - zstd at level :data:`IMAGE_ZSTD_LEVEL` (1) instead of zarr's default level 3: on
      the sample's uint8 chunks it encodes about 1.7 times faster for chunks about 13%
      larger, and decodes as fast;
    - every chunk is written (``write_empty_chunks=True``): otherwise zarr compares each
      chunk with the fill value before writing it, on its single I/O thread, to skip
      all-fill chunks. An all-nodata chunk now costs a small file instead.
    """
    from zarr.codecs import ZstdCodec

    nb = ds[IMAGE].shape[0]
    encoding = {IMAGE: {"chunks": (nb, chunk, chunk), "compressors": [ZstdCodec(level=IMAGE_ZSTD_LEVEL)]}}
    return _to_zarr(ds, path, "w", encoding, write_empty_chunks=True)


def _consolidate(store: Path) -> None:
    import zarr

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        zarr.consolidate_metadata(store, zarr_format=3)


def _drop_variable(store: Path, name: str) -> None:
    import zarr

    group = zarr.open_group(store, mode="r+", zarr_format=3)
    if name in group:
        del group[name]  # the whole directory, with anything inside it (such as chunk markers)
        _consolidate(store)


def _partial(name: str) -> str:
    return f"{name}_partial"


#: Sidecar directory of per-chunk completion markers, inside the partial labels array
#: (zarr never looks into an array's directory for anything but zarr.json and chunks).
DONE_DIR = ".chunks_done"

#: Attribute holding the key of the segment run that wrote an array (see :mod:`pipeline.resume`).
SEGMENT_KEY = "segment_key"


def create_partial_labels(
    store: Path,
    labels: da.Array,
    grid: Grid,
    attrs: dict[str, Any],
    probabilities: da.Array | None = None,
) -> None:
    """Create empty ``labels_partial`` (y, x) (and ``probabilities_partial`` (class, y, x),
    float16) arrays in an existing store, with their metadata and attributes, and an empty
    marker directory; leftovers of an earlier unfinished run are removed first.

    Chunks are then written one by one by :class:`ChunkWriter` tasks, and only
    :func:`publish_labels` (after every chunk is written) renames the arrays onto ``labels``
    / ``probabilities``, replacing the earlier ones whole. A failed or killed run therefore
    never leaves a ``labels`` array with unwritten chunks (which would read as the fill
    value), and an earlier complete ``labels`` survives it. Arrays must be chunked like the
    store's ``image`` in (y, x), so every task writes whole zarr chunks.

    Raises:
        RasterIOError: the store cannot be written.
    """
    store = Path(store)
    discard_partial_labels(store)
    coords = _coords(grid)
    data_vars = {_partial(LABELS): xr.DataArray(labels, dims=("y", "x"), coords=coords, attrs=dict(attrs))}
    chunks = (labels.chunks[0][0], labels.chunks[1][0])
    encoding: dict[str, Any] = {_partial(LABELS): {"chunks": chunks}}
    if probabilities is not None:
        names = list(attrs.get("class_names") or [])
        pattrs = {"class_names": names, SEGMENT_KEY: attrs.get(SEGMENT_KEY)}
        data_vars[_partial(PROBABILITIES)] = xr.DataArray(probabilities, dims=("class", "y", "x"), coords=coords,
                                                          attrs=pattrs)  # fmt: skip
        encoding[_partial(PROBABILITIES)] = {"chunks": (probabilities.shape[0],) + chunks}
    ds = _georeference(xr.Dataset(data_vars), grid)
    try:
        _to_zarr(ds, store, "a", encoding)  # writes the metadata now; the returned data writes are not used
        (store / _partial(LABELS) / DONE_DIR).mkdir()
    except OSError as exc:
        raise RasterIOError(f"cannot create the labels arrays in {store}: {exc}") from None


def _read_attrs(array_dir: Path) -> dict[str, Any] | None:
    """Attributes of a zarr v3 array from its zarr.json, or None when it has none (or is damaged)."""
    import json

    try:
        return json.loads((array_dir / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError):
        return None


def labels_state(store: Path) -> dict[str, Any]:
    """What a store holds of segment output: the :data:`SEGMENT_KEY` of ``labels`` and of
    ``labels_partial`` (None when absent or without a key), and whether ``probabilities``
    / ``probabilities_partial`` exist (with their keys)."""
    store = Path(store)
    out: dict[str, Any] = {}
    for name in (LABELS, PROBABILITIES):
        for var in (name, _partial(name)):
            attrs = _read_attrs(store / var)
            out[var] = None if attrs is None else attrs.get(SEGMENT_KEY, "")
    return out


def labels_attrs(store: Path) -> list[dict[str, Any]]:
    """Attributes of the store's ``labels_partial`` and ``labels``, in that order, of those
    that exist (an interrupted run's first, then the finished one's)."""
    found = (_read_attrs(Path(store) / var) for var in (_partial(LABELS), LABELS))
    return [a for a in found if a is not None]


def done_chunks(store: Path, key: str) -> set[tuple[int, int]]:
    """Chunks (i, j) of ``labels_partial`` whose completion marker holds ``key``.

    A marker is written (atomically) only after its chunk (and its probabilities chunk) is
    written, so a chunk without a marker, or with another run's marker, is redone.
    """
    done: set[tuple[int, int]] = set()
    folder = Path(store) / _partial(LABELS) / DONE_DIR
    if not folder.is_dir():
        return done
    for f in folder.iterdir():
        parts = f.name.split(".")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            continue  # a temporary file of a killed marker write
        try:
            if f.read_text() == key:
                done.add((int(parts[0]), int(parts[1])))
        except OSError:
            continue
    return done


@dataclass(frozen=True)
class ChunkWriter:
    """Writes one chunk of ``labels_partial`` (and ``probabilities_partial``) of ``store``,
    then its completion marker ``labels_partial/.chunks_done/<i>.<j>`` holding ``key``.

    Called inside Dask tasks (:func:`pipeline.apply.write_chunks`); a plain dataclass so it
    pickles to workers. The chunk files are written by zarr (atomically: temporary file and
    rename) and the marker last, also through a rename, so a marker always means a whole chunk.
    """

    store: str
    key: str

    def __call__(self, index: tuple[int, int], window, labels: np.ndarray, probabilities: np.ndarray | None) -> None:
        (r0, r1), (c0, c1) = window
        root = Path(self.store)
        try:
            if probabilities is not None:
                zarr_array(root / _partial(PROBABILITIES), "r+")[:, r0:r1, c0:c1] = probabilities
            zarr_array(root / _partial(LABELS), "r+")[r0:r1, c0:c1] = labels
            marker = root / _partial(LABELS) / DONE_DIR / f"{index[0]}.{index[1]}"
            tmp = marker.with_name(f"{marker.name}.{os.getpid()}.tmp")
            tmp.write_text(self.key)
            os.replace(tmp, marker)
        except OSError as exc:
            raise RasterIOError(f"cannot write chunk {index} to {self.store}: {exc}") from None


def publish_labels(store: Path) -> None:
    """Rename the arrays made by :func:`create_partial_labels` onto ``labels`` / ``probabilities``
    once every chunk is written, dropping the marker directory first.

    Earlier ``labels`` and ``probabilities`` are removed first (also ``probabilities`` when
    this run wrote none, so no stale probabilities stay next to new labels). Temporary files
    that zarr left in the arrays when an earlier run was killed mid-write are removed.

    Raises:
        RasterIOError: the store cannot be changed.
    """
    store = Path(store)
    try:
        shutil.rmtree(store / _partial(LABELS) / DONE_DIR, ignore_errors=True)
        for name in (LABELS, PROBABILITIES):
            final, tmp = store / name, store / _partial(name)
            if tmp.exists():
                for leftover in tmp.rglob("*.partial"):  # zarr's temporary chunk files of a killed write
                    leftover.unlink(missing_ok=True)
            if final.exists():
                shutil.rmtree(final)
            if tmp.exists():
                tmp.rename(final)
        _consolidate(store)
    except OSError as exc:
        raise RasterIOError(f"cannot publish labels in {store}: {exc}") from None


def discard_partial_labels(store: Path) -> None:
    """Remove arrays (and markers) left by an unfinished segment run (no-op when there are none)."""
    for name in (LABELS, PROBABILITIES):
        _drop_variable(Path(store), _partial(name))


def read_root_attrs(store: Path) -> dict[str, Any]:
    """The store's root group attributes (empty when it has none or is not a zarr v3 store)."""
    return _read_attrs(Path(store)) or {}


@lru_cache(maxsize=64)
def _open_cached(path: str, mode: str, identity: tuple[int, int, int]) -> Any:
    import zarr

    return zarr.open_array(path, mode=mode)


def zarr_array(path: str | Path, mode: str = "r") -> Any:
    """``zarr.open_array(path, mode)``, cached in this process for the chunk tasks.

    Opening parses the array's ``zarr.json`` (about 1.2 ms, as much as half of reading a
    512 x 512 chunk: the Otsu benchmark's profile). The cache key includes that file's inode,
    size and mtime, so an array replaced or rewritten under the same path (stores are
    published by rename) is opened afresh.

    Raises:
        FileNotFoundError: no array at ``path``.
    """
    st = os.stat(Path(path) / "zarr.json")
    return _open_cached(str(path), mode, (st.st_ino, st.st_size, st.st_mtime_ns))


def read_region(store: str | Path, bands: list[int], r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """Read ``image[bands, r0:r1, c0:c1]`` of a store straight from zarr, shape (len(bands), r1-r0, c1-c0).

    Raises:
        RasterIOError: the store cannot be read.
    """
    try:
        arr = zarr_array(Path(store) / IMAGE)
        bands = list(bands)
        if not bands:
            return np.empty((0, r1 - r0, c1 - c0), arr.dtype)
        # A slice of the bands' span, then numpy picks the bands: a chunk holds every band and is
        # decoded whole anyway, and zarr's orthogonal indexing (``oindex``) costs more Python per
        # call (10 of 13 bands, the U-Net's: 24 against 33 ms per window block).
        lo, hi = min(bands), max(bands)
        span = np.asarray(arr[lo : hi + 1, r0:r1, c0:c1])
        return span if bands == list(range(lo, hi + 1)) else span[[b - lo for b in bands]]
    except Exception as exc:  # zarr raises many types for missing or damaged chunks
        raise RasterIOError(f"cannot read image[{r0}:{r1}, {c0}:{c1}] from {store}: {exc}") from None


def iter_blocks(store: str | Path, name: str, windows: list[Any]) -> Iterator[tuple[Any, np.ndarray]]:
    """Yield (window, ``name[..., rows, cols]``) for each rasterio ``Window``, read straight from
    zarr in this process: shape (window.height, window.width) for a (y, x) array.

    For the single-process COG writer (stitch): going through Dask instead costs a scheduler
    round trip per chunk, which the Otsu benchmark's profile showed taking most of stitch's
    time (README "Performance").

    Raises:
        RasterIOError: the array or one of its chunks cannot be read.
    """
    import zarr

    try:
        arr = zarr.open_array(Path(store) / name, mode="r")
    except Exception as exc:  # zarr raises many types for a missing or damaged array
        raise RasterIOError(f"cannot open {name} in {store}: {exc}") from None
    for w in windows:
        r0, c0 = int(w.row_off), int(w.col_off)
        r1, c1 = r0 + int(w.height), c0 + int(w.width)
        try:
            block = np.asarray(arr[..., r0:r1, c0:c1])
        except Exception as exc:
            raise RasterIOError(f"cannot read {name}[{r0}:{r1}, {c0}:{c1}] from {store}: {exc}") from None
        yield w, block


def open_store(path: str | Path) -> xr.Dataset:
    """Open a tileseg store lazily (Dask arrays chunked as stored).

    Raises:
        RasterIOError: the path is not a zarr store.
        InputError: the store has no ``image`` variable.
    """
    p = Path(path)
    if not (p / "zarr.json").is_file():
        raise RasterIOError(f"{p} is not a zarr v3 store (no zarr.json); run `tileseg ingest` first")
    try:
        ds = xr.open_zarr(p, consolidated=True)
    except Exception as exc:  # zarr raises many types for a damaged store
        raise RasterIOError(f"cannot open zarr store {p}: {exc}") from None
    if IMAGE not in ds and LABELS not in ds:
        raise InputError(f"{p} has neither '{IMAGE}' nor '{LABELS}'; is it a tileseg store?")
    return ds


def store_grid(ds: xr.Dataset) -> Grid:
    """The Grid of an opened store (CRS from ``spatial_ref``, transform from ``GeoTransform``)."""
    import rioxarray  # noqa: F401

    var = ds[IMAGE] if IMAGE in ds else ds[LABELS]
    crs = var.rio.crs
    transform: Affine = var.rio.transform()
    return Grid(crs.to_wkt() if crs is not None else None, transform, var.sizes["y"], var.sizes["x"])


def publish_dir(tmp: Path, final: Path) -> None:
    """Atomically replace directory ``final`` by ``tmp`` (rename on one filesystem).

    Raises:
        RasterIOError: the rename fails.
    """
    old = final.with_name(f".{final.name}.old")
    try:
        if final.exists():
            if old.exists():
                shutil.rmtree(old)
            final.rename(old)
        tmp.rename(final)
    except OSError as exc:
        raise RasterIOError(f"cannot publish {final}: {exc}") from None
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def write_array(arr: da.Array, path: Path) -> Any:
    """Prepare writing a (y, x) Dask array to a new plain zarr v3 array at ``path``
    (storage chunks = Dask chunks, so each task writes whole chunks of its own);
    returns a lazy Dask object to compute. For intermediate results (the error map)."""
    return da.to_zarr(arr, str(path), compute=False, overwrite=True)


def create_scratch(path: Path, shape: tuple[int, int], chunks: tuple[int, int], dtype: Any) -> None:
    """Create an empty plain zarr v3 array (y, x) at ``path`` (replacing any), filled with 0,
    for :class:`WindowWriter` tasks to write chunk by chunk; read it back with :func:`open_array`.

    Raises:
        RasterIOError: the array cannot be created.
    """
    import zarr

    try:
        zarr.create_array(str(path), shape=shape, chunks=chunks, dtype=dtype, fill_value=0, overwrite=True)
    except OSError as exc:
        raise RasterIOError(f"cannot create {path}: {exc}") from None


@dataclass(frozen=True)
class WindowWriter:
    """Writes a (y, x) block to its pixel window ``((r0, r1), (c0, c1))`` of the zarr array at
    ``path`` (made by :func:`create_scratch`), inside a Dask task; pickles to workers. The
    windows must be whole storage chunks, so that no two tasks write one chunk."""

    path: str

    def __call__(self, index: tuple[int, int], window: tuple[tuple[int, int], tuple[int, int]],
                 block: np.ndarray) -> None:  # fmt: skip
        (r0, r1), (c0, c1) = window
        try:
            zarr_array(self.path, "r+")[r0:r1, c0:c1] = block
        except OSError as exc:
            raise RasterIOError(f"cannot write chunk {index} to {self.path}: {exc}") from None


def open_array(path: Path) -> da.Array:
    """A zarr array written by :func:`write_array`, lazily, chunked as stored."""
    return da.from_zarr(str(path))


INSTANCES = "instances"
PANOPTIC = "panoptic"


def write_variable(store: Path, name: str, arr: da.Array, grid: Grid, attrs: dict[str, Any],
                   dims: tuple[str, ...] = ("y", "x")) -> Any:  # fmt: skip
    """Prepare writing a (y, x) array (or (k, y, x) with ``dims``, e.g. ("component", "y",
    "x")) as ``<name>_partial`` into an existing store, with the store's georeferencing;
    returns a Dask delayed to compute. :func:`publish_variable` renames it onto ``name``
    after the compute succeeded (as :func:`write_labels` does for ``labels``). ``arr``
    must be chunked like the store's ``image`` in (y, x), whole along a leading axis.
    """
    _drop_variable(Path(store), _partial(name))  # leftovers of a killed run
    da_ = xr.DataArray(arr, dims=dims, coords=_coords(grid), attrs=dict(attrs))
    ds = _georeference(xr.Dataset({_partial(name): da_}), grid)
    chunks = tuple(arr.shape[:-2]) + (arr.chunks[-2][0], arr.chunks[-1][0])
    return _to_zarr(ds, Path(store), "a", {_partial(name): {"chunks": chunks}})


def publish_variable(store: Path, name: str) -> None:
    """Rename ``<name>_partial`` onto ``name`` (replacing an earlier one whole).

    Raises:
        RasterIOError: the store cannot be changed.
    """
    store = Path(store)
    final, tmp = store / name, store / _partial(name)
    try:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _consolidate(store)
    except OSError as exc:
        raise RasterIOError(f"cannot publish {name} in {store}: {exc}") from None


def discard_partial(store: Path, name: str) -> None:
    """Remove ``<name>_partial`` left by an unfinished :func:`write_variable` (no-op if absent)."""
    _drop_variable(Path(store), _partial(name))
