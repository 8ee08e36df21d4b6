"""Confusion counts and every metric against scikit-learn."""

import warnings

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


# --------------------------------------------------------------------------- every metric vs scikit-learn
def _kept(gt, pred, area, image_valid, gt_ignore, pred_ignore):
    """The evaluation mask written independently of the code under test."""
    keep = area & image_valid & (gt != 255) & (pred != 254)
    keep &= ~np.isin(gt, gt_ignore) & ~np.isin(pred, pred_ignore)
    return keep


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 9))
def test_every_metric_matches_sklearn_with_nodata_and_ignored_pixels(seed, k):
    from sklearn.metrics import (accuracy_score, balanced_accuracy_score, cohen_kappa_score, f1_score,
                                 precision_score, recall_score)  # fmt: skip

    rng = np.random.default_rng(seed)
    shape = (41, 37)
    # each side uses a random subset of the classes, so some classes are absent from one or both
    gt = rng.choice(rng.choice(k, size=rng.integers(1, k + 1), replace=False), size=shape)
    pred = rng.choice(rng.choice(k, size=rng.integers(1, k + 1), replace=False), size=shape)
    gt[rng.random(shape) < 0.15] = 255
    pred[rng.random(shape) < 0.1] = 254
    # make agreement better than chance so that kappa is not ~0
    agree = rng.random(shape) < 0.4
    pred[agree & (gt != 255)] = gt[agree & (gt != 255)]
    area = rng.random(shape) < 0.85
    image_valid = rng.random(shape) < 0.9
    gt_ignore = [200]  # a raw value that is not a class
    gt[rng.random(shape) < 0.05] = 200
    counts = chunk_counts(gt, pred, k, 255, 254, area, image_valid=image_valid, gt_ignore=gt_ignore)
    cm = counts[: k * k].reshape(k, k)
    excluded = dict(zip(EXCLUSION_REASONS, counts[k * k :].tolist()))
    keep = _kept(gt, pred, area, image_valid, gt_ignore, [])
    y, p = gt[keep], pred[keep]
    labels = list(range(k))
    np.testing.assert_array_equal(cm, confusion_matrix(y, p, labels=labels))
    assert sum(excluded.values()) + cm.sum() == gt.size
    assert excluded["ignored_ground_truth"] == (area & image_valid & (gt == 200)).sum()
    assert excluded["nodata_image"] == (area & ~image_valid).sum()

    m = semantic_metrics(cm, excluded)
    present = np.union1d(y, p)  # applicable classes: in ground truth or prediction
    assert set(np.flatnonzero(m.applicable)) == set(present)
    np.testing.assert_allclose(m.iou[present], jaccard_score(y, p, labels=present, average=None, zero_division=0))
    np.testing.assert_allclose(m.dice[present], f1_score(y, p, labels=present, average=None, zero_division=0))
    pred_present = np.unique(p)
    true_present = np.unique(y)
    np.testing.assert_allclose(m.precision[pred_present], precision_score(y, p, labels=pred_present, average=None))
    np.testing.assert_allclose(m.recall[true_present], recall_score(y, p, labels=true_present, average=None))
    assert np.isnan(m.precision[np.setdiff1d(labels, pred_present)]).all()
    assert np.isnan(m.recall[np.setdiff1d(labels, true_present)]).all()
    np.testing.assert_array_equal(m.support, np.bincount(y, minlength=k))
    np.testing.assert_array_equal(m.predicted, np.bincount(p, minlength=k))
    with warnings.catch_warnings():  # sklearn warns on single-label cases and classes absent from y_true
        warnings.simplefilter("ignore")
        expected = {
            "miou": jaccard_score(y, p, labels=present, average="macro"),
            "frequency_weighted_iou": jaccard_score(y, p, labels=true_present, average="weighted"),
            "micro_iou": jaccard_score(y, p, labels=labels, average="micro"),
            "overall_accuracy": accuracy_score(y, p),
            "mean_class_accuracy": balanced_accuracy_score(y, p),
            "cohens_kappa": cohen_kappa_score(y, p),  # NaN when only one label occurs, as ours
        }
    for name, value in expected.items():
        np.testing.assert_allclose(getattr(m, name), value, rtol=1e-12, err_msg=name)


