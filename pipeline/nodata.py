"""Which pixel values are missing: one rule for every stage.

A value is missing when it equals the raster's nodata value, and, in a floating-point
raster, when it is not finite (NaN, +-inf), whatever the nodata value: neither is a
measurement, and either stays non-finite through any arithmetic, so such a pixel that
reached a model or a k-means distance would spoil its neighbours' results too. ``nodata``
NaN is compared with ``isnan``, since NaN equals nothing, itself included.

The functions take numpy or Dask arrays alike (they use only ufuncs and comparisons).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def is_nan(value: float | None) -> bool:
    """Whether a nodata value is NaN (None is not)."""
    return value is not None and isinstance(value, (float, np.floating)) and math.isnan(value)


def missing(values: Any, nodata: float | None) -> Any:
    """bool array of ``values``' shape: True where a value is missing (module docstring).

    Args:
        values: any shape and real dtype, numpy or Dask.
        nodata: the raster's nodata value (any real, NaN, or None for none).

    Returns:
        bool, numpy or Dask as ``values``.
    """
    floating = np.issubdtype(values.dtype, np.floating)
    out = None
    if nodata is not None and not is_nan(nodata):
        out = values == nodata
    if floating:
        out = ~np.isfinite(values) if out is None else out | ~np.isfinite(values)
    return np.zeros_like(values, dtype=bool) if out is None else out


def same_nodata(a: float | None, b: float | None) -> bool:
    """Whether two nodata values are the same (NaN equals NaN here; None only None)."""
    if a is None or b is None:
        return a is None and b is None
    return (is_nan(a) and is_nan(b)) or a == b


def fits(value: float, dtype: Any) -> bool:
    """Whether a nodata ``value`` can occur in an array of ``dtype``: any value (NaN too) in a
    float dtype; in an integer dtype, a whole number in its range (never NaN)."""
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return True
    if not math.isfinite(float(value)) or float(value) != int(value):
        return False
    lo, hi = (0, 1) if dt.kind == "b" else (np.iinfo(dt).min, np.iinfo(dt).max)
    return lo <= int(value) <= hi
