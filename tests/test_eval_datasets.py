"""Dataset readers of the downstream evaluation on small folders made here: MVTec-AD, VisA split CSV, UDG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unidg.train.evaluation.datasets import DatasetLayoutError, read_mvtec, read_udg, read_visa


def _png(path: Path, size: tuple[int, int] = (16, 16), mask: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mask:
        array = np.zeros((size[1], size[0]), np.uint8)
        array[2:6, 3:9] = 255
        Image.fromarray(array, "L").save(path)
    else:
        Image.fromarray(np.full((size[1], size[0], 3), 90, np.uint8)).save(path)
    return path


def make_mvtec(root: Path) -> Path:
    obj = root / "bottle"
    for i in range(3):
        _png(obj / "train" / "good" / f"{i:03d}.png")
    _png(obj / "test" / "good" / "000.png")
    for defect in ("broken", "contamination"):
        for i in range(2):
            _png(obj / "test" / defect / f"{i:03d}.png")
            _png(obj / "ground_truth" / defect / f"{i:03d}_mask.png", mask=True)
    return root


def test_mvtec_layout_is_read_with_reference_shots(tmp_path: Path) -> None:
    (split,) = read_mvtec(make_mvtec(tmp_path), reference_shots=1)
    assert split.object_name == "bottle" and len(split.train_good) == 3
    assert split.defect_types == ["broken", "contamination"]
    assert [s.defect for s in split.train_defects] == ["broken", "contamination"]
    assert sorted(s.defect for s in split.test) == ["broken", "contamination", "good"]
    image, mask = split.test[0].load(size=8)
    assert image.shape == (8, 8, 3) and mask.shape == (8, 8)
    defect = next(s for s in split.test if s.is_defect)
    assert defect.load()[1].sum() == 4 * 6


def test_mvtec_wrong_layouts_are_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match="is not a folder"):
        read_mvtec(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetLayoutError, match="train/good"):
        read_mvtec(tmp_path / "empty")
    root = make_mvtec(tmp_path / "a")
    (root / "bottle" / "ground_truth" / "broken" / "001_mask.png").unlink()
    with pytest.raises(DatasetLayoutError, match=r"001\.png has no mask .*001_mask\.png"):
        read_mvtec(root)
    root = make_mvtec(tmp_path / "b")
    for png in (root / "bottle" / "train" / "good").iterdir():
        png.unlink()
    with pytest.raises(DatasetLayoutError, match="holds no images"):
        read_mvtec(root)


def test_mvtec_mask_of_another_size_is_refused(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path)
    _png(root / "bottle" / "ground_truth" / "contamination" / "000_mask.png", size=(16, 12), mask=True)
    with pytest.raises(DatasetLayoutError, match=r"000_mask\.png is 16x12 but its image .* is 16x16"):
        read_mvtec(root)


def make_visa(root: Path, header: str = "object,split,label,image,mask") -> Path:
    rows = [header]
    for i in range(2):
        rows.append(f"candle,train,normal,candle/Normal/{i}.png,")
        _png(root / "candle" / "Normal" / f"{i}.png")
    rows.append("candle,test,normal,candle/Normal/9.png,")
    _png(root / "candle" / "Normal" / "9.png")
    rows.append("candle,test,anomaly,candle/Anomaly/0.png,candle/Masks/0.png")
    _png(root / "candle" / "Anomaly" / "0.png")
    _png(root / "candle" / "Masks" / "0.png", mask=True)
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    return root / "split_csv" / "1cls.csv"


def test_visa_split_csv_is_read(tmp_path: Path) -> None:
    (split,) = read_visa(tmp_path, make_visa(tmp_path))
    assert split.object_name == "candle" and len(split.train_good) == 2
    assert sorted(s.defect for s in split.test) == ["anomaly", "good"]


def test_visa_wrong_csv_and_mismatched_mask_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match="lacks the column"):
        read_visa(tmp_path, make_visa(tmp_path / "a", header="object,split,label,image,path"))
    csv_file = make_visa(tmp_path / "b")
    _png(tmp_path / "b" / "candle" / "Masks" / "0.png", size=(8, 8), mask=True)
    with pytest.raises(DatasetLayoutError, match="must have its image's size"):
        read_visa(tmp_path / "b", csv_file)
    csv_file = make_visa(tmp_path / "c")
    (tmp_path / "c" / "candle" / "Anomaly" / "0.png").unlink()
    with pytest.raises(DatasetLayoutError, match=r"line 5: image .*0\.png does not exist"):
        read_visa(tmp_path / "c", csv_file)


def test_udg_folder_is_split_by_defect_type_and_lot(tmp_path: Path) -> None:
    from unidg.core.udg import read_index
    from unidg.train.procedural import synthesize

    synthesize(tmp_path / "udg", count=60, seed=5, size=32, progress=False)
    quadruplets = {q.path("abnormal"): q for q in read_index(tmp_path / "udg")}
    splits = read_udg(tmp_path / "udg")
    assert splits
    for split in splits:
        train_files = {p.name for p in split.train_good} | {s.image.name for s in split.train_defects}
        assert not train_files & {s.image.name for s in split.test}
        train_types = {s.defect for s in split.train_defects}
        test_defects = [s for s in split.test if s.is_defect]
        assert test_defects and all(s.defect in train_types for s in test_defects)
        assert all(s.mask is not None for s in test_defects)
        # A defect type with several lots keeps each lot on one side.
        for defect in {s.defect for s in test_defects}:
            test_lots = {quadruplets[s.image].extra["lot"] for s in test_defects if s.defect == defect}
            train_lots = {quadruplets[s.image].extra["lot"] for s in split.train_defects if s.defect == defect}
            assert len(test_lots | train_lots) == 1 or not test_lots & train_lots
    with pytest.raises(DatasetLayoutError, match="no quadruplet of nothing"):
        read_udg(tmp_path / "udg", objects=["nothing"])
