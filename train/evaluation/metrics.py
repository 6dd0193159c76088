"""Detection, localization and segmentation metrics of the paper's downstream protocol (Sec. 6.1, Tables 1-2).

numpy only (scikit-learn is not a dependency of the project): ROC and precision-recall curves with tied scores
grouped as one threshold, AUROC by the trapezoid rule, AP as scikit-learn's ``average_precision_score`` defines it
(sum over thresholds of recall increase times precision, no interpolation), and PRO as MVTec-AD defines it: the mean
overlap of every ground-truth connected region with the prediction, integrated over the false-positive rate of the
normal pixels from 0 to ``max_fpr`` (0.3) and divided by ``max_fpr``.
"""

from __future__ import annotations

import numpy as np


def _check_binary(labels: np.ndarray, scores: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"{name}: labels ({labels.size}) and scores ({scores.size}) differ in size")
    if not np.isfinite(scores).all():
        raise ValueError(f"{name}: scores hold NaN or infinity")
    if labels.all() or not labels.any():
        raise ValueError(f"{name}: needs both positive and negative samples (got {int(labels.sum())} of {labels.size})")
    return labels, scores


def _threshold_counts(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(true positives, false positives, threshold) at each distinct score, highest threshold first."""
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tps = np.cumsum(labels)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    return tps.astype(np.float64), fps.astype(np.float64), scores[last_of_tie]


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false-positive rate, true-positive rate, thresholds), starting at (0, 0) with threshold +inf."""
    labels, scores = _check_binary(labels, scores, "roc_curve")
    tps, fps, thresholds = _threshold_counts(labels, scores)
    return np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]], np.r_[np.inf, thresholds]


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half, as the Mann-Whitney U statistic)."""
    fpr, tpr, _ = roc_curve(labels, scores)
    return float(np.trapezoid(tpr, fpr))


def precision_recall_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds) at each distinct score, highest threshold first."""
    labels, scores = _check_binary(labels, scores, "precision_recall_curve")
    tps, fps, thresholds = _threshold_counts(labels, scores)
    return tps / (tps + fps), tps / tps[-1], thresholds


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """AP = sum_n (R_n - R_{n-1}) P_n over the distinct thresholds (scikit-learn's definition)."""
    precision, recall, _ = precision_recall_curve(labels, scores)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def trapezoid_until(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under the curve (x ascending) from x[0] to ``x_max``, y interpolated linearly at ``x_max``."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    inside = x <= x_max
    xs, ys = x[inside], y[inside]
    if xs.size and xs[-1] < x_max and inside.sum() < x.size:
        following = int(inside.sum())
        x0, x1, y0, y1 = x[following - 1], x[following], y[following - 1], y[following]
        xs, ys = np.r_[xs, x_max], np.r_[ys, y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)]
    return float(np.trapezoid(ys, xs))


def pro_curve(masks: np.ndarray, score_maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rate of the normal pixels, mean per-region overlap) at each distinct score, from (0, 0).

    ``masks``: bool (N, H, W) ground truth; ``score_maps``: float (N, H, W). Every 8-connected region of every mask
    weighs the same, whatever its size: a pixel of region r adds 1 / (|r| * regions) to the overlap when the threshold
    passes its score.
    """
    from scipy import ndimage

    masks = np.asarray(masks, dtype=bool)
    score_maps = np.asarray(score_maps, dtype=np.float64)
    if masks.shape != score_maps.shape or masks.ndim != 3:
        raise ValueError(f"pro_curve: masks {masks.shape} and score maps {score_maps.shape} must both be (N, H, W)")
    if not np.isfinite(score_maps).all():
        raise ValueError("pro_curve: score maps hold NaN or infinity")
    weights = np.zeros(masks.shape, dtype=np.float64)
    regions = 0
    region_sizes = []
    for i, mask in enumerate(masks):
        labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
        if count:
            sizes = np.bincount(labels.ravel())
            weights[i][labels > 0] = 1.0 / sizes[labels[labels > 0]]
            region_sizes.extend(sizes[1:])
            regions += count
    normal = ~masks
    if regions == 0 or not normal.any():
        raise ValueError("pro_curve: needs at least one defect region and one normal pixel")
    weights /= regions
    scores = score_maps.ravel()
    order = np.argsort(-scores, kind="mergesort")
    scores = scores[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    fpr = np.cumsum(normal.ravel()[order])[last_of_tie] / normal.sum()
    pro = np.cumsum(weights.ravel()[order])[last_of_tie]
    return np.r_[0.0, fpr], np.r_[0.0, np.minimum(pro, 1.0)]


def pro_auc(masks: np.ndarray, score_maps: np.ndarray, max_fpr: float = 0.3) -> float:
    """Area under the PRO curve for FPR in [0, ``max_fpr``], divided by ``max_fpr`` (1.0: every region found fully
    before any normal pixel is flagged)."""
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in (0, 1] (got {max_fpr})")
    fpr, pro = pro_curve(masks, score_maps)
    return trapezoid_until(fpr, pro, max_fpr) / max_fpr


def accuracy(predicted: np.ndarray, target: np.ndarray) -> float:
    predicted, target = np.asarray(predicted).ravel(), np.asarray(target).ravel()
    if predicted.shape != target.shape or predicted.size == 0:
        raise ValueError(f"accuracy: {predicted.size} predictions for {target.size} targets")
    return float(np.mean(predicted == target))


def confusion_matrix(predicted: np.ndarray, target: np.ndarray, classes: int) -> np.ndarray:
    """(classes, classes) counts, rows = target class, columns = predicted class."""
    predicted, target = np.asarray(predicted, dtype=np.int64).ravel(), np.asarray(target, dtype=np.int64).ravel()
    if predicted.shape != target.shape:
        raise ValueError(f"confusion_matrix: {predicted.size} predictions for {target.size} targets")
    for name, values in (("predicted", predicted), ("target", target)):
        if values.size and (values.min() < 0 or values.max() >= classes):
            raise ValueError(f"confusion_matrix: {name} classes must lie in [0, {classes})")
    return np.bincount(target * classes + predicted, minlength=classes * classes).reshape(classes, classes)


def segmentation_iou(confusion: np.ndarray) -> dict:
    """Per-class IoU = TP / (TP + FP + FN) (NaN for a class neither present nor predicted), mIoU over the classes
    that occur, BG-mIoU (class 0, background) and FG-mIoU (mean over the defect classes 1..K that occur)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    foreground = iou[1:]
    return {
        "iou": [None if np.isnan(v) else float(v) for v in iou],
        "miou": float(np.nanmean(iou)),
        "bg_miou": float(iou[0]),
        "fg_miou": float(np.nanmean(foreground)) if np.isfinite(foreground).any() else float("nan"),
    }
