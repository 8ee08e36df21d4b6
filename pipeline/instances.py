"""Chunked instance labelling with stitching across chunk borders (Dask glue; no file I/O).

Design note "Instances across chunks", step by step:

1. **Segment each chunk with a halo** (:func:`segment_chunks`). A task reads its chunk
   plus ``halo`` pixels on each side, clipped at the raster edges (never padded, so no
   padding artefacts), and runs the kernel (:mod:`pipeline.segment.instances`). It keeps
   the objects with at least one pixel in its core and numbers them 1..n_k in the order
   of their ids ("local ranks"); pixels of other objects become 0.
2. **Provisional ids, unique by construction**: chunk k's objects get ``offset_k + rank``
   with ``offset_k`` the prefix sum of the object counts of the chunks before it
   (row-major), in 64 bits. Chunk indices are never packed into bits; more ids than
   int64 holds is an error (:func:`merge_plan`).
3. **Cross-border pairs**: for every pair of neighbouring chunks A, B (faces and diagonal
   corners), both chunks' labels are read on the shared window ``crop(A) ∩ crop(B)``,
   where each chunk's segmentation extends into the other's core through its halo. A
   pair (a, b) is recorded when ``IoU(a, b) > iou_threshold`` on that window (default
   0.5: for thresholds >= 0.5 a piece pairs with at most one piece, Kirillov et al. 2019,
   Theorem 1). Merely touching is no reason: two objects that meet on a chunk face are
   disjoint in both segmentations, their IoU is 0, and they stay two objects.
4. **Union-find on the client** (:func:`merge_plan`): the pairs involve border objects
   only; connected components of the pair graph (``scipy.sparse.csgraph``) give each
   group's root (its smallest provisional id).
5. **Relabel once** (:func:`relabel`): consecutive ids 1..N in the order of the roots'
   provisional ids, in the smallest sufficient dtype (uint16, uint32, uint64; 0 =
   background). Each chunk's lookup table has ``n_k + 1`` entries, built in its task from
   the chunk's base id and its own merged objects, so a worker holds at most a chunk
   plus halo, and no task ever holds the whole label image.

If the halo is at least the kernel's ``required_halo`` (checked), an object touching a
chunk's core is segmented the same in every chunk that sees it (up to the kernel's
documented non-local effects), so the result does not depend on the chunking, up to a
permutation of ids (:func:`chunking_agreement` measures it).

Cost: :func:`instance_labels` runs the kernel twice per chunk (once for counts and
pairs, once more when the returned array is computed). A stage runs it once: each chunk's
task writes its local ranks to a store (:func:`segment_chunks`' ``writer``) while
:func:`ordered_counts_pairs` gathers the counts and pairs, chunk rows in order, then
:func:`relabel` reads the stored array.

Axis order: images (band, y, x), labels and masks (y, x). Sizes in pixels.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import dask
import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph

from pipeline.errors import ConfigError, InputError
from pipeline.segment.instances import ClassicalInstances, InstanceKernel

#: The 8 neighbour directions (dy, dx); a pair task is built for the first four only.
_FORWARD = ((0, 1), (1, -1), (1, 0), (1, 1))
_DIRECTIONS = _FORWARD + tuple((-dy, -dx) for dy, dx in _FORWARD)

_INT64_MAX = int(np.iinfo(np.int64).max)


# ---------------------------------------------------------------------------------------
# chunk geometry
# ---------------------------------------------------------------------------------------
def _bounds(chunks: tuple[int, ...]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(chunks)]).astype(np.int64)


@dataclass(frozen=True)
class _Geom:
    """Where a block's crop lies (all in pixels).

    rows/cols: the input blocks gathered, as ranges of block indices; gather_y0/x0: raster
    offset of the gathered region; crop: (y0, y1, x0, x1) raster window of chunk plus halo
    clipped to the raster; core: (y0, y1, x0, x1) of the chunk inside the crop;
    windows: direction -> (y0, y1, x0, x1) of crop(self) ∩ crop(neighbour) inside the crop.
    """

    rows: tuple[int, int]
    cols: tuple[int, int]
    gather_y0: int
    gather_x0: int
    crop: tuple[int, int, int, int]
    core: tuple[int, int, int, int]
    windows: dict = field(default_factory=dict)


def _crop_window(by: np.ndarray, bx: np.ndarray, i: int, j: int, halo: int) -> tuple[int, int, int, int]:
    return (max(0, int(by[i]) - halo), min(int(by[-1]), int(by[i + 1]) + halo),
            max(0, int(bx[j]) - halo), min(int(bx[-1]), int(bx[j + 1]) + halo))  # fmt: skip


def _geometry(chunks_y: tuple[int, ...], chunks_x: tuple[int, ...], halo: int) -> dict[tuple[int, int], _Geom]:
    by, bx = _bounds(chunks_y), _bounds(chunks_x)
    ny, nx = len(chunks_y), len(chunks_x)
    out = {}
    for i in range(ny):
        for j in range(nx):
            y0, y1, x0, x1 = _crop_window(by, bx, i, j, halo)
            r0 = int(np.searchsorted(by, y0, side="right")) - 1
            r1 = int(np.searchsorted(by, y1, side="left"))
            c0 = int(np.searchsorted(bx, x0, side="right")) - 1
            c1 = int(np.searchsorted(bx, x1, side="left"))
            windows = {}
            for dy, dx in _DIRECTIONS:
                k, m = i + dy, j + dx
                if 0 <= k < ny and 0 <= m < nx:
                    ny0, ny1, nx0, nx1 = _crop_window(by, bx, k, m, halo)
                    windows[(dy, dx)] = (max(y0, ny0) - y0, min(y1, ny1) - y0, max(x0, nx0) - x0, min(x1, nx1) - x0)
            core = (int(by[i]) - y0, int(by[i + 1]) - y0, int(bx[j]) - x0, int(bx[j + 1]) - x0)
            out[(i, j)] = _Geom((r0, r1), (c0, c1), int(by[r0]), int(bx[c0]), (y0, y1, x0, x1), core, windows)
    return out


def _assemble(blocks: list, g: _Geom) -> np.ndarray:
    """The crop from the gathered blocks (nested list [row][col] of arrays (..., y, x))."""
    whole = np.block(blocks) if len(blocks) > 1 or len(blocks[0]) > 1 else blocks[0][0]
    y0, y1, x0, x1 = g.crop
    return whole[..., y0 - g.gather_y0 : y1 - g.gather_y0, x0 - g.gather_x0 : x1 - g.gather_x0]


def _prepare(image: da.Array, valid: da.Array) -> tuple[da.Array, da.Array]:
    if image.ndim != 3 or valid.ndim != 2:
        raise InputError(f"image must be (band, y, x) and valid (y, x); got shapes {image.shape} and {valid.shape}")
    if image.shape[1:] != valid.shape:
        raise InputError(f"image (y, x) shape {image.shape[1:]} differs from the valid mask's {valid.shape}")
    if len(image.chunks[0]) != 1:
        image = image.rechunk({0: -1})
    if valid.chunks != image.chunks[1:]:
        valid = valid.rechunk(image.chunks[1:])
    return image, valid.astype(bool)


def _crop_layer(name: str, func, image: da.Array, valid: da.Array, halo: int, *args) -> tuple[dict, dict]:
    """Graph layer: one task per chunk calling ``func(crop_image, crop_valid, geom, *args)``."""
    geoms = _geometry(image.chunks[1], image.chunks[2], halo)
    dsk = {}
    for (i, j), g in geoms.items():
        rows, cols = range(*g.rows), range(*g.cols)
        img_keys = [[(image.name, 0, r, c) for c in cols] for r in rows]
        ok_keys = [[(valid.name, r, c) for c in cols] for r in rows]
        dsk[(name, i, j)] = (func, img_keys, ok_keys, g) + args
    return dsk, geoms


def _graph(inputs: list, layers: dict[str, tuple[dict, tuple[str, ...]]]) -> HighLevelGraph:
    """A HighLevelGraph of ``inputs``' graphs plus ``layers`` (name -> (tasks, dependencies));
    the dependency "in" stands for all the inputs' output layers."""
    all_layers, deps = {}, {}
    in_names = set()
    for x in inputs:
        hlg = x.__dask_graph__()
        all_layers.update(hlg.layers)
        deps.update(hlg.dependencies)
        in_names.update(x.__dask_layers__())
    for name, (tasks, needs) in layers.items():
        all_layers[name] = tasks
        deps[name] = set(in_names) if needs == ("in",) else set(needs)
    return HighLevelGraph(all_layers, deps)


