"""Vector ground truth: read polygons (any OGR format, via pyogrio/geopandas) and
rasterize them onto windows of a prediction grid.

Rasterization rule (documented in README): a pixel takes a polygon's class when
its centre lies inside the polygon (rasterio's default, ``all_touched=False``), so
the result for a pixel depends only on that pixel and not on how the grid is
windowed. Where polygons overlap, the SMALLER polygon wins: polygons are burned
from largest to smallest area, so a pond mapped inside a farm stays water.
Features whose class is not in the class list are ignored (left unlabeled).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning
from rasterio.features import rasterize
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from pipeline.errors import InputError, RasterIOError
from pipeline.grid import Grid

# rasterio.features.rasterize builds an in-memory dataset and, under threads, sometimes
# warns that it has no geotransform before it is set; the burned pixels are unaffected
# (tested against a single-threaded run). Narrow filter: that category from that module.
warnings.filterwarnings("ignore", category=NotGeoreferencedWarning, module="rasterio.features")

VECTOR_SUFFIXES = {".gpkg", ".geojson", ".json", ".shp", ".fgb", ".gml", ".kml", ".parquet"}


def is_vector(path: str | Path) -> bool:
    """True when ``path`` looks like a vector file (by suffix)."""
    return Path(path).suffix.lower() in VECTOR_SUFFIXES


def _read(path: str | Path, bbox: tuple[float, float, float, float] | None = None):
    import geopandas as gpd

    p = Path(path)
    if not p.exists():
        raise RasterIOError(f"ground truth not found: {p}")
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


def check_vector(path: str | Path, class_column: str | None, class_names: list[str]) -> dict[str, int]:
    """Validate a vector ground truth file and count features per class value.

    Raises:
        InputError: no class column given, column missing, or no feature of a known class.
    """
    gdf = _read(path)
    if class_column is None:
        raise InputError(f"vector ground truth {path} needs a class column (evaluate.ground_truth.class_column)")
    if class_column not in gdf.columns:
        raise InputError(f"{path} has no column {class_column!r}; columns are {[c for c in gdf.columns if c != 'geometry']}")
    if gdf.crs is None:
        raise InputError(f"{path} has no CRS; assign one before using it as ground truth")
    counts = {str(k): int(v) for k, v in gdf[class_column].value_counts().items()}
    if not any(name in counts for name in class_names) and not any(str(i) in counts for i in range(len(class_names))):
        raise InputError(
            f"no feature of {path} has a class in {class_names} (column {class_column!r} has {sorted(counts)[:10]})"
        )
    return counts


def rasterize_window(
    path: str | Path,
    class_column: str,
    class_names: list[str],
    grid: Grid,
    window: Window,
    nodata: int,
) -> np.ndarray:
    """Rasterize polygons of ``path`` onto ``window`` of ``grid``.

    Class values are matched against ``class_names`` (by name, or by integer id as text).

    Returns:
        uint8 array (window.height, window.width): class ids, ``nodata`` where unlabeled.

    Raises:
        RasterIOError: the file cannot be read.
    """
    out_shape = (int(window.height), int(window.width))
    bounds = grid.bounds(window)
    dst = CRS.from_wkt(grid.crs_wkt) if grid.crs_wkt is not None else None
    src = _layer_crs(path)
    if dst is not None and src is not None and src != dst:
        # read the window's footprint only, then bring it onto the grid's CRS
        gdf = _read(path, bbox=transform_bounds(dst, src, *bounds, densify_pts=21)).to_crs(dst.to_wkt())
    else:
        gdf = _read(path, bbox=bounds)
    lookup = {name: i for i, name in enumerate(class_names)}
    lookup.update({str(i): i for i in range(len(class_names))})
    ids = gdf[class_column].astype(str).map(lookup) if len(gdf) else []
    keep = [i for i, v in enumerate(ids) if v == v and v is not None]  # drop unknown classes (NaN)
    if not keep:
        return np.full(out_shape, nodata, dtype=np.uint8)
    sub = gdf.iloc[keep]
    vals = np.asarray(ids)[keep].astype(np.int64)
    order = np.argsort(-sub.geometry.area.to_numpy(), kind="stable")  # largest first: smaller wins
    shapes = ((sub.geometry.iloc[i], int(vals[i])) for i in order)
    return rasterize(
        shapes,
        out_shape=out_shape,
        transform=grid.window_transform(window),
        fill=nodata,
        all_touched=False,
        dtype="uint8",
    )
