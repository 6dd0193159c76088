"""UniDG-Text's data side: instructions from UDG captions (both forms) and the diptych without a reference."""

from __future__ import annotations

import numpy as np
import pytest

from unidg.core.errors import UniDGError
from unidg.core.geometry import build_diptych, build_text_diptych, defect_token_mask, paste_back
from unidg.core.instructions import REFERENCE_INSTRUCTION, defect_attributes, instruction
from unidg.core.udg import caption_stub


def _caption() -> dict:
    caption = caption_stub("scratch", "metal plate")
    caption["defect-level"][0].update(size="small", shape="linear", color="dark grey", edge="unknown", contrast="")
    return caption


def test_attributes_are_the_filled_fields_in_reading_order() -> None:
    assert defect_attributes(_caption()) == ["small", "linear", "dark grey"]
    assert defect_attributes({"defect-level": []}) == []


def test_both_forms_and_a_reproducible_choice() -> None:
    caption = _caption()
    assert instruction(caption, "scratch", with_reference=True) == REFERENCE_INSTRUCTION
    texts = {instruction(caption, "scratch", with_reference=False, seed=0, sample_id=f"{i:06d}") for i in range(200)}
    assert "Add the scratch defect to the image." in texts
    assert "Add the small, linear, dark grey scratch defect to the image." in texts
    for text in texts:
        assert text.startswith("Add the ") and text.endswith(" scratch defect to the image.")
    again = [instruction(caption, "scratch", with_reference=False, seed=0, sample_id=f"{i:06d}") for i in range(20)]
    assert again == [
        instruction(caption, "scratch", with_reference=False, seed=0, sample_id=f"{i:06d}") for i in range(20)
    ]
    other = [instruction(caption, "scratch", with_reference=False, seed=1, sample_id=f"{i:06d}") for i in range(20)]
    assert other != again
    with pytest.raises(UniDGError):
        instruction(caption, "sparkles", with_reference=False)


def test_the_diptych_without_a_reference_is_black_on_the_left_and_equal_on_the_right() -> None:
    rng = np.random.default_rng(0)
    source = rng.integers(0, 255, (80, 100, 3), dtype=np.uint8)
    target = np.zeros((80, 100), bool)
    target[30:50, 40:70] = True
    reference = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    reference_mask = np.zeros((64, 64), bool)
    reference_mask[20:30, 20:40] = True
    text = build_text_diptych(source, target, 64)
    full = build_diptych(reference, reference_mask, source, target, 64)
    assert not text.image[:, :64].any() and not text.reference.mask.any()
    assert np.array_equal(text.image[:, 64:], full.image[:, 64:])
    assert np.array_equal(text.mask, full.mask)
    tokens = defect_token_mask(text).reshape(4, 8)
    assert not tokens[:, :4].any() and tokens[:, 4:].any()  # only the target region gets defect attention
    assert np.array_equal(paste_back(text, full.source_square, source)[~text.dilated_mask], source[~text.dilated_mask])