# ---------------------------------------------------------------------------------------
# step 1: per-chunk segmentation
# ---------------------------------------------------------------------------------------
def _segment_block(img_blocks, ok_blocks, g: _Geom, kernel: InstanceKernel, writer=None, index=None):
    img = _assemble(img_blocks, g).astype(np.float32, copy=False)
    ok = _assemble(ok_blocks, g).astype(bool, copy=False)
    labels = np.asarray(kernel(img, ok))
    if labels.shape != ok.shape:
        raise InputError(f"the instance kernel returned labels of shape {labels.shape} for a block of {ok.shape}")
    if labels.dtype.kind not in "iu":
        raise InputError(f"the instance kernel returned {labels.dtype} labels; integer ids are required")
    if labels.dtype.kind == "i" and labels.size and labels.min() < 0:
        raise InputError("the instance kernel returned negative labels; use 0 for background and ids >= 1")
    labels = np.where(ok, labels, 0)
    cy0, cy1, cx0, cx1 = g.core
    core = labels[cy0:cy1, cx0:cx1]
    ids = np.unique(core[core > 0])
    # local rank 1..n of the objects that reach the core; 0 for every other pixel
    local = np.zeros(labels.shape, dtype=np.int64)
    if len(ids):
        pos = np.minimum(np.searchsorted(ids, labels), len(ids) - 1)
        hit = (ids[pos] == labels) & (labels > 0)
        local[hit] = pos[hit] + 1
    strips = {d: local[y0:y1, x0:x1].copy() for d, (y0, y1, x0, x1) in g.windows.items()}
    if writer is not None:  # the core goes to the store now; the task's result keeps only what the merge needs
        y0, x0 = g.crop[0], g.crop[2]
        writer(index, ((y0 + cy0, y0 + cy1), (x0 + cx0, x0 + cx1)), local[cy0:cy1, cx0:cx1])
        return None, len(ids), strips
    return local[cy0:cy1, cx0:cx1].copy(), len(ids), strips


