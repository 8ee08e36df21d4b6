"""Raster file I/O with rasterio: describing sources, windowed reads onto a target
grid, and the single-writer Cloud-Optimized GeoTIFF.

This module and its siblings in ``pipeline.io`` are the only places that open files.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from contextlib import nullcontext
from typing import Any
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import rasterio.errors
import rasterio.shutil
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio._err import CPLE_BaseError
from rasterio.errors import RasterioError
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from pipeline.errors import InputError, MissingFileError, RasterIOError, io_failure
from pipeline.grid import Grid
from pipeline.io.files import remove_stale_temporaries, usable_cpus

log = logging.getLogger("tileseg")


@dataclass(frozen=True)
class BandSource:
    """One input band: a band of a raster file.

    Attributes:
        path: the file (any GDAL-readable raster).
        index: 1-based band index in that file.
        name: band name used in expressions and configs (for example ``B03``).
        dtype: numpy dtype name of the band.
        nodata: the file's nodata value for the band, or None.
        grid: the file's own grid.
    """

    path: str
    index: int
    name: str
    dtype: str
    nodata: float | None
    grid: Grid


# GDAL decodes some formats (JPEG2000, multi-threaded GeoTIFF) on its own worker
# threads. A decoder error raised there bypasses rasterio's per-thread error handler:
# GDAL prints "ERROR 1" and the read returns garbage with no exception. Reading on the
# calling thread turns those errors into exceptions; Dask runs chunks in parallel instead.
#
# GDAL_CACHEMAX: datasets stay open between chunks (:func:`_reader`), and GDAL's block cache,
# by default 5 % of the RAM, would keep every block read until it is full; 16 MiB keeps a
# worker's memory bounded by its chunks and still holds the blocks one window's read decodes
# (64 MiB: +65 MiB RSS for Otsu at 8192² and ingest of the sample 1.47 s against 1.52 to 1.63 s;
# README "Performance"). rasterio passes an integer to GDALSetCacheMax64, in *bytes*: a bare
# 64 was a 64-byte cache (blocks shared by two reads of a window decoded twice, a JPEG2000
# band read onto a finer grid 40 times slower). The cache is one for the whole process and
# stays at this size after tileseg's reads.
_CACHE_BYTES = 16 * 1024 * 1024
_READ_ENV = {"GDAL_NUM_THREADS": "1", "GDAL_CACHEMAX": _CACHE_BYTES}
#: GDAL's block cache while writing a COG (bytes). Its default, 5 % of the RAM, held every
#: written tile of the temporary GeoTIFF until the file was closed, so stitch's peak memory
#: grew with the raster (README "Performance", case 4); tiles stream to disk with a small cache.
_WRITE_ENV = {"GDAL_CACHEMAX": _CACHE_BYTES}


_HANDLES = threading.local()
_HANDLES_MAX = 16


def _reader(path: str, session: str) -> rasterio.DatasetReader:
    """An open dataset for ``path`` kept for this thread during one ``session`` (one stage's
    computation; at most 16 datasets, least recently used closed first), re-opened when the
    file's inode, size or mtime changed. Opening a GeoTIFF cost about 1 ms of the 3 ms a
    512 px chunk's read took (ingest benchmark). Datasets are not shared between threads: each
    Dask thread has its own. A new session (every ingest) opens every file afresh, so a
    long-lived worker of an existing cluster never reads a VRT whose sources were replaced
    between runs through an old dataset."""
    try:
        st = os.stat(path)
        key: tuple = (path, session, st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError:  # missing (rasterio raises below), or not a local file (a URL, /vsi...)
        key = (path, session)
    cache = getattr(_HANDLES, "datasets", None)
    if cache is None:
        cache = _HANDLES.datasets = {}
    ds = cache.pop(key, None)
    if ds is None or ds.closed:
        for k in [k for k in cache if k[0] == path]:  # an older version, or another session's
            cache.pop(k).close()
        with rasterio.Env(**_READ_ENV):
            ds = rasterio.open(path)
        while len(cache) >= _HANDLES_MAX:
            cache.pop(next(iter(cache))).close()
    cache[key] = ds  # most recently used last
    return ds


def _opened(path: str, session: str | None) -> Any:
    """Context manager of a dataset for reading: this thread's open one for ``session``
    (:func:`_reader`, left open), or, without a session, one opened and closed here."""
    return nullcontext(_reader(path, session)) if session else rasterio.open(path)


def _forget(path: str) -> None:
    """Close and drop this thread's open datasets of ``path`` (after a failed read)."""
    cache = getattr(_HANDLES, "datasets", {})
    for k in [k for k in cache if k[0] == path]:
        cache.pop(k).close()


