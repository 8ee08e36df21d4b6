"""Pure evaluation maths: confusion counts per chunk (additive) and metrics from counts.

Habit: metrics add counts, never ratios (smp's ``get_stats``). Each chunk returns
its confusion matrix and its excluded-pixel counts; these are summed over all chunks;
every metric is then computed once from that one global matrix.

Conventions (scikit-learn's): rows of the confusion matrix are ground truth, columns
prediction, ``cm[i, j]`` = pixels of true class i predicted as j.

Definitions (K classes, N evaluated pixels, TP/FP/FN per class from the matrix):

- IoU (Jaccard 1912) = TP / (TP + FP + FN); sklearn ``jaccard_score(average=None)``.
- Dice / F1 (Dice 1945, Sørensen 1948) = 2 TP / (2 TP + FP + FN); ``f1_score(average=None)``.
- precision = TP / (TP + FP); recall = TP / (TP + FN); ``precision_score`` / ``recall_score``.
- macro mIoU = mean IoU over applicable classes; ``jaccard_score(average="macro", labels=applicable)``.
- frequency-weighted IoU (Long, Shelhamer & Darrell 2015, FCN) = sum_c support_c IoU_c / N;
  ``jaccard_score(average="weighted")``.
- micro IoU = sum TP / sum (TP + FP + FN) = trace / (2 N - trace); ``jaccard_score(average="micro")``.
- overall accuracy = trace / N; ``accuracy_score``.
- mean class accuracy = mean recall over applicable classes with support > 0;
  ``balanced_accuracy_score`` (Brodersen et al. 2010).
- Cohen's kappa (Cohen 1960) = (p_o - p_e) / (1 - p_e), p_o = trace / N,
  p_e = sum_c support_c predicted_c / N^2; ``cohen_kappa_score``.

A class is *not applicable* when it is absent from both ground truth and prediction
(TP + FP + FN = 0: its IoU is 0/0), or when it is listed in ``ignore_classes``; such
classes are left out of the macro means (macro mIoU, mean class accuracy) so that they
never lower them. The micro and frequency-weighted figures, overall accuracy and kappa
use the whole matrix.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np

#: Reasons a pixel is left out of the confusion matrix, in the order they are tested:
#: a pixel is counted once, under the first reason that applies.
EXCLUSION_REASONS = (
    "outside_area",
    "nodata_image",
    "unlabeled_ground_truth",
    "ignored_ground_truth",
    "nodata_prediction",
    "ignored_prediction",
    "out_of_range",
)

#: What each reason means, for the reports.
EXCLUSION_EXPLANATIONS = {
    "outside_area": "pixel centre outside the evaluation area",
    "nodata_image": "every band of the input image is nodata",
    "unlabeled_ground_truth": "ground truth is nodata, unlabeled, outside the ground truth, or of a class not in the list",
    "ignored_ground_truth": "ground truth class is in evaluate.ground_truth.ignore_classes",
    "nodata_prediction": "prediction is nodata",
    "ignored_prediction": "predicted class is in evaluate.prediction.ignore_classes",
    "out_of_range": "class id outside the class list (an error unless 0)",
}

#: Values of the error map (uint8). The map's nodata is the prediction's nodata where
#: the prediction has no value (see :func:`error_codes`).
ERROR_EXCLUDED, ERROR_CORRECT, ERROR_WRONG = 0, 1, 2


def confusion_counts(gt: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Confusion matrix of two 1-D integer arrays with values in [0, n_classes).

    Returns:
        int64 (n_classes, n_classes), rows ground truth, columns prediction.
    """
    idx = gt.astype(np.int64) * n_classes + pred.astype(np.int64)
    return np.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def exclusion_codes(
    gt: np.ndarray,
    pred: np.ndarray,
    n_classes: int,
    gt_nodata: int | None,
    pred_nodata: int | None,
    area: np.ndarray | None = None,
    *,
    image_valid: np.ndarray | None = None,
    gt_ignore: Collection[int] = (),
    pred_ignore: Collection[int] = (),
) -> np.ndarray:
    """Why each pixel of a chunk is excluded: 0 = evaluated, ``r + 1`` = ``EXCLUSION_REASONS[r]``.

    The evaluation mask is area ∧ valid(image) ∧ valid(ground truth) ∧ valid(prediction).
    Reasons are tested in the order of ``EXCLUSION_REASONS`` and a pixel gets the first
    one that applies, so every excluded pixel is counted exactly once.

    Args:
        gt, pred: (y, x) integer class ids of the same chunk.
        gt_nodata: ground-truth value meaning unlabeled (None: none).
        pred_nodata: prediction nodata value (None: every prediction pixel is valid).
        area: optional (y, x) bool, True inside the evaluation area.
        image_valid: optional (y, x) bool, False where the image is nodata.
        gt_ignore, pred_ignore: class ids (or raw values) whose pixels are ignored.

    Returns:
        uint8 (y, x).
    """
    gt = gt.astype(np.int64, copy=False)
    pred = pred.astype(np.int64, copy=False)
    no = np.zeros(gt.shape, dtype=bool)
    tests = [
        ~area.astype(bool, copy=False) if area is not None else no,
        ~image_valid.astype(bool, copy=False) if image_valid is not None else no,
        (gt == gt_nodata) if gt_nodata is not None else no,
        np.isin(gt, list(gt_ignore)) if len(gt_ignore) else no,
        (pred == pred_nodata) if pred_nodata is not None else no,
        np.isin(pred, list(pred_ignore)) if len(pred_ignore) else no,
        (gt < 0) | (gt >= n_classes) | (pred < 0) | (pred >= n_classes),
    ]
    codes = np.zeros(gt.shape, dtype=np.uint8)
    for r in range(len(tests) - 1, -1, -1):  # last reason first, so the first one that applies wins
        codes[tests[r]] = r + 1
    return codes


