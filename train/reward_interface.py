"""The interface every Consistency-RFT reward implements: a batch of generated targets with their inputs in, a score
per sample (and per-term details) out. The rewards themselves live in ``rewards``, ``judge`` and ``reward_recog``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from unidg.core.errors import UniDGError


class RewardError(UniDGError):
    """A reward could not score a sample; the message names the term, the sample and what to fix."""


@dataclass
class RewardInputs:
    """A batch of B generated targets with what they were generated from, all in the diptych's S x S halves."""

    reference: np.ndarray  # (B, S, S, 3) uint8 reference crop (the diptych's left half)
    reference_mask: np.ndarray  # (B, S, S) bool the defect in the reference crop
    generated: np.ndarray  # (B, S, S, 3) uint8 the generated target (the result diptych's right half)
    target_mask: np.ndarray  # (B, S, S) bool where the defect was to be painted
    source: np.ndarray | None = None  # (B, S, S, 3) uint8 the unedited target (None where unknown)
    categories: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        batch = len(self.generated)
        for name in ("reference", "reference_mask", "target_mask") + (("source",) if self.source is not None else ()):
            if len(getattr(self, name)) != batch:
                raise ValueError(f"reward inputs: {name} has {len(getattr(self, name))} rows, generated has {batch}")
        if not self.ids:
            self.ids = [str(i) for i in range(batch)]

    @property
    def batch(self) -> int:
        return len(self.generated)


@dataclass
class RewardOutput:
    scores: np.ndarray  # (B,) float64
    details: dict[str, np.ndarray] = field(default_factory=dict)  # per-term / per-dimension (B,) arrays


class Reward(Protocol):
    name: str

    def score(self, inputs: RewardInputs) -> RewardOutput: ...


def checked(name: str, output: RewardOutput, inputs: RewardInputs) -> RewardOutput:
    scores = np.asarray(output.scores, dtype=np.float64)
    if scores.shape != (inputs.batch,):
        raise RewardError(f"reward {name!r} returned {scores.shape} scores for a batch of {inputs.batch}")
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        raise RewardError(f"reward {name!r} gave a non-finite score for sample {inputs.ids[bad[0]]!r}")
    return RewardOutput(scores, output.details)