def _count(result) -> np.ndarray:
    return np.array([[result[1]]], dtype=np.int64)


def _pair_block(a: np.ndarray, b: np.ndarray, threshold: float, block_a: int, block_b: int) -> np.ndarray:
    """(k, 4) int64 rows (block_a, rank_a, block_b, rank_b) of piece pairs with IoU > threshold
    on one shared window; ``a`` and ``b`` are the two chunks' local ranks there."""
    if a.shape != b.shape:
        raise AssertionError(f"shared windows differ: {a.shape} vs {b.shape}")
    both = (a > 0) & (b > 0)
    if not both.any():
        return np.empty((0, 4), dtype=np.int64)
    area_a = np.bincount(a.ravel())
    area_b = np.bincount(b.ravel())
    pa, pb = a[both], b[both]
    radix = int(pb.max()) + 1
    if (int(pa.max()) + 1) * radix < _INT64_MAX:
        keys, inter = np.unique(pa * radix + pb, return_counts=True)
        ra, rb = keys // radix, keys % radix
    else:  # pragma: no cover - more than ~3e9 objects in one chunk
        rows, inter = np.unique(np.stack([pa, pb], axis=1), axis=0, return_counts=True)
        ra, rb = rows[:, 0], rows[:, 1]
    iou = inter / (area_a[ra] + area_b[rb] - inter)
    sel = iou > threshold
    n = int(sel.sum())
    return np.stack([np.full(n, block_a), ra[sel], np.full(n, block_b), rb[sel]], axis=1).astype(np.int64)


def _concat_pairs(parts: list) -> np.ndarray:
    return np.concatenate(parts, axis=0) if parts else np.empty((0, 4), dtype=np.int64)