def _read_failed(path: str | Path, window: Window, exc: RasterioError) -> RasterIOError:
    """A one-line error for a failed read, with GDAL's own reason (rasterio chains it as the cause).

    A local file that is not there (where the read ran: a Dask worker sees its own file
    system) is a :class:`MissingFileError`, which no retry fixes, not a corrupt file."""
    if _is_local(str(path)) and not Path(path).exists():
        return MissingFileError(
            f"input raster not found where the read ran: {path} (on a Dask cluster every worker must see the "
            "file under this name: a shared file system)"
        )
    reason = exc.__cause__ if exc.__cause__ is not None else exc  # rasterio: "See previous exception"
    where = f"rows {window.row_off}-{window.row_off + window.height}, cols {window.col_off}-{window.col_off + window.width}"
    return RasterIOError(
        f"reading {path} ({where}) failed: {str(reason).strip()}; the file may be truncated or corrupt, "
        "check it with `gdalinfo -checksum` and re-download or re-export it"
    )


def _is_local(path: str) -> bool:
    """Whether ``path`` names a file of the local file system (not a URL, not a GDAL /vsi path)."""
    return "://" not in path and not path.startswith("/vsi")


def _open(path: str | Path) -> rasterio.DatasetReader:
    if _is_local(str(path)) and not Path(path).exists():
        raise MissingFileError(f"input raster not found: {path}")
    try:
        ds = rasterio.open(path)
    except RasterioError as exc:
        raise RasterIOError(f"cannot read {path} as a raster ({exc}); is it a valid GDAL raster?") from None
    if ds.count == 0:
        ds.close()
        raise RasterIOError(f"{path} has no raster bands (a zarr store or a container?); give raster files")
    return ds


def _band_name_from_file(path: str) -> str:
    """Band name for a single-band file: the stem's last '_' token (``T33UUU_..._B03`` -> ``B03``)."""
    stem = Path(path).name.split(".")[0]
    token = re.split(r"[_\-\s]+", stem)[-1]
    return token or stem


def describe_sources(paths: Iterable[str | Path], band_names: list[str] | None = None) -> list[BandSource]:
    """List every band of every input file, in order, with its name and grid.

    Names come from ``band_names`` if given, else from the band description, else
    (single-band files) from the last ``_`` token of the file name, else ``band_<i>``.

    Raises:
        RasterIOError: a file is missing or not a raster.
        InputError: wrong number of band names, duplicate names, no CRS on some file.
    """
    paths = [str(p) for p in paths]
    if not paths:
        raise InputError("no input rasters given")
    sources: list[BandSource] = []
    for path in paths:
        with _open(path) as ds:
            crs_wkt = ds.crs.to_wkt() if ds.crs else None
            grid = Grid(crs_wkt, ds.transform, ds.height, ds.width)
            for i in range(1, ds.count + 1):
                desc = ds.descriptions[i - 1]
                if desc:
                    name = desc
                elif ds.count == 1:
                    name = _band_name_from_file(path)
                else:
                    name = f"{Path(path).stem}_band_{i}" if len(paths) > 1 else f"band_{i}"
                sources.append(BandSource(path, i, name, ds.dtypes[i - 1], ds.nodatavals[i - 1], grid))
    if band_names is not None:
        if len(band_names) != len(sources):
            raise InputError(f"ingest.band_names has {len(band_names)} names but the inputs have {len(sources)} bands")
        sources = [BandSource(s.path, s.index, n, s.dtype, s.nodata, s.grid) for s, n in zip(sources, band_names)]
    names = [s.name for s in sources]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"duplicate band names {dupes}; set ingest.band_names to name the bands")
    has_crs = [s.grid.crs_wkt is not None for s in sources]
    if any(has_crs) and not all(has_crs):
        missing = sorted({s.path for s in sources if s.grid.crs_wkt is None})
        raise InputError(f"some inputs have no CRS: {missing}; assign one (gdal_edit.py -a_srs) and retry")
    return sources


