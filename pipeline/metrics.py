"""Pure evaluation maths: confusion counts per chunk (additive) and metrics from counts.

Habit: metrics add counts, never ratios (smp's ``get_stats``). Each chunk returns
its confusion matrix; the matrices are summed over all chunks; every metric is then
computed once from that one global matrix.

Conventions (scikit-learn's): rows of the confusion matrix are ground truth, columns
prediction, ``cm[i, j]`` = pixels of true class i predicted as j.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Reasons a pixel is left out of the confusion matrix, in the order of
#: :func:`chunk_counts`'s extra counters.
EXCLUSION_REASONS = ("outside_area", "unlabeled_ground_truth", "nodata_prediction", "out_of_range")


def confusion_counts(gt: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Confusion matrix of two 1-D integer arrays with values in [0, n_classes).

    Returns:
        int64 (n_classes, n_classes), rows ground truth, columns prediction.
    """
    idx = gt.astype(np.int64) * n_classes + pred.astype(np.int64)
    return np.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def chunk_counts(
    gt: np.ndarray,
    pred: np.ndarray,
    n_classes: int,
    gt_nodata: int,
    pred_nodata: int | None,
    area: np.ndarray | None = None,
) -> np.ndarray:
    """Confusion counts of one chunk plus the pixels excluded from it, by reason.

    Args:
        gt, pred: (y, x) integer class ids of the same chunk.
        gt_nodata: ground-truth value meaning unlabeled.
        pred_nodata: prediction nodata value (None: every prediction pixel is valid).
        area: optional (y, x) bool, True inside the evaluation area.

    Returns:
        int64 vector of length ``n_classes**2 + len(EXCLUSION_REASONS)``: the flattened
        confusion matrix, then the excluded-pixel counts. Each excluded pixel is counted
        once, under the first reason that applies, in the order of EXCLUSION_REASONS.
    """
    gt = gt.astype(np.int64, copy=False)
    pred = pred.astype(np.int64, copy=False)
    keep = np.ones(gt.shape, dtype=bool) if area is None else area.astype(bool, copy=True)
    excluded = [int((~keep).sum())]
    for bad in (gt == gt_nodata, (pred == pred_nodata) if pred_nodata is not None else np.zeros_like(keep)):
        hit = keep & bad
        excluded.append(int(hit.sum()))
        keep &= ~bad
    bad = (gt < 0) | (gt >= n_classes) | (pred < 0) | (pred >= n_classes)
    hit = keep & bad
    excluded.append(int(hit.sum()))
    keep &= ~bad
    cm = confusion_counts(gt[keep], pred[keep], n_classes)
    return np.concatenate([cm.ravel(), np.asarray(excluded, dtype=np.int64)])


@dataclass
class SemanticMetrics:
    """Metrics derived from one confusion matrix.

    Attributes:
        confusion: int64 (K, K), rows ground truth, columns prediction.
        iou: float64 (K,), per-class IoU = TP / (TP + FP + FN); NaN where the class is
            absent from both ground truth and prediction (not applicable).
        miou: macro mean IoU over the classes present in ground truth or prediction.
        overall_accuracy: trace / total.
        excluded: excluded pixel counts by reason.
    """

    confusion: np.ndarray
    iou: np.ndarray
    miou: float
    overall_accuracy: float
    excluded: dict[str, int] = field(default_factory=dict)

    @property
    def support(self) -> np.ndarray:
        """Ground-truth pixels per class, int64 (K,)."""
        return self.confusion.sum(axis=1)

    @property
    def predicted(self) -> np.ndarray:
        """Predicted pixels per class, int64 (K,)."""
        return self.confusion.sum(axis=0)

    @property
    def evaluated_pixels(self) -> int:
        return int(self.confusion.sum())


def semantic_metrics(confusion: np.ndarray, excluded: dict[str, int] | None = None) -> SemanticMetrics:
    """IoU per class, macro mIoU and overall accuracy from a confusion matrix.

    IoU (Jaccard index) per class: ``TP / (TP + FP + FN)``, as scikit-learn's
    ``jaccard_score(average=None)``. Classes with ``TP + FP + FN == 0`` are absent from
    both sides and get NaN; they are left out of the macro mean, so an absent class
    never lowers mIoU.
    """
    cm = np.asarray(confusion, dtype=np.int64)
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    denom = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(denom > 0, tp / np.where(denom > 0, denom, 1), np.nan)
    present = denom > 0
    miou = float(iou[present].mean()) if present.any() else float("nan")
    total = cm.sum()
    oa = float(tp.sum() / total) if total else float("nan")
    return SemanticMetrics(cm, iou, miou, oa, dict(excluded or {}))
