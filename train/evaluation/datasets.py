"""Inspection datasets for the downstream evaluation: one ``InspectionSplit`` per object.

Three layouts are read:

- a procedural (or any) UDG folder (``unidg data synth``, ``unidg.core.udg``): each quadruplet gives a good image
  (its normal) and a defect image (its abnormal + mask); lots (the ``lot`` key ``unidg data synth`` writes, else the
  id) are split between training and test so no product is in both;
- MVTec-AD: ``<object>/train/good/*.png``, ``<object>/test/<defect>/*.png`` (``good`` among them),
  ``<object>/ground_truth/<defect>/<stem>_mask.png`` for every defect image;
- VisA's split CSV (``split_csv/1cls.csv``): columns ``object,split,label,image,mask``, ``label`` normal/anomaly,
  paths relative to the dataset root.

Every refusal names the folder or file and the fix; masks whose size differs from their image's are refused when the
split is read (image headers only, no pixels decoded).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from unidg.core import images
from unidg.core.errors import UniDGError
from unidg.core.udg import read_index

GOOD = "good"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".JPG", ".PNG")
VISA_COLUMNS = ("object", "split", "label", "image", "mask")


class DatasetLayoutError(UniDGError):
    """A dataset folder or split file is not in the expected layout; the message names it and the fix."""


@dataclass(frozen=True)
class InspectionSample:
    image: Path
    mask: Path | None  # None for a good image
    defect: str  # defect type, or "good"
    object_name: str
    category: str = ""  # the UDG category (mask templates are grouped by it); "": the defect type stands in

    @property
    def template_category(self) -> str:
        return self.category or self.defect

    @property
    def is_defect(self) -> bool:
        return self.defect != GOOD

    def load(self, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 (H, W, 3) image, bool (H, W) mask), resized to ``size`` x ``size`` when given (mask: nearest)."""
        image = images.load_image(self.image, f"{self.object_name} image")
        if self.mask is None:
            mask = np.zeros(image.shape[:2], dtype=bool)
        else:
            mask = images.mask_from_pil(Image.open(self.mask), f"{self.object_name} mask", self.mask)
        if size is not None:
            return resize_pair(image, mask, size)
        return image, mask


def resize_pair(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    resized = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
    mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.Resampling.NEAREST))
    return resized, mask > 127


@dataclass
class InspectionSplit:
    """One object's data: good training images, the real defects available for training (references, and the
    real-defect training set), and the test images (good and defective)."""

    object_name: str
    train_good: list[Path] = field(default_factory=list)
    train_defects: list[InspectionSample] = field(default_factory=list)
    test: list[InspectionSample] = field(default_factory=list)

    @property
    def defect_types(self) -> list[str]:
        return sorted({s.defect for s in self.train_defects + self.test if s.is_defect})


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError:
        raise DatasetLayoutError(f"{path} does not exist; add the file or fix the layout") from None
    except OSError as error:
        raise DatasetLayoutError(f"{path} is not a readable image ({error})") from None


def check_mask_matches(image: Path, mask: Path) -> None:
    image_size, mask_size = _image_size(image), _image_size(mask)
    if image_size != mask_size:
        raise DatasetLayoutError(
            f"mask {mask} is {mask_size[0]}x{mask_size[1]} but its image {image} is {image_size[0]}x{image_size[1]}; "
            "a mask must have its image's size"
        )


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in IMAGE_SUFFIXES)


