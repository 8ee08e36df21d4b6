"""Vector ground truth and evaluation areas: read features (any OGR format, via
pyogrio/geopandas) and rasterize them onto windows of a prediction grid.

Rasterization rule (documented in README): a pixel takes a feature's class when
its centre lies inside the feature's polygon (rasterio's default, ``all_touched=False``),
so the result for a pixel depends only on that pixel and not on how the grid is
windowed. Lines and points are first buffered by ``line_buffer`` map units (of the
grid's CRS) on each side. Where polygons overlap, the SMALLER polygon wins: features
are burned from largest to smallest area, so a pond mapped inside a farm stays water
and a buffered road across a field stays road. Features whose class is not in the
class list (or, with a class map, not in the map) are left unlabeled.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning
from rasterio.features import rasterize
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from pipeline.errors import InputError, MissingFileError, RasterIOError
from pipeline.grid import Grid

# rasterio.features.rasterize builds an in-memory dataset and, under threads, sometimes
# warns that it has no geotransform before it is set; the burned pixels are unaffected
# (tested against a single-threaded run). Narrow filter: that category from that module.
warnings.filterwarnings("ignore", category=NotGeoreferencedWarning, module="rasterio.features")

VECTOR_SUFFIXES = {".gpkg", ".geojson", ".json", ".shp", ".fgb", ".gml", ".kml", ".parquet"}
_POLYGONAL = {"Polygon", "MultiPolygon"}


def is_vector(path: str | Path) -> bool:
    """True when ``path`` looks like a vector file (by suffix)."""
    return Path(path).suffix.lower() in VECTOR_SUFFIXES


def _read(path: str | Path, bbox: tuple[float, float, float, float] | None = None):
    import geopandas as gpd

    p = Path(path)
    if not p.exists():
        raise MissingFileError(f"vector file not found: {p}")
    try:
        return gpd.read_file(p, bbox=bbox, engine="pyogrio")
    except Exception as exc:  # pyogrio raises DataSourceError and friends
        raise RasterIOError(f"cannot read {p} as vector data: {exc}") from None


def _layer_crs(path: str | Path) -> CRS | None:
    import pyogrio

    try:
        wkt = pyogrio.read_info(path).get("crs")
    except Exception as exc:
        raise RasterIOError(f"cannot read {path} as vector data: {exc}") from None
    return CRS.from_user_input(wkt) if wkt else None


def layer_bounds(path: str | Path) -> tuple[tuple[float, float, float, float], str | None]:
    """(xmin, ymin, xmax, ymax) of all features in the layer's CRS, and that CRS as WKT.

    Raises:
        RasterIOError: missing or unreadable file.
        InputError: the layer has no features, or coordinates outside longitude/latitude in a
            geographic CRS (projected coordinates in a GeoJSON without a crs member).
    """
    import pyogrio

    if not Path(path).exists():
        raise MissingFileError(f"vector file not found: {path}")
    try:
        info = pyogrio.read_info(path, force_total_bounds=True)
    except Exception as exc:
        raise RasterIOError(f"cannot read {path} as vector data: {exc}") from None
    bounds = info.get("total_bounds")
    if not info.get("features") or bounds is None or not np.all(np.isfinite(bounds)):
        raise InputError(f"{path} has no features")
    crs = CRS.from_user_input(info["crs"]) if info.get("crs") else None
    xmin, ymin, xmax, ymax = (float(v) for v in bounds)
    if crs is not None and crs.is_geographic and not (-360 <= xmin <= xmax <= 360 and -90 <= ymin <= ymax <= 90):
        raise InputError(f"{path} has coordinates up to ({xmax:g}, {ymax:g}), outside longitude/latitude, but its CRS "
                         f"is {crs.to_string()} (a GeoJSON without a crs member is WGS 84, RFC 7946); save it with "
                         "its real CRS (for example as GeoPackage)")  # fmt: skip
    return (xmin, ymin, xmax, ymax), (crs.to_wkt() if crs else None)


def _as_text(values):
    """Class column values as text; whole floats (Shapefile integers read as 6.0) as ``"6"``."""
    if values.dtype.kind == "f":
        finite = values.dropna()
        if (finite == finite.round()).all():
            return values.astype("Int64").astype(str)
    return values.astype(str)


def check_vector(
    path: str | Path,
    class_column: str | None,
    lookup: Mapping[str, int],
    line_buffer: float | None = None,
) -> dict[str, int]:
    """Validate a vector ground truth file and count features per class value.

    Args:
        lookup: class value (as text) -> class id (:func:`pipeline.classes.value_lookup`).
        line_buffer: buffer of lines and points in map units; None refuses such features.

    Raises:
        InputError: no class column given or missing, no CRS, no feature of a known class,
            or lines/points without ``line_buffer``.
    """
    gdf = _read(path)
    if class_column is None:
        raise InputError(f"vector ground truth {path} needs a class column (evaluate.ground_truth.class_column)")
    if class_column not in gdf.columns:
        raise InputError(f"{path} has no column {class_column!r}; columns are {[c for c in gdf.columns if c != 'geometry']}")
    if gdf.crs is None:
        raise InputError(f"{path} has no CRS; assign one before using it as ground truth")
    counts = {str(k): int(v) for k, v in _as_text(gdf[class_column]).value_counts().items()}
    if not any(value in lookup for value in counts):
        raise InputError(
            f"no feature of {path} has a known class (column {class_column!r} has {sorted(counts)[:10]}; "
            f"known values are {sorted(lookup)[:10]}); set evaluate.ground_truth.class_map?"
        )
    kinds = set(gdf.geometry.geom_type.dropna()) - _POLYGONAL
    if kinds and line_buffer is None:
        raise InputError(
            f"{path} has {sorted(kinds)} features; set evaluate.ground_truth.line_buffer "
            "(buffer on each side, map units) to rasterize them"
        )
    return counts


def _features(path: str | Path, grid: Grid, window: Window, margin: float):
    """Features of ``path`` near ``window`` (its bounds grown by ``margin`` map units), in the grid's CRS."""
    xmin, ymin, xmax, ymax = grid.bounds(window)
    bounds = (xmin - margin, ymin - margin, xmax + margin, ymax + margin)
    dst = CRS.from_wkt(grid.crs_wkt) if grid.crs_wkt is not None else None
    src = _layer_crs(path)
    if dst is not None and src is not None and src != dst:
        # read the window's footprint only, then bring it onto the grid's CRS
        return _read(path, bbox=transform_bounds(dst, src, *bounds, densify_pts=21)).to_crs(dst.to_wkt())
    return _read(path, bbox=bounds)


