"""Test-sampling error of the benchmark's metrics: a bootstrap over test images, paired across training sets.

A replicate redraws each object's test images with replacement (good and defective images separately, so every
replicate keeps the split's class balance and every metric stays defined) and scores every detector on the redrawn
set. The draws depend only on (bootstrap seed, object, replicate), never on the training set or the detector seed,
so all sets and seeds are scored on the same redrawn images: the difference of two sets' replicates is the paired
bootstrap of their difference.

A redrawn set is represented by a multiplicity per test image (how often the draw picked it), and every metric is
computed with those multiplicities as weights over one ranking of the scores sorted once. With multiplicities the
result equals the metric of ``unidg.train.evaluation.metrics`` on the explicitly resampled images (ties grouped the
same way, PRO's regions counted once per copy); with all ones it is that metric on the test set itself. The tests
check both.
"""

from __future__ import annotations

import zlib

import numpy as np
from scipy import ndimage, sparse

from unidg.train.evaluation import metrics


def resample_counts(is_defect: np.ndarray, replicates: int, seed: int, name: str) -> np.ndarray:
    """(replicates, N) multiplicities of N test images: a stratified draw with replacement per replicate, from a
    generator keyed by (``seed``, ``name``) alone."""
    is_defect = np.asarray(is_defect, dtype=bool)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    counts = np.zeros((replicates, is_defect.size), dtype=np.int64)
    for stratum in (np.flatnonzero(~is_defect), np.flatnonzero(is_defect)):
        if stratum.size:
            counts[:, stratum] = rng.multinomial(stratum.size, np.full(stratum.size, 1.0 / stratum.size), replicates)
    return counts


class Ranking:
    """Binary labels and scores sorted once (highest first, ties grouped as one threshold), each element belonging to
    a group (its test image) whose multiplicity weighs it; AUROC, AP and PRO of many redrawn sets at once.

    Only the thresholds that pass a positive change AP's precision sum, the count of negatives ranked above a
    positive (AUROC: Mann-Whitney, ties one half) and PRO's overlap, so the ranking is kept as sparse per-group
    counts at those thresholds: positives (and PRO's region weights) and negatives in each positive tie group, and
    negatives between two such groups. A redrawn set is then a few sparse products and cumulative sums, exact in
    exact arithmetic. ``region_weight`` (PRO): 1 / size of the element's 8-connected defect region, 0 outside any;
    ``regions``: regions per group.
    """

    def __init__(
        self,
        labels: np.ndarray,
        scores: np.ndarray,
        groups: np.ndarray,
        region_weight: np.ndarray | None = None,
        regions: np.ndarray | None = None,
    ) -> None:
        labels, scores = metrics._check_binary(labels, scores, "bootstrap ranking")
        groups = np.asarray(groups, dtype=np.int64).ravel()
        order = np.argsort(-scores, kind="mergesort")
        sorted_scores, positive, groups = scores[order], labels[order], groups[order]
        tie = np.r_[0, np.cumsum(np.diff(sorted_scores) != 0)]
        positive_ties = np.unique(tie[positive])
        # Index of the positive tie group each element is in, or the next one (negatives between two groups).
        bucket = np.searchsorted(positive_ties, tie)
        within = (bucket < positive_ties.size) & (positive_ties[np.minimum(bucket, positive_ties.size - 1)] == tie)
        self.n_groups = int(groups.max()) + 1
        rows = positive_ties.size

        def counts(select: np.ndarray, rows: int, values: np.ndarray | None = None) -> sparse.csr_matrix:
            data = np.ones(int(select.sum())) if values is None else values[select]
            return sparse.csr_matrix((data, (bucket[select], groups[select])), shape=(rows, self.n_groups))

        self.positives = counts(positive, rows)
        self.tied_negatives = counts(~positive & within, rows)
        self.negatives_before = counts(~positive & ~within, rows + 1)  # the last row: below every positive
        self.region_weight = None
        if region_weight is not None:
            self.region_weight = counts(positive, rows, np.asarray(region_weight, dtype=np.float64).ravel()[order])
            self.regions = np.asarray(regions, dtype=np.float64)

    def metrics(self, multiplicity: np.ndarray, max_fpr: float = 0.3) -> dict[str, np.ndarray]:
        """``auroc``, ``ap`` (and ``pro`` with regions) for each row of ``multiplicity`` (R, groups)."""
        weights = np.atleast_2d(np.asarray(multiplicity, dtype=np.float64)).T  # (groups, R)
        new_tp = self.positives @ weights
        tied_fp = self.tied_negatives @ weights
        before = self.negatives_before @ weights
        fp_end = np.cumsum(before[:-1] + tied_fp, axis=0)
        fp_total = fp_end[-1] + before[-1]
        tp_end = np.cumsum(new_tp, axis=0)
        tp_total = tp_end[-1]
        seen = tp_end + fp_end
        precision = np.divide(tp_end, seen, out=np.zeros_like(seen), where=new_tp > 0)
        out = {
            "ap": (new_tp * precision).sum(axis=0) / tp_total,
            "auroc": 1.0 - (new_tp * (fp_end - 0.5 * tied_fp)).sum(axis=0) / (tp_total * fp_total),
        }
        if self.region_weight is not None:
            # Trapezoid area of overlap against FPR up to max_fpr: an overlap step at a threshold whose FPR runs
            # from f0 to f1 adds step * (max_fpr - (f0 + f1) / 2), or, if it straddles max_fpr, the part before it.
            step = (self.region_weight @ weights) / (self.regions @ weights)
            f1 = fp_end / fp_total
            width = tied_fp / fp_total
            f0 = f1 - width
            full = step * (max_fpr - f0 - 0.5 * width)
            straddle = step * (max_fpr - f0) ** 2 / (2.0 * np.where(width > 0, width, 1.0))
            area = np.where(f1 <= max_fpr, full, np.where(f0 < max_fpr, straddle, 0.0))
            out["pro"] = area.sum(axis=0) / max_fpr
        return out


