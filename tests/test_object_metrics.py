"""Object metrics: hand-computed instance and panoptic cases, and counts that add up over
chunks to the whole-array counts."""

import json

import dask
import dask.array as da
import numpy as np
import pytest

from pipeline.errors import InputError
from pipeline.object_metrics import (
    THRESHOLDS,
    dask_counts,
    instance_counts,
    instance_metrics,
    panoptic_counts,
    panoptic_quality,
    sum_counts,
)
from tests.synth import crowded_nuclei


def _hand_case() -> tuple[np.ndarray, np.ndarray]:
    """3 ground-truth objects, 3 predictions: G1 found (IoU 0.75), G2 split in two halves
    (IoU 0.5 each: NOT a match, IoU must exceed the threshold), G3 missed."""
    gt = np.zeros((6, 10), np.int64)
    gt[0:2, 0:4] = 1  # G1, 8 px
    gt[0:2, 5:9] = 2  # G2, 8 px
    gt[4:6, 0:2] = 3  # G3, 4 px
    pred = np.zeros((6, 10), np.uint32)
    pred[0:2, 0:3] = 10  # P1, 6 px inside G1: IoU 6 / 8 = 0.75
    pred[0:2, 5:7] = 20  # P2a, 4 px of G2: IoU 4 / 8 = 0.5
    pred[0:2, 7:9] = 21  # P2b, 4 px of G2: IoU 4 / 8 = 0.5
    return gt, pred


def test_instance_metrics_equal_hand_computed_case():
    gt, pred = _hand_case()
    m = instance_metrics(instance_counts(gt, pred))
    assert (m.n_gt, m.n_pred) == (3, 3)
    np.testing.assert_array_equal(m.thresholds, [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95])
    # IoU > t for t in 0.50..0.70: only G1-P1 (0.75) matches -> TP 1, FP 2 (P2a, P2b), FN 2 (G2, G3)
    # IoU > t for t in 0.75..0.95: nothing (0.75 is not > 0.75) -> TP 0, FP 3, FN 3
    low, high = slice(0, 5), slice(5, 10)
    np.testing.assert_array_equal(m.tp, [1] * 5 + [0] * 5)
    np.testing.assert_array_equal(m.fp, [2] * 5 + [3] * 5)
    np.testing.assert_array_equal(m.fn, [2] * 5 + [3] * 5)
    np.testing.assert_allclose(m.precision[low], 1 / 3)  # 1 / (1 + 2)
    np.testing.assert_allclose(m.recall[low], 1 / 3)  # 1 / (1 + 2)
    np.testing.assert_allclose(m.f1[low], 1 / 3)  # 2 / (2 + 2 + 2)
    np.testing.assert_allclose(m.ap[low], 0.2)  # DSB: 1 / (1 + 2 + 2)
    np.testing.assert_allclose(m.mean_matched_iou[low], 0.75)
    np.testing.assert_allclose(m.rq[low], 1 / 3)  # 1 / (1 + 1 + 1)
    np.testing.assert_allclose(m.pq[low], 0.25)  # 0.75 / 3
    np.testing.assert_allclose(m.ap[high], 0.0)
    np.testing.assert_allclose(m.pq[high], 0.0)  # no match but FP + FN > 0: PQ = 0
    assert np.isnan(m.mean_matched_iou[high]).all()  # 0 / 0
    assert m.mean_ap == pytest.approx(0.1)  # (5 x 0.2 + 5 x 0) / 10
    d = m.to_dict()
    json.dumps(d, allow_nan=False)  # NaN became null
    assert d["pq"] == pytest.approx(0.25) and d["mean_ap"] == pytest.approx(0.1)
    assert d["per_threshold"]["mean_matched_iou"][-1] is None
    assert "| 0.50 | 1 | 2 | 2 |" in m.markdown()


def test_perfect_prediction_and_id_permutation():
    gt, _ = _hand_case()
    perm = np.where(gt > 0, 1000 - gt, 0)  # other ids, same objects
    m = instance_metrics(instance_counts(gt, perm))
    np.testing.assert_array_equal(m.tp, 3)
    assert m.mean_ap == 1.0 and m.pq[0] == 1.0