# ------------------------------------------------------------------------------------------------------ MVTec-AD
def read_mvtec(root: str | Path, objects: list[str] | None = None, reference_shots: int = 0) -> list[InspectionSplit]:
    """Every object of an MVTec-AD-layout folder (or ``objects``). ``reference_shots``: the first k images of each
    defect type move from the test set to ``train_defects`` (the few real references; MVTec has no training
    defects)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"{root} is not a folder; pass the MVTec-AD root (holding <object>/train/good)")
    names = objects or sorted(p.name for p in root.iterdir() if (p / "train").is_dir() or (p / "test").is_dir())
    if not names:
        raise DatasetLayoutError(
            f"{root} holds no object folder with train/ and test/; the MVTec-AD layout is "
            "<object>/train/good, <object>/test/<defect>, <object>/ground_truth/<defect>/<name>_mask.png"
        )
    return [_read_mvtec_object(root / name, reference_shots) for name in names]


def _read_mvtec_object(folder: Path, reference_shots: int) -> InspectionSplit:
    name = folder.name
    good = folder / "train" / GOOD
    if not good.is_dir() or not _image_files(good):
        raise DatasetLayoutError(f"{good} is missing or holds no images; MVTec-AD keeps normal training images there")
    test = folder / "test"
    if not test.is_dir():
        raise DatasetLayoutError(f"{test} is missing; MVTec-AD keeps test images in {test}/<defect>/ and good/")
    split = InspectionSplit(name, train_good=_image_files(good))
    for defect_folder in sorted(p for p in test.iterdir() if p.is_dir()):
        defect = defect_folder.name
        samples = []
        for image in _image_files(defect_folder):
            mask = None
            if defect != GOOD:
                mask = folder / "ground_truth" / defect / f"{image.stem}_mask.png"
                if not mask.is_file():
                    raise DatasetLayoutError(
                        f"{image} has no mask {mask}; MVTec-AD needs ground_truth/<defect>/<name>_mask.png for every "
                        "defect image"
                    )
                check_mask_matches(image, mask)
            samples.append(InspectionSample(image, mask, defect, name))
        if defect != GOOD and reference_shots:
            split.train_defects.extend(samples[:reference_shots])
            samples = samples[reference_shots:]
        split.test.extend(samples)
    if not any(s.is_defect for s in split.test) or all(s.is_defect for s in split.test):
        raise DatasetLayoutError(f"{test} must hold good/ and at least one defect folder, each with test images")
    return split


# ---------------------------------------------------------------------------------------------------------- VisA
def read_visa_rows(split_csv: Path, error: type[UniDGError] = DatasetLayoutError) -> list[dict[str, str]]:
    """The rows of VisA's split CSV by column name. A byte-order mark (a spreadsheet's UTF-8 export) is dropped; a file
    that is not UTF-8 raises ``error`` naming it."""
    try:
        with open(split_csv, newline="", encoding="utf-8-sig") as handle:
            return list(csv.DictReader(handle))
    except UnicodeDecodeError as decode:
        raise error(
            f"{split_csv} is not UTF-8 text (byte {decode.start}: {decode.reason}); save VisA's split CSV as UTF-8"
        ) from decode


def read_visa(root: str | Path, split_csv: str | Path, objects: list[str] | None = None) -> list[InspectionSplit]:
    """Objects of a VisA-layout dataset from its split CSV (``object,split,label,image,mask``; paths relative to
    ``root``). VisA names no defect types: every anomaly is "anomaly"."""
    root, split_csv = Path(root), Path(split_csv)
    if not split_csv.is_file():
        raise DatasetLayoutError(f"{split_csv} does not exist; pass VisA's split CSV (e.g. split_csv/1cls.csv)")
    rows = read_visa_rows(split_csv)
    columns = set(rows[0]) if rows else set()
    missing = [c for c in VISA_COLUMNS if c not in columns]
    if missing:
        raise DatasetLayoutError(
            f"{split_csv} lacks the column(s) {', '.join(missing)}; VisA's split CSV has the header "
            f"{','.join(VISA_COLUMNS)}"
        )
    splits: dict[str, InspectionSplit] = {}
    for line, row in enumerate(rows, start=2):
        name = row["object"]
        if objects and name not in objects:
            continue
        split = splits.setdefault(name, InspectionSplit(name))
        where = f"{split_csv} line {line}"
        if row["split"] not in ("train", "test"):
            raise DatasetLayoutError(f"{where}: split {row['split']!r} must be train or test")
        if row["label"] not in ("normal", "anomaly"):
            raise DatasetLayoutError(f"{where}: label {row['label']!r} must be normal or anomaly")
        image = root / row["image"]
        if not image.is_file():
            raise DatasetLayoutError(f"{where}: image {image} does not exist; fix the path or the dataset root")
        if row["label"] == "normal":
            sample = InspectionSample(image, None, GOOD, name)
        else:
            if not row["mask"]:
                raise DatasetLayoutError(f"{where}: an anomaly needs a mask path")
            mask = root / row["mask"]
            if not mask.is_file():
                raise DatasetLayoutError(f"{where}: mask {mask} does not exist; fix the path or the dataset root")
            check_mask_matches(image, mask)
            sample = InspectionSample(image, mask, "anomaly", name)
        if row["split"] == "test":
            split.test.append(sample)
        elif sample.is_defect:
            split.train_defects.append(sample)
        else:
            split.train_good.append(image)
    if not splits:
        raise DatasetLayoutError(f"{split_csv} lists no images" + (f" of {', '.join(objects)}" if objects else ""))
    for split in splits.values():
        if not split.train_good:
            raise DatasetLayoutError(f"{split_csv}: object {split.object_name} has no normal training image")
    return [splits[name] for name in sorted(splits)]


# ------------------------------------------------------------------------------------------------- UDG folders
def read_udg(folder: str | Path, objects: list[str] | None = None) -> list[InspectionSplit]:
    """Per-object splits of a UDG folder, stratified by defect type so test defect types were seen in training.

    Within one object and defect type: with two or more lots (``unidg data synth``'s ``lot`` key; else the id),
    lots alternate between training and test (no product in both); with one lot, its quadruplets alternate (the
    product, the same normal image flipped, is then in both; the defect instances differ). A type seen once goes to
    training only. A test quadruplet gives a good image (its normal) and a defect image (abnormal + mask).
    """
    quadruplets = read_index(folder)
    if not quadruplets:
        raise DatasetLayoutError(f"{folder} holds no quadruplets; make one with `unidg data synth`")
    groups: dict[str, dict[str, list]] = {}
    for q in quadruplets:
        if objects is None or q.object_name in objects:
            groups.setdefault(q.object_name, {}).setdefault(str(q.extra.get("defect_type", q.category)), []).append(q)
    if objects:
        absent = sorted(set(objects) - set(groups))
        if absent:
            raise DatasetLayoutError(f"{folder} has no quadruplet of {', '.join(absent)}")
    splits = []
    for name in sorted(groups):
        split = InspectionSplit(name)
        for defect, group in sorted(groups[name].items()):
            lots = sorted({str(q.extra.get("lot", q.id)) for q in group})
            for index, q in enumerate(group):
                rank = lots.index(str(q.extra.get("lot", q.id))) if len(lots) > 1 else index
                defect_sample = InspectionSample(q.path("abnormal"), q.path("mask"), defect, name, q.category)
                if rank % 2:
                    split.test += [InspectionSample(q.path("normal"), None, GOOD, name), defect_sample]
                else:
                    split.train_good.append(q.path("normal"))
                    split.train_defects.append(defect_sample)
        if split.test:
            splits.append(split)
    return splits
