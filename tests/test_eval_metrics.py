"""Downstream metrics against hand-computed cases (unidg.eval.metrics)."""

from __future__ import annotations

import numpy as np
import pytest

from unidg.train.evaluation import metrics


def test_auroc_counts_ordered_pairs_and_ties_as_half() -> None:
    # Positive/negative pairs: (0.9 > 0.5), (0.9 > 0.1), (0.4 < 0.5), (0.4 > 0.1): 3 of 4 ordered.
    assert metrics.roc_auc([1, 1, 0, 0], [0.9, 0.4, 0.5, 0.1]) == pytest.approx(0.75)
    assert metrics.roc_auc([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
    assert metrics.roc_auc([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(0.75)


def test_auroc_equals_the_mann_whitney_statistic_on_random_scores() -> None:
    rng = np.random.default_rng(3)
    labels = rng.random(300) < 0.3
    scores = np.round(rng.random(300) + 0.3 * labels, 2)  # rounding makes ties
    pos, neg = scores[labels], scores[~labels]
    mann_whitney = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (pos.size * neg.size)
    assert metrics.roc_auc(labels, scores) == pytest.approx(mann_whitney, abs=1e-12)


def test_average_precision_hand_computed() -> None:
    # Thresholds 0.9, 0.8, 0.7, 0.1: (P, R) = (1, .5), (.5, .5), (2/3, 1), (.5, 1) -> .5 * 1 + .5 * 2/3.
    assert metrics.average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx(0.5 + 1 / 3)
    # A tie between a positive and a negative is one threshold: P = 1/2 at R = 1.
    assert metrics.average_precision([1, 0], [0.3, 0.3]) == pytest.approx(0.5)


def test_curves_and_refusals() -> None:
    fpr, tpr, thresholds = metrics.roc_curve([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    assert thresholds[0] == np.inf
    with pytest.raises(ValueError, match="both positive and negative"):
        metrics.roc_auc([1, 1], [0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        metrics.average_precision([1, 0], [np.nan, 0.3])
    with pytest.raises(ValueError, match="differ in size"):
        metrics.roc_auc([1, 0, 1], [0.2, 0.3])


def test_pro_is_one_when_every_region_is_found_before_any_normal_pixel() -> None:
    masks = np.array([[[1, 1, 0, 0]]], dtype=bool)
    assert metrics.pro_auc(masks, np.array([[[0.9, 0.8, 0.1, 0.2]]])) == pytest.approx(1.0)


def test_pro_weighs_regions_equally_hand_computed() -> None:
    # Region A = pixel 0 (size 1), region B = pixels 2-4 (size 3), six normal pixels.
    masks = np.array([[[1, 0, 1, 1, 1, 0, 0, 0, 0, 0]]], dtype=bool)
    scores = np.array([[[0.5, 0.7, 0.9, 0.9, 0.1, 0.3, 0.0, 0.0, 0.0, 0.0]]])
    # Thresholds: 0.9 -> PRO = (0 + 2/3) / 2 = 1/3 at FPR 0; 0.7 -> FPR 1/6; 0.5 -> PRO 5/6; 0.3 -> FPR 1/3;
    # 0.1 -> PRO 1. Area up to FPR 0.3: 1/3 * 1/6 + 5/6 * (0.3 - 1/6) = 1/6; normalised by 0.3: 5/9.
    fpr, pro = metrics.pro_curve(masks, scores)
    np.testing.assert_allclose(fpr, [0, 0, 1 / 6, 1 / 6, 1 / 3, 1 / 3, 1])
    np.testing.assert_allclose(pro, [0, 1 / 3, 1 / 3, 5 / 6, 5 / 6, 1, 1])
    assert metrics.pro_auc(masks, scores) == pytest.approx(5 / 9)
    # Pixel-level overlap would have given 3/4 between FPR 1/6 and 1/3: the per-region mean must differ from it.
    assert metrics.pro_auc(masks, scores) != pytest.approx((0.5 / 6 + 0.75 * (0.3 - 1 / 6)) / 0.3)


def test_pro_counts_regions_over_several_images_and_8_connectivity() -> None:
    # Image 0: a diagonal pair of pixels is ONE region (8-connected); image 1: one pixel region.
    masks = np.zeros((2, 3, 3), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True
    masks[1, 2, 2] = True
    scores = np.zeros((2, 3, 3))
    scores[0, 0, 0] = 1.0  # half of region one found at FPR 0
    # PRO = (1/2 + 0) / 2 regions = 1/4 at FPR 0; then everything at FPR 1 (all the rest tied at 0).
    # Area up to 0.3 of the segment (0, 1/4) -> (1, 1): 0.3 * 1/4 + 0.3^2 / 2 * 3/4 = 0.10875.
    assert metrics.pro_auc(masks, scores) == pytest.approx(0.10875 / 0.3)
    with pytest.raises(ValueError, match="at least one defect region"):
        metrics.pro_auc(np.zeros((1, 2, 2), bool), np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match="max_fpr"):
        metrics.pro_auc(masks, scores, max_fpr=0.0)


def test_trapezoid_until_interpolates_at_the_limit() -> None:
    assert metrics.trapezoid_until([0, 1], [0, 1], 0.5) == pytest.approx(0.125)
    assert metrics.trapezoid_until([0, 0.2, 1], [1, 1, 1], 0.3) == pytest.approx(0.3)


def test_segmentation_iou_hand_computed() -> None:
    target = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 0, 1, 1, 2, 2])
    confusion = metrics.confusion_matrix(predicted, target, 4)
    # class 0: TP 2, FP 0, FN 1 -> 2/3; class 1: TP 1, FP 1, FN 1 -> 1/3; class 2: TP 1, FP 1, FN 0 -> 1/2; class 3
    # absent and never predicted -> not counted.
    result = metrics.segmentation_iou(confusion)
    assert result["iou"][:3] == pytest.approx([2 / 3, 1 / 3, 1 / 2]) and result["iou"][3] is None
    assert result["miou"] == pytest.approx((2 / 3 + 1 / 3 + 1 / 2) / 3)
    assert result["bg_miou"] == pytest.approx(2 / 3)
    assert result["fg_miou"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert metrics.accuracy(predicted, target) == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        metrics.confusion_matrix(np.array([5]), np.array([0]), 4)
