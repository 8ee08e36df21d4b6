"""Pure pixel-grid maths: the target grid, chunk windows, pixel-centre coordinates.

No file is opened here. Axis order is always (row, col) = (y, x) for arrays and
windows; affine transforms follow GDAL/rasterio (``x = c + a*col + b*row``,
``y = f + d*col + e*row``, col/row at the pixel's top-left corner).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from affine import Affine
from rasterio.windows import Window


@dataclass(frozen=True)
class Grid:
    """A georeferenced pixel grid.

    Attributes:
        crs_wkt: CRS as WKT, or None for pixel coordinates (microscopy).
        transform: affine transform of the top-left pixel corner, map units per pixel.
        height, width: shape in pixels (y, x).
    """

    crs_wkt: str | None
    transform: Affine
    height: int
    width: int

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return (self.height, self.width)

    def window_transform(self, window: Window) -> Affine:
        """Affine transform of a window's top-left corner."""
        return self.transform @ Affine.translation(window.col_off, window.row_off)

    def x_centres(self, col_off: int = 0, width: int | None = None) -> np.ndarray:
        """Map x of pixel centres for columns ``col_off .. col_off+width-1``, float64, shape (width,).

        Only valid for north-up grids (no rotation), which is what tileseg writes.
        """
        width = self.width - col_off if width is None else width
        cols = np.arange(col_off, col_off + width, dtype=np.float64) + 0.5
        return self.transform.c + cols * self.transform.a

    def y_centres(self, row_off: int = 0, height: int | None = None) -> np.ndarray:
        """Map y of pixel centres for rows ``row_off .. row_off+height-1``, float64, shape (height,)."""
        height = self.height - row_off if height is None else height
        rows = np.arange(row_off, row_off + height, dtype=np.float64) + 0.5
        return self.transform.f + rows * self.transform.e

    def bounds(self, window: Window | None = None) -> tuple[float, float, float, float]:
        """(xmin, ymin, xmax, ymax) of the grid or of a window, map units."""
        if window is None:
            window = Window(0, 0, self.width, self.height)
        t = self.window_transform(window)
        x0, y0 = t.c, t.f
        x1, y1 = t @ (window.width, window.height)
        return (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))

    def is_north_up(self) -> bool:
        """True when the transform has no rotation or shear and y decreases downwards."""
        t = self.transform
        return t.b == 0 and t.d == 0 and t.a > 0 and t.e < 0


def chunk_starts(size: int, chunk: int) -> list[int]:
    """Offsets of chunks of edge ``chunk`` along an axis of length ``size`` (last chunk may be short)."""
    if chunk <= 0:
        raise ValueError("chunk must be positive")
    return list(range(0, size, chunk))


def chunk_sizes(size: int, chunk: int) -> tuple[int, ...]:
    """Dask-style chunk sizes along one axis, e.g. ``chunk_sizes(1000, 512) == (512, 488)``."""
    return tuple(min(chunk, size - s) for s in chunk_starts(size, chunk))


def column_strips(col_chunks: tuple[int, ...], strip_px: int | None) -> list[tuple[int, int]]:
    """Consecutive runs [j0, j1) of chunk columns, each at most ``strip_px`` pixels wide (but at
    least one chunk): the vertical strips in which chunks are computed, one strip after the
    other and row by row inside each (see :func:`pipeline.apply.chunk_tasks`). None: one strip.

    Args:
        col_chunks: chunk widths along x (Dask's ``chunks[-1]``), pixels.
        strip_px: the widest strip, pixels.
    """
    n = len(col_chunks)
    if strip_px is None or n == 0:
        return [(0, n)] if n else []
    strips, j0, width = [], 0, 0
    for j, c in enumerate(col_chunks):
        if j > j0 and width + c > strip_px:
            strips.append((j0, j))
            j0, width = j, 0
        width += c
    strips.append((j0, n))
    return strips


def iter_windows(height: int, width: int, chunk: int) -> Iterator[Window]:
    """Row-major windows tiling a (height, width) grid with (chunk, chunk) windows."""
    for r in chunk_starts(height, chunk):
        for c in chunk_starts(width, chunk):
            yield Window(c, r, min(chunk, width - c), min(chunk, height - r))


def block_window(array_location: list[tuple[int, int]]) -> Window:
    """Window of a Dask block from ``block_info[...]['array-location']`` of its last two axes (y, x)."""
    (r0, r1), (c0, c1) = array_location[-2], array_location[-1]
    return Window(c0, r0, c1 - c0, r1 - r0)


def bbox_mask(grid: Grid, window: Window, bbox: tuple[float, float, float, float]) -> np.ndarray:
    """Boolean mask, shape (window.height, window.width): pixel centre inside ``bbox``.

    ``bbox`` is (xmin, ymin, xmax, ymax) in map units; the test is half-open,
    ``xmin <= x < xmax`` and ``ymin <= y < ymax``, so abutting boxes share no pixel.
    """
    xmin, ymin, xmax, ymax = bbox
    xs = grid.x_centres(int(window.col_off), int(window.width))
    ys = grid.y_centres(int(window.row_off), int(window.height))
    inx = (xs >= xmin) & (xs < xmax)
    iny = (ys >= ymin) & (ys < ymax)
    return iny[:, None] & inx[None, :]


def bounds_window(grid: Grid, bounds: tuple[float, float, float, float]) -> Window | None:
    """Smallest window holding every pixel whose centre is inside ``bounds`` (map units,
    half-open like :func:`bbox_mask`); None when there is no such pixel. North-up grids only."""
    xmin, ymin, xmax, ymax = bounds
    xs, ys = grid.x_centres(), grid.y_centres()
    cols = np.flatnonzero((xs >= xmin) & (xs < xmax))
    rows = np.flatnonzero((ys >= ymin) & (ys < ymax))
    if not len(cols) or not len(rows):
        return None
    return Window(int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1))


def pixel_area(grid: Grid) -> float:
    """Area of one pixel in squared map units: ``|a*e - b*d|`` of the affine transform."""
    t = grid.transform
    return abs(t.a * t.e - t.b * t.d)
