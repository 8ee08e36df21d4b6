"""Classical per-pixel segmentation kernels: spectral-index expressions, Otsu from a
global histogram, and k-means. Pure numpy / scikit-image / scikit-learn; no file I/O.

Every per-chunk kernel here is pixel-local (a pixel's label depends only on that
pixel's band values and on global parameters fitted beforehand), so the chunked
result equals the whole-array result bit for bit, whatever the chunking.
"""

from __future__ import annotations

import ast
import operator
from dataclasses import dataclass

import numpy as np

from pipeline.errors import ConfigError, InputError

_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


@dataclass(frozen=True)
class Expression:
    """A parsed band arithmetic expression such as ``(B03 - B08) / (B03 + B08)``.

    Only band names, numbers, ``+ - * / **``, unary minus and parentheses are allowed;
    it is evaluated by walking the syntax tree, never with ``eval``.
    """

    text: str
    tree: ast.expr
    names: tuple[str, ...]

    @classmethod
    def parse(cls, text: str, band_names: list[str]) -> Expression:
        """Parse and check that every name is a band.

        Raises:
            ConfigError: syntax error, a forbidden construct, or an unknown band name.
        """
        try:
            tree = ast.parse(text, mode="eval").body
        except SyntaxError:
            raise ConfigError(f"expression {text!r} is not valid arithmetic") from None
        names: list[str] = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Name):
                names.append(node.id)
            elif isinstance(node, ast.BinOp):
                if type(node.op) not in _BINOPS:
                    raise ConfigError(f"expression {text!r}: operator {type(node.op).__name__} is not allowed")
            elif isinstance(node, ast.UnaryOp):
                if type(node.op) not in _UNARY:
                    raise ConfigError(f"expression {text!r}: operator {type(node.op).__name__} is not allowed")
            elif isinstance(node, ast.Constant):
                if not isinstance(node.value, (int, float)) or isinstance(node.value, bool):
                    raise ConfigError(f"expression {text!r}: only numbers may appear as constants")
            elif not isinstance(node, (ast.operator, ast.unaryop, ast.expr_context)):
                raise ConfigError(f"expression {text!r}: {type(node).__name__} is not allowed")
        unknown = sorted(set(names) - set(band_names))
        if unknown:
            raise InputError(f"expression {text!r} uses bands {unknown} that the raster lacks; bands are {band_names}")
        if not names:
            raise ConfigError(f"expression {text!r} uses no band")
        return cls(text, tree, tuple(dict.fromkeys(names)))

    @property
    def band(self) -> str | None:
        """The band's name when the expression is a bare band (``B08``, ``(B08)``), else None."""
        return self.tree.id if isinstance(self.tree, ast.Name) else None

    def evaluate(self, bands: dict[str, np.ndarray]) -> np.ndarray:
        """Evaluate on arrays of identical shape (y, x); computed in float64.

        Division by zero gives ±inf or NaN (numpy semantics, warnings silenced);
        callers treat non-finite results as invalid pixels.
        """

        def walk(node: ast.expr) -> np.ndarray | float:
            if isinstance(node, ast.Name):
                return bands[node.id].astype(np.float64, copy=False)
            if isinstance(node, ast.Constant):
                return float(node.value)
            if isinstance(node, ast.BinOp):
                return _BINOPS[type(node.op)](walk(node.left), walk(node.right))
            if isinstance(node, ast.UnaryOp):
                return _UNARY[type(node.op)](walk(node.operand))
            raise AssertionError(f"unexpected node {node!r}")  # excluded by parse()

        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            out = walk(self.tree)
        return np.asarray(out, dtype=np.float64)


