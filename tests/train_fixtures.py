"""Helpers the training tests share."""

from __future__ import annotations

from pathlib import Path

import pytest


def procedural_udg(tmp_path_factory: pytest.TempPathFactory, count: int) -> Path:
    """A small procedural UDG folder (64 px, seed 3): the training tests' data."""
    from unidg.train.procedural import synthesize

    folder = tmp_path_factory.mktemp("udg") / "train"
    synthesize(folder, count, seed=3, size=64, progress=False)
    return folder


def checkpoint_weights(run: Path, step: int) -> dict:
    """The trainable weights a training run saved at ``step``."""
    from safetensors.torch import load_file

    from unidg.train.checkpoints import CHECKPOINTS, TRAINABLE_FILE

    return load_file(str(run / CHECKPOINTS / f"step-{step:06d}" / TRAINABLE_FILE))
