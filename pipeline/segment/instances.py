"""Per-chunk instance segmentation kernels (pure numpy / scipy / scikit-image; no Dask, no files).

The shared kernel interface, used by this module's classical method and by the learned
methods (U-Net boundary, Mask R-CNN), is::

    kernel(block, valid) -> labels
    block:  (band, y, x) float32, the chunk plus its halo
    valid:  (y, x) bool, False = nodata
    labels: (y, x) int64, 0 = background, objects numbered 1..n (need not be consecutive)

A kernel may carry a ``required_halo`` attribute (int, pixels): the smallest halo with
which a chunk reproduces the single-piece result in its core and in the strip its
objects reach into the neighbours (see :func:`pipeline.instances.instance_labels`, which
refuses smaller halos).

Classical method (:class:`ClassicalInstances`), in order:

1. signal: mean of the chosen bands, smoothed by a Gaussian (sigma) as a normalised
   convolution over valid pixels, ``G*(v m) / G*m`` (m = validity), so nodata never
   leaks into valid pixels;
2. foreground: ``signal > threshold`` (bright objects) or ``signal <= threshold`` (dark
   objects; the complement), and valid. The threshold is global (e.g. Otsu of the whole
   raster's histogram, :func:`pipeline.instances.global_otsu_threshold`), never per chunk;
3. optional Canny edges (``skimage.feature.canny`` on the signal, absolute thresholds)
   removed from the foreground, so a visible boundary separates touching objects;
4. optional hole filling: background components that touch no edge of the block and fit
   in a box of ``max_diameter`` pixels are filled (holes inside an object are smaller
   than the object; a bigger enclosed region, e.g. the space inside a ring of touching
   cells, is background and stays so);
5. separation: watershed (``skimage.segmentation.watershed``, masked to the foreground,
   optional compactness) of the negative Euclidean distance to the background
   (``scipy.ndimage.distance_transform_edt``, clipped at ``max_diameter / 2``), or of the
   inverted signal, from markers at the local maxima of the same map
   (``skimage.feature.peak_local_max`` per foreground component, ``min_distance``,
   square or disk footprint, ``exclude_border=False``; ties go to the first pixel in
   raster order, which a crop preserves);
6. objects smaller than ``min_size`` pixels are removed (after the watershed, per object).

Locality and halo. Every step reads a bounded neighbourhood, given ``max_diameter`` D
(the largest object, px): the Gaussian and Canny read ``ceil(4 sigma)`` (+2 for Canny's
gradient and non-maximum suppression); the clipped distance reads ``R = ceil(D / 2)``;
markers read ``min_distance``; a hole lies inside its object. An object that reaches a
chunk's core lies within D of it; its watershed boundary depends on the markers of the
objects touching it, which lie within another D. So a block reproduces the single-piece
labels of every object touching its core when its halo is at least::

    required_halo = 2 D + R (distance split only) + min_distance + max(smoothing, Canny) radius

(:attr:`ClassicalInstances.required_halo`). Three effects are not strictly bounded and are
why chunked results are compared object by object and with an adjusted Rand index, not
bit for bit: the greedy spacing of maxima in ``peak_local_max`` can cascade along chains
of maxima closer than ``min_distance``; Canny's hysteresis follows weak edges of any
length; and the watershed breaks ties between equally high pixels by flooding order,
which a crop can change, so a few boundary pixels between touching objects may go to
the other object (seen with compactness > 0 and with the dark polarity in the tests;
mean IoU of matched objects >= 0.995). Objects larger than D break the bound.

Units (STYLE habit 4): lengths (``sigma``, ``max_diameter``, ``min_distance``,
``edge_sigma``) are in ``units``, pixels ("px") or micrometres ("um", with
``pixel_size`` in µm per pixel); ``min_size`` is an area in px or µm².
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
from scipy import ndimage

from pipeline.errors import ConfigError, InputError

LengthUnit = Literal["px", "um"]

#: Gaussian support in standard deviations (scipy.ndimage and skimage default ``truncate``).
GAUSSIAN_TRUNCATE = 4.0


class InstanceKernel(Protocol):
    """What :func:`pipeline.instances.instance_labels` calls on each chunk plus halo."""

    def __call__(self, block: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """(band, y, x) float32 and (y, x) bool -> (y, x) int64 labels, 0 = background."""
        ...


def gaussian_radius(sigma_px: float) -> int:
    """Pixels a Gaussian of ``sigma_px`` reads on each side (``ceil(4 sigma)``; 0 for sigma 0)."""
    return int(math.ceil(GAUSSIAN_TRUNCATE * sigma_px)) if sigma_px > 0 else 0


def smooth_valid(values: np.ndarray, valid: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian smoothing over valid pixels only (normalised convolution).

    Args:
        values: (y, x) real values; only valid pixels are read.
        valid: (y, x) bool.
        sigma_px: standard deviation in pixels; 0 returns the values unchanged.

    Returns:
        float64 (y, x): ``G*(v m) / G*m`` with m = valid (Knutsson & Westin 1993,
        normalised convolution); NaN where no valid pixel lies within ``ceil(4 sigma)``.
        The filter reflects at the array edges (scipy.ndimage ``mode="reflect"``), which for
        a block clipped at the raster edge is the raster's own edge.
    """
    v = np.where(valid, values, 0.0).astype(np.float64)
    if sigma_px <= 0:
        return np.where(valid, v, np.nan)
    m = valid.astype(np.float64)
    num = ndimage.gaussian_filter(v, sigma_px, truncate=GAUSSIAN_TRUNCATE, mode="reflect")
    den = ndimage.gaussian_filter(m, sigma_px, truncate=GAUSSIAN_TRUNCATE, mode="reflect")
    out = np.full(v.shape, np.nan)
    np.divide(num, den, out=out, where=den > 1e-12)
    return out