def chunk_counts(
    gt: np.ndarray,
    pred: np.ndarray,
    n_classes: int,
    gt_nodata: int | None,
    pred_nodata: int | None,
    area: np.ndarray | None = None,
    *,
    image_valid: np.ndarray | None = None,
    gt_ignore: Collection[int] = (),
    pred_ignore: Collection[int] = (),
    codes: np.ndarray | None = None,
) -> np.ndarray:
    """Confusion counts of one chunk plus the pixels excluded from it, by reason.

    Arguments as :func:`exclusion_codes` (``codes``: its result, when already computed).

    Returns:
        int64 vector of length ``n_classes**2 + len(EXCLUSION_REASONS)``: the flattened
        confusion matrix, then the excluded-pixel counts in the order of EXCLUSION_REASONS.
        Vectors of several chunks add up to the vector of their union.
    """
    if codes is None:
        codes = exclusion_codes(gt, pred, n_classes, gt_nodata, pred_nodata, area, image_valid=image_valid,
                                gt_ignore=gt_ignore, pred_ignore=pred_ignore)  # fmt: skip
    keep = codes == 0
    cm = confusion_counts(np.asarray(gt)[keep], np.asarray(pred)[keep], n_classes)
    excluded = np.bincount(codes.ravel(), minlength=len(EXCLUSION_REASONS) + 1)[1:]
    return np.concatenate([cm.ravel(), excluded.astype(np.int64)])


def error_codes(gt: np.ndarray, pred: np.ndarray, codes: np.ndarray, pred_nodata: int | None, nodata: int) -> np.ndarray:
    """The error map of a chunk: uint8 (y, x).

    ``ERROR_CORRECT`` (1) where an evaluated pixel's prediction equals the ground truth,
    ``ERROR_WRONG`` (2) where it differs, ``ERROR_EXCLUDED`` (0) where the pixel is
    excluded for any reason, and ``nodata`` where the prediction itself is nodata.
    """
    out = np.where(np.asarray(gt) == np.asarray(pred), ERROR_CORRECT, ERROR_WRONG).astype(np.uint8)
    out[codes != 0] = ERROR_EXCLUDED
    if pred_nodata is not None:
        out[np.asarray(pred) == pred_nodata] = nodata
    return out