def target_grid(
    sources: list[BandSource], reference: str | None, resolution: float | None, allow_no_crs: bool = False
) -> Grid:
    """The grid all bands are resampled onto.

    The reference band's grid (default: the band with the smallest pixel size, first on
    ties, among the bands in the CRS most bands share, first on ties: pixel sizes in
    degrees and in metres are not comparable, and a lone band in another CRS must not
    move the whole store into it); with ``resolution`` (map units), the same extent at that pixel size
    (shape rounded to whole pixels). With ``allow_no_crs``, inputs without a CRS are
    taken in their own transform's units (pixel coordinates, rows downwards as in
    microscopy stores, when the transform is the identity: a file without any
    georeferencing); otherwise they are refused.

    Raises:
        InputError: unknown reference band, inputs without a CRS (unless allowed), or a
            rotated reference grid.
    """
    if reference is not None:
        by_name = {s.name: s for s in sources}
        if reference not in by_name:
            raise InputError(f"ingest.grid.reference {reference!r} is not a band; bands are {list(by_name)}")
        ref = by_name[reference]
    else:
        groups = _by_crs(sources)
        members = max(groups, key=len)  # max keeps the first of equal lengths
        if len(groups) > 1:
            others = sorted({Path(s.path).name for g in groups if g is not members for s in g})
            log.info("inputs in %d CRSs: the target grid is in %s, the CRS of most bands; %s reprojected", len(groups),
                     _crs_name(members[0].grid.crs_wkt), ", ".join(others))  # fmt: skip
        ref = min(members, key=lambda s: abs(s.grid.transform.a * s.grid.transform.e))
    grid = ref.grid
    if grid.crs_wkt is None and not allow_no_crs:
        what = "no georeferencing (no CRS, identity transform)" if grid.transform.is_identity else "no CRS"
        raise InputError(f"{ref.path} has {what}; assign one (gdal_edit.py -a_srs EPSG:... -a_ullr ...) "
                         "or set ingest.allow_no_crs: true to work in pixel coordinates")  # fmt: skip
    pixels = grid.crs_wkt is None and grid.transform.is_identity  # no georeferencing: rows down, as in microscopy
    if not grid.is_north_up() and not pixels:
        raise InputError(f"{ref.path} has a rotated or south-up transform; warp it north-up first")
    if resolution is not None:
        xmin, ymin, xmax, ymax = grid.bounds()
        width = max(1, round((xmax - xmin) / resolution))
        height = max(1, round((ymax - ymin) / resolution))
        transform = rasterio.Affine(resolution, 0.0, xmin, 0.0, -resolution, ymax)
        grid = Grid(grid.crs_wkt, transform, height, width)
    return grid


def _same_crs(a: str | None, b: str | None) -> bool:
    """Same CRS, compared as CRSs (not as WKT text); None only equals None."""
    return a == b or (a is not None and b is not None and CRS.from_wkt(a) == CRS.from_wkt(b))


def _by_crs(sources: list[BandSource]) -> list[list[BandSource]]:
    """The sources grouped by CRS, groups and members in input order."""
    groups: list[list[BandSource]] = []
    for s in sources:
        group = next((g for g in groups if _same_crs(g[0].grid.crs_wkt, s.grid.crs_wkt)), None)
        if group is None:
            groups.append([s])
        else:
            group.append(s)
    return groups


def _crs_name(wkt: str | None) -> str:
    if wkt is None:
        return "no CRS"
    crs = CRS.from_wkt(wkt)
    return crs.to_string() if crs.to_epsg() else crs.to_wkt()[:60]


def same_grid(a: Grid, b: Grid) -> bool:
    """Same CRS (compared as CRSs, not as WKT text), shape and transform (to 1e-9)."""
    return _same_crs(a.crs_wkt, b.crs_wkt) and a.shape == b.shape and a.transform.almost_equals(b.transform, precision=1e-9)