@dataclass
class ChunkedInstances:
    """Lazy per-chunk results of step 1-3 (module docstring).

    Attributes:
        local: int64 (y, x), chunked like the image: each chunk's local ranks 1..n_k, 0 =
            background. None when the chunk tasks write it themselves (``writer``).
        counts: int64 (n_chunks_y, n_chunks_x): objects per chunk (n_k).
        pairs: Delayed int64 (k, 4): rows (block_a, rank_a, block_b, rank_b), block
            indices flattened row-major, of the cross-border pairs to merge.
        halo: the halo used (pixels).
    """

    local: da.Array | None
    counts: da.Array
    pairs: Delayed
    halo: int


def _check_halo(kernel: InstanceKernel, halo: int) -> None:
    if int(halo) != halo or halo < 0:
        raise ConfigError(f"halo must be a whole number of pixels >= 0, got {halo}")
    need = getattr(kernel, "required_halo", None)
    if need is not None and halo < need:
        raise ConfigError(
            f"halo {halo} px is below the {need} px this kernel needs to segment objects across chunk borders "
            f"(from its largest object size, smoothing and marker spacing); use a halo of at least {need} px"
        )


def segment_chunks(
    image: da.Array, valid: da.Array, kernel: InstanceKernel, halo: int, iou_threshold: float = 0.5,
    writer: Callable[[tuple[int, int], tuple[tuple[int, int], tuple[int, int]], np.ndarray], None] | None = None,
) -> ChunkedInstances:
    """Steps 1-3 of the module docstring, lazily.

    Without ``writer`` the local ranks are a Dask array (``ChunkedInstances.local``) whose
    chunk tasks share the kernel's run with the counts and pairs (compute them together).
    With ``writer``, each chunk task writes its local ranks itself,
    ``writer((i, j), ((r0, r1), (c0, c1)), ranks)`` (pixel window of the chunk, ranks int64
    (y, x)), and keeps only its count and the shared windows: a chunk's ranks are then never
    held past its own task, whatever order the scheduler runs the counts and pairs in
    (:func:`ordered_counts_pairs` orders them). A stage stores them this way and
    :func:`relabel` reads them back.

    Args:
        image: (band, y, x) any real dtype (blocks reach the kernel as float32); its (y, x)
            chunks are the output chunks.
        valid: (y, x) bool, False = nodata (such pixels are always background).
        kernel: the per-chunk kernel (:mod:`pipeline.segment.instances`).
        halo: pixels read beyond each chunk edge; at least ``kernel.required_halo`` when the
            kernel declares one.
        iou_threshold: pieces pair when their IoU on the shared window is above this.

    Raises:
        ConfigError: halo below the kernel's need, or an IoU threshold outside [0.5, 1).
        InputError: shapes that do not match.
    """
    _check_halo(kernel, halo)
    if not 0.5 <= iou_threshold < 1:
        raise ConfigError(f"iou_threshold must be in [0.5, 1) so that pairs are unique, got {iou_threshold}")
    image, valid = _prepare(image, valid)
    token = tokenize(image.name, valid.name, kernel, halo, iou_threshold, writer)
    seg = f"instances-seg-{token}"
    dsk, geoms = _crop_layer(seg, _segment_block, image, valid, int(halo), kernel, *([writer] if writer else []))
    if writer is not None:  # each task also gets its chunk index
        dsk = {k: (*task, k[1:]) for k, task in dsk.items()}
    ny, nx = len(image.chunks[1]), len(image.chunks[2])

    local_name, count_name = f"instances-local-{token}", f"instances-count-{token}"
    strip_name, pairs_name = f"instances-strips-{token}", f"instances-pairs-{token}"
    local_dsk, count_dsk, strip_dsk, pair_dsk = {}, {}, {}, {}
    for i, j in geoms:
        if writer is None:
            local_dsk[(local_name, i, j)] = (operator.getitem, (seg, i, j), 0)
        count_dsk[(count_name, i, j)] = (_count, (seg, i, j))
        strip_dsk[(strip_name, i, j)] = (operator.getitem, (seg, i, j), 2)
        for dy, dx in _FORWARD:
            k, m = i + dy, j + dx
            if 0 <= k < ny and 0 <= m < nx:
                pair_dsk[(pairs_name, i, j, dy, dx)] = (
                    _pair_block, (operator.getitem, (strip_name, i, j), (dy, dx)),
                    (operator.getitem, (strip_name, k, m), (-dy, -dx)), float(iou_threshold), i * nx + j, k * nx + m,
                )  # fmt: skip
    pair_dsk[pairs_name] = (_concat_pairs, list(pair_dsk))
    graph = _graph(
        [image, valid],
        {seg: (dsk, ("in",)), count_name: (count_dsk, (seg,)), strip_name: (strip_dsk, (seg,)),
         pairs_name: (pair_dsk, (strip_name,)), **({local_name: (local_dsk, (seg,))} if local_dsk else {})},
    )  # fmt: skip
    per_chunk = ((1,) * ny, (1,) * nx)
    counts = da.Array(graph, count_name, chunks=per_chunk, dtype=np.int64, meta=np.empty((0, 0), np.int64))
    pairs = Delayed(pairs_name, graph, layer=pairs_name)
    if writer is not None:
        return ChunkedInstances(None, counts, pairs, int(halo))
    local = da.Array(graph, local_name, chunks=image.chunks[1:], dtype=np.int64, meta=np.empty((0, 0), np.int64))
    return ChunkedInstances(local, counts, pairs, int(halo))


