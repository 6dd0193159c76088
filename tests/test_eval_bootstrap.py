"""The bootstrap over test images: weighted metrics equal the metrics of the explicitly redrawn images (ties and PRO
regions included), draws are stratified, deterministic and shared by every detector, intervals cover."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from unidg.train.evaluation import bootstrap, metrics


def _maps(seed: int = 0, n: int = 12, side: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Masks (half the images defective, some with two regions) and coarse score maps (many tied scores)."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, side, side), bool)
    for i in range(n // 2):
        y, x = rng.integers(0, side - 5, 2)
        masks[i, y : y + rng.integers(2, 5), x : x + rng.integers(2, 5)] = True
        if i % 2:
            masks[i, 0:2, side - 3 : side - 1] = True
    scores = np.round(rng.random(masks.shape) * 0.6 + 0.5 * masks, 1)  # rounded: ties across labels and images
    return masks, scores


def test_weighted_metrics_equal_the_metrics_of_the_redrawn_images() -> None:
    masks, scores = _maps()
    labels = masks.any(axis=(1, 2))
    image_scores = scores.max(axis=(1, 2)) + np.arange(len(labels)) % 3 * 0.01
    counts = bootstrap.resample_counts(labels, 25, seed=3, name="fabric")
    counts = np.vstack([np.ones(len(labels), np.int64), counts])  # row 0: the test set itself
    assert (counts == 0).any()  # images left out, images drawn twice or more
    got = bootstrap.binary_replicates(scores, masks, labels, image_scores, counts)
    for r, row in enumerate(counts):
        index = np.repeat(np.arange(len(labels)), row)
        expected = {
            "auroc_i": metrics.roc_auc(labels[index], image_scores[index]),
            "ap_i": metrics.average_precision(labels[index], image_scores[index]),
            "auroc_p": metrics.roc_auc(masks[index], scores[index]),
            "ap_p": metrics.average_precision(masks[index], scores[index]),
            "pro": metrics.pro_auc(masks[index], scores[index]),
        }
        for key, value in expected.items():
            assert got[key][r] == pytest.approx(value, abs=1e-12), (key, r)


def test_accuracy_and_iou_replicates_equal_the_redrawn_figures() -> None:
    rng = np.random.default_rng(1)
    correct = rng.random(9) < 0.6
    targets = rng.integers(0, 3, (9, 5, 5))
    predicted = np.where(rng.random((9, 5, 5)) < 0.7, targets, rng.integers(0, 3, (9, 5, 5)))
    confusions = np.stack([metrics.confusion_matrix(p, t, 3) for p, t in zip(predicted, targets)])
    counts = bootstrap.resample_counts(np.zeros(9, bool), 6, seed=0, name="x")
    accuracy = bootstrap.accuracy_replicates(correct, counts)
    iou = bootstrap.iou_replicates(confusions, counts)
    for r, row in enumerate(counts):
        index = np.repeat(np.arange(9), row)
        assert accuracy[r] == pytest.approx(float(correct[index].mean()), abs=1e-12)
        expected = metrics.segmentation_iou(metrics.confusion_matrix(predicted[index], targets[index], 3))
        assert iou["miou"][r] == pytest.approx(expected["miou"], abs=1e-12)
        assert iou["bg_miou"][r] == pytest.approx(expected["bg_miou"], abs=1e-12)


def test_draws_are_stratified_deterministic_and_keyed_by_seed_and_object() -> None:
    is_defect = np.array([True] * 7 + [False] * 5)
    counts = bootstrap.resample_counts(is_defect, 200, seed=0, name="fabric")
    assert counts.shape == (200, 12)
    assert (counts[:, is_defect].sum(axis=1) == 7).all() and (counts[:, ~is_defect].sum(axis=1) == 5).all()
    np.testing.assert_array_equal(counts, bootstrap.resample_counts(is_defect, 200, seed=0, name="fabric"))
    assert not np.array_equal(counts, bootstrap.resample_counts(is_defect, 200, seed=1, name="fabric"))
    assert not np.array_equal(counts, bootstrap.resample_counts(is_defect, 200, seed=0, name="metal plate"))
    # Each image is drawn once per replicate on average (with replacement).
    assert counts.mean() == pytest.approx(1.0) and counts.max() >= 3


def test_percentile_interval_covers_the_true_auroc() -> None:
    """Binormal scores: the population AUROC is Phi(d / sqrt 2). The 95 % interval from 40 + 40 images, repeated on
    120 independent test sets, covers it about 95 % of the time."""
    d = 1.0
    truth = norm.cdf(d / np.sqrt(2))
    labels = np.r_[np.ones(40, bool), np.zeros(40, bool)]
    covered = 0
    trials = 120
    for trial in range(trials):
        rng = np.random.default_rng([trial, 77])
        scores = rng.standard_normal(80) + d * labels
        counts = bootstrap.resample_counts(labels, 400, seed=trial, name="synthetic")
        replicates = bootstrap.Ranking(labels, scores, np.arange(80)).metrics(counts)["auroc"]
        low, high = bootstrap.interval(replicates, 0.95)
        covered += low <= truth <= high
    assert 0.86 <= covered / trials <= 1.0, covered


def test_pairing_cancels_the_shared_test_sampling_error() -> None:
    """Two detectors that nearly agree: each one's interval is wide (few test images), the paired interval of their
    difference is narrow and centred on the true difference; unpaired draws would not cancel."""
    rng = np.random.default_rng(5)
    labels = np.r_[np.ones(30, bool), np.zeros(30, bool)]
    first = rng.standard_normal(60) + 0.8 * labels
    second = first + 0.05 * rng.standard_normal(60) + 0.1 * labels  # slightly better, same images
    counts = bootstrap.resample_counts(labels, 500, seed=0, name="obj")
    a = bootstrap.Ranking(labels, first, np.arange(60)).metrics(counts)["auroc"]
    b = bootstrap.Ranking(labels, second, np.arange(60)).metrics(counts)["auroc"]
    width = np.subtract(*bootstrap.interval(a, 0.95)[::-1])
    paired = bootstrap.interval(b - a, 0.95)
    unpaired_counts = bootstrap.resample_counts(labels, 500, seed=1, name="obj")
    b_unpaired = bootstrap.Ranking(labels, second, np.arange(60)).metrics(unpaired_counts)["auroc"]
    unpaired = bootstrap.interval(b_unpaired - a, 0.95)
    assert width > 0.15
    assert paired[1] - paired[0] < 0.3 * (unpaired[1] - unpaired[0])
    true_difference = metrics.roc_auc(labels, second) - metrics.roc_auc(labels, first)
    assert paired[0] <= true_difference <= paired[1] and paired[0] > 0


def test_interval_is_the_percentile_range_without_nans() -> None:
    values = np.r_[np.arange(1001) / 1000.0, np.nan]
    low, high = bootstrap.interval(values, 0.9)
    assert low == pytest.approx(0.05) and high == pytest.approx(0.95)
    assert all(np.isnan(bootstrap.interval(np.array([np.nan]), 0.95)))
