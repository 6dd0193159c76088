"""The lean runtime's tokenizers (``tokenizers`` only) give transformers' ids, masks and truncation."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from text_fixtures import AWKWARD_TEXTS, tiny_text_folder, tokenizer_texts

from unidg.core.text import CLIP_MAX_LENGTH, T5_MAX_LENGTH, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE
from unidg.runtime.text_tokenizer import FluxTokenizers, TextTokenizer, TokenizerError
from unidg.train.text_encoders import TextEncoders, load_text_encoders

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tiny_text_folder(tmp_path_factory, seed=2)


@pytest.fixture(scope="module")
def encoders(folder: Path) -> TextEncoders:
    return load_text_encoders(folder)


@pytest.mark.parametrize("t5_length", [T5_MAX_LENGTH, 8])
def test_ids_and_masks_equal_transformers(folder: Path, encoders: TextEncoders, t5_length: int) -> None:
    texts = tokenizer_texts(200)
    assert len(texts) >= 214
    expected = encoders.tokenize(texts, max_length=t5_length)
    clip, t5 = FluxTokenizers(folder, t5_max_length=t5_length)(texts)
    assert clip.ids.shape == (len(texts), CLIP_MAX_LENGTH) and t5.ids.shape == (len(texts), t5_length)
    agree = {
        "clip": (clip.ids == expected["clip_ids"].numpy()).all(axis=1),
        "t5": (t5.ids == expected["t5_ids"].numpy()).all(axis=1),
    }
    for name, rows in agree.items():
        assert rows.all(), (
            f"{name}: {int((~rows).sum())} of {len(texts)} texts differ, e.g. {texts[int(np.argmin(rows))]!r}"
        )
    assert np.array_equal(clip.mask, expected["clip_mask"].numpy())
    assert np.array_equal(t5.mask, expected["t5_mask"].numpy())
    # The texts do exercise truncation, padding and characters outside the tiny vocabularies.
    assert clip.mask[-1].all() and not clip.mask[0].all()
    assert (t5.ids == encoders.t5_tokenizer.unk_token_id).any()
    assert len({tuple(row) for row in clip.ids}) > 100


def test_awkward_texts_tokenize_one_by_one_as_in_a_batch(folder: Path) -> None:
    tokenizer = TextTokenizer(folder / "tokenizer_2", 32)
    batch = tokenizer(AWKWARD_TEXTS)
    for index, text in enumerate(AWKWARD_TEXTS):
        assert np.array_equal(tokenizer([text]).ids[0], batch.ids[index])


def test_broken_tokenizer_folders_are_refused(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        TextTokenizer(tmp_path, 77)
    copy = tmp_path / "copy"
    shutil.copytree(folder / "tokenizer", copy)
    config = json.loads((copy / TOKENIZER_CONFIG_FILE).read_text())
    (copy / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config | {"pad_token": "<nothing>"}))
    with pytest.raises(TokenizerError, match="pad_token '<nothing>'"):
        TextTokenizer(copy, 77)
    (copy / TOKENIZER_FILE).write_text("{not json")
    with pytest.raises(TokenizerError, match="unreadable"):
        TextTokenizer(copy, 77)
    with pytest.raises(TokenizerError, match="non-empty list"):
        TextTokenizer(folder / "tokenizer", 77)("one string")


def test_the_runtime_tokenizer_imports_neither_torch_nor_transformers() -> None:
    tree = ast.parse((ROOT / "runtime" / "text_tokenizer.py").read_text())
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported.isdisjoint({"torch", "transformers", "diffusers"}), imported