def _buffered(geoms, line_buffer: float | None):
    """Polygons as they are; lines and points buffered (round ends) when ``line_buffer`` is set."""
    if not line_buffer:
        return geoms
    polygonal = geoms.geom_type.isin(list(_POLYGONAL))
    return geoms.where(polygonal, geoms.buffer(line_buffer))


def rasterize_window(
    path: str | Path,
    class_column: str,
    lookup: Mapping[str, int] | list[str],
    grid: Grid,
    window: Window,
    nodata: int,
    line_buffer: float | None = None,
) -> np.ndarray:
    """Rasterize the features of ``path`` onto ``window`` of ``grid`` (rule: module docstring).

    Args:
        lookup: class value (as text) -> class id; a list of class names means
            :func:`pipeline.classes.value_lookup` without a class map.
        line_buffer: buffer distance of lines and points, map units of the grid's CRS.

    Returns:
        uint8 array (window.height, window.width): class ids, ``nodata`` where unlabeled.

    Raises:
        RasterIOError: the file cannot be read.
    """
    if isinstance(lookup, list):
        from pipeline.classes import value_lookup

        lookup = value_lookup(lookup, None)
    out_shape = (int(window.height), int(window.width))
    gdf = _features(path, grid, window, line_buffer or 0.0)
    ids = _as_text(gdf[class_column]).map(lookup) if len(gdf) else []
    keep = [i for i, v in enumerate(ids) if v == v and v is not None]  # drop unknown classes (NaN)
    if not keep:
        return np.full(out_shape, nodata, dtype=np.uint8)
    geoms = _buffered(gdf.geometry.iloc[keep], line_buffer)
    vals = np.asarray(ids)[keep].astype(np.int64)
    order = np.argsort(-geoms.area.to_numpy(), kind="stable")  # largest first: smaller wins
    shapes = ((geoms.iloc[i], int(vals[i])) for i in order if not geoms.iloc[i].is_empty)
    return rasterize(
        shapes,
        out_shape=out_shape,
        transform=grid.window_transform(window),
        fill=nodata,
        all_touched=False,
        dtype="uint8",
    )


def area_window(path: str | Path, grid: Grid, window: Window) -> np.ndarray:
    """bool (window.height, window.width): pixel centre inside any polygon of ``path``."""
    gdf = _features(path, grid, window, 0.0)
    geoms = [g for g in gdf.geometry if g is not None and not g.is_empty and g.geom_type in _POLYGONAL]
    if not geoms:
        return np.zeros((int(window.height), int(window.width)), dtype=bool)
    burned = rasterize(
        ((g, 1) for g in geoms),
        out_shape=(int(window.height), int(window.width)),
        transform=grid.window_transform(window),
        fill=0,
        all_touched=False,
        dtype="uint8",
    )
    return burned.astype(bool)