class _Gather:
    """``collect`` of :func:`ordered_counts_pairs`: per-chunk counts (in ``todo`` order) and
    pair blocks -> (counts (ny, nx), pairs (k, 4)). A class, so that it pickles to workers."""

    def __init__(self, todo: list[tuple[int, int]], shape: tuple[int, int]):
        self.todo, self.shape = todo, shape

    def __call__(self, counts: list, pairs: list) -> tuple[np.ndarray, np.ndarray]:
        out = np.zeros(self.shape, dtype=np.int64)
        for (i, j), c in zip(self.todo, counts):
            out[i, j] = int(np.asarray(c).ravel()[0])
        return out, _concat_pairs(pairs)

    def __dask_tokenize__(self):
        return (type(self).__name__, self.todo, self.shape)


def ordered_counts_pairs(chunked: ChunkedInstances, strips: list[tuple[int, int]] | None = None) -> Delayed:
    """One ``Delayed`` of (counts int64 (n_chunks_y, n_chunks_x), pairs int64 (k, 4)), the
    same values as ``chunked.counts`` and ``chunked.pairs``, whose computing finishes the
    chunks row by row (strip after strip with ``strips``, runs [j0, j1) of chunk columns
    from :func:`pipeline.grid.column_strips`), through :func:`pipeline.apply.chunk_tasks`.

    Each pair task waits in the link of the later of its two chunks, so a chunk's shared
    windows are freed once its neighbours are done. Computed as two outputs of their own
    beside the writes, Dask's order kept every chunk's shared windows, and on a U-Net raster
    every window block, to the end (a test measures the blocks alive).

    Use it with :func:`segment_chunks`' ``writer``: the chunk tasks then write their local
    ranks as they run. (Computing ``chunked.local`` as well would be another output in
    Dask's own order, or the kernel run twice.)
    """
    from pipeline import apply

    ny, nx = chunked.counts.numblocks
    link = {}
    for k, (j0, j1) in enumerate(strips or [(0, nx)]):
        for j in range(j0, j1):
            for i in range(ny):
                link[(i, j)] = (k, i)
    pairs_name = chunked.pairs.key
    extra: dict[tuple[int, int], list] = {}
    for i in range(ny):
        for j in range(nx):
            for dy, dx in _FORWARD:
                if (i + dy, j + dx) in link:
                    later = max((i, j), (i + dy, j + dx), key=link.__getitem__)
                    extra.setdefault(later, []).append((pairs_name, i, j, dy, dx))
    todo = [(i, j) for i in range(ny) for j in range(nx)]
    return apply.chunk_tasks(chunked.counts, todo, strips, extra=extra, collect=_Gather(todo, (ny, nx)))