def read_onto_grid(
    path: str,
    indexes: list[int],
    grid: Grid,
    window: Window,
    resampling: str = "nearest",
    src_nodata: float | None = None,
    dst_nodata: float | None = None,
    src_grid: Grid | None = None,
    session: str | None = None,
) -> np.ndarray:
    """Read bands of ``path`` for ``window`` of the target ``grid``, resampling when grids differ.

    Returns an array of shape (len(indexes), window.height, window.width) in the file's dtype.
    Pixels of the window outside the source are ``dst_nodata`` (0 when None).
    The warp (rasterio ``WarpedVRT``) computes each output pixel from the source alone,
    so the values do not depend on how the target grid is cut into windows. With ``session``
    (a stage's id) the file stays open in this thread for the next chunk (:func:`_reader`).

    Raises:
        RasterIOError: the file cannot be read.
    """
    # The error is raised outside the `except` block so that it carries no chained
    # GDAL exception: Dask (tblib) pickles the whole chain, and GDAL's CPLE errors do not
    # unpickle, which would turn the error into a bare `Exception` on the client.
    try:
        with rasterio.Env(**_READ_ENV), _opened(str(path), session) as src:
            own = src_grid or Grid(src.crs.to_wkt() if src.crs else None, src.transform, src.height, src.width)
            if same_grid(own, grid):
                return src.read(indexes, window=window)
            fill = 0 if dst_nodata is None else dst_nodata
            with WarpedVRT(
                src,
                crs=CRS.from_wkt(grid.crs_wkt) if grid.crs_wkt else src.crs,
                transform=grid.transform,
                width=grid.width,
                height=grid.height,
                resampling=Resampling[resampling],
                src_nodata=src_nodata if src_nodata is not None else src.nodata,
                nodata=fill,
            ) as vrt:
                return vrt.read(indexes, window=window)
    except RasterioError as exc:
        _forget(str(path))
        failure = _read_failed(path, window, exc)
    raise failure


@dataclass(frozen=True)
class RasterInfo:
    """What :func:`raster_info` reads: the grid, band 1's dtype and nodata, dataset tags,
    and band 1's colour table (value -> RGBA) when it has one."""

    grid: Grid
    dtype: str
    nodata: float | None
    tags: dict[str, str]
    colormap: dict[int, tuple[int, int, int, int]] | None = None


def raster_info(path: str | Path) -> RasterInfo:
    """Grid, band-1 dtype and nodata, dataset tags and colour table of a raster file.

    Raises:
        RasterIOError: missing or unreadable file.
    """
    with _open(path) as ds:
        grid = Grid(ds.crs.to_wkt() if ds.crs else None, ds.transform, ds.height, ds.width)
        try:
            cmap = {int(k): tuple(int(c) for c in v) for k, v in ds.colormap(1).items()}
        except ValueError:  # no colour table
            cmap = None
        return RasterInfo(grid, ds.dtypes[0], ds.nodata, dict(ds.tags()), cmap)  # type: ignore[arg-type]


def read_window(path: str | Path, window: Window, band: int = 1) -> np.ndarray:
    """Read one band of ``path`` in ``window`` (native grid), shape (window.height, window.width).

    Raises:
        RasterIOError: the file cannot be read.
    """
    try:
        with rasterio.Env(**_READ_ENV), rasterio.open(path) as src:
            return src.read(band, window=window)
    except RasterioError as exc:
        failure = _read_failed(path, window, exc)
    raise failure  # outside `except`: no chained GDAL error (see read_onto_grid)


def _tmp_sibling(path: Path, tag: str) -> Path:
    remove_stale_temporaries(path)
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}.tmp.tif")


