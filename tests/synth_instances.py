"""Small synthetic instance data made in code from a fixed seed: discs, some touching."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.draw import disk


def blob_instances(height: int, width: int, n: int, seed: int, radius: tuple[int, int] = (5, 9)) -> np.ndarray:
    """int32 (y, x) instance mask of ``n`` discs (ids 1..n; a later disc covers an earlier one
    where they overlap, so neighbours touch along a straight-ish line, as nuclei do)."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((height, width), dtype=np.int32)
    for k in range(1, n + 1):
        r = int(rng.integers(*radius))
        cy, cx = int(rng.integers(r, height - r)), int(rng.integers(r, width - r))
        rr, cc = disk((cy, cx), r, shape=ids.shape)
        ids[rr, cc] = k
    return ids


def blob_image(instances: np.ndarray, seed: int, scale: float = 1000.0) -> np.ndarray:
    """uint16 (1, y, x) image of an instance mask: bright objects whose edges (pixels next to
    another id or the background) are dimmer, as stained nuclei look, plus noise."""
    rng = np.random.default_rng(seed)
    fg = (instances > 0).astype(np.float64)
    edge = ndimage.morphological_gradient(instances, size=3) > 0
    img = fg - 0.5 * (edge & (instances > 0)) + rng.normal(0, 0.08, instances.shape)
    return np.clip(200 + scale * img, 1, 65535).astype(np.uint16)[None]


def two_touching_discs(size: int = 48) -> np.ndarray:
    """int32 (size, size) mask with two discs of radius 10 whose centres are 18 px apart
    (they overlap by 2 px; the second covers the first there)."""
    ids = np.zeros((size, size), dtype=np.int32)
    c = size // 2
    for k, cx in ((1, c - 9), (2, c + 9)):
        rr, cc = disk((c, cx), 10, shape=ids.shape)
        ids[rr, cc] = k
    return ids