def fill_small_holes(fg: np.ndarray, max_extent: int) -> np.ndarray:
    """Fill background components that touch no array edge and fit in a ``max_extent`` px box.

    Args:
        fg: (y, x) bool foreground.
        max_extent: largest hole height and width in pixels.

    Returns:
        (y, x) bool, ``fg`` with those holes filled (4-connected background components).

    Local: a hole of extent <= E lies within E of each of its pixels, so a block with a
    halo >= E decides it as the whole raster does; a background region reaching the
    block's edge is never filled (it is either open, or larger than E).
    """
    bg_labels, n = ndimage.label(~fg)
    if n == 0:
        return fg.copy()
    h, w = fg.shape
    fill = np.zeros(n + 1, dtype=bool)
    for i, sl in enumerate(ndimage.find_objects(bg_labels), start=1):
        ys, xs = sl
        touches_edge = ys.start == 0 or xs.start == 0 or ys.stop == h or xs.stop == w
        small = (ys.stop - ys.start) <= max_extent and (xs.stop - xs.start) <= max_extent
        fill[i] = small and not touches_edge
    return fg | fill[bg_labels]


def remove_small_labels(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Set objects of fewer than ``min_size`` pixels to 0 (in place; returns ``labels``)."""
    if min_size <= 1 or not labels.any():
        return labels
    counts = np.bincount(labels.ravel())
    small = counts < min_size
    small[0] = False
    labels[small[labels]] = 0
    return labels


@dataclass(frozen=True)
class ClassicalInstances:
    """Classical instance segmentation kernel: global threshold, then watershed split.

    Callable with the shared kernel interface (module docstring). Lengths are in
    ``units`` ("px", or "um" with ``pixel_size`` µm/px); ``min_size`` is an area (px or µm²).

    Attributes:
        threshold: foreground threshold on the smoothed signal (its units: the band's);
            None until set (e.g. from :func:`pipeline.instances.global_otsu_threshold`);
            the kernel refuses to run without it.
        bands: band indices (into the block's band axis) averaged into the signal.
        polarity: "bright" objects on a dark background (``signal > threshold``) or
            "dark" on bright (``signal <= threshold``).
        sigma: Gaussian standard deviation of the smoothing (0 = none).
        max_diameter: largest object extent; sets the halo, the distance clip and the
            largest hole filled.
        min_distance: smallest distance between two markers (Chebyshev, as in
            ``peak_local_max``); at least 1 px.
        min_size: objects with a smaller area are removed.
        fill_holes: fill holes inside objects (step 4 of the module docstring).
        split: "distance" (watershed of the clipped distance transform) or "intensity"
            (watershed of the inverted signal).
        footprint: "square" (side 2 min_distance + 1) or "disk" (radius min_distance)
            neighbourhood in which a marker must be the maximum.
        compactness: watershed compactness (0 = classical watershed; Neubert &
            Protzel 2014 compact watershed otherwise).
        edges: remove Canny edges of the signal from the foreground.
        edge_sigma: Canny's Gaussian standard deviation.
        edge_low, edge_high: Canny's hysteresis thresholds on the gradient magnitude, in
            signal units per pixel (absolute, never quantiles, so they are global);
            None: scikit-image's defaults (0.1 and 0.2 for float input).
        units: "px" or "um".
        pixel_size: µm per pixel; required when ``units == "um"``.

    Raises:
        ConfigError: on construction, for physical units without a pixel size, or a
            value out of range (named in the message).
    """

    threshold: float | None = None
    bands: tuple[int, ...] = (0,)
    polarity: Literal["bright", "dark"] = "bright"
    sigma: float = 1.0
    max_diameter: float = 30.0
    min_distance: float = 4.0
    min_size: float = 0.0
    fill_holes: bool = True
    split: Literal["distance", "intensity"] = "distance"
    footprint: Literal["square", "disk"] = "square"
    compactness: float = 0.0
    edges: bool = False
    edge_sigma: float = 1.0
    edge_low: float | None = None
    edge_high: float | None = None
    units: LengthUnit = "px"
    pixel_size: float | None = None

    def __post_init__(self) -> None:
        if self.units not in ("px", "um"):
            raise ConfigError(f"units must be 'px' or 'um', got {self.units!r}")
        if self.units == "um" and (self.pixel_size is None or not self.pixel_size > 0):
            raise ConfigError(
                "sizes are in micrometres (units='um') but no positive pixel_size (µm per pixel) is given; "
                "set pixel_size or give the sizes in pixels"
            )
        if not self.bands or any(int(b) < 0 for b in self.bands):
            raise ConfigError(f"bands must be a non-empty list of band indices >= 0, got {list(self.bands)}")
        if self.polarity not in ("bright", "dark"):
            raise ConfigError(f"polarity must be 'bright' or 'dark', got {self.polarity!r}")
        if self.split not in ("distance", "intensity"):
            raise ConfigError(f"split must be 'distance' or 'intensity', got {self.split!r}")
        if self.footprint not in ("square", "disk"):
            raise ConfigError(f"footprint must be 'square' or 'disk', got {self.footprint!r}")
        for name in ("sigma", "min_size", "compactness", "edge_sigma"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.max_diameter > 0:
            raise ConfigError(f"max_diameter must be > 0, got {self.max_diameter}")
        if self.min_distance_px < 1:
            raise ConfigError(
                f"min_distance {self.min_distance} {self.units} is below one pixel; markers need at least 1 px"
            )
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ConfigError(f"threshold must be a finite number, got {self.threshold}")

    # -- sizes in pixels -------------------------------------------------------------
    def _to_px(self, length: float) -> float:
        return length if self.units == "px" else length / float(self.pixel_size)

    @property
    def sigma_px(self) -> float:
        """Smoothing sigma in pixels."""
        return self._to_px(self.sigma)

    @property
    def edge_sigma_px(self) -> float:
        """Canny sigma in pixels."""
        return self._to_px(self.edge_sigma)

    @property
    def max_diameter_px(self) -> int:
        """Largest object extent in pixels, rounded up."""
        return int(math.ceil(self._to_px(self.max_diameter) - 1e-9))

    @property
    def min_distance_px(self) -> int:
        """Marker spacing in pixels, rounded to the nearest pixel."""
        return int(round(self._to_px(self.min_distance)))

    @property
    def min_size_px(self) -> int:
        """Smallest object area in pixels, rounded up (µm² / pixel_size²)."""
        area = self.min_size if self.units == "px" else self.min_size / float(self.pixel_size) ** 2
        return int(math.ceil(area - 1e-9))

    @property
    def distance_clip_px(self) -> int:
        """R = ceil(D / 2): the distance transform is clipped there (px); 0 for the intensity split."""
        return int(math.ceil(self.max_diameter_px / 2)) if self.split == "distance" else 0

    @property
    def context_radius_px(self) -> int:
        """Pixels the signal and edge steps read on each side of a pixel."""
        r = gaussian_radius(self.sigma_px)
        if self.edges:
            r = max(r, gaussian_radius(self.edge_sigma_px) + 2)
        return r

    @property
    def required_halo(self) -> int:
        """Smallest halo (px) for chunked results equal to the single-piece ones:
        ``2 D + R + min_distance + context radius`` (derivation: module docstring)."""
        return 2 * self.max_diameter_px + self.distance_clip_px + self.min_distance_px + self.context_radius_px

    # -- the kernel ------------------------------------------------------------------
    def signal(self, block: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """The smoothed signal that is thresholded.

        Args:
            block: (band, y, x) real.
            valid: (y, x) bool; non-finite band values count as invalid too.

        Returns:
            float64 (y, x), NaN where no valid pixel is near (see :func:`smooth_valid`).

        Raises:
            InputError: a band index beyond the block's bands.
        """
        if max(self.bands) >= block.shape[0]:
            raise InputError(f"bands {list(self.bands)} requested but the image has {block.shape[0]} band(s)")
        v = block[list(self.bands)].astype(np.float64).mean(axis=0)
        ok = np.asarray(valid, dtype=bool) & np.isfinite(v)
        return smooth_valid(v, ok, self.sigma_px)

    def foreground(self, block: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(foreground (y, x) bool, signal (y, x) float64) after thresholding, edges and holes."""
        if self.threshold is None:
            raise ConfigError("the instance threshold is not set; compute it (global Otsu) or give a value")
        s = self.signal(block, valid)
        ok = np.asarray(valid, dtype=bool) & np.isfinite(s)
        with np.errstate(invalid="ignore"):
            fg = (s > self.threshold) if self.polarity == "bright" else (s <= self.threshold)
        fg &= ok
        if self.edges:
            from skimage.feature import canny

            filled = np.where(ok, s, self.threshold)
            e = canny(filled, sigma=self.edge_sigma_px, low_threshold=self.edge_low,
                      high_threshold=self.edge_high, use_quantiles=False, mode="nearest")  # fmt: skip
            fg &= ~e
        if self.fill_holes:
            fg = fill_small_holes(fg, self.max_diameter_px) & ok
        return fg, s

    def __call__(self, block: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Label instances in one block (shared kernel interface).

        Args:
            block: (band, y, x) float32, chunk plus halo.
            valid: (y, x) bool, False = nodata.

        Returns:
            int64 (y, x), 0 = background (and nodata), objects 1..n.

        Raises:
            ConfigError: the threshold is not set.
            InputError: a band index beyond the block's bands.
        """
        from skimage.feature import peak_local_max
        from skimage.morphology import disk
        from skimage.segmentation import watershed

        fg, s = self.foreground(block, valid)
        labels = np.zeros(fg.shape, dtype=np.int64)
        if not fg.any():
            return labels
        md = self.min_distance_px
        if self.split == "distance":
            if fg.all():  # no background: every distance exceeds the clip
                relief = np.full(fg.shape, float(self.distance_clip_px))
            else:
                relief = np.minimum(ndimage.distance_transform_edt(fg), self.distance_clip_px)
            floor = 0.0  # foreground distances are >= 1
        else:
            relief = (s - self.threshold) if self.polarity == "bright" else (self.threshold - s)
            relief = np.where(fg, relief, 0.0)
            floor = -1.0  # foreground relief is > 0 (bright) or >= 0 (dark)
        components, _ = ndimage.label(fg)
        peaks = peak_local_max(
            relief, min_distance=md, threshold_abs=floor, exclude_border=False, labels=components,
            footprint=disk(md) if self.footprint == "disk" else None,
        )  # fmt: skip
        markers = np.zeros(fg.shape, dtype=np.int64)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        labels = watershed(-relief, markers, mask=fg, compactness=self.compactness).astype(np.int64)
        return remove_small_labels(labels, self.min_size_px)