def write_cog(
    out: str | Path,
    grid: Grid,
    dtype: str,
    nodata: int | float | None,
    blocks: Iterable[tuple[Window, np.ndarray]],
    *,
    colormap: dict[int, tuple[int, int, int, int]] | None = None,
    class_names: list[str] | None = None,
    blocksize: int = 512,
    compress: str = "deflate",
    level: int | None = None,
    overview_resampling: str = "nearest",
    on_block: Callable[[], None] | None = None,
    description: str = "labels",
    band_descriptions: list[str] | None = None,
    tags: dict[str, str] | None = None,
) -> Path:
    """Write a Cloud-Optimized GeoTIFF (one band, or ``len(band_descriptions)`` bands) from
    (window, array) blocks, from one process.

    The blocks are written window by window into a tiled GeoTIFF under a temporary
    name; GDAL's COG driver then copies it with internal overviews (``overview_resampling``,
    never averaging for labels) into a second temporary file, which is renamed onto
    ``out`` last, so a reader never sees a partial COG (design note: one writer per GeoTIFF).

    Args:
        grid: CRS, transform and shape of the output.
        blocks: (window, array of shape (window.height, window.width)) covering the grid;
            (bands, height, width) for a multi-band COG.
        band_descriptions: one description per band of a multi-band COG (no colour table).
        level: the codec's compression level (GDAL's ``LEVEL``); None: GDAL's default.
        colormap: class id -> RGBA, embedded as the colour table.
        class_names: stored as the ``CLASS_NAMES`` tag (JSON list; id = position).
        description: the band description (with ``class_names``).
        tags: more dataset tags (for example which run wrote the file).

    Raises:
        RasterIOError: the output cannot be written.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tiled = _tmp_sibling(out, "tiled")
    final_tmp = _tmp_sibling(out, "cog")
    profile = {
        "driver": "GTiff",
        "width": grid.width,
        "height": grid.height,
        "count": len(band_descriptions) if band_descriptions else 1,
        "dtype": dtype,
        "crs": CRS.from_wkt(grid.crs_wkt) if grid.crs_wkt else None,
        "transform": grid.transform,
        "nodata": nodata,
        "tiled": True,
        "blockxsize": blocksize,
        "blockysize": blocksize,
        # The temporary file is read once by the COG driver: zstd level 1 encodes it about 8 times
        # faster than deflate (the COG keeps ``compress``; see README "Performance").
        "compress": "zstd",
        "zstd_level": 1,
        "BIGTIFF": "IF_SAFER",
    }
    try:
        with warnings.catch_warnings():
            if grid.crs_wkt is None:  # pixel coordinates (microscopy): no georeferencing is intended
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            dst = rasterio.open(tiled, "w", **profile)
        with rasterio.Env(**_WRITE_ENV), dst:
            if colormap:  # before any pixel: GDAL fixes the photometric tag at the first write
                dst.write_colormap(1, colormap)
            for window, arr in blocks:
                if band_descriptions:
                    dst.write(arr, window=window)
                else:
                    dst.write(arr, 1, window=window)
                if on_block is not None:
                    on_block()
            if class_names:
                dst.update_tags(CLASS_NAMES=json.dumps(class_names))
                dst.set_band_description(1, description)
            for i, text in enumerate(band_descriptions or [], 1):
                dst.set_band_description(i, text)
            if tags:
                dst.update_tags(**tags)
        with rasterio.Env(**_WRITE_ENV):
            rasterio.shutil.copy(
                tiled,
                final_tmp,
                driver="COG",
                BLOCKSIZE=blocksize,
                COMPRESS=compress.upper(),
                **({"LEVEL": str(level)} if level is not None else {}),
                OVERVIEW_RESAMPLING=overview_resampling.upper(),
                BIGTIFF="IF_SAFER",
                # Compress the COG's tiles (and overviews) on every core this process may use:
                # the copy is the one serial step of stitch (1.1 s instead of 2.0 s for an
                # 8192 x 8192 label raster on 2 cores; README "Performance").
                NUM_THREADS=str(usable_cpus()),
            )
        os.replace(final_tmp, out)
    except RasterIOError:
        raise
    except (RasterioError, CPLE_BaseError, OSError) as exc:  # GDAL write errors, disk full, permissions
        failure = io_failure("writing COG", out, exc)
    else:
        return out
    finally:
        for p in (tiled, final_tmp):
            p.unlink(missing_ok=True)
    raise failure  # outside `except`: no chained GDAL error (see read_onto_grid)
