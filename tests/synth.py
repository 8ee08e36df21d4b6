"""Small synthetic rasters made in code from a fixed seed (no committed fixtures)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from scipy import ndimage

CRS = "EPSG:32633"
ORIGIN = (330000.0, 5822040.0)


def class_map(height: int, width: int, n_classes: int = 4, seed: int = 0) -> np.ndarray:
    """uint8 (y, x) blobby class map: argmax of smoothed random fields."""
    rng = np.random.default_rng(seed)
    fields = [ndimage.gaussian_filter(rng.normal(size=(height, width)), sigma=12) for _ in range(n_classes)]
    return np.argmax(np.stack(fields), axis=0).astype(np.uint8)


def bands_from_classes(classes: np.ndarray, n_bands: int = 4, seed: int = 1, nodata_collar: int = 0) -> np.ndarray:
    """uint16 (band, y, x): per-class means plus noise; a collar of 0 (nodata) if asked."""
    rng = np.random.default_rng(seed)
    k = int(classes.max()) + 1
    means = rng.uniform(500, 4000, size=(n_bands, k))
    img = means[:, classes] + rng.normal(0, 150, size=(n_bands,) + classes.shape)
    img = np.clip(img, 1, 65535).astype(np.uint16)
    if nodata_collar:
        img[:, :nodata_collar, :] = 0
        img[:, :, :nodata_collar] = 0
    return img


def write_tif(path: Path, data: np.ndarray, res: float = 10.0, nodata=None, crs: str | None = CRS,
              names: list[str] | None = None, origin=ORIGIN) -> Path:
    """Write (band, y, x) or (y, x) data as a tiled GeoTIFF, north-up at ``res`` map units."""
    if data.ndim == 2:
        data = data[None]
    transform = Affine(res, 0, origin[0], 0, -res, origin[1])
    with rasterio.open(
        path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
        dtype=data.dtype, crs=crs, transform=transform, nodata=nodata, tiled=True, blockxsize=256, blockysize=256,
    ) as dst:
        dst.write(data)
        if names:
            for i, n in enumerate(names, 1):
                dst.set_band_description(i, n)
    return path


def crowded_nuclei(height: int, width: int, n: int, radius: tuple[float, float] = (5.0, 8.0), seed: int = 0,
                   noise: float = 0.05) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Synthetic fluorescence nuclei: random disks that touch or overlap a little, with noise.

    Centres are drawn uniformly and kept when at least 0.85 (r_i + r_j) from every kept
    centre, so neighbours touch or overlap slightly. A pixel belongs to the covering
    disk whose centre is nearest (relative to its radius). Intensity: background 0.1,
    a dome ``0.5 + 0.4 (1 - (d / r)^2)`` times a per-nucleus gain in [0.8, 1.2] inside
    each disk, plus Gaussian noise (``noise`` standard deviation).

    Returns:
        image: float32 (1, y, x); ground truth: int64 (y, x), 0 background, ids 1..m.
    """
    rng = np.random.default_rng(seed)
    centres: list[tuple[float, float, float]] = []
    for _ in range(n * 50):
        if len(centres) == n:
            break
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        r = rng.uniform(*radius)
        if all((cy - y) ** 2 + (cx - x) ** 2 >= (0.85 * (r + q)) ** 2 for y, x, q in centres):
            centres.append((cy, cx, r))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    best = np.full((height, width), np.inf)
    gt = np.zeros((height, width), dtype=np.int64)
    img = np.full((height, width), 0.1)
    for i, (cy, cx, r) in enumerate(centres, start=1):
        rel = np.hypot(yy - cy, xx - cx) / r
        mine = (rel <= 1) & (rel < best)
        gain = rng.uniform(0.8, 1.2)
        gt[mine] = i
        best[mine] = rel[mine]
        img[mine] = gain * (0.5 + 0.4 * (1 - rel[mine] ** 2))
    img += rng.normal(0, noise, size=img.shape)
    return img[None].astype(np.float32), gt