# ---------------------------------------------------------------------------------------
# steps 4-5: merge on the client, relabel per chunk
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MergePlan:
    """What :func:`relabel` needs, computed once on the client.

    Attributes:
        n_objects: N, objects after merging; final ids are 1..N.
        dtype: smallest of uint16, uint32, uint64 that holds N.
        chunks: the (y, x) chunks the plan was made for.
        base: int64 (n_chunks_y, n_chunks_x): final id = base + rank - (merged ranks below
            it) for a chunk's objects that are not merged into another chunk's object.
        merged: (i, j) -> (ranks int64 (m,), final ids int64 (m,)) of that chunk's objects
            merged into an object with a smaller provisional id (only chunks that have some).
        n_provisional: objects before merging (sum of the chunk counts).
    """

    n_objects: int
    dtype: np.dtype
    chunks: tuple[tuple[int, ...], tuple[int, ...]]
    base: np.ndarray
    merged: dict
    n_provisional: int


def label_dtype(n_objects: int) -> np.dtype:
    """Smallest unsigned dtype (uint16, uint32, uint64) whose maximum is >= ``n_objects``."""
    for dt in (np.uint16, np.uint32, np.uint64):
        if n_objects <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise InputError(f"{n_objects} objects do not fit in 64-bit labels")  # pragma: no cover