def histogram(values: np.ndarray, valid: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts of ``values[valid]`` in the bins ``edges`` (len(edges)-1 bins, int64).

    Counts from several chunks add up to the whole raster's histogram because the
    bin edges are fixed beforehand (design note: global statistics).
    """
    counts, _ = np.histogram(values[valid], bins=edges)
    return counts.astype(np.int64)


def integer_bin_edges(dtype: np.dtype | str) -> np.ndarray | None:
    """Histogram edges with one unit bin centred on every value of an 8- or 16-bit integer
    ``dtype`` (``v - 0.5 .. v + 0.5``; 256 or 65536 bins), or None for any other dtype.

    With them the histogram of integer data is exact and its bin centres are the values, as in
    ``skimage.filters.threshold_otsu`` on an integer image (one bin per value from the minimum
    to the maximum), so :func:`otsu_threshold` gives the same threshold and ``values > t``
    the same labels; and no pass over the data is needed to find the range first.
    """
    dt = np.dtype(dtype)
    if dt.kind not in "iu" or dt.itemsize > 2:
        return None
    info = np.iinfo(dt)
    return np.arange(info.min - 0.5, info.max + 1.0, 1.0)


def otsu_threshold(counts: np.ndarray, edges: np.ndarray) -> float:
    """Otsu's threshold from a histogram, via ``skimage.filters.threshold_otsu(hist=...)``.

    Empty bins below the first and above the last filled bin are dropped first, so a histogram
    over a dtype's whole range gives the threshold of the data's own range. The threshold is
    a bin centre: pixels strictly above it are foreground.

    Source: N. Otsu, "A threshold selection method from gray-level histograms",
    IEEE Trans. SMC 9(1), 1979.

    Raises:
        InputError: the histogram is empty.
    """
    from skimage.filters import threshold_otsu

    filled = np.flatnonzero(counts)
    if filled.size == 0:
        raise InputError("no valid pixel to compute an Otsu threshold (all nodata?)")
    first, last = filled[0], filled[-1]
    counts, edges = counts[first : last + 1], edges[first : last + 2]
    centres = (edges[:-1] + edges[1:]) / 2
    return float(threshold_otsu(hist=(counts, centres)))


@dataclass(frozen=True)
class KMeansModel:
    """Fitted k-means: centroids in standardised feature space.

    Attributes:
        centroids: float64 (K, F), in units of ``(x - mean) / std``.
        mean, std: float64 (F,), from the sample.
    """

    centroids: np.ndarray
    mean: np.ndarray
    std: np.ndarray

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Nearest centroid per pixel.

        Args:
            features: (F, y, x) band values (any real dtype).

        Returns:
            int64 (y, x) cluster ids; ties go to the lower id.

        The squared distances are computed pixel by pixel with a fixed summation
        order over features, not with a BLAS matrix product whose blocking depends
        on the array size, so a pixel's cluster is identical however the raster is
        chunked.
        """
        z = (features.astype(np.float64) - self.mean[:, None, None]) / self.std[:, None, None]
        best = np.full(z.shape[1:], np.inf)
        ids = np.zeros(z.shape[1:], dtype=np.int64)
        for k, c in enumerate(self.centroids):
            d = np.zeros(z.shape[1:])
            for f in range(z.shape[0]):
                d += (z[f] - c[f]) ** 2
            closer = d < best
            best[closer] = d[closer]
            ids[closer] = k
        return ids


def fit_kmeans(samples: np.ndarray, n_clusters: int, seed: int) -> KMeansModel:
    """Fit k-means (scikit-learn, k-means++ init, 4 restarts) on standardised samples.

    The fit runs on one thread (OpenMP and BLAS): scikit-learn's Lloyd iterations add per-thread
    partial sums, so the centroids' last bits depended on the thread count (6e-15 apart
    with 1 and 2 threads), and with them the segment key (:mod:`pipeline.resume`): the
    same run on another machine or scheduler computed its labels again. One thread was
    not slower on a 2-core machine (10.4 s against 13.2 s, 48 clusters, 10^5 samples).

    Args:
        samples: (N, F) valid pixel values.

    Returns:
        The model; equal samples give bitwise equal centroids.

    Raises:
        InputError: fewer distinct samples than clusters.
    """
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    samples = np.asarray(samples, dtype=np.float64)
    if len(np.unique(samples, axis=0)) < n_clusters:
        raise InputError(
            f"only {len(samples)} valid sampled pixels ({len(np.unique(samples, axis=0))} distinct) "
            f"for {n_clusters} clusters; lower segment.kmeans.n_clusters or check nodata"
        )
    mean = samples.mean(axis=0)
    std = samples.std(axis=0)
    std[std == 0] = 1.0
    with threadpool_limits(limits=1):  # OpenMP (Lloyd) and BLAS (k-means++ distances)
        km = KMeans(n_clusters=n_clusters, n_init=4, random_state=seed).fit((samples - mean) / std)
    return KMeansModel(km.cluster_centers_.astype(np.float64), mean, std)


def majority_mapping(contingency: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Map each cluster to the class it overlaps most (majority vote).

    Args:
        contingency: int (K clusters, C classes) pixel counts in the training area.
        centroids: (K, F) cluster centroids; a cluster with no labeled pixel takes the
            class of the nearest centroid that has one.

    Returns:
        int64 (K,) class id per cluster.

    Raises:
        InputError: no cluster overlaps any labeled pixel.
    """
    support = contingency.sum(axis=1)
    if not support.any():
        raise InputError("the training area holds no labeled ground-truth pixel; check segment.kmeans.train_area")
    mapping = contingency.argmax(axis=1).astype(np.int64)
    voted = np.flatnonzero(support > 0)
    for k in np.flatnonzero(support == 0):
        d = ((centroids[voted] - centroids[k]) ** 2).sum(axis=1)
        mapping[k] = mapping[voted[int(np.argmin(d))]]
    return mapping
