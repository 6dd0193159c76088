"""Helpers the UniDG-Text tests share: a tiny FLUX-layout text-encoder folder, the instructions to tokenize, and a
tiny merged UniDG-Text weights folder made by the commands users run."""

from __future__ import annotations

from dataclasses import replace
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


def tiny_text_weights(folder: Path, *, text_tokens: int = 32, resolution: int = 32) -> Path:
    """A merged UniDG-Text weights folder as users make one, on a tiny scale: a merged Diversity-SFT folder of the
    nano widths with one double and one single block (the nano text encoders' widths; half the export time of nano's
    six blocks), `unidg train text` (2 steps, random nano encoders kept in the run's text_encoders/, both instruction
    forms), then `unidg train merge`. Returns the merged folder (``folder/text-model``; the run is ``folder/run``)."""
    from unidg.cli import main
    from unidg.core.settings import UniDGSettings
    from unidg.train.loading import save_model
    from unidg.train.model import UniDGModel
    from unidg.train.presets import get_preset
    from unidg.train.procedural import synthesize

    synthesize(folder / "udg", 4, seed=3, size=resolution, progress=False)
    nano = get_preset("nano")
    preset = replace(
        nano,
        name="nano-2-blocks",
        transformer=replace(nano.transformer, num_layers=1, num_single_layers=1),
        image_encoder=replace(nano.image_encoder, num_hidden_layers=1),
    )
    settings = UniDGSettings(resolution=resolution, text_tokens=8, guidance=1.0)
    model = UniDGModel.from_preset(preset, seed=0, settings=settings)
    save_model(model, folder / "sft", metadata={"stage": "merged", "merge": {}})
    config = folder / "text.toml"
    config.write_text(
        f'base = "{folder / "sft"}"\noutput = "{folder / "run"}"\n[data]\ntrain = "{folder / "udg"}"\n'
        f"[settings]\ntext_tokens = {text_tokens}\n[lora]\nrank = 4\nalpha = 4.0\n"
        '[optim]\nname = "adamw"\nlr = 1e-3\n[train]\nsteps = 2\nbatch_size = 4\nprogress = false\n'
        '[text]\nrandom_encoders = "nano"\nno_reference = 0.5\n'
    )
    assert main(["train", "text", "--config", str(config)]) == 0
    merge = ["train", "merge", "--base", str(folder / "sft"), "--lora", str(folder / "run")]
    assert main([*merge, "--out", str(folder / "text-model")]) == 0
    return folder / "text-model"
