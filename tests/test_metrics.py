"""Confusion counts and IoU against scikit-learn."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import confusion_matrix, jaccard_score

from pipeline.metrics import EXCLUSION_REASONS, chunk_counts, semantic_metrics


def _random_case(seed, shape=(60, 70), k=5):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, k, size=shape)
    pred = rng.integers(0, k, size=shape)
    gt[rng.random(shape) < 0.2] = 255  # unlabeled
    pred[rng.random(shape) < 0.1] = 254  # prediction nodata
    area = rng.random(shape) < 0.8
    return gt, pred, area, k


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confusion_matches_sklearn_with_ignored_pixels(seed):
    gt, pred, area, k = _random_case(seed)
    counts = chunk_counts(gt, pred, k, gt_nodata=255, pred_nodata=254, area=area)
    cm = counts[: k * k].reshape(k, k)
    keep = area & (gt != 255) & (pred != 254)
    expected = confusion_matrix(gt[keep], pred[keep], labels=list(range(k)))
    np.testing.assert_array_equal(cm, expected)
    excluded = dict(zip(EXCLUSION_REASONS, counts[k * k :]))
    assert excluded["outside_area"] == (~area).sum()
    assert excluded["unlabeled_ground_truth"] == (area & (gt == 255)).sum()
    assert excluded["nodata_prediction"] == (area & (gt != 255) & (pred == 254)).sum()
    assert sum(excluded.values()) + cm.sum() == gt.size


def test_chunked_counts_add_up_to_whole():
    gt, pred, area, k = _random_case(7, shape=(97, 131))
    whole = chunk_counts(gt, pred, k, 255, 254, area)
    parts = sum(
        chunk_counts(gt[r : r + 32, c : c + 45], pred[r : r + 32, c : c + 45], k, 255, 254, area[r : r + 32, c : c + 45])
        for r in range(0, 97, 32)
        for c in range(0, 131, 45)
    )
    np.testing.assert_array_equal(parts, whole)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 7))
def test_iou_matches_sklearn_jaccard(seed, k):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, k, size=300)
    pred = rng.integers(0, k, size=300)
    m = semantic_metrics(confusion_matrix(gt, pred, labels=list(range(k))))
    present = np.union1d(gt, pred)
    expected = jaccard_score(gt, pred, labels=present, average=None, zero_division=0)
    np.testing.assert_allclose(m.iou[present], expected)
    assert m.miou == pytest.approx(expected.mean())
    assert m.overall_accuracy == pytest.approx((gt == pred).mean())


def test_absent_class_is_not_applicable_and_not_averaged():
    gt = np.array([0, 0, 1, 1])
    pred = np.array([0, 1, 1, 1])
    m = semantic_metrics(confusion_matrix(gt, pred, labels=[0, 1, 2]))
    assert np.isnan(m.iou[2])
    assert m.miou == pytest.approx((0.5 + 2 / 3) / 2)


def test_out_of_range_ids_are_counted_not_binned():
    gt = np.array([[0, 1, 9]])
    pred = np.array([[0, 1, 1]])
    counts = chunk_counts(gt, pred, 2, gt_nodata=255, pred_nodata=None)
    assert counts[:4].sum() == 2
    assert counts[4 + EXCLUSION_REASONS.index("out_of_range")] == 1