def pixel_ranking(masks: np.ndarray, score_maps: np.ndarray) -> Ranking:
    """The ranking of every pixel of (N, H, W) score maps, grouped by image, with PRO's 8-connected regions."""
    masks = np.asarray(masks, dtype=bool)
    region_weight = np.zeros(masks.shape, dtype=np.float64)
    regions = np.zeros(masks.shape[0], dtype=np.float64)
    for i, mask in enumerate(masks):
        labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
        if count:
            sizes = np.bincount(labels.ravel())
            region_weight[i][labels > 0] = 1.0 / sizes[labels[labels > 0]]
            regions[i] = count
    groups = np.repeat(np.arange(masks.shape[0]), masks[0].size)
    return Ranking(masks, score_maps, groups, region_weight, regions)


def binary_replicates(
    probability: np.ndarray, masks: np.ndarray, image_labels: np.ndarray, image_scores: np.ndarray, counts: np.ndarray
) -> dict[str, list[float]]:
    """AUROC-I, AP-I, AUROC-P, AP-P and PRO of a binary detector on each redrawn test set (rows of ``counts``)."""
    images = Ranking(image_labels, image_scores, np.arange(len(image_labels))).metrics(counts)
    pixels = pixel_ranking(masks, probability).metrics(counts)
    values = {
        "auroc_i": images["auroc"],
        "ap_i": images["ap"],
        "auroc_p": pixels["auroc"],
        "ap_p": pixels["ap"],
        "pro": pixels["pro"],
    }
    return {key: [float(v) for v in value] for key, value in values.items()}


def accuracy_replicates(correct: np.ndarray, counts: np.ndarray) -> list[float]:
    """Accuracy on each redrawn set; ``counts`` columns are the classified test images, ``correct`` per image."""
    totals = counts.sum(axis=1)
    return [float(v) for v in (counts @ np.asarray(correct, dtype=np.float64)) / np.maximum(totals, 1)]


def iou_replicates(confusions: np.ndarray, counts: np.ndarray) -> dict[str, list[float]]:
    """mIoU, BG-mIoU and FG-mIoU on each redrawn set from per-image confusion matrices (N, K, K)."""
    out: dict[str, list[float]] = {"miou": [], "bg_miou": [], "fg_miou": []}
    flat = confusions.reshape(confusions.shape[0], -1).astype(np.float64)
    for row in counts:
        result = metrics.segmentation_iou((row @ flat).reshape(confusions.shape[1:]))
        for key in out:
            out[key].append(result[key])
    return out


def interval(replicates: np.ndarray, confidence: float) -> tuple[float, float]:
    """The percentile interval of bootstrap replicates (NaN replicates dropped)."""
    values = np.asarray(replicates, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not values.size:
        return float("nan"), float("nan")
    tail = 50.0 * (1.0 - confidence)
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)
