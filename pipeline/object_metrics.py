"""Object-level metrics for instance and panoptic segmentation, from additive counts.

Habit 6 (metrics add counts, never ratios): each chunk gives sparse counts, the areas of
its segments and the intersections of (ground-truth segment, predicted segment) pairs
(:class:`SegmentCounts`); counts from all chunks are summed (``+``) and every metric is
computed once from the sum. A segment is a key ``(class, id)``; for plain instance labels
the class is 0 and the id is the label (0 = background, not a segment).

Matching (Kirillov et al. 2019, "Panoptic Segmentation", CVPR, Sec. 4.1): a ground-truth
segment g and a predicted segment p of the same class match when ``IoU(g, p) > t``. For
``t >= 0.5`` the matching is unique (their Theorem 1: each segment has at most one
partner with IoU above 0.5, because two such partners would have to overlap it by more
than half each), so no assignment problem has to be solved. Then, per class and
threshold t:

- TP = matched pairs, FP = unmatched predicted segments, FN = unmatched ground-truth
  segments;
- precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2 TP / (2 TP + FP + FN);
- AP as defined for the 2018 Data Science Bowl (Caicedo et al. 2019, Nature Methods 16):
  ``TP / (TP + FP + FN)`` at each t, averaged over t = 0.50, 0.55, ..., 0.95 (``mean_ap``);
- mean matched IoU = SQ = (sum of IoU over TP) / TP; RQ = TP / (TP + FP/2 + FN/2) (= F1);
  PQ = (sum of IoU over TP) / (TP + FP/2 + FN/2) = SQ x RQ, and 0 when TP = 0 but FP + FN > 0
  (Kirillov et al. 2019, Eq. 1-2, and their reference code panopticapi; the paper's PQ is
  at t = 0.5).

Void (panoptic input): pixels whose ground-truth class is the void value are removed from
predicted segments before IoU is computed, and an unmatched predicted segment more than
half of which is void is not a false positive (Kirillov et al. 2019, Sec. 4.1). Pixels
outside ``valid`` are left out of everything. Ratios that are 0/0 are NaN.

Axis order: label images (y, x).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from pipeline.errors import InputError

#: IoU thresholds 0.50, 0.55, ..., 0.95 (Data Science Bowl 2018; COCO's AP@[.5:.95] grid).
THRESHOLDS = np.round(np.linspace(0.5, 0.95, 10), 2)

_KEY = np.int64

#: Per-threshold fields of :class:`InstanceMetrics`; the first three are counts.
_ROW = ("tp", "fp", "fn", "precision", "recall", "f1", "ap", "mean_matched_iou", "sq", "rq", "pq")


# ---------------------------------------------------------------------------------------
# sparse grouping helpers
# ---------------------------------------------------------------------------------------
def _group_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique rows of an int64 (n, c) array in lexicographic order, and each row's index.

    Columns are compacted one at a time (``np.unique`` codes, combined and re-compacted),
    so any 64-bit ids work and no product of cardinalities exceeds n^2.
    """
    n = rows.shape[0]
    if n == 0:
        return rows.reshape(0, rows.shape[1]), np.zeros(0, np.int64)
    code = np.zeros(n, dtype=np.int64)
    for c in range(rows.shape[1]):
        u, inv = np.unique(rows[:, c], return_inverse=True)
        _, code = np.unique(code * len(u) + inv.ravel(), return_inverse=True)
        code = code.ravel().astype(np.int64)
    _, first, inverse = np.unique(code, return_index=True, return_inverse=True)
    return rows[first], inverse.ravel()


