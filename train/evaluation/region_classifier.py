"""A defect-category classifier that looks only at the pixels inside the target region.

``unidg eval instructions`` asks which category a painted defect reads as. A classifier of the whole image (the
Defect-Recog reward at 64 px) mostly sees the object and background, and calls most real defect images ``normal``;
a defect's colour and contrast sit inside its region. This one describes a quadruplet by per-channel statistics of the
abnormal image A inside the dilated mask and of the change A − N from the normal image there (mean, standard
deviation, 10th / 50th / 90th percentiles), and of both over the quarter of the region that changed most (the defect
itself when it fills only part of the dilated region), and fits a linear softmax classifier over the 28 categories on
standardised features.

The mask's size and shape are deliberately not features: in procedural data a category comes with its own shapes, so
they would name the category without looking at the defect, and under the paired instruction measurement the mask is
the same for both instructions anyway — they could only raise both rates alike. Every statistic is a function of the
multiset of pixel values in the region (tested: shuffling the region's pixels into another shape of the same area
changes nothing). Images are first resized to the generator's resolution S, so real defects (drawn at full size) and
generated ones (painted at S and resized up) are described at the same detail.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from unidg.core.errors import UniDGError
from unidg.core.geometry import dilated_target_mask
from unidg.core.udg import CATEGORIES, Quadruplet, read_index

PERCENTILES = (10, 50, 90)
TOP_SHARE = 0.25  # the share of the region's pixels, by change magnitude, that the "most changed" statistics cover
L2 = 1e-4  # weight decay: chosen by 5-fold cross-validation over procedural families of the nano training folder
MAX_ITERATIONS = 500
FEATURES = 2 * 3 * (2 + len(PERCENTILES)) + 2 * 3


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BOX))


def region_features(abnormal: np.ndarray, normal: np.ndarray, region: np.ndarray, size: int) -> np.ndarray:
    """The ``FEATURES`` statistics of ``abnormal`` (H, W, 3 uint8) and of ``abnormal - normal`` inside ``region``
    (H, W bool, the dilated target mask), all three resized to ``size`` x ``size`` first (a pixel belongs to the
    region when any of it did)."""
    small = _resize(region.astype(np.uint8) * 255, size) > 0
    if not small.any():
        raise UniDGError("the target region is empty: every quadruplet needs a mask with at least one marked pixel")
    inside = _resize(abnormal, size)[small].astype(np.float64) / 255.0  # (P, 3)
    change = inside - _resize(normal, size)[small].astype(np.float64) / 255.0
    parts = []
    for values in (inside, change):
        parts += [values.mean(axis=0), values.std(axis=0), *np.percentile(values, PERCENTILES, axis=0)]
    magnitude = np.abs(change).sum(axis=1)
    most = magnitude >= np.quantile(magnitude, 1.0 - TOP_SHARE)
    parts += [inside[most].mean(axis=0), change[most].mean(axis=0)]
    return np.concatenate(parts)


def quadruplet_features(quadruplet: Quadruplet, size: int, kernel: int, iterations: int) -> np.ndarray:
    """``region_features`` of a quadruplet's real defect, its mask dilated as the generator dilates it."""
    region = dilated_target_mask(quadruplet.load_mask(), kernel, iterations)
    return region_features(quadruplet.load_abnormal(), quadruplet.load_normal(), region, size)


@dataclass(frozen=True)
class RegionClassifier:
    """Standardisation and a linear softmax layer over ``CATEGORIES``."""

    mean: np.ndarray  # (FEATURES,)
    scale: np.ndarray  # (FEATURES,)
    weight: np.ndarray  # (FEATURES, 28)
    bias: np.ndarray  # (28,)

    @classmethod
    def fit(cls, features: np.ndarray, categories: Sequence[str], l2: float = L2) -> RegionClassifier:
        """Cross-entropy plus ``l2`` times the squared weights, minimised by full-batch L-BFGS from zero weights in
        float64: deterministic, no seed involved."""
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or len(features) != len(categories) or len(set(categories)) < 2:
            raise UniDGError(
                f"{len(categories)} training quadruplet(s) of {len(set(categories))} category(ies): the region "
                "classifier needs quadruplets of at least 2 categories; give a larger --train-data folder"
            )
        mean, scale = features.mean(axis=0), features.std(axis=0)
        scale = np.where(scale > 1e-12, scale, 1.0)  # a constant feature stays 0
        x = torch.from_numpy((features - mean) / scale)
        y = torch.tensor([CATEGORIES.index(c) for c in categories])
        weight = torch.zeros(x.shape[1], len(CATEGORIES), dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(len(CATEGORIES), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [weight, bias],
            max_iter=MAX_ITERATIONS,
            tolerance_grad=1e-9,
            tolerance_change=1e-12,
            line_search_fn="strong_wolfe",
        )

        def loss() -> torch.Tensor:
            optimizer.zero_grad()
            value = torch.nn.functional.cross_entropy(x @ weight + bias, y) + l2 * weight.pow(2).sum()
            value.backward()
            return value

        optimizer.step(loss)
        return cls(mean, scale, weight.detach().numpy().copy(), bias.detach().numpy().copy())

    def predict(self, features: np.ndarray) -> list[str]:
        """The top category of each row of ``features``."""
        logits = ((np.atleast_2d(features) - self.mean) / self.scale) @ self.weight + self.bias
        return [CATEGORIES[k] for k in logits.argmax(axis=1)]


def train_region_classifier(
    folder: str | Path, size: int, kernel: int, iterations: int
) -> tuple[RegionClassifier, dict]:
    """The classifier fitted on every quadruplet of the UDG folder ``folder``, and a summary of its training (how many
    quadruplets and categories, its accuracy on them)."""
    folder = Path(folder)
    if not (folder / "index.jsonl").is_file():
        raise UniDGError(
            f"--train-data {folder}: no index.jsonl, so it is not a UDG folder; give the training folder of the "
            "bundle's model (e.g. out/nano/data/train), or make one with `unidg data synth`"
        )
    quadruplets = read_index(folder)
    categories = [q.category for q in quadruplets]
    features = np.stack([quadruplet_features(q, size, kernel, iterations) for q in quadruplets])
    classifier = RegionClassifier.fit(features, categories)
    correct = [p == c for p, c in zip(classifier.predict(features), categories)]
    summary = {
        "train_data": str(folder),
        "quadruplets": len(quadruplets),
        "categories": sorted(set(categories)),
        "features": FEATURES,
        "l2": L2,
        "size": size,
        "train_accuracy": float(np.mean(correct)),
    }
    return classifier, summary
