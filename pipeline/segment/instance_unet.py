"""Instance segmentation with a U-Net: a 3-class (background / interior / boundary)
output, then a marker-controlled watershed per chunk.

Training target (:func:`boundary_targets`): from an instance mask (y, x) of object ids,
class 2 (boundary) is each object's *inner* outline
(``skimage.segmentation.find_boundaries(mode="inner")``: object pixels with a
4-neighbour of another value), class 1 (interior) the rest of each object, class 0 the
background. The inner outline is chosen over the outer one so that interior ∪ boundary
is exactly the union of the objects (the predicted foreground keeps the objects'
extent), and so that two touching objects are split by a 2 px boundary band that lies
inside them. This is the three-class scheme of Caicedo et al., "Evaluation of deep
learning strategies for nucleus segmentation in fluorescence images", Cytometry A 95
(2019). Objects too thin to have an interior pixel are boundary only; the watershed
step still keeps them (see :func:`watershed_instances`).

Inference: the existing blended tiled inference (:func:`pipeline.inference.unet_probabilities`)
gives class probabilities (3, y, x) on one global window grid; :func:`watershed_instances`
turns a chunk plus halo of those probabilities into instance ids and matches the per-chunk
kernel interface ``kernel(block, valid) -> labels``::

    block: (band, y, x) float32 -- here (3, y, x) probabilities of a chunk plus its halo
    valid: (y, x) bool, False = nodata
    returns (y, x) int64 labels, 0 = background, objects 1..n

Locality: the label of a pixel depends only on the probabilities inside the 4-connected
foreground component that holds it (the watershed floods within the foreground mask,
markers come from inside it, size filters count pixels of pieces inside it). So a halo
larger than the largest cluster of touching objects makes the kernel's result on a
chunk independent of where the chunk lies (up to the numbering of the objects).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.errors import InputError

#: Output channels of an instance-boundary U-Net, in order (class id = position).
INSTANCE_CLASSES = ["background", "interior", "boundary"]
BACKGROUND, INTERIOR, BOUNDARY = 0, 1, 2


def boundary_targets(instances: np.ndarray, unlabeled: np.ndarray | None = None, ignore: int = 255) -> np.ndarray:
    """3-class training target from an instance mask.

    Args:
        instances: (y, x) integer object ids, 0 = background; any other value is one object.
        unlabeled: optional (y, x) bool, True where the ground truth has no label; those
            pixels are treated as background when outlining and set to ``ignore``.
        ignore: value written where ``unlabeled`` (the training loss ignores 255).

    Returns:
        int64 (y, x): 0 background, 1 interior, 2 boundary (the object's inner outline,
        4-connectivity, see the module docstring), ``ignore`` where unlabeled. Pixels on
        the array's edge are not outlined against the outside, so an object cut by the
        edge keeps its interior there.

    Raises:
        InputError: ``instances`` is not a 2-D integer array, or shapes differ.
    """
    from skimage.segmentation import find_boundaries

    inst = np.asarray(instances)
    if inst.ndim != 2 or inst.dtype.kind not in "iu":
        raise InputError(f"an instance mask must be a (y, x) integer array, got {inst.dtype} {inst.shape}")
    if unlabeled is not None and unlabeled.shape != inst.shape:
        raise InputError(f"unlabeled mask {unlabeled.shape} and instance mask {inst.shape} differ in shape")
    ids = inst.astype(np.int64)
    if unlabeled is not None:
        ids = np.where(unlabeled, 0, ids)
    out = np.where(ids != 0, INTERIOR, BACKGROUND).astype(np.int64)
    out[find_boundaries(ids, connectivity=1, mode="inner", background=0)] = BOUNDARY
    if unlabeled is not None:
        out[unlabeled] = ignore
    return out


@dataclass(frozen=True)
class WatershedParams:
    """Parameters of :func:`watershed_instances` (probabilities in [0, 1], sizes in pixels).

    Attributes:
        foreground: a pixel is foreground where P(interior) + P(boundary) > this.
        seed: markers are 4-connected components of P(interior) > this (inside the foreground).
        min_seed_px: markers smaller than this are dropped (their pixels are flooded from
            neighbouring markers, or form an unseeded piece).
        min_size_px: objects smaller than this are set to background.
    """

    foreground: float = 0.5
    seed: float = 0.5
    min_seed_px: int = 4
    min_size_px: int = 8

    def __post_init__(self) -> None:
        for name in ("foreground", "seed"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise InputError(f"watershed {name} threshold must be in [0, 1), got {v}")
        if self.min_seed_px < 1 or self.min_size_px < 1:
            raise InputError(f"watershed sizes must be >= 1 px, got min_seed_px={self.min_seed_px}, "
                             f"min_size_px={self.min_size_px}")  # fmt: skip


def watershed_instances(block: np.ndarray, valid: np.ndarray,
                        params: WatershedParams = WatershedParams()) -> np.ndarray:  # fmt: skip
    """Instance ids from 3-class probabilities: marker-controlled watershed in the foreground.

    Steps: foreground = valid & (P(interior) + P(boundary) > ``params.foreground``);
    markers = 4-connected components of P(interior) > ``params.seed`` inside the
    foreground, those under ``params.min_seed_px`` dropped;
    ``skimage.segmentation.watershed`` floods the elevation 1 − P(interior) from the
    markers within the foreground (4-connectivity), so touching objects split where the
    interior probability is lowest, i.e. on the predicted boundary band. Foreground
    components that hold no marker (objects too thin for an interior) become one object
    each. Objects under ``params.min_size_px`` become background.

    Args:
        block: (3, y, x) float probabilities (background, interior, boundary), e.g. a chunk
            plus its halo of :func:`pipeline.inference.unet_probabilities`.
        valid: (y, x) bool, False where the input is nodata (always background).

    Returns:
        int64 (y, x): 0 background, objects numbered from 1 (not necessarily consecutive).
        The result is local: see the module docstring.

    Raises:
        InputError: ``block`` is not (3, y, x) or ``valid`` has another (y, x) shape.
    """
    from scipy import ndimage
    from skimage.segmentation import watershed

    if block.ndim != 3 or block.shape[0] != len(INSTANCE_CLASSES):
        raise InputError(f"the watershed step needs (3, y, x) class probabilities, got shape {block.shape}")
    if valid.shape != block.shape[1:]:
        raise InputError(f"valid mask {valid.shape} does not match the probabilities' (y, x) {block.shape[1:]}")
    p_int = block[INTERIOR].astype(np.float64)
    fg = valid & ((block[INTERIOR].astype(np.float64) + block[BOUNDARY]) > params.foreground)
    four = ndimage.generate_binary_structure(2, 1)
    markers, _ = ndimage.label(fg & (p_int > params.seed), structure=four)
    markers = _drop_small(markers, params.min_seed_px)
    labels = watershed(1.0 - p_int, markers=markers, mask=fg, connectivity=1).astype(np.int64)
    unseeded, n_extra = ndimage.label(fg & (labels == 0), structure=four)
    if n_extra:
        labels[unseeded > 0] = unseeded[unseeded > 0] + (int(markers.max()) if markers.size else 0)
    return _drop_small(labels, params.min_size_px).astype(np.int64)


def _drop_small(labels: np.ndarray, min_px: int) -> np.ndarray:
    """``labels`` (y, x) non-negative ids with every id of fewer than ``min_px`` pixels set to 0."""
    if min_px <= 1 or labels.size == 0:
        return labels
    small = np.bincount(labels.ravel()) < min_px
    small[0] = False
    return np.where(small[labels], 0, labels)


@dataclass(frozen=True)
class WatershedKernel:
    """The per-chunk kernel ``kernel(block, valid) -> labels`` of :func:`watershed_instances`
    (a small frozen object: picklable, and tokenised by Dask from its fields).

    Attributes:
        params: the watershed's parameters.
        required_halo: optional, pixels: the extent of the largest cluster of touching
            objects expected (see the module docstring on locality). The watershed itself
            cannot know it; when set, the chunk stitcher (:mod:`pipeline.instances`) refuses
            a smaller halo.
    """

    params: WatershedParams = WatershedParams()
    required_halo: int | None = None

    def __call__(self, block: np.ndarray, valid: np.ndarray) -> np.ndarray:
        return watershed_instances(block, valid, self.params)


def watershed_kernel(params: WatershedParams = WatershedParams(), required_halo: int | None = None) -> WatershedKernel:
    """The per-chunk kernel of :func:`watershed_instances` with ``params`` bound (see :class:`WatershedKernel`)."""
    return WatershedKernel(params, required_halo)


__all__ = ["INSTANCE_CLASSES", "WatershedKernel", "WatershedParams", "boundary_targets", "watershed_instances", "watershed_kernel"]