@dataclass
class SemanticMetrics:
    """Metrics derived from one confusion matrix (definitions: module docstring).

    Per-class arrays are float64 (K,), NaN where the metric is 0/0 (undefined).

    Attributes:
        confusion: int64 (K, K), rows ground truth, columns prediction.
        iou, dice, precision, recall: per class.
        applicable: bool (K,), False for classes left out of the macro means.
        not_applicable: class id -> why it is left out ("absent", "ignored").
        miou: macro mIoU over applicable classes.
        frequency_weighted_iou, micro_iou, overall_accuracy, mean_class_accuracy,
        cohens_kappa: aggregates, NaN when there is no evaluated pixel.
        excluded: excluded pixel counts by reason.
    """

    confusion: np.ndarray
    iou: np.ndarray
    dice: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    applicable: np.ndarray
    not_applicable: dict[int, str]
    miou: float
    frequency_weighted_iou: float
    micro_iou: float
    overall_accuracy: float
    mean_class_accuracy: float
    cohens_kappa: float
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

    @property
    def excluded_pixels(self) -> int:
        return int(sum(self.excluded.values()))

    def aggregates(self) -> dict[str, float]:
        """The six aggregates under their report keys (see :data:`AGGREGATES`)."""
        return {key: float(getattr(self, attr)) for key, (attr, _, _) in AGGREGATES.items()}


#: Report key -> (attribute of SemanticMetrics, name shown to people, definition with source).
AGGREGATES: dict[str, tuple[str, str, str]] = {
    "macro_miou": ("miou", "macro mIoU", "mean of per-class IoU over applicable classes"),
    "frequency_weighted_iou": (
        "frequency_weighted_iou",
        "frequency-weighted IoU",
        "per-class IoU weighted by ground-truth pixels (Long, Shelhamer & Darrell 2015)",
    ),
    "micro_iou": ("micro_iou", "micro IoU", "IoU of all classes pooled: sum TP / sum (TP + FP + FN)"),
    "overall_accuracy": ("overall_accuracy", "overall accuracy", "correct pixels / evaluated pixels"),
    "mean_class_accuracy": (
        "mean_class_accuracy",
        "mean class accuracy",
        "mean of per-class recall over applicable classes with ground truth (balanced accuracy)",
    ),
    "cohens_kappa": ("cohens_kappa", "Cohen's kappa", "agreement beyond chance, (p_o - p_e) / (1 - p_e) (Cohen 1960)"),
}


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if x.size else float("nan")


def semantic_metrics(
    confusion: np.ndarray, excluded: dict[str, int] | None = None, ignored: Collection[int] = ()
) -> SemanticMetrics:
    """Every per-class and aggregate metric from one confusion matrix.

    Args:
        confusion: (K, K) counts, rows ground truth, columns prediction.
        excluded: excluded pixel counts by reason (copied into the result).
        ignored: class ids listed in ``ignore_classes`` (ground truth or prediction);
            they are not applicable and left out of the macro means.

    A class with ``TP + FP + FN == 0`` is absent from both sides: its IoU, Dice and
    recall/precision are NaN and it is left out of the macro means, so an absent class
    never lowers macro mIoU.
    """
    cm = np.asarray(confusion, dtype=np.int64)
    k = cm.shape[0]
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    fp = predicted - tp
    fn = support - tp
    n = float(cm.sum())
    iou = _ratio(tp, tp + fp + fn)
    dice = _ratio(2 * tp, 2 * tp + fp + fn)
    precision = _ratio(tp, predicted)
    recall = _ratio(tp, support)

    not_applicable: dict[int, str] = {}
    for c in range(k):
        if c in set(ignored):
            not_applicable[c] = "ignored"
        elif tp[c] + fp[c] + fn[c] == 0:
            not_applicable[c] = "absent"
    applicable = np.array([c not in not_applicable for c in range(k)], dtype=bool)

    miou = _mean(iou[applicable])
    mean_class_acc = _mean(recall[applicable & (support > 0)])
    if n > 0:
        trace = float(tp.sum())
        oa = trace / n
        micro = trace / (2 * n - trace)
        fw = float(np.nansum(support * np.nan_to_num(iou)) / n)
        pe = float((support / n) @ (predicted / n))  # float64: row x column products overflow int64
        kappa = (oa - pe) / (1 - pe) if pe < 1 else float("nan")
    else:
        oa = micro = fw = kappa = float("nan")
    return SemanticMetrics(
        confusion=cm,
        iou=iou,
        dice=dice,
        precision=precision,
        recall=recall,
        applicable=applicable,
        not_applicable=not_applicable,
        miou=miou,
        frequency_weighted_iou=fw,
        micro_iou=micro,
        overall_accuracy=oa,
        mean_class_accuracy=mean_class_acc,
        cohens_kappa=kappa,
        excluded=dict(excluded or {}),
    )
