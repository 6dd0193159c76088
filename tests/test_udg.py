"""UDG quadruplet folders: categories, caption schema, writer/reader round trip, and refusals that name the index
line, the file and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unidg.core.udg import (
    CATEGORIES,
    DEFECT_LEVEL_FIELDS,
    INDEX_FILE,
    CaptionError,
    UDGError,
    UDGWriter,
    caption_problems,
    caption_stub,
    count_by,
    read_index,
    validate,
    validate_caption,
    write_quadruplet,
)

# Copied from the paper (App. A.2, "28 standardized categories ... in descending order by frequency").
PAPER_CATEGORIES = (
    "missing, combined, deformation, discoloration, breakage, dirt, scratch, dehiscence, bruise, raised, "
    "foreign matter, abrasion, indentation, unknown, hole, black spot, fold, misprint, wrinkle, graze, watermark, "
    "scraped, glue, knife grain, rust, bubble, unclear, bright line"
)


def arrays(height: int = 24, width: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    normal = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), dtype=bool)
    mask[4:9, 6:15] = True
    abnormal = normal.copy()
    abnormal[mask] = (200, 30, 10)
    return normal, abnormal, mask


def folder_with(tmp_path: Path, count: int = 3) -> Path:
    folder = tmp_path / "udg"
    with UDGWriter(folder) as writer:
        for i in range(count):
            normal, abnormal, mask = arrays(seed=i)
            category = CATEGORIES[i]
            writer.add(normal, abnormal, mask, caption_stub(category, "plate", mask), "plate", category)
    return folder


def index_lines(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / INDEX_FILE).read_text().splitlines()]


def rewrite_line(folder: Path, number: int, text: str) -> None:
    lines = (folder / INDEX_FILE).read_text().splitlines()
    lines[number - 1] = text
    (folder / INDEX_FILE).write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------- categories, captions
def test_categories_are_the_papers_28_in_order():
    assert CATEGORIES == tuple(PAPER_CATEGORIES.split(", "))
    assert len(set(CATEGORIES)) == 28


def test_caption_stub_follows_the_schema_and_says_what_it_knows():
    mask = np.zeros((30, 30), dtype=bool)
    mask[1:5, 24:29] = True  # 20 px of 900 = 2.2 %: medium, top-right
    caption = caption_stub("rust", "bolt", mask)
    assert caption_problems(caption) == []
    defect = caption["defect-level"][0]
    assert defect["type"] == "rust" and defect["size"] == "medium" and defect["location"] == "top-right"
    assert caption["image-level"][0]["foreground-object"] == "bolt"
    assert "Confidence" not in caption
    with pytest.raises(UDGError, match="unknown defect category 'rusty'.*one of the 28"):
        caption_stub("rusty", "bolt")


def test_caption_problems_name_every_departure_from_fig7():
    caption = caption_stub("hole", "plate")
    del caption["defect-level"][0]["depth"]
    caption["foreground-object-level"][0]["color"] = 3
    caption["summary"] = None
    caption["Confidence"] = 1.5
    problems = " | ".join(caption_problems(caption))
    assert "'depth'" in problems
    assert "fields color must be strings" in problems
    assert 'caption["summary"] must be a string' in problems
    assert "Confidence" in problems and "[0, 1]" in problems
    empty = caption_stub("hole", "plate")
    empty["defect-level"] = []
    assert any("at least one defect" in p for p in caption_problems(empty))
    assert caption_problems(["not", "a", "dict"]) == ["caption must be a JSON object, got list"]
    with pytest.raises(CaptionError, match="Fig. 7"):
        validate_caption({"summary": "x"})


def test_full_fig7_caption_with_confidence_is_valid():
    caption = {
        "image-level": [{"foreground-object": "bagel", "background": "white"}],
        "foreground-object-level": [
            dict.fromkeys(("viewpoint", "material", "texture", "structure", "color", "shape", "summary"), "x")
        ],
        "defect-level": [dict.fromkeys(DEFECT_LEVEL_FIELDS, "x"), dict.fromkeys(DEFECT_LEVEL_FIELDS, "y")],
        "summary": "A bagel with a crack and a hole.",
        "Confidence": 0.9,
    }
    assert caption_problems(caption) == []


# ------------------------------------------------------------------------------------------------- write and read
def test_writer_and_reader_round_trip(tmp_path):
    folder = folder_with(tmp_path, count=3)
    quadruplets = read_index(folder)
    assert [q.id for q in quadruplets] == ["000000", "000001", "000002"]
    assert [q.category for q in quadruplets] == list(CATEGORIES[:3])
    normal, abnormal, mask = arrays(seed=1)
    second = quadruplets[1]
    np.testing.assert_array_equal(second.load_normal(), normal)
    np.testing.assert_array_equal(second.load_abnormal(), abnormal)
    np.testing.assert_array_equal(second.load_mask(), mask)
    assert second.size == (24, 32) and second.object_name == "plate"
    with Image.open(second.path("mask")) as image:
        assert image.mode == "L" and set(np.unique(np.asarray(image))) == {0, 255}
    assert count_by(quadruplets, "object_name") == {"plate": 3}
    # A second writer appends after the existing ids; extra keys survive a read.
    write_quadruplet(folder, normal, abnormal, mask, caption_stub("hole", "cup"), "cup", "hole")
    with UDGWriter(folder) as writer:
        writer.add(normal, abnormal, mask, caption_stub("hole", "cup"), "cup", "hole", extra={"defect_type": "pit"})
    quadruplets = read_index(folder)
    assert [q.id for q in quadruplets][-2:] == ["000003", "000004"]
    assert quadruplets[-1].extra == {"defect_type": "pit"}
    assert quadruplets[-1].to_json()["defect_type"] == "pit"


def test_writer_refuses_bad_quadruplets_and_writes_nothing(tmp_path):
    normal, abnormal, mask = arrays()
    caption = caption_stub("hole", "plate")
    folder = tmp_path / "udg"
    with UDGWriter(folder) as writer:
        writer.add(normal, abnormal, mask, caption, "plate", "hole", sample_id="a")
        with pytest.raises(UDGError, match="already exists"):
            writer.add(normal, abnormal, mask, caption, "plate", "hole", sample_id="a")
        with pytest.raises(UDGError, match="mask is empty"):
            writer.add(normal, abnormal, np.zeros_like(mask), caption, "plate", "hole")
        with pytest.raises(UDGError, match="sizes differ"):
            writer.add(normal, abnormal, mask[:-1], caption, "plate", "hole")
        with pytest.raises(UDGError, match="unknown defect category"):
            writer.add(normal, abnormal, mask, caption, "plate", "crack")
        with pytest.raises(CaptionError):
            writer.add(normal, abnormal, mask, {"summary": "x"}, "plate", "hole")
        with pytest.raises(UDGError, match="ids are letters"):
            writer.add(normal, abnormal, mask, caption, "plate", "hole", sample_id="../x")
    assert len(index_lines(folder)) == 1
    assert sorted(p.name for p in (folder / "mask").iterdir()) == ["a.png"]


# ------------------------------------------------------------------------------------------------------ refusals
def test_missing_file_names_line_file_and_fix(tmp_path):
    folder = folder_with(tmp_path)
    (folder / "abnormal" / "000001.png").unlink()
    with pytest.raises(UDGError) as error:
        read_index(folder)
    message = str(error.value)
    assert f"{folder / INDEX_FILE} line 2:" in message
    assert str(folder / "abnormal" / "000001.png") in message
    assert "does not exist; add the file or fix the path" in message


def test_wrong_category_names_line_and_the_categories(tmp_path):
    folder = folder_with(tmp_path)
    entry = index_lines(folder)[2]
    entry["category"] = "crack"
    rewrite_line(folder, 3, json.dumps(entry))
    with pytest.raises(UDGError, match=r"index\.jsonl line 3: \"category\" 'crack' is not one of the 28") as error:
        read_index(folder)
    assert "breakage" in str(error.value)  # the fix: the list to map it to


def test_malformed_json_line_names_line_and_column(tmp_path):
    folder = folder_with(tmp_path)
    rewrite_line(folder, 2, '{"id": "000001", "normal": ')
    expected = r"index\.jsonl line 2: is not valid JSON \(Expecting value at column 27\); write one JSON object"
    with pytest.raises(UDGError, match=expected):
        read_index(folder)


def test_mask_size_mismatch_names_the_files_and_sizes(tmp_path):
    folder = folder_with(tmp_path)
    Image.fromarray(np.full((20, 32), 255, np.uint8)).save(folder / "mask" / "000000.png")
    with pytest.raises(UDGError, match=r"line 1: image sizes differ") as error:
        read_index(folder)
    message = str(error.value)
    assert f"mask {folder / 'mask' / '000000.png'} is 20x32" in message
    assert "must have the same HxW" in message


def test_empty_mask_is_refused(tmp_path):
    folder = folder_with(tmp_path)
    Image.fromarray(np.zeros((24, 32), np.uint8)).save(folder / "mask" / "000002.png")
    with pytest.raises(UDGError, match=r"line 3: \"mask\" file .*000002\.png is empty .* white \(255\) on black"):
        read_index(folder)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"normal": "../outside.png"}, "must be relative to the UDG folder"),
        ({"id": "000000"}, "repeats line 1"),
        ({"height": 10, "width": 32}, '"height"/"width" say 10x32'),
        ({"object_name": " "}, '"object_name" must be a non-empty string'),
        ({"caption": {"summary": "x"}}, "caption does not follow the Fig. 7 schema"),
    ],
)
def test_other_bad_lines(tmp_path, change, words):
    folder = folder_with(tmp_path)
    entry = {**index_lines(folder)[1], **change}
    rewrite_line(folder, 2, json.dumps(entry))
    with pytest.raises(UDGError, match="line 2: ") as error:
        read_index(folder)
    assert words in str(error.value)


def test_validate_lists_every_bad_line_and_keeps_the_good(tmp_path):
    folder = folder_with(tmp_path, count=4)
    rewrite_line(folder, 2, "not json")
    (folder / "normal" / "000003.png").unlink()
    valid, problems = validate(folder)
    assert [q.id for q in valid] == ["000000", "000002"]
    assert [p.line for p in problems] == [2, 4]
    assert all(str(folder / INDEX_FILE) in str(p) for p in problems)


def test_missing_folder_or_index(tmp_path):
    with pytest.raises(UDGError, match="is not a folder"):
        read_index(tmp_path / "nope")
    with pytest.raises(UDGError, match="has no index.jsonl"):
        read_index(tmp_path)
    (tmp_path / INDEX_FILE).write_text("\n")
    with pytest.raises(UDGError, match="lists no quadruplets"):
        read_index(tmp_path)
