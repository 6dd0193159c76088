"""Training and scoring the downstream detectors (``unidg.train.detectors``) on a ``LabelledSet``.

Binary U-Net: BCE + soft Dice on the defect mask; the image score is the maximum of the 4x4-averaged defect
probability (one bright pixel does not flag an image). Classifier and multi-class U-Net: cross-entropy. Inputs are
scaled to [-1, 1]; each batch is flipped at random (horizontally and vertically, masks alike). Adam, fixed epochs.

Every model (and every new output layer of a pre-trained one) is built right after torch is seeded with the run's
seed (``seeded``): its initial weights depend on the seed alone, not on what the process drew before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from unidg.train.detectors import MultiTaskUNet, ResNet34, UNet
from unidg.train.evaluation import bootstrap, metrics
from unidg.train.evaluation.training_sets import LabelledSet

T = TypeVar("T")


def seeded(seed: int, build: Callable[[], T]) -> T:
    """``build()`` with torch's global generator seeded first (module initialisers draw from it)."""
    torch.manual_seed(seed)
    return build()


def as_input(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1], contiguous: the permuted view is channels-last, and
    torch 2.13's CPU convolution backward corrupts the heap on channels-last input at narrow widths (a 4 -> 8
    stride-2 1x1 convolution, ResNet-34 at width 4, aborts with "corrupted double-linked list")."""
    return (torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0).contiguous()


def fit(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor | tuple[torch.Tensor, ...],
    loss_fn,
    epochs: int,
    batch: int,
    lr: float,
    seed: int,
    spatial_target: bool | tuple[bool, ...],
    forward: Callable[[torch.Tensor], object] | None = None,
) -> nn.Module:
    """Adam over shuffled batches with random flips. ``targets``: one tensor or a tuple (``spatial_target`` then
    says per tensor whether it flips with the image); ``forward``: what the loss sees (default: the model)."""
    many = isinstance(targets, tuple)
    target_tuple = targets if many else (targets,)
    spatial = spatial_target if isinstance(spatial_target, tuple) else (spatial_target,) * len(target_tuple)
    forward = forward or model
    inputs = inputs.contiguous()  # see as_input: never a channels-last tensor into the CPU convolution
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _epoch in range(epochs):
        order = torch.randperm(inputs.shape[0], generator=generator)
        for start in range(0, len(order), batch):
            index = order[start : start + batch]
            if index.numel() < 2 and len(order) > 1:
                continue  # BatchNorm needs two samples
            x, ys = inputs[index], [t[index] for t in target_tuple]
            flips = torch.rand(2, generator=generator) < 0.5
            for dim, flip in ((3, flips[0]), (2, flips[1])):
                if flip:
                    x = x.flip(dim)
                    ys = [y.flip(dim - 1) if flag else y for y, flag in zip(ys, spatial)]
            optimizer.zero_grad()
            loss_fn(forward(x), tuple(ys) if many else ys[0]).backward()
            optimizer.step()
    return model.eval()


def binary_segmentation_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    logits = logits[:, 0]
    bce = F.binary_cross_entropy_with_logits(logits, masks)
    probability = torch.sigmoid(logits)
    dice = 1 - (2 * (probability * masks).sum() + 1) / (probability.sum() + masks.sum() + 1)
    return bce + dice


def train_binary_unet(data: LabelledSet, cfg, seed: int, epochs: int, model: UNet | None = None) -> UNet:
    model = model or seeded(seed, lambda: UNet(1, cfg.unet_width, cfg.unet_depth))
    targets = torch.from_numpy(data.masks.astype(np.float32))
    return fit(model, as_input(data.images), targets, binary_segmentation_loss, epochs, cfg.batch, cfg.lr, seed, True)


@torch.no_grad()
def predict_probability(model: UNet, images: np.ndarray, batch: int = 32) -> np.ndarray:
    out = [torch.sigmoid(model(as_input(images[i : i + batch]))[:, 0]) for i in range(0, len(images), batch)]
    return torch.cat(out).numpy()


def image_scores(probability: np.ndarray) -> np.ndarray:
    pooled = F.avg_pool2d(torch.from_numpy(probability)[:, None], 4, stride=1)
    return pooled.flatten(1).max(dim=1).values.numpy()


def evaluate_binary(model: UNet, test: LabelledSet, counts: np.ndarray | None = None) -> dict:
    """AUROC-I/P, AP-I/P, PRO on ``test`` (needs good and defective images); with ``counts`` (replicates, N test
    images) also each metric on every redrawn test set, under ``bootstrap``."""
    return binary_metrics(predict_probability(model, test.images), test, counts)


def binary_metrics(probability: np.ndarray, test: LabelledSet, counts: np.ndarray | None = None) -> dict:
    labels = np.array([d != "good" for d in test.defects])
    scores = image_scores(probability)
    result = {
        "auroc_i": metrics.roc_auc(labels, scores),
        "ap_i": metrics.average_precision(labels, scores),
        "auroc_p": metrics.roc_auc(test.masks, probability),
        "ap_p": metrics.average_precision(test.masks, probability),
        "pro": metrics.pro_auc(test.masks, probability),
        "curve": {"labels": labels.astype(int).tolist(), "scores": [round(float(s), 6) for s in scores]},
    }
    if counts is not None:
        result["bootstrap"] = bootstrap.binary_replicates(probability, test.masks, labels, scores, counts)
    return result


def train_classifier(
    data: LabelledSet, classes: list[str], cfg, seed: int, epochs: int, model: ResNet34 | None = None
) -> ResNet34:
    """A ResNet-34 over ``classes`` (a fresh ``fc`` when ``model`` was trained for other classes)."""
    if model is None:
        model = seeded(seed, lambda: ResNet34(len(classes), cfg.resnet_width))
    elif model.fc.out_features != len(classes):
        model.fc = seeded(seed, lambda: nn.Linear(model.fc.in_features, len(classes)))
    targets = torch.tensor([classes.index(d) for d in data.defects])
    return fit(model, as_input(data.images), targets, F.cross_entropy, epochs, cfg.batch, cfg.lr, seed, False)


@torch.no_grad()
def evaluate_classifier(
    model: ResNet34, test: LabelledSet, classes: list[str], counts: np.ndarray | None = None
) -> dict:
    keep = [i for i, d in enumerate(test.defects) if d in classes and d != "good"]
    if not keep:
        return {"accuracy": None, "classified": 0}
    subset = test.subset(keep)
    predicted = model(as_input(subset.images)).argmax(dim=1).numpy()
    target = np.array([classes.index(d) for d in subset.defects])
    result = {"accuracy": metrics.accuracy(predicted, target), "classified": len(keep)}
    if counts is not None:
        result["bootstrap"] = {"accuracy": bootstrap.accuracy_replicates(predicted == target, counts[:, keep])}
    return result


def label_maps(data: LabelledSet, classes: list[str]) -> np.ndarray:
    """Per-pixel class index (0 background); pixels of a defect type outside ``classes`` are -1 (ignored)."""
    maps = np.zeros(data.masks.shape, dtype=np.int64)
    for n, defect in enumerate(data.defects):
        if defect != "good":
            maps[n][data.masks[n]] = classes.index(defect) if defect in classes else -1
    return maps


def train_multiclass_unet(
    data: LabelledSet, classes: list[str], cfg, seed: int, epochs: int, model: UNet | None = None
) -> UNet:
    """``classes[0]`` is the background; a fresh output layer when ``model`` was trained for other classes."""
    if model is None:
        model = seeded(seed, lambda: UNet(len(classes), cfg.unet_width, cfg.unet_depth))
    elif model.outc.out_channels != len(classes):
        model.outc = seeded(seed, lambda: nn.Conv2d(model.outc.in_channels, len(classes), 1))
    targets = torch.from_numpy(label_maps(data, classes))

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, ignore_index=-1)

    return fit(model, as_input(data.images), targets, loss, epochs, cfg.batch, cfg.lr, seed, True)


@torch.no_grad()
def evaluate_multiclass(model: UNet, test: LabelledSet, classes: list[str], counts: np.ndarray | None = None) -> dict:
    target = label_maps(test, classes)
    logits = torch.cat([model(as_input(test.images[i : i + 32])) for i in range(0, len(test), 32)])
    predicted = logits.argmax(dim=1).numpy()
    valid = target >= 0
    result = metrics.segmentation_iou(metrics.confusion_matrix(predicted[valid], target[valid], len(classes)))
    result.pop("iou")
    # Table 2's binary metrics: every defect class merged into one foreground.
    foreground = 1.0 - torch.softmax(logits, dim=1)[:, 0].numpy()
    merged = binary_metrics(foreground, test)
    merged.pop("curve")
    result = {**result, **{f"merged_{key}": value for key, value in merged.items()}}
    if counts is not None:
        per_image = np.stack(
            [metrics.confusion_matrix(p[v], t[v], len(classes)) for p, t, v in zip(predicted, target, valid)]
        )
        result["bootstrap"] = bootstrap.iou_replicates(per_image, counts)
    return result


# ------------------------------------------------------------------------------------------ seed 004 (UniADC)
TYPE_LOSS_WEIGHT = 0.5  # UniADC's weight of the classification loss


def category_consistency(generated: LabelledSet, references: LabelledSet, cfg, seed: int) -> np.ndarray:
    """UniADC's category-consistency score of each generated image: the probability a defect-type classifier
    trained on the real references (``cls_epochs``, the benchmark's ResNet-34) gives the image's labelled type
    (NaN for a type no reference has)."""
    classes = sorted(set(references.defects))
    scores = np.full(len(generated), np.nan)
    if len(classes) < 2:
        return scores  # one type: nothing to be inconsistent with
    model = train_classifier(references, classes, cfg, seed, cfg.cls_epochs)
    with torch.no_grad():
        probability = torch.softmax(model(as_input(generated.images)), dim=1).numpy()
    for n, defect in enumerate(generated.defects):
        if defect in classes:
            scores[n] = probability[n, classes.index(defect)]
    return scores


def consistent_subset(generated: LabelledSet, scores: np.ndarray, threshold: float, floor: float) -> LabelledSet:
    """The generated images whose consistency score is >= ``threshold``, and at least the best ``floor`` share
    (so a weak reference classifier cannot empty the set); with no scores (one type) all of them."""
    if np.isnan(scores).all():
        return generated
    ranked = np.argsort(-np.nan_to_num(scores, nan=-1.0), kind="stable")
    keep = set(np.flatnonzero(np.nan_to_num(scores, nan=-1.0) >= threshold).tolist())
    keep |= set(ranked[: max(1, int(np.ceil(floor * len(generated))))].tolist())
    return generated.subset(sorted(keep))


def train_multitask(data: LabelledSet, classes: list[str], cfg, seed: int, epochs: int) -> MultiTaskUNet:
    """The multi-task discriminator on ``data`` (defect images of ``classes`` and good images): BCE + soft Dice on
    the defect map plus 0.5 x cross-entropy of the image's type, class 0 "good"."""
    labels = ["good", *classes]
    model = seeded(seed, lambda: MultiTaskUNet(len(labels), cfg.unet_width, cfg.unet_depth))
    masks = torch.from_numpy(data.masks.astype(np.float32))
    types = torch.tensor([labels.index(d) for d in data.defects])

    def loss(outputs: tuple[torch.Tensor, torch.Tensor], targets: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        (maps, type_logits), (mask, kind) = outputs, targets
        return binary_segmentation_loss(maps, mask) + TYPE_LOSS_WEIGHT * F.cross_entropy(type_logits, kind)

    inputs = as_input(data.images)
    return fit(model, inputs, (masks, types), loss, epochs, cfg.batch, cfg.lr, seed, (True, False), model.both)


@torch.no_grad()
def evaluate_multitask_types(
    model: MultiTaskUNet, test: LabelledSet, classes: list[str], counts: np.ndarray | None = None
) -> dict:
    """Defect-type accuracy of the type head on the test defects of ``classes`` (argmax over the defect types, as
    the classifier's)."""
    keep = [i for i, d in enumerate(test.defects) if d in classes]
    if not keep or len(classes) < 2:
        return {"accuracy": None, "classified": 0}
    subset = test.subset(keep)
    predicted = model.both(as_input(subset.images))[1][:, 1:].argmax(dim=1).numpy()
    target = np.array([classes.index(d) for d in subset.defects])
    result = {"accuracy": metrics.accuracy(predicted, target), "classified": len(keep)}
    if counts is not None:
        result["bootstrap"] = {"accuracy": bootstrap.accuracy_replicates(predicted == target, counts[:, keep])}
    return result
