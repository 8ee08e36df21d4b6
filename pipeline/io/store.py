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

import shutil
import warnings
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


def _to_zarr(ds: xr.Dataset, path: Path, mode: str, encoding: dict[str, Any]) -> Any:
    with warnings.catch_warnings():
        # zarr v3 warns that consolidated metadata is an extension; xarray relies on it.
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        return ds.to_zarr(path, mode=mode, zarr_format=3, consolidated=True, encoding=encoding, compute=False)


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


def write_image(ds: xr.Dataset, path: Path, chunk: int) -> Any:
    """Prepare writing the image Dataset to a new store at ``path``; returns a Dask delayed to compute.

    Dask chunks must equal storage chunks (band, chunk, chunk) so each task writes
    whole zarr chunks that no other task writes.
    """
    nb = ds[IMAGE].shape[0]
    return _to_zarr(ds, path, "w", {IMAGE: {"chunks": (nb, chunk, chunk)}})


def _consolidate(store: Path) -> None:
    import zarr

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        zarr.consolidate_metadata(store, zarr_format=3)


def _drop_variable(store: Path, name: str) -> None:
    import zarr

    group = zarr.open_group(store, mode="r+", zarr_format=3)
    if name in group:
        del group[name]
        _consolidate(store)


def _partial(name: str) -> str:
    return f"{name}_partial"


def write_labels(
    store: Path,
    labels: da.Array,
    grid: Grid,
    attrs: dict[str, Any],
    probabilities: da.Array | None = None,
) -> Any:
    """Prepare writing ``labels`` (y, x) (and optionally ``probabilities`` (class, y, x),
    float16) into an existing store; returns a Dask delayed to compute.

    The arrays are written as ``labels_partial`` / ``probabilities_partial``; only
    :func:`publish_labels` (after the compute succeeded) renames them onto ``labels`` /
    ``probabilities``, replacing the earlier ones whole. A failed or killed run therefore
    never leaves a ``labels`` array with unwritten chunks (which would read as class 0),
    and an earlier complete ``labels`` survives it. Arrays must be chunked like the
    store's ``image`` in (y, x), so every task writes whole zarr chunks.
    """
    discard_partial_labels(store)  # leftovers of a killed run
    coords = _coords(grid)
    data_vars = {_partial(LABELS): xr.DataArray(labels, dims=("y", "x"), coords=coords, attrs=dict(attrs))}
    chunks = (labels.chunks[0][0], labels.chunks[1][0])
    encoding: dict[str, Any] = {_partial(LABELS): {"chunks": chunks}}
    if probabilities is not None:
        names = list(attrs.get("class_names") or [])
        data_vars[_partial(PROBABILITIES)] = xr.DataArray(
            probabilities, dims=("class", "y", "x"), coords=coords, attrs={"class_names": names}
        )
        encoding[_partial(PROBABILITIES)] = {"chunks": (probabilities.shape[0],) + chunks}
    ds = _georeference(xr.Dataset(data_vars), grid)
    return _to_zarr(ds, store, "a", encoding)


def publish_labels(store: Path) -> None:
    """Rename the arrays written by :func:`write_labels` onto ``labels`` / ``probabilities``.

    Earlier ``labels`` and ``probabilities`` are removed first (also ``probabilities`` when
    this run wrote none, so no stale probabilities stay next to new labels).

    Raises:
        RasterIOError: the store cannot be changed.
    """
    store = Path(store)
    try:
        for name in (LABELS, PROBABILITIES):
            final, tmp = store / name, store / _partial(name)
            if final.exists():
                shutil.rmtree(final)
            if tmp.exists():
                tmp.rename(final)
        _consolidate(store)
    except OSError as exc:
        raise RasterIOError(f"cannot publish labels in {store}: {exc}") from None


def discard_partial_labels(store: Path) -> None:
    """Remove arrays left by an unfinished :func:`write_labels` (no-op when there are none)."""
    for name in (LABELS, PROBABILITIES):
        _drop_variable(Path(store), _partial(name))


def read_region(store: str | Path, bands: list[int], r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """Read ``image[bands, r0:r1, c0:c1]`` of a store straight from zarr, shape (len(bands), r1-r0, c1-c0).

    Raises:
        RasterIOError: the store cannot be read.
    """
    import zarr

    try:
        arr = zarr.open_array(Path(store) / IMAGE, mode="r")
        return np.asarray(arr.oindex[list(bands), r0:r1, c0:c1])
    except Exception as exc:  # zarr raises many types for missing or damaged chunks
        raise RasterIOError(f"cannot read image[{r0}:{r1}, {c0}:{c1}] from {store}: {exc}") from None


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
