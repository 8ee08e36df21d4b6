"""Pure maths for overlap-blended window inference on ONE global window grid.

Windows of edge ``W`` px are placed on a grid that depends only on the raster: along
each axis the origins are ``-p, -p + S, -p + 2S, ...`` with stride ``S < W`` and
``p = (W - S) // 2``, until the raster is covered. Pixels outside the raster are
filled by reflection about its edges (numpy's ``reflect`` convention, repeated for
rasters smaller than a window) and cropped away afterwards. A window's contribution
to a pixel depends only on the window's position, never on the chunking, so every
output chunk that recomputes the windows touching it gets the same sums as a
single-piece run (design note "Chunk recomputes its windows").

Blending (per pixel): ``P = sum_w weight_w * softmax_w / sum_w weight_w``, normalised
by the summed weights, not by a constant, so raster edges and partial covers are right.

Axis order: (y, x) for grids, (C, y, x) for images, (K, y, x) for probabilities.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from pipeline.errors import ConfigError

WindowKind = Literal["hann", "gaussian"]


@dataclass(frozen=True)
class WindowGrid:
    """The global window grid along both axes.

    Attributes:
        window: W, window edge in pixels.
        stride: S, pixels between window origins (S <= W).
        pad: p, how far the first window starts before the raster (pixels).
    """

    window: int
    stride: int
    pad: int

    @classmethod
    def from_overlap(cls, window: int, overlap: float, divisor: int = 1) -> WindowGrid:
        """Grid from a window size and an overlap fraction (``S = round(W * (1 - overlap))``).

        Raises:
            ConfigError: W not a multiple of ``divisor`` (the model's downsampling), or
                an overlap outside [0, 1) or so small that S rounds to W with overlap > 0.
        """
        if window % divisor:
            raise ConfigError(f"segment.unet.window {window} must be a multiple of {divisor} for this model")
        if not 0 <= overlap < 1:
            raise ConfigError(f"segment.unet.overlap must be in [0, 1), got {overlap}")
        stride = max(1, round(window * (1 - overlap)))
        if overlap > 0 and stride >= window:
            raise ConfigError(f"overlap {overlap} is below one pixel for window {window}")
        return cls(window, stride, (window - stride) // 2)

    @property
    def halo(self) -> int:
        """Pixels of context a chunk needs beyond its edges: a window touching the chunk
        reaches at most W - 1 px past it."""
        return self.window - 1

    def origins(self, size: int) -> np.ndarray:
        """int64 origins along an axis of ``size`` px: ``-p + k*S`` until ``origin + W >= size``."""
        first = -self.pad
        n = 1 if size + self.pad <= self.window else 1 + -(-(size + self.pad - self.window) // self.stride)
        return first + self.stride * np.arange(n, dtype=np.int64)

    def touching(self, size: int, lo: int, hi: int) -> np.ndarray:
        """Origins of the windows that overlap pixels [lo, hi) of an axis of ``size`` px."""
        o = self.origins(size)
        return o[(o < hi) & (o + self.window > lo)]


def window_weights(window: int, kind: WindowKind = "hann", sigma_scale: float = 0.125) -> np.ndarray:
    """float64 (W, W) window weights, strictly positive and exactly symmetric.

    Built from pixel centres ``t = (i + 0.5) / W`` in float64, so ``w[i] == w[W-1-i]``
    also for even W, and no weight is 0 (a pixel covered by one window only, at a raster
    edge, still gets a defined value).

    - ``hann``: ``sin(pi * t)**2`` (the Hann window evaluated at pixel centres).
    - ``gaussian``: ``exp(-((t - 0.5) * W)**2 / (2 * (sigma_scale * W)**2))``, the weighting
      of MONAI's ``sliding_window_inference(mode="gaussian", sigma_scale=0.125)``.
    """
    t = (np.arange(window, dtype=np.float64) + 0.5) / window
    if kind == "hann":
        w1 = np.sin(np.pi * t) ** 2
    elif kind == "gaussian":
        d = (t - 0.5) * window
        w1 = np.exp(-(d**2) / (2 * (sigma_scale * window) ** 2))
    else:
        raise ConfigError(f"unknown blending window {kind!r}")
    w1 = (w1 + w1[::-1]) / 2  # exact symmetry against rounding
    return np.outer(w1, w1)


def reflect_index(idx: np.ndarray, size: int) -> np.ndarray:
    """Map virtual indices (may be negative or >= size) into [0, size) by reflection about
    the edges without repeating the edge pixel (numpy ``np.pad(mode="reflect")``), repeated
    as often as needed. For ``size == 1`` every index maps to 0."""
    idx = np.asarray(idx, dtype=np.int64)
    if size == 1:
        return np.zeros_like(idx)
    period = 2 * (size - 1)
    m = np.mod(idx, period)
    return np.where(m < size, m, period - m)


def blend_region(
    read: Callable[[int, int, int, int], np.ndarray],
    shape: tuple[int, int],
    rows: tuple[int, int],
    cols: tuple[int, int],
    grid: WindowGrid,
    weights: np.ndarray,
    predict: Callable[[np.ndarray], np.ndarray],
    n_classes: int,
    batch_size: int,
) -> np.ndarray:
    """Blended class probabilities for pixels [r0, r1) x [c0, c1) of a raster of ``shape``.

    Args:
        read: ``read(r0, r1, c0, c1)`` returns the raster's (C, r1-r0, c1-c0) pixels inside
            the raster (the caller does the I/O); it is called once.
        shape: (height, width) of the whole raster.
        predict: maps a (N, C, W, W) batch (in raster units, already reflect-padded) to
            float32 (N, K, W, W) probabilities. Batches always hold exactly ``batch_size``
            windows (padded with repeats of the last window), so the model sees one batch
            shape and a window's output does not depend on which windows share its batch.
        weights: (W, W) from :func:`window_weights`.

    Returns:
        float64 (K, r1-r0, c1-c0) probabilities, sums over K equal 1.
    """
    (r0, r1), (c0, c1) = rows, cols
    h, w = shape
    win = grid.window
    oy = grid.touching(h, r0, r1)
    ox = grid.touching(w, c0, c1)
    # virtual rows/cols of the region covered by those windows, mapped into the raster
    vy = np.arange(oy[0], oy[-1] + win)
    vx = np.arange(ox[0], ox[-1] + win)
    sy, sx = reflect_index(vy, h), reflect_index(vx, w)
    ry0, ry1, rx0, rx1 = int(sy.min()), int(sy.max()) + 1, int(sx.min()), int(sx.max()) + 1
    data = read(ry0, ry1, rx0, rx1)
    region = data[:, (sy - ry0)[:, None], (sx - rx0)[None, :]]  # (C, len(vy), len(vx))

    acc = np.zeros((n_classes, r1 - r0, c1 - c0), dtype=np.float64)
    wsum = np.zeros((r1 - r0, c1 - c0), dtype=np.float64)
    origins = [(y, x) for y in oy for x in ox]  # row-major: a fixed order of accumulation
    for b in range(0, len(origins), batch_size):
        chunk = origins[b : b + batch_size]
        batch = np.stack([region[:, y - oy[0] : y - oy[0] + win, x - ox[0] : x - ox[0] + win] for y, x in chunk])
        if len(chunk) < batch_size:
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - len(chunk), axis=0)])
        probs = predict(batch)[: len(chunk)]
        for (y, x), p in zip(chunk, probs):
            # intersection of this window with the requested pixels, in raster coordinates
            ya, yb = max(y, r0), min(y + win, r1)
            xa, xb = max(x, c0), min(x + win, c1)
            if ya >= yb or xa >= xb:
                continue
            wy, wx = slice(ya - y, yb - y), slice(xa - x, xb - x)
            oyy, oxx = slice(ya - r0, yb - r0), slice(xa - c0, xb - c0)
            wgt = weights[wy, wx]
            acc[:, oyy, oxx] += p[:, wy, wx].astype(np.float64) * wgt
            wsum[oyy, oxx] += wgt
    return acc / wsum
