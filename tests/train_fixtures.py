"""Helpers the training tests share."""

from __future__ import annotations

from pathlib import Path

import pytest


def procedural_udg(tmp_path_factory: pytest.TempPathFactory, count: int, *, seed: int = 3, size: int = 64) -> Path:
    """A small procedural UDG folder (64 px, seed 3 unless told): the training tests' data."""
    from unidg.train.procedural import synthesize

    folder = tmp_path_factory.mktemp("udg") / "train"
    synthesize(folder, count, seed=seed, size=size, progress=False)
    return folder


def udg_fixture(count: int, *, seed: int = 3, size: int = 64):
    """A module-scoped ``udg`` fixture (``udg = udg_fixture(8)`` in a test module): ``procedural_udg`` of ``count``
    quadruplets, built once per module."""

    @pytest.fixture(scope="module")
    def udg(tmp_path_factory: pytest.TempPathFactory) -> Path:
        return procedural_udg(tmp_path_factory, count, seed=seed, size=size)

    return udg


def checkpoint_weights(run: Path, step: int) -> dict:
    """The trainable weights a training run saved at ``step``."""
    from safetensors.torch import load_file

    from unidg.train.checkpoints import CHECKPOINTS, TRAINABLE_FILE

    return load_file(str(run / CHECKPOINTS / f"step-{step:06d}" / TRAINABLE_FILE))


# The settings of the nano training tests: S = 64, 8 text tokens, no guidance.
SETTINGS = {"resolution": 64, "text_tokens": 8, "guidance": 1.0}


def nano_sft_config(
    udg: Path,
    output: Path,
    *,
    base: str | Path = "in-memory",
    data: object = None,
    optim: object = None,
    loss: object = None,
    settings: dict | None = None,
    **loop,
):
    """An SFT config of the training tests: rank-4 LoRA, AdamW 3e-3, no progress bar; ``loop`` sets [train] keys."""
    from unidg.train.config import DataConfig, LoopConfig, LoraConfig, LossConfig, OptimConfig, SFTConfig

    return SFTConfig(
        base=str(base),
        output=str(output),
        seed=0,
        data=data or DataConfig(train=str(udg)),
        lora=LoraConfig(rank=4, alpha=4.0),
        optim=optim or OptimConfig(name="adamw", lr=3e-3),
        loss=loss or LossConfig(normal_reg_weight=0.1, mask_weight=2.0),
        train=LoopConfig(**{"progress": False, **loop}),
        settings={**SETTINGS, **(settings or {})},
    )
