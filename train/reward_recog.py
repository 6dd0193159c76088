"""Defect-Recog reward (paper App. D.1): a defect classifier (ResNet-34, the 28 UDG categories + normal) and a
defect segmenter (U-Net, the stand-in here for the paper's ViT-B/16 instance segmenter), trained on UDG folders by
``unidg train reward-recog --data D --out R``.

Score of a generated target: the mean of four numbers in [0, 1] — the category match (1 when the classifier's
prediction is the reference defect's category, else 0), and the segmenter's defect map against the target mask as
normalised pixel AUROC ((AUROC - 0.5) / 0.5, clipped to [0, 1]: chance scores 0), pixel AP and PRO (FPR <= 0.3,
normalised by 0.3). No pretrained weights can be fetched: both networks train from scratch on the UDG folder; a
local torchvision ``resnet34`` state dict (safetensors) can initialise the classifier's backbone.

A reward folder R holds ``classifier.safetensors``, ``segmenter.safetensors`` and ``recog.json`` (classes, input
size, network widths, training settings, held-out figures), written whole or not at all.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from unidg.core.errors import UniDGError
from unidg.core.manifest import atomic_write_text
from unidg.core.staging import check_output_folder, staged_folder
from unidg.core.udg import CATEGORIES, read_index
from unidg.train.config import _check
from unidg.train.detectors import ResNet34, UNet
from unidg.train.evaluation import metrics
from unidg.train.evaluation.datasets import resize_pair
from unidg.train.evaluation.detector_training import as_input, predict_probability, train_binary_unet, train_classifier
from unidg.train.evaluation.training_sets import LabelledSet
from unidg.train.reward_interface import RewardError, RewardOutput

NORMAL = "normal"
CLASSES: tuple[str, ...] = (*CATEGORIES, NORMAL)
RECOG_JSON = "recog.json"
CLASSIFIER_FILE = "classifier.safetensors"
SEGMENTER_FILE = "segmenter.safetensors"


@dataclass
class RecogTrainConfig:
    size: int = 64  # input side of both networks (a multiple of 2 ** unet_depth)
    epochs: int = 5  # paper: 5
    batch: int = 32  # paper: 128
    lr: float = 1e-3  # paper: 1e-4 with a cosine schedule on real data; higher from scratch on small sets
    resnet_width: int = 64  # 64: torchvision's ResNet-34 (pretrained state dicts fit); smaller: faster
    unet_width: int = 16
    unet_depth: int = 3
    seed: int = 0

    def validate(self, where: str = "unidg train reward-recog") -> None:
        for name in ("size", "epochs", "batch", "resnet_width", "unet_width", "unet_depth"):
            _check(getattr(self, name) >= 1, where, f"--{name.replace('_', '-')}", "must be >= 1", getattr(self, name))
        _check(math.isfinite(self.lr) and self.lr > 0, where, "--lr", "must be a finite number > 0", self.lr)
        _check(self.seed >= 0, where, "--seed", "must be >= 0", self.seed)


def labelled_set(folder: str | Path, size: int, limit: int = 0):
    """Every quadruplet of a UDG folder as two examples: the abnormal image with its mask and category, and the
    normal image with an empty mask, class ``normal``."""
    quadruplets = list(read_index(folder))[: limit or None]
    if not quadruplets:
        raise UniDGError(f"{folder} holds no quadruplets; make some with `unidg data synth --out {folder}`")
    images, masks, labels = [], [], []
    for q in quadruplets:
        image, mask = resize_pair(q.load_abnormal(), q.load_mask(), size)
        normal, empty = resize_pair(q.load_normal(), np.zeros(q.load_mask().shape, bool), size)
        images += [image, normal]
        masks += [mask, empty]
        labels += [q.category, NORMAL]
    return LabelledSet(np.stack(images), np.stack(masks), labels)


def load_pretrained_backbone(model, path: str | Path) -> int:
    """Copy a torchvision ``resnet34`` state dict (safetensors) into ``model`` except its ``fc`` layer (other
    classes); returns the tensors loaded. Any other missing, extra or mis-shaped key is refused by name."""
    path = Path(path)
    if not path.is_file():
        raise UniDGError(f"pretrained classifier {path} not found (a torchvision resnet34 state dict)")
    state = {k: v for k, v in load_file(str(path)).items() if not k.startswith("fc.")}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or extra or shapes:
        raise UniDGError(
            f"{path} is not a resnet34 state dict for this classifier (missing {missing[:3]}, unexpected {extra[:3]}, "
            f"other shapes {shapes[:3]}); it needs resnet_width = 64"
        )
    model.load_state_dict(state, strict=False)
    return len(state)


def train_reward_recog(
    data: str | Path,
    out: str | Path,
    config: RecogTrainConfig,
    heldout: str | Path | None = None,
    pretrained_classifier: str | Path | None = None,
    limit: int = 0,
    replace: bool = False,
) -> dict:
    """``unidg train reward-recog``: train both networks and write the reward folder ``out``."""
    if config.size % 2**config.unet_depth:
        raise UniDGError(f"--size {config.size} must be a multiple of {2**config.unet_depth} (the U-Net's depth)")
    check_output_folder(out, replace=replace)
    train = labelled_set(data, config.size, limit)
    classifier = ResNet34(len(CLASSES), config.resnet_width)
    loaded = load_pretrained_backbone(classifier, pretrained_classifier) if pretrained_classifier else 0
    with torch.random.fork_rng():
        classifier = train_classifier(train, list(CLASSES), config, config.seed, config.epochs, classifier)
        segmenter = train_binary_unet(
            train, config, config.seed, config.epochs, UNet(1, config.unet_width, config.unet_depth)
        )
    document = {
        "classes": list(CLASSES),
        "train": asdict(config),
        "examples": len(train),
        "pretrained_classifier": str(pretrained_classifier) if pretrained_classifier else None,
        "pretrained_tensors": loaded,
    }
    if heldout:
        document["heldout"] = evaluate_recog(classifier, segmenter, labelled_set(heldout, config.size))
    with staged_folder(out, replace=replace) as folder:
        save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, str(folder / CLASSIFIER_FILE))
        save_file({k: v.contiguous() for k, v in segmenter.state_dict().items()}, str(folder / SEGMENTER_FILE))
        atomic_write_text(folder / RECOG_JSON, json.dumps(document, indent=2) + "\n")
    return document


@torch.no_grad()
def evaluate_recog(classifier, segmenter, data) -> dict:
    predicted = classifier.eval()(as_input(data.images)).argmax(dim=1).numpy()
    target = np.array([CLASSES.index(d) for d in data.defects])
    probability = predict_probability(segmenter.eval(), data.images)
    return {
        "category_accuracy": metrics.accuracy(predicted, target),
        "auroc_p": metrics.roc_auc(data.masks, probability),
        "ap_p": metrics.average_precision(data.masks, probability),
        "pro": metrics.pro_auc(data.masks, probability),
    }


class DefectRecogReward:
    """The Defect-Recog reward of a folder written by ``train_reward_recog`` (see the module docstring)."""

    name = "recog"

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu") -> None:
        folder = Path(folder)
        retrain = f"train it again with `unidg train reward-recog --data UDG_FOLDER --out {folder} --overwrite`"
        if not (folder / RECOG_JSON).is_file():
            raise UniDGError(
                f"Defect-Recog checkpoint {folder} has no {RECOG_JSON}; train one with "
                f"`unidg train reward-recog --data UDG_FOLDER --out {folder}`"
            )
        try:
            document = json.loads((folder / RECOG_JSON).read_bytes())
            self.classes = list(document["classes"])
            train = RecogTrainConfig(**document["train"])
            train.validate(str(folder / RECOG_JSON))
        except (ValueError, KeyError, TypeError) as error:  # not JSON / UTF-8, keys missing, other keys or types
            raise UniDGError(
                f"Defect-Recog checkpoint {folder}: {RECOG_JSON} is not what `unidg train reward-recog` writes "
                f"({type(error).__name__}: {error}); {retrain}"
            ) from error
        if self.classes != list(CLASSES):
            raise UniDGError(
                f"Defect-Recog checkpoint {folder} classifies {self.classes}, this unidg scores {list(CLASSES)}; "
                f"{retrain}"
            )
        self.size = train.size
        self.classifier = ResNet34(len(self.classes), train.resnet_width)
        self.segmenter = UNet(1, train.unet_width, train.unet_depth)
        for network, file in ((self.classifier, CLASSIFIER_FILE), (self.segmenter, SEGMENTER_FILE)):
            try:
                network.load_state_dict(load_file(str(folder / file)))
            except (OSError, RuntimeError, SafetensorError) as error:  # missing, truncated, other shapes or keys
                reason = str(error).splitlines()[0] if str(error) else type(error).__name__
                raise UniDGError(
                    f"Defect-Recog checkpoint {folder}: {file} cannot be loaded ({reason}); {retrain}"
                ) from error
        self.device = torch.device(device)
        self.classifier.to(self.device).eval()
        self.segmenter.to(self.device).eval()

    @torch.no_grad()
    def score(self, inputs):
        if len(inputs.categories) != inputs.batch or not all(inputs.categories):
            raise RewardError("reward 'recog' needs the reference defect's category of every sample")
        pairs = [resize_pair(inputs.generated[b], inputs.target_mask[b], self.size) for b in range(inputs.batch)]
        images = np.stack([p[0] for p in pairs])
        masks = np.stack([p[1] for p in pairs])
        x = as_input(images).to(self.device)
        predicted = self.classifier(x).argmax(dim=1).cpu().numpy()
        probability = torch.sigmoid(self.segmenter(x)[:, 0]).cpu().numpy()
        parts = {"recog/category": [], "recog/auroc_p": [], "recog/ap_p": [], "recog/pro": []}
        for b in range(inputs.batch):
            category = inputs.categories[b]
            if category not in self.classes:
                raise RewardError(f"reward 'recog': sample {inputs.ids[b]!r} has category {category!r}, unknown to it")
            try:
                auroc = metrics.roc_auc(masks[b], probability[b])
                ap = metrics.average_precision(masks[b], probability[b])
                pro = metrics.pro_auc(masks[b][None], probability[b][None])
            except ValueError as error:
                raise RewardError(f"reward 'recog': sample {inputs.ids[b]!r}: {error}") from error
            parts["recog/category"].append(float(self.classes[int(predicted[b])] == category))
            parts["recog/auroc_p"].append(float(np.clip((auroc - 0.5) / 0.5, 0.0, 1.0)))
            parts["recog/ap_p"].append(ap)
            parts["recog/pro"].append(pro)
        details = {k: np.asarray(v, dtype=np.float64) for k, v in parts.items()}
        return RewardOutput(np.mean(list(details.values()), axis=0), details)