def test_absent_class_does_not_lower_macro_miou_and_is_listed():
    rng = np.random.default_rng(3)
    gt = rng.integers(0, 3, 500)
    pred = np.where(rng.random(500) < 0.7, gt, rng.integers(0, 3, 500))
    three = semantic_metrics(confusion_matrix(gt, pred, labels=[0, 1, 2]))
    # the same data with a 4th class (id 3) that nobody uses, and a 5th in the middle
    gt5 = np.where(gt == 2, 4, gt)
    pred5 = np.where(pred == 2, 4, pred)
    five = semantic_metrics(confusion_matrix(gt5, pred5, labels=[0, 1, 2, 3, 4]))
    assert five.miou == pytest.approx(three.miou)
    assert five.mean_class_accuracy == pytest.approx(three.mean_class_accuracy)
    assert five.not_applicable == {2: "absent", 3: "absent"}
    assert np.isnan(five.iou[[2, 3]]).all() and not five.applicable[[2, 3]].any()
    # the pooled figures do not depend on unused classes either
    for name in ("frequency_weighted_iou", "micro_iou", "overall_accuracy", "cohens_kappa"):
        assert getattr(five, name) == pytest.approx(getattr(three, name)), name


def test_ignored_class_is_not_applicable_even_when_predicted():
    gt = np.array([0, 0, 1, 1, 1])
    pred = np.array([0, 2, 1, 1, 2])  # class 2 is predicted but ignored in the ground truth
    m = semantic_metrics(confusion_matrix(gt, pred, labels=[0, 1, 2]), ignored=[2])
    assert m.not_applicable == {2: "ignored"}
    assert m.miou == pytest.approx((0.5 + 2 / 3) / 2)
    assert m.iou[2] == 0.0  # still reported, just not averaged


def test_class_zero_is_a_real_class():
    gt = np.array([[0, 0, 1, 255]])
    pred = np.array([[0, 1, 1, 0]])
    counts = chunk_counts(gt, pred, 2, gt_nodata=255, pred_nodata=255)
    np.testing.assert_array_equal(counts[:4].reshape(2, 2), [[1, 1], [0, 1]])


def test_error_codes():
    from pipeline.metrics import error_codes, exclusion_codes

    gt = np.array([[0, 1, 255, 1, 1]])
    pred = np.array([[0, 0, 1, 255, 1]])
    area = np.array([[True, True, True, True, False]])
    codes = exclusion_codes(gt, pred, 2, 255, 255, area)
    np.testing.assert_array_equal(codes, [[0, 0, 3, 5, 1]])
    np.testing.assert_array_equal(error_codes(gt, pred, codes, 255, 255), [[1, 2, 0, 255, 0]])


def test_no_evaluated_pixel_gives_nan_not_an_exception():
    m = semantic_metrics(np.zeros((3, 3), np.int64))
    assert np.isnan(m.miou) and np.isnan(m.overall_accuracy) and np.isnan(m.cohens_kappa)
    assert m.not_applicable == {0: "absent", 1: "absent", 2: "absent"}


def test_text_forms_accept_bare_metrics():
    from pipeline.report import console_table, iou_table, markdown

    m = semantic_metrics(np.array([[3, 1], [0, 2]]))
    text = console_table(m, ["a", "b"])
    assert "macro mIoU" in text and text.splitlines()[1].startswith("a ")
    assert text.splitlines()[-1] == "evaluated 6 px; excluded 0 px"  # no empty "()" of reasons
    assert iou_table(m, ["a", "b"])[1]["IoU"] == f"{2 / 3:.4f}"
    assert "| **b** | 0 | 2 |" in markdown(m, ["a", "b"])
