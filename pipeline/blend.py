"""Pure maths for overlap-blended window inference on ONE global window grid.

Windows of edge ``W`` px are placed on a grid that depends only on the raster: along
each axis the origins are ``-p, -p + S, -p + 2S, ...`` with stride ``S < W`` and
``p = (W - S) // 2``, until the raster is covered. Pixels outside the raster are
filled by reflection about its edges (numpy's ``reflect`` convention, repeated for
rasters smaller than a window) and cropped away afterwards. A window's contribution
to a pixel depends only on the window's position, never on the chunking, so every
output chunk that recomputes the windows touching it gets the same sums as a
single-piece run (design note "Chunk recomputes its windows").

Two placements (``WindowGrid.placement``):

- ``centred`` (default): the origins above; the raster's edge pixels get a window's
  centre, with reflected context.
- ``edge``: MONAI's ``sliding_window_inference`` placement (``monai.data.utils.dense_patch_slices``):
  origins ``0, S, 2S, ...`` with ``S = int(W * (1 - overlap))``, the last one moved back to
  ``size - W`` so that no window leaves the raster (reflection only when the raster is
  smaller than a window, where MONAI pads with zeros instead).

Blending (per pixel): ``P = sum_w weight_w * softmax_w / sum_w weight_w``, normalised
by the summed weights, not by a constant, so raster edges and partial covers are right.
Windows run in *window blocks* of ``by x bx`` consecutive windows of the grid, one model
batch each (``by * bx = batch_size``; :func:`block_shape`, :func:`window_blocks`). A block's
sums are accumulated in float32 in a fixed (row-major) order, and a region adds the sums of
the blocks covering it in block order (:func:`add_blocks`). Blocks depend on the grid only,
so a pixel's sums are the same float32 additions in the same order however the raster is
cut into chunks or tasks: the results are bit-identical for any chunking, and
:func:`blend_region` on the whole raster equals :mod:`pipeline.inference`'s chunked run.

Axis order: (y, x) for grids, (C, y, x) for images, (K, y, x) for probabilities.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from pipeline.errors import ConfigError

WindowKind = Literal["hann", "gaussian"]
Placement = Literal["centred", "edge"]



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
    placement: Placement = "centred"

    @classmethod
    def from_overlap(cls, window: int, overlap: float, divisor: int = 1, placement: Placement = "centred") -> WindowGrid:
        """Grid from a window size and an overlap fraction: ``S = round(W * (1 - overlap))``
        for ``centred``, ``S = int(W * (1 - overlap))`` (MONAI's ``_get_scan_interval``) for ``edge``.

        Raises:
            ConfigError: W not a multiple of ``divisor`` (the model's downsampling), or
                an overlap outside [0, 1) or so small that S rounds to W with overlap > 0.
        """
        if window % divisor:
            raise ConfigError(f"segment.unet.window {window} must be a multiple of {divisor} for this model")
        if not 0 <= overlap < 1:
            raise ConfigError(f"segment.unet.overlap must be in [0, 1), got {overlap}")
        if placement not in ("centred", "edge"):
            raise ConfigError(f"unknown window placement {placement!r} (centred or edge)")
        stride = max(1, round(window * (1 - overlap)) if placement == "centred" else int(window * (1 - overlap)))
        if overlap > 0 and stride >= window:
            raise ConfigError(f"overlap {overlap} is below one pixel for window {window}")
        return cls(window, stride, (window - stride) // 2 if placement == "centred" else 0, placement)

    @property
    def halo(self) -> int:
        """Pixels of context a chunk needs beyond its edges: a window touching the chunk
        reaches at most W - 1 px past it."""
        return self.window - 1

    def origins(self, size: int) -> np.ndarray:
        """int64 origins along an axis of ``size`` px, increasing: ``-p + k*S`` until
        ``origin + W >= size`` (``centred``); ``k*S`` until then, the last one clamped to
        ``size - W`` (``edge``; just 0 when ``size <= W``)."""
        first = -self.pad
        n = 1 if size + self.pad <= self.window else 1 + -(-(size + self.pad - self.window) // self.stride)
        o = first + self.stride * np.arange(n, dtype=np.int64)
        if self.placement == "edge":
            o = np.minimum(o, max(size - self.window, 0))
        return o

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
      of MONAI's ``sliding_window_inference(mode="gaussian", sigma_scale=0.125)``
      (``monai.data.utils.compute_importance_map``), including its floor: the 2-D weights are
      raised to at least ``max(min, 1e-3)``.
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
    w2 = np.outer(w1, w1)
    if kind == "gaussian":
        w2 = np.maximum(w2, max(w2.min(), 1e-3))
    return w2


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


def block_shape(batch_size: int) -> tuple[int, int]:
    """(by, bx) windows of a window block: ``by * bx == batch_size``, as square as possible
    (``by`` the largest divisor of ``batch_size`` not above its square root)."""
    by = max(d for d in range(1, int(np.sqrt(batch_size)) + 1) if batch_size % d == 0)
    return by, batch_size // by


def window_blocks(origins: np.ndarray, per_block: int, window: int, size: int) -> list[tuple[np.ndarray, int, int]]:
    """Cut one axis' window ``origins`` (from :meth:`WindowGrid.origins`) into consecutive runs
    of ``per_block``; for each: its origins and the pixels [start, end) its windows cover
    inside an axis of ``size`` px."""
    out = []
    for k in range(0, len(origins), per_block):
        o = origins[k : k + per_block]
        out.append((o, max(int(o[0]), 0), min(size, int(o[-1]) + window)))
    return out


def window_sums(
    read: Callable[[int, int, int, int], np.ndarray],
    shape: tuple[int, int],
    oy: np.ndarray,
    ox: np.ndarray,
    rows: tuple[int, int],
    cols: tuple[int, int],
    grid: WindowGrid,
    weights: np.ndarray,
    predict: Callable[[np.ndarray], Any],
    n_classes: int,
    batch_size: int,
) -> np.ndarray:
    """Weighted sums of the windows with origins ``oy`` x ``ox`` (a window block) over pixels
    [r0, r1) x [c0, c1) of a raster of ``shape`` (the parts of windows outside them are dropped).

    Args:
        read: ``read(r0, r1, c0, c1)`` returns the raster's (C, r1-r0, c1-c0) pixels inside
            the raster (the caller does the I/O); it is called once, for the windows' extent.
        oy, ox: window origins (from ``grid.origins``; increasing), pixels.
        predict: maps a (N, C, W, W) batch (in raster units, already reflect-padded) to
            (N, K, W, W) probabilities: a float32 numpy array, or a torch tensor on any
            device (the sums are then made on that device: a GPU adds its own windows).
            Batches always hold exactly ``batch_size`` windows (padded with repeats of the
            last window), so the model sees one batch shape.
        weights: (W, W) from :func:`window_weights`.

    Returns:
        float32 (K + 1, r1-r0, c1-c0): ``p_k * weight`` summed over the windows (row-major
        order) for each class k, then the summed weights.
    """
    import torch

    (r0, r1), (c0, c1) = rows, cols
    h, w = shape
    win = grid.window
    acc = None
    if len(oy) == 0 or len(ox) == 0:
        return np.zeros((n_classes + 1, r1 - r0, c1 - c0), np.float32)
    # virtual rows/cols covered by the windows, mapped into the raster
    vy = np.arange(oy[0], oy[-1] + win)
    vx = np.arange(ox[0], ox[-1] + win)
    sy, sx = reflect_index(vy, h), reflect_index(vx, w)
    ry0, ry1, rx0, rx1 = int(sy.min()), int(sy.max()) + 1, int(sx.min()), int(sx.max()) + 1
    data = read(ry0, ry1, rx0, rx1)
    if not (np.array_equal(vy, sy) and np.array_equal(vx, sx)):  # reflection needed: gather
        data = data[:, (sy - ry0)[:, None], (sx - rx0)[None, :]]  # (C, len(vy), len(vx))
    origins = [(int(y), int(x)) for y in oy for x in ox]  # row-major
    for b in range(0, len(origins), batch_size):
        part = origins[b : b + batch_size]
        batch = np.stack([data[:, y - oy[0] : y - oy[0] + win, x - ox[0] : x - ox[0] + win] for y, x in part])
        if len(part) < batch_size:
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - len(part), axis=0)])
        probs = torch.as_tensor(predict(batch))[: len(part)]
        if acc is None:
            wt = torch.from_numpy(weights.astype(np.float32)).to(probs.device)
            acc = torch.zeros((n_classes + 1, r1 - r0, c1 - c0), dtype=torch.float32, device=probs.device)
        q = probs.to(torch.float32) * wt  # (n, K, W, W)
        for (y, x), qi in zip(part, q):
            # intersection of this window with the requested pixels, in raster coordinates
            ya, yb = max(y, r0), min(y + win, r1)
            xa, xb = max(x, c0), min(x + win, c1)
            if ya >= yb or xa >= xb:
                continue
            wy, wx = slice(ya - y, yb - y), slice(xa - x, xb - x)
            oyy, oxx = slice(ya - r0, yb - r0), slice(xa - c0, xb - c0)
            acc[:n_classes, oyy, oxx] += qi[:, wy, wx]
            acc[n_classes, oyy, oxx] += wt[wy, wx]
    return acc.cpu().numpy()


def add_blocks(rows: tuple[int, int], cols: tuple[int, int], origins: list[tuple[int, int]],
               parts: list[np.ndarray]) -> np.ndarray:  # fmt: skip
    """float32 (K + 1, r1-r0, c1-c0): the window blocks' sums ``parts`` (each (K + 1, h, w),
    top-left pixel at ``origins``), added where they fall on [r0, r1) x [c0, c1), onto zeros,
    in the given order (block order, the same for every chunking)."""
    (r0, r1), (c0, c1) = rows, cols
    acc = np.zeros((parts[0].shape[0], r1 - r0, c1 - c0), np.float32)
    for (pr, pc), part in zip(origins, parts):
        ya, yb = max(r0, pr), min(r1, pr + part.shape[1])
        xa, xb = max(c0, pc), min(c1, pc + part.shape[2])
        if ya < yb and xa < xb:
            acc[:, ya - r0 : yb - r0, xa - c0 : xb - c0] += part[:, ya - pr : yb - pr, xa - pc : xb - pc]
    return acc


def normalise_sums(sums: np.ndarray) -> np.ndarray:
    """float32 (K, y, x) probabilities from (K + 1, y, x) sums (:func:`window_sums`,
    :func:`add_blocks`): each class's sum divided by the summed weights."""
    return sums[:-1] / sums[-1]


def blend_region(
    read: Callable[[int, int, int, int], np.ndarray],
    shape: tuple[int, int],
    rows: tuple[int, int],
    cols: tuple[int, int],
    grid: WindowGrid,
    weights: np.ndarray,
    predict: Callable[[np.ndarray], Any],
    n_classes: int,
    batch_size: int,
) -> np.ndarray:
    """Blended class probabilities for pixels [r0, r1) x [c0, c1) of a raster of ``shape``:
    the window blocks of ``grid`` that cover them, summed (see :func:`window_sums` for the
    arguments) and added in block order, exactly as :mod:`pipeline.inference` does for a chunk.
    ``read`` is called once per block.

    Returns:
        float32 (K, r1-r0, c1-c0) probabilities, sums over K equal to 1 (to ~1e-6).
    """
    (r0, r1), (c0, c1) = rows, cols
    h, w = shape
    by, bx = block_shape(batch_size)
    blocks_y = [b for b in window_blocks(grid.origins(h), by, grid.window, h) if b[1] < r1 and b[2] > r0]
    blocks_x = [b for b in window_blocks(grid.origins(w), bx, grid.window, w) if b[1] < c1 and b[2] > c0]
    origins, parts = [], []
    for oy, y0, y1 in blocks_y:
        for ox, x0, x1 in blocks_x:
            parts.append(window_sums(read, shape, oy, ox, (y0, y1), (x0, x1), grid, weights, predict, n_classes,
                                     batch_size))  # fmt: skip
            origins.append((y0, x0))
    return normalise_sums(add_blocks(rows, cols, origins, parts))