def test_panoptic_quality_equals_hand_computed_case():
    # 4 x 6 px. Classes: 1 = cell (things), 2 = tissue (stuff), 255 = void.
    #   gt class             gt id        pred class           pred id
    #   2 2 2 2 V V          0 0 0 0 0 0  2 2 2 1 1 1          5 5 5 9 9 9
    #   2 1 1 2 V V          0 1 1 0 0 0  2 1 1 2 1 1          5 7 7 0 7 9
    #   2 1 1 2 1 1          0 1 1 0 2 2  2 1 1 2 2 2          0 7 7 0 0 0
    #   2 2 2 2 1 1          0 0 0 0 2 2  2 2 2 2 2 2          0 0 0 0 0 0
    V = 255
    gc = np.array([[2, 2, 2, 2, V, V], [2, 1, 1, 2, V, V], [2, 1, 1, 2, 1, 1], [2, 2, 2, 2, 1, 1]])
    gi = np.array([[0, 0, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0], [0, 1, 1, 0, 2, 2], [0, 0, 0, 0, 2, 2]])
    pc = np.array([[2, 2, 2, 1, 1, 1], [2, 1, 1, 2, 1, 1], [2, 1, 1, 2, 2, 2], [2, 2, 2, 2, 2, 2]])
    pi = np.array([[5, 5, 5, 9, 9, 9], [5, 7, 7, 0, 7, 9], [0, 7, 7, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    # cell A (gt 1/1, 4 px) vs pred 1/7 (5 px, one of them void): void removed -> IoU 4 / 4 = 1: TP.
    # cell B (gt 1/2, 4 px) predicted as tissue: FN.
    # pred 1/9 (4 px: 3 void, 1 on tissue): unmatched, 3/4 > 1/2 void -> not a FP.
    # tissue: gt 12 px, pred 15 px (ids 5 and 0 are one stuff segment), overlap 11 -> IoU 11/16: TP.
    counts = panoptic_counts(gc, gi, pc, pi, void=V, stuff_classes={2})
    m = panoptic_quality(counts, stuff_classes={2})
    np.testing.assert_array_equal(m.classes, [1, 2])
    np.testing.assert_array_equal(m.tp, [1, 1])
    np.testing.assert_array_equal(m.fp, [0, 0])
    np.testing.assert_array_equal(m.fn, [1, 0])
    np.testing.assert_allclose(m.sq, [1.0, 11 / 16])
    np.testing.assert_allclose(m.rq, [2 / 3, 1.0])  # 1 / (1 + 0 + 1/2)
    np.testing.assert_allclose(m.pq, [2 / 3, 11 / 16])
    assert m.pq_things == pytest.approx(2 / 3) and m.pq_stuff == pytest.approx(11 / 16)
    assert m.pq_all == pytest.approx((2 / 3 + 11 / 16) / 2)
    assert m.sq_all == pytest.approx((1 + 11 / 16) / 2) and m.rq_all == pytest.approx((2 / 3 + 1) / 2)
    json.dumps(m.to_dict({1: "cell", 2: "tissue"}), allow_nan=False)
    assert "| cell | things | 1 | 0 | 1 |" in m.markdown({1: "cell", 2: "tissue"})

    # chunked panoptic counts add up to the same counts
    chunked = dask.compute(dask_counts(panoptic_counts, *(da.from_array(a, chunks=(3, 4)) for a in (gc, gi, pc, pi)),
                                       void=V, stuff_classes={2}))[0]  # fmt: skip
    assert chunked == counts


def _perturbed(gt: np.ndarray, seed: int) -> np.ndarray:
    """A prediction: some objects dropped, some merged with a neighbour id, some shifted, new ids."""
    rng = np.random.default_rng(seed)
    n = int(gt.max())
    lut = rng.permutation(np.arange(1, n + 1)) + 10**10  # ids above 32 bits
    lut = np.concatenate([[0], lut])
    lut[rng.choice(np.arange(1, n + 1), n // 10, replace=False)] = 0  # missed
    merged = rng.choice(np.arange(2, n + 1), n // 10, replace=False)
    lut[merged] = lut[merged - 1]
    pred = lut[gt]
    return np.roll(pred, 2, axis=1).astype(np.uint64)


def test_chunked_counts_equal_whole_array_counts():
    _, gt = crowded_nuclei(160, 150, 70, seed=11)
    pred = _perturbed(gt, 1)
    valid = np.ones(gt.shape, bool)
    valid[:, 140:] = False
    whole = instance_counts(gt, pred, valid)
    for chunk in ((40, 40), (33, 70), (160, 150)):
        g, p, v = (da.from_array(a, chunks=chunk) for a in (gt, pred, valid))
        (summed,) = dask.compute(dask_counts(instance_counts, g, p, valid=v))
        assert summed == whole, chunk
    # and summing numpy chunks by hand gives the same
    parts = [instance_counts(gt[r : r + 50, c : c + 60], pred[r : r + 50, c : c + 60], valid[r : r + 50, c : c + 60])
             for r in range(0, 160, 50) for c in range(0, 150, 60)]  # fmt: skip
    assert sum_counts(parts) == whole
    # areas are the objects' full pixel counts inside valid
    ids, areas = np.unique(gt[valid & (gt > 0)], return_counts=True)
    np.testing.assert_array_equal(whole.gt[:, 1], ids)
    np.testing.assert_array_equal(whole.gt_area, areas)
    m = instance_metrics(whole)
    assert 0 < m.tp[0] < m.n_gt and m.fp[0] > 0


def test_thresholds_below_one_half_and_mixed_classes_are_refused():
    gt, pred = _hand_case()
    with pytest.raises(InputError, match="0.5"):
        instance_metrics(instance_counts(gt, pred), thresholds=np.array([0.3]))
    counts = panoptic_counts(np.ones((2, 2), int), np.ones((2, 2), int), np.full((2, 2), 2), np.ones((2, 2), int))
    with pytest.raises(InputError, match="panoptic_quality"):
        instance_metrics(counts)
    assert len(THRESHOLDS) == 10
