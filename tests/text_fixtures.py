"""Helpers the UniDG-Text tests share: a tiny FLUX-layout text-encoder folder and the instructions to tokenize."""

from __future__ import annotations

from pathlib import Path

import pytest

# Non-ASCII, emoji, odd whitespace, contractions, digits and special-token look-alikes: where tokenizers diverge.
AWKWARD_TEXTS = [
    "Add the défaut de surface crack defect to the image.",
    "Add the 裂纹 defect to the image.",
    "Add the small 🙂 scratch defect to the image 🔧🔩.",
    "Ajoute la rayure à l'objet — très fine, ça s'étend.",
    "Migrate   the\tdefect\n\nfrom the reference image to the target scene.",
    "It's a 3.5 mm dent; we'll ADD it at 45° (don't move it).",
    "<|endoftext|> add the <pad> crack </s> defect <unk>",
    "Ｆｕｌｌｗｉｄｔｈ ｃｒａｃｋ and ﬁne ligatures",
    "Кратер на поверхности, 凹痕, 스크래치",
    "",
    " ",
]


def tokenizer_texts(count: int = 200) -> list[str]:
    """``count`` instructions of both forms, the awkward texts, and texts longer than CLIP's 77 and T5's 512 tokens."""
    from unidg.train.text_encoders import instruction_corpus

    long_instruction = " ".join(instruction_corpus(60, seed=5))
    return (
        instruction_corpus(count, seed=1) + AWKWARD_TEXTS + [long_instruction, "crack " * 700, "défaut 裂纹 🙂 " * 300]
    )


def tiny_text_folder(tmp_path_factory: pytest.TempPathFactory, seed: int = 0) -> Path:
    """Random nano text encoders with their tiny tokenizers, saved in FLUX's layout."""
    from unidg.train.text_encoders import make_text_encoders, save_text_encoders

    return save_text_encoders(make_text_encoders("nano", seed=seed), tmp_path_factory.mktemp("text") / "FLUX")