def _reduce(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum int64 ``values`` (n, v) over equal ``keys`` rows (n, c)."""
    uniq, inv = _group_rows(keys)
    out = np.zeros((len(uniq), values.shape[1]), dtype=np.int64)
    np.add.at(out, inv, values)
    return uniq, out


def _lookup(table: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Index in ``table`` (unique rows) of each row of ``query`` (all present)."""
    _, inv = _group_rows(np.concatenate([table, query]))
    where = np.empty(inv[: len(table)].max() + 1 if len(table) else 0, dtype=np.int64)
    where[inv[: len(table)]] = np.arange(len(table))
    return where[inv[len(table) :]]


def _as_ids(a: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind not in "iub":
        raise InputError(f"{what} must hold integer ids, got {a.dtype}")
    if a.dtype == np.uint64 and a.size and a.max() > np.iinfo(np.int64).max:
        raise InputError(f"{what} has ids above 2^63 - 1, which object metrics cannot count")
    return a.astype(np.int64, copy=False)


# ---------------------------------------------------------------------------------------
# counts (additive over chunks)
# ---------------------------------------------------------------------------------------
@dataclass
class SegmentCounts:
    """Sparse, additive counts of one region (a chunk or the whole raster).

    Attributes:
        gt: int64 (n_g, 2) ground-truth segment keys (class, id), unique, sorted.
        gt_area: int64 (n_g,) pixels of each.
        pred: int64 (n_p, 2) predicted segment keys; pred_area: int64 (n_p,) pixels;
        pred_void: int64 (n_p,) of those pixels, how many are void in the ground truth.
        pairs: int64 (k, 4) rows (gt class, gt id, pred class, pred id) that overlap;
        inter: int64 (k,) overlapping pixels.
    """

    gt: np.ndarray
    gt_area: np.ndarray
    pred: np.ndarray
    pred_area: np.ndarray
    pred_void: np.ndarray
    pairs: np.ndarray
    inter: np.ndarray

    @classmethod
    def empty(cls) -> SegmentCounts:
        z2, z4, z = np.zeros((0, 2), _KEY), np.zeros((0, 4), _KEY), np.zeros(0, np.int64)
        return cls(z2, z, z2, z, z, z4, z)

    def __add__(self, other: SegmentCounts) -> SegmentCounts:
        gt, ga = _reduce(np.concatenate([self.gt, other.gt]), np.concatenate([self.gt_area, other.gt_area])[:, None])
        pv = np.stack([np.concatenate([self.pred_area, other.pred_area]),
                       np.concatenate([self.pred_void, other.pred_void])], axis=1)  # fmt: skip
        pred, pv = _reduce(np.concatenate([self.pred, other.pred]), pv)
        pairs, inter = _reduce(np.concatenate([self.pairs, other.pairs]),
                               np.concatenate([self.inter, other.inter])[:, None])  # fmt: skip
        return SegmentCounts(gt, ga[:, 0], pred, pv[:, 0], pv[:, 1], pairs, inter[:, 0])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SegmentCounts):
            return NotImplemented
        return all(np.array_equal(getattr(self, f), getattr(other, f)) for f in
                   ("gt", "gt_area", "pred", "pred_area", "pred_void", "pairs", "inter"))  # fmt: skip


def _counts_from_keys(gk: np.ndarray, g_in: np.ndarray, pk: np.ndarray, p_in: np.ndarray,
                      g_void: np.ndarray) -> SegmentCounts:  # fmt: skip
    gt, ga = _group_rows(gk[g_in])
    gt_area = np.bincount(ga, minlength=len(gt)).astype(np.int64)
    pred, pi = _group_rows(pk[p_in])
    pred_area = np.bincount(pi, minlength=len(pred)).astype(np.int64)
    pred_void = np.bincount(pi, weights=g_void[p_in], minlength=len(pred)).astype(np.int64)
    both = g_in & p_in
    pairs, qi = _group_rows(np.concatenate([gk[both], pk[both]], axis=1))
    inter = np.bincount(qi, minlength=len(pairs)).astype(np.int64)
    return SegmentCounts(gt, gt_area, pred, pred_area, pred_void, pairs, inter)


def instance_counts(gt: np.ndarray, pred: np.ndarray, valid: np.ndarray | None = None) -> SegmentCounts:
    """Counts of one chunk of instance labels.

    Args:
        gt, pred: (y, x) integer ids, 0 = background; any dtype up to 64 bits.
        valid: (y, x) bool, pixels to count (None: all).

    Raises:
        InputError: shapes differ or ids are not integers.
    """
    g, p = _as_ids(gt, "ground-truth labels"), _as_ids(pred, "predicted labels")
    if g.shape != p.shape or (valid is not None and np.shape(valid) != g.shape):
        raise InputError(f"label images differ in shape: {g.shape} vs {p.shape}")
    if valid is not None:
        ok = np.asarray(valid, dtype=bool)
        g, p = g[ok], p[ok]
    g, p = g.ravel(), p.ravel()
    zero = np.zeros(len(g), dtype=np.int64)
    return _counts_from_keys(np.stack([zero, g], 1), g > 0, np.stack([zero, p], 1), p > 0, np.zeros(len(g), bool))


def panoptic_counts(
    gt_class: np.ndarray,
    gt_id: np.ndarray,
    pred_class: np.ndarray,
    pred_id: np.ndarray,
    void: int | None = None,
    stuff_classes: Collection[int] = (),
    valid: np.ndarray | None = None,
) -> SegmentCounts:
    """Counts of one chunk of panoptic labels (a class id and an instance id per pixel).

    Args:
        gt_class, gt_id, pred_class, pred_id: (y, x) integer arrays. A segment is a
            (class, id) pair; for ``stuff_classes`` the id is ignored (one segment per class).
        void: class value meaning "no label": void in ``gt_class`` (see the module
            docstring's void rule), no segment in ``pred_class``. None: no void.
        valid: (y, x) bool, pixels to count (None: all).

    Raises:
        InputError: shapes differ or ids are not integers.
    """
    arrs = [_as_ids(a, n) for a, n in ((gt_class, "gt_class"), (gt_id, "gt_id"),
                                       (pred_class, "pred_class"), (pred_id, "pred_id"))]  # fmt: skip
    if len({a.shape for a in arrs}) != 1 or (valid is not None and np.shape(valid) != arrs[0].shape):
        raise InputError(f"panoptic label images differ in shape: {[a.shape for a in arrs]}")
    if valid is not None:
        ok = np.asarray(valid, dtype=bool)
        arrs = [a[ok] for a in arrs]
    gc, gi, pc, pi = (a.ravel() for a in arrs)
    stuff = np.asarray(sorted(stuff_classes), dtype=np.int64)
    gi = np.where(np.isin(gc, stuff), 0, gi)
    pi = np.where(np.isin(pc, stuff), 0, pi)
    g_void = (gc == void) if void is not None else np.zeros(len(gc), bool)
    p_in = (pc != void) if void is not None else np.ones(len(pc), bool)
    return _counts_from_keys(np.stack([gc, gi], 1), ~g_void, np.stack([pc, pi], 1), p_in, g_void)


def sum_counts(parts: list[SegmentCounts]) -> SegmentCounts:
    """Sum of counts (pairwise, as a balanced tree)."""
    parts = list(parts) or [SegmentCounts.empty()]
    while len(parts) > 1:
        parts = [parts[i] + parts[i + 1] if i + 1 < len(parts) else parts[i] for i in range(0, len(parts), 2)]
    return parts[0]


def dask_counts(chunk_fn, *arrays, **kwargs):
    """Lazy :class:`SegmentCounts` summed over chunks (a ``dask.delayed`` object).

    Args:
        chunk_fn: :func:`instance_counts` or :func:`panoptic_counts`.
        arrays: (y, x) Dask arrays in ``chunk_fn``'s positional order; they are rechunked
            like the first one. A ``valid`` Dask array may be given as keyword.
        kwargs: other keyword arguments of ``chunk_fn`` (plain values).

    Example: ``dask.compute(dask_counts(instance_counts, gt, pred, valid=mask))[0]``.
    """
    import dask

    valid = kwargs.pop("valid", None)
    ref = arrays[0]
    aligned = [a.rechunk(ref.chunks) for a in arrays]
    if valid is not None:
        aligned.append(valid.rechunk(ref.chunks))
    blocks = [a.to_delayed().ravel() for a in aligned]
    fn = dask.delayed(chunk_fn, pure=True)
    parts = []
    for bs in zip(*blocks):
        args = bs[: len(arrays)]
        v = bs[len(arrays)] if valid is not None else None
        parts.append(fn(*args, valid=v, **kwargs))
    add = dask.delayed(lambda a, b: a + b, pure=True)
    while len(parts) > 1:
        parts = [add(parts[i], parts[i + 1]) if i + 1 < len(parts) else parts[i] for i in range(0, len(parts), 2)]
    return parts[0]


# ---------------------------------------------------------------------------------------
# matching and metrics
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Matched:
    classes: np.ndarray  # int64 (C,)
    tp: np.ndarray  # int64 (T, C)
    fp: np.ndarray
    fn: np.ndarray
    iou_sum: np.ndarray  # float64 (T, C)


def _match(counts: SegmentCounts, thresholds: np.ndarray, void_fraction: float = 0.5) -> _Matched:
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if thresholds.size and thresholds.min() < 0.5:
        raise InputError("IoU thresholds below 0.5 do not give a unique matching (Kirillov et al. 2019, Theorem 1)")
    classes = np.union1d(counts.gt[:, 0], counts.pred[:, 0]).astype(np.int64)
    t, c = len(thresholds), len(classes)
    n_gt = np.bincount(np.searchsorted(classes, counts.gt[:, 0]), minlength=c)
    same = counts.pairs[:, 0] == counts.pairs[:, 2]
    pairs, inter = counts.pairs[same], counts.inter[same].astype(np.float64)
    gi = _lookup(counts.gt, pairs[:, :2])
    pi = _lookup(counts.pred, pairs[:, 2:])
    pred_area = (counts.pred_area - counts.pred_void).astype(np.float64)  # void removed from predictions
    iou = inter / (counts.gt_area[gi] + pred_area[pi] - inter)
    pair_cls = np.searchsorted(classes, pairs[:, 0])
    pred_cls = np.searchsorted(classes, counts.pred[:, 0])
    mostly_void = counts.pred_void > void_fraction * counts.pred_area
    tp = np.zeros((t, c), np.int64)
    fp = np.zeros((t, c), np.int64)
    fn = np.zeros((t, c), np.int64)
    iou_sum = np.zeros((t, c))
    for k, thr in enumerate(thresholds):
        hit = iou > thr
        tp[k] = np.bincount(pair_cls[hit], minlength=c)
        iou_sum[k] = np.bincount(pair_cls[hit], weights=iou[hit], minlength=c)
        matched_pred = np.zeros(len(counts.pred), bool)
        matched_pred[pi[hit]] = True
        fp[k] = np.bincount(pred_cls[~matched_pred & ~mostly_void], minlength=c)
        fn[k] = n_gt - tp[k]
    return _Matched(classes, tp, fp, fn, iou_sum)


def _div(num, den) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _f(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


@dataclass
class InstanceMetrics:
    """Instance metrics at each IoU threshold (definitions: module docstring).

    Attributes:
        thresholds: float64 (T,).
        n_gt, n_pred: ground-truth and predicted objects.
        tp, fp, fn: int64 (T,).
        precision, recall, f1, ap, mean_matched_iou, sq, rq, pq: float64 (T,); ``ap`` is the
            Data Science Bowl's TP / (TP + FP + FN); ``mean_matched_iou`` equals ``sq``.
    """

    thresholds: np.ndarray
    n_gt: int
    n_pred: int
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    ap: np.ndarray
    mean_matched_iou: np.ndarray
    sq: np.ndarray
    rq: np.ndarray
    pq: np.ndarray

    @property
    def mean_ap(self) -> float:
        """AP averaged over the thresholds (the 2018 Data Science Bowl score for one image)."""
        return float(np.mean(self.ap)) if self.ap.size else float("nan")

    def at(self, threshold: float) -> dict[str, float]:
        """The row of one threshold (e.g. 0.5) as a dict."""
        k = int(np.flatnonzero(np.isclose(self.thresholds, threshold))[0])
        row = {name: getattr(self, name)[k] for name in _ROW}
        return {name: (int(v) if name in _ROW[:3] else _f(v)) for name, v in row.items()}

    def to_dict(self) -> dict:
        """JSON-ready: counts, per-threshold lists (null for NaN) and the summary figures."""
        per = {name: [(int(v) if name in _ROW[:3] else _f(v)) for v in getattr(self, name)] for name in _ROW}
        row50 = self.at(0.5) if np.isclose(self.thresholds, 0.5).any() else {}
        return {
            "n_ground_truth": self.n_gt,
            "n_predicted": self.n_pred,
            "thresholds": [float(t) for t in self.thresholds],
            "per_threshold": per,
            "mean_ap": _f(self.mean_ap),
            "pq": row50.get("pq"),
            "sq": row50.get("sq"),
            "rq": row50.get("rq"),
            "f1_at_0.5": row50.get("f1"),
            "definitions": {
                "match": "same object when IoU > threshold (unique for thresholds >= 0.5; Kirillov et al. 2019, Thm 1)",
                "ap": "TP / (TP + FP + FN) per threshold (2018 Data Science Bowl); mean_ap averages 0.50:0.05:0.95",
                "pq": "SQ x RQ at IoU 0.5; SQ = mean IoU of matches, RQ = TP / (TP + FP/2 + FN/2) "
                "(Kirillov et al. 2019)",
            },
        }

    def markdown(self) -> str:
        """A Markdown table: one row per threshold, then the summary."""
        lines = ["| IoU > | TP | FP | FN | precision | recall | F1 | AP (DSB) | mean matched IoU | PQ |",
                 "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip

        def fmt(x: float) -> str:
            return "n/a" if not math.isfinite(x) else f"{x:.4f}"

        for k, t in enumerate(self.thresholds):
            lines.append(
                f"| {t:.2f} | {self.tp[k]} | {self.fp[k]} | {self.fn[k]} | {fmt(self.precision[k])} | "
                f"{fmt(self.recall[k])} | {fmt(self.f1[k])} | {fmt(self.ap[k])} | {fmt(self.mean_matched_iou[k])} | "
                f"{fmt(self.pq[k])} |"
            )
        lines += ["", f"ground-truth objects {self.n_gt}, predicted objects {self.n_pred}, "
                      f"mean AP (0.50:0.95) {fmt(self.mean_ap)}"]  # fmt: skip
        return "\n".join(lines)


def instance_metrics(counts: SegmentCounts, thresholds: np.ndarray = THRESHOLDS) -> InstanceMetrics:
    """Instance metrics from summed counts of instance labels (all segments of class 0).

    Raises:
        InputError: a threshold below 0.5, or counts with several classes (use
            :func:`panoptic_quality`).
    """
    if len(np.union1d(counts.gt[:, 0], counts.pred[:, 0])) > 1:
        raise InputError("instance metrics need one class; these counts hold several (use panoptic_quality)")
    thresholds = np.asarray(thresholds, dtype=np.float64)
    m = _match(counts, thresholds)
    if m.tp.shape[1] == 0:  # no object on either side
        zeros = np.zeros(len(thresholds), np.int64)
        tp = fp = fn = zeros
        iou_sum = np.zeros(len(thresholds))
    else:
        tp, fp, fn, iou_sum = m.tp[:, 0], m.fp[:, 0], m.fn[:, 0], m.iou_sum[:, 0]
    sq = _div(iou_sum, tp)
    rq = _div(tp, tp + fp / 2 + fn / 2)
    return InstanceMetrics(
        thresholds=thresholds, n_gt=len(counts.gt), n_pred=len(counts.pred), tp=tp, fp=fp, fn=fn,
        precision=_div(tp, tp + fp), recall=_div(tp, tp + fn), f1=_div(2 * tp, 2 * tp + fp + fn),
        ap=_div(tp, tp + fp + fn), mean_matched_iou=sq, sq=sq, rq=rq, pq=_div(iou_sum, tp + fp / 2 + fn / 2),
    )  # fmt: skip


@dataclass
class PanopticMetrics:
    """Panoptic quality per class and averaged (Kirillov et al. 2019), at one IoU threshold.

    Attributes:
        threshold: the matching threshold (0.5 in the paper).
        classes: int64 (C,) class ids present in the ground truth or the prediction.
        stuff: bool (C,) classes treated as stuff (one segment per class).
        tp, fp, fn: int64 (C,); pq, sq, rq: float64 (C,), NaN for 0/0.
        pq_all, sq_all, rq_all: means over classes with TP + FP + FN > 0.
        pq_things, pq_stuff: the same mean over thing or stuff classes.
    """

    threshold: float
    classes: np.ndarray
    stuff: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    pq: np.ndarray
    sq: np.ndarray
    rq: np.ndarray
    pq_all: float
    sq_all: float
    rq_all: float
    pq_things: float
    pq_stuff: float

    def to_dict(self, class_names: dict[int, str] | None = None) -> dict:
        """JSON-ready: per-class rows and the averages (null for NaN)."""
        names = class_names or {}
        return {
            "threshold": self.threshold,
            "classes": [
                {"class": int(c), "name": names.get(int(c)), "stuff": bool(s), "tp": int(tp), "fp": int(fp),
                 "fn": int(fn), "pq": _f(pq), "sq": _f(sq), "rq": _f(rq)}
                for c, s, tp, fp, fn, pq, sq, rq in zip(self.classes, self.stuff, self.tp, self.fp, self.fn,
                                                        self.pq, self.sq, self.rq)
            ],
            "pq": _f(self.pq_all), "sq": _f(self.sq_all), "rq": _f(self.rq_all),
            "pq_things": _f(self.pq_things), "pq_stuff": _f(self.pq_stuff),
        }  # fmt: skip

    def markdown(self, class_names: dict[int, str] | None = None) -> str:
        """A Markdown table: one row per class, then the averages."""
        names = class_names or {}

        def fmt(x: float) -> str:
            return "n/a" if not math.isfinite(x) else f"{x:.4f}"

        lines = ["| class | kind | TP | FP | FN | PQ | SQ | RQ |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for k, c in enumerate(self.classes):
            kind = "stuff" if self.stuff[k] else "things"
            lines.append(f"| {names.get(int(c), int(c))} | {kind} | {self.tp[k]} | {self.fp[k]} | {self.fn[k]} | "
                         f"{fmt(self.pq[k])} | {fmt(self.sq[k])} | {fmt(self.rq[k])} |")  # fmt: skip
        lines += ["", f"PQ {fmt(self.pq_all)} (things {fmt(self.pq_things)}, stuff {fmt(self.pq_stuff)}), "
                      f"SQ {fmt(self.sq_all)}, RQ {fmt(self.rq_all)}, matches at IoU > {self.threshold:g}"]  # fmt: skip
        return "\n".join(lines)


def panoptic_quality(
    counts: SegmentCounts, stuff_classes: Collection[int] = (), threshold: float = 0.5
) -> PanopticMetrics:
    """Per-class and mean PQ, SQ, RQ from summed :func:`panoptic_counts` (segments match
    only within their class; void rule in the module docstring).

    Raises:
        InputError: a threshold below 0.5.
    """
    m = _match(counts, np.array([threshold]))
    tp, fp, fn, iou_sum = m.tp[0], m.fp[0], m.fn[0], m.iou_sum[0]
    sq = _div(iou_sum, tp)
    rq = _div(tp, tp + fp / 2 + fn / 2)
    pq = _div(iou_sum, tp + fp / 2 + fn / 2)
    stuff = np.isin(m.classes, np.asarray(list(stuff_classes), dtype=np.int64))
    present = (tp + fp + fn) > 0

    def mean(x: np.ndarray, sel: np.ndarray) -> float:
        return float(np.mean(x[sel])) if sel.any() else float("nan")

    return PanopticMetrics(
        threshold=float(threshold), classes=m.classes, stuff=stuff, tp=tp, fp=fp, fn=fn, pq=pq, sq=sq, rq=rq,
        pq_all=mean(pq, present), sq_all=mean(np.nan_to_num(sq), present), rq_all=mean(rq, present),
        pq_things=mean(pq, present & ~stuff), pq_stuff=mean(pq, present & stuff),
    )  # fmt: skip