def merge_plan(counts: np.ndarray, pairs: np.ndarray, chunks: tuple[tuple[int, ...], tuple[int, ...]]) -> MergePlan:
    """Union-find over the cross-border pairs and the consecutive final numbering.

    Args:
        counts: int (n_chunks_y, n_chunks_x) objects per chunk.
        pairs: int64 (k, 4) rows (block_a, rank_a, block_b, rank_b) from :func:`segment_chunks`.
        chunks: the (y, x) chunks of the local labels.

    Raises:
        InputError: more provisional ids than int64 holds (never wraps around).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    counts = np.asarray(counts, dtype=np.int64)
    flat = [int(c) for c in counts.ravel()]
    total = sum(flat)  # Python ints: no overflow while checking
    if total >= _INT64_MAX:
        raise InputError(f"{total} provisional objects exceed 64-bit ids; use fewer, larger objects or fewer chunks")
    offsets = np.concatenate([[0], np.cumsum(flat)[:-1]]).astype(np.int64) if flat else np.zeros(0, np.int64)

    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 4)
    ga = offsets[pairs[:, 0]] + pairs[:, 1]
    gb = offsets[pairs[:, 2]] + pairs[:, 3]
    nodes, inv = np.unique(np.concatenate([ga, gb]), return_inverse=True)
    if len(nodes):
        e = len(ga)
        adj = coo_matrix((np.ones(e, dtype=np.int8), (inv[:e], inv[e:])), shape=(len(nodes), len(nodes)))
        _, comp = connected_components(adj, directed=False)
        root = np.full(comp.max() + 1, _INT64_MAX, dtype=np.int64)
        np.minimum.at(root, comp, nodes)
        node_root = root[comp]
        is_removed = nodes != node_root
        removed, removed_root = nodes[is_removed], node_root[is_removed]  # sorted: nodes are
    else:
        removed = removed_root = np.zeros(0, np.int64)
    removed_final = removed_root - np.searchsorted(removed, removed_root, side="left")

    base = np.zeros(counts.shape, dtype=np.int64)
    merged = {}
    nx = counts.shape[1] if counts.ndim == 2 else 1
    for b, (o, n) in enumerate(zip(offsets, flat)):
        lo = int(np.searchsorted(removed, o, side="right"))
        hi = int(np.searchsorted(removed, o + n, side="right"))
        i, j = divmod(b, nx)
        base[i, j] = o - lo
        if hi > lo:
            merged[(i, j)] = (removed[lo:hi] - o, removed_final[lo:hi])
    n_objects = total - len(removed)
    return MergePlan(n_objects, label_dtype(n_objects), tuple(map(tuple, chunks)), base, merged, total)


def _relabel_block(local: np.ndarray, base: int, ranks: np.ndarray, finals: np.ndarray, dtype) -> np.ndarray:
    n = int(local.max()) if local.size else 0
    r = np.arange(n + 1, dtype=np.int64)
    lut = base + r - np.searchsorted(ranks, r, side="left")
    lut[0] = 0
    keep = ranks <= n
    lut[ranks[keep]] = finals[keep]
    return lut.astype(dtype)[local]


def relabel(local: da.Array, plan: MergePlan) -> da.Array:
    """Step 5: final ids 1..N in ``plan.dtype`` (0 = background), chunked like ``local``.

    Args:
        local: int (y, x) local ranks, as ``ChunkedInstances.local`` or read back from a store.
        plan: from :func:`merge_plan` for the same chunks.

    Raises:
        InputError: ``local`` is chunked differently from the plan.
    """
    if tuple(map(tuple, local.chunks)) != plan.chunks:
        raise InputError("the local labels are chunked differently from the merge plan; keep the chunks of step 1")
    merged = sorted((k, r.tolist(), f.tolist()) for k, (r, f) in plan.merged.items())
    name = f"instances-final-{tokenize(local.name, plan.n_provisional, plan.n_objects, plan.base, merged)}"
    empty = np.zeros(0, np.int64)
    dsk = {}
    for i in range(len(plan.chunks[0])):
        for j in range(len(plan.chunks[1])):
            ranks, finals = plan.merged.get((i, j), (empty, empty))
            dsk[(name, i, j)] = (_relabel_block, (local.name, i, j), int(plan.base[i, j]), ranks, finals, plan.dtype)
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[local])
    return da.Array(graph, name, chunks=plan.chunks, dtype=plan.dtype, meta=np.empty((0, 0), plan.dtype))


def instance_labels(
    image: da.Array, valid: da.Array, kernel: InstanceKernel, halo: int, iou_threshold: float = 0.5
) -> da.Array:
    """Instance labels of a chunked image, objects whole across chunk borders.

    Computes the per-chunk counts and cross-border pairs now (one kernel run per chunk)
    and returns the final labels lazily (a second kernel run per chunk when computed).

    Args:
        image: (band, y, x) Dask array; its (y, x) chunks are the output chunks.
        valid: (y, x) bool Dask array, False = nodata (always background).
        kernel: per-chunk kernel (:mod:`pipeline.segment.instances`).
        halo: pixels of context per side (>= ``kernel.required_halo`` when declared).
        iou_threshold: pieces in neighbouring chunks merge when their IoU on the shared
            window is above it.

    Returns:
        (y, x) Dask array of ids 1..N (0 = background), dtype uint16, uint32 or uint64
        (the smallest that holds N), chunked like ``image``.

    Raises:
        ConfigError: halo below the kernel's need; IoU threshold outside [0.5, 1).
        InputError: mismatched shapes, kernel output of the wrong shape or type.
    """
    ch = segment_chunks(image, valid, kernel, halo, iou_threshold)
    counts, pairs = dask.compute(ch.counts, ch.pairs)
    return relabel(ch.local, merge_plan(counts, pairs, ch.local.chunks))


# ---------------------------------------------------------------------------------------
# global threshold for the classical kernel
# ---------------------------------------------------------------------------------------
def _signal_block(img_blocks, ok_blocks, g: _Geom, kernel: ClassicalInstances) -> np.ndarray:
    s = kernel.signal(_assemble(img_blocks, g).astype(np.float32, copy=False), _assemble(ok_blocks, g))
    cy0, cy1, cx0, cx1 = g.core
    return s[cy0:cy1, cx0:cx1]


def instance_signal(image: da.Array, valid: da.Array, kernel: ClassicalInstances) -> da.Array:
    """Lazy float64 (y, x) smoothed signal of the classical kernel, chunked like ``image``.

    Each chunk reads the Gaussian's radius around it, so the values equal the
    single-piece signal bit for bit (NaN where no valid pixel is near).
    """
    image, valid = _prepare(image, valid)
    name = f"instances-signal-{tokenize(image.name, valid.name, kernel)}"
    dsk, _ = _crop_layer(name, _signal_block, image, valid, kernel.context_radius_px, kernel)
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[image, valid])
    return da.Array(graph, name, chunks=image.chunks[1:], dtype=np.float64, meta=np.empty((0, 0), np.float64))


def global_otsu_threshold(values: da.Array, valid: da.Array, bins: int = 1024) -> float:
    """Otsu's threshold of a (y, x) Dask array from the WHOLE raster's histogram.

    Per-chunk histograms over fixed edges (from the global finite min/max) are summed,
    then thresholded (:func:`pipeline.apply.global_histogram`,
    :func:`pipeline.segment.classical.otsu_threshold`; design note "Global statistics").
    Computes now (two passes).

    Raises:
        InputError: no valid finite pixel, or a constant signal.
    """
    from pipeline.apply import finite_range, global_histogram
    from pipeline.segment.classical import otsu_threshold

    valid = valid.astype(bool)
    lo, hi = (float(v) for v in dask.compute(*finite_range(values, valid)))
    if not np.isfinite(lo):
        raise InputError("no valid pixel to compute an instance threshold from (all nodata?)")
    if hi <= lo:
        raise InputError(f"every valid pixel is {lo:g}: Otsu needs two values; give the threshold explicitly")
    edges = np.linspace(lo, hi, int(bins) + 1)
    (counts,) = dask.compute(global_histogram(values, valid, edges))
    return otsu_threshold(np.asarray(counts), edges)


def with_global_otsu(
    image: da.Array, valid: da.Array, kernel: ClassicalInstances, bins: int = 1024
) -> ClassicalInstances:
    """``kernel`` with its threshold set to the global Otsu threshold of its smoothed signal."""
    s = instance_signal(image, valid, kernel)
    return dataclasses.replace(kernel, threshold=global_otsu_threshold(s, valid, bins))


# ---------------------------------------------------------------------------------------
# oracle: chunked vs single piece
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChunkingAgreement:
    """Chunked labels vs the single-piece kernel output.

    Attributes:
        chunk: chunk edge in pixels.
        ari: adjusted Rand index over all valid pixels (background is one cluster;
            ``sklearn.metrics.adjusted_rand_score``; 1 = same partition).
        n_objects, n_reference: objects in the chunked and single-piece labels.
        matched: single-piece objects with a chunked object of IoU > 0.5 (one-to-one).
        mean_matched_iou: mean IoU of those matches (1 = identical objects).
        dtype: dtype of the chunked labels.
    """

    chunk: int
    ari: float
    n_objects: int
    n_reference: int
    matched: int
    mean_matched_iou: float
    dtype: str


def chunking_agreement(
    image: np.ndarray,
    valid: np.ndarray,
    kernel: InstanceKernel,
    halo: int,
    chunk_sizes: list[int],
    iou_threshold: float = 0.5,
) -> list[ChunkingAgreement]:
    """Run :func:`instance_labels` for each chunk size and compare with ``kernel`` run once
    on the whole image (which must fit in memory).

    Args:
        image: (band, y, x) array; valid: (y, x) bool.
        chunk_sizes: chunk edges in pixels (a size >= the image gives one chunk).
    """
    from sklearn.metrics import adjusted_rand_score

    from pipeline.object_metrics import instance_counts, instance_metrics

    image = np.asarray(image)
    valid = np.asarray(valid, dtype=bool)
    ref = np.where(valid, np.asarray(kernel(image.astype(np.float32), valid)), 0)
    n_ref = len(np.unique(ref[ref > 0]))
    out = []
    for c in chunk_sizes:
        lab = instance_labels(da.from_array(image, chunks=(-1, c, c)), da.from_array(valid, chunks=(c, c)),
                              kernel, halo, iou_threshold).compute()  # fmt: skip
        m = instance_metrics(instance_counts(ref, lab, valid), thresholds=np.array([0.5]))
        out.append(ChunkingAgreement(
            chunk=int(c),
            ari=float(adjusted_rand_score(ref[valid], lab[valid])),
            n_objects=len(np.unique(lab[lab > 0])),
            n_reference=n_ref,
            matched=int(m.tp[0]),
            mean_matched_iou=float(m.mean_matched_iou[0]),
            dtype=str(lab.dtype),
        ))  # fmt: skip
    return out
