"""Rewards of Consistency-RFT behind one interface: a batch of generated targets and their inputs -> a score per
sample and per-term details, combined by configurable weights (paper Alg. 3: r = w_gen r_gen + w_det r_det).

A reward config (TOML, or the ``[reward]`` table of an RFT config) has one table per term; a term with weight 0 is
off. Terms:

- ``[judge]``: Defect-Und, a multimodal judge behind an OpenAI-compatible chat-completions API
  (``unidg.train.judge``); score = mean of its four Fig. 12 rubric scores / 5, in [0, 1].
- ``[recog]``: Defect-Recog, a classifier + segmenter folder of ``unidg train reward-recog``
  (``unidg.train.reward_recog``): mean of the category match and the normalised pixel AUROC / AP / PRO.
- ``[color]``: reference colour adherence, the criterion of ``unidg train eval-nano`` made continuous: with d_ref
  the distance of the generated region's mean RGB to the reference defect's mean RGB and d_src its distance to the
  unedited target's, score = d_src / (d_ref + d_src) in [0, 1] (1: the reference colour, 0: the source unchanged).

A reward is never silently zero: a term that cannot score a sample (server down, empty mask, NaN) raises
``RewardError`` naming the term and the sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from unidg.train.config import ConfigError, from_dict, read_config_file
from unidg.train.judge import DefectUndJudge, JudgeConfig
from unidg.train.reward_interface import Reward, RewardError, RewardInputs, RewardOutput, checked
from unidg.train.reward_recog import RECOG_JSON, DefectRecogReward


# ============================================================================ colour adherence
@dataclass
class ColorConfig:
    weight: float = 0.0


class ColorAdherenceReward:
    name = "color"

    def score(self, inputs: RewardInputs) -> RewardOutput:
        if inputs.source is None:
            raise RewardError("reward 'color' needs the unedited target (source) of every sample")
        scores, to_reference, to_source = [], [], []
        for b in range(inputs.batch):
            ref_mask, target_mask = inputs.reference_mask[b], inputs.target_mask[b]
            if not ref_mask.any() or not target_mask.any():
                which = "reference" if not ref_mask.any() else "target"
                raise RewardError(f"reward 'color': sample {inputs.ids[b]!r} has an empty {which} mask")
            reference = inputs.reference[b][ref_mask].astype(np.float64).mean(axis=0)
            generated = inputs.generated[b][target_mask].astype(np.float64).mean(axis=0)
            source = inputs.source[b][target_mask].astype(np.float64).mean(axis=0)
            d_ref, d_src = float(np.linalg.norm(generated - reference)), float(np.linalg.norm(generated - source))
            scores.append(0.5 if d_ref + d_src == 0 else d_src / (d_ref + d_src))
            to_reference.append(d_ref)
            to_source.append(d_src)
        return RewardOutput(
            np.array(scores), {"color/to_reference": np.array(to_reference), "color/to_source": np.array(to_source)}
        )


# ============================================================================ combination
@dataclass
class RecogConfig:
    weight: float = 0.0  # Defect-Recog (paper w_det = 0.5)
    checkpoint: str = ""  # folder written by `unidg train reward-recog`

    def validate(self, where: str) -> None:
        if not (Path(self.checkpoint) / RECOG_JSON).is_file():
            raise ConfigError(
                f"{where}: recog.checkpoint {self.checkpoint!r} is not a Defect-Recog folder (no {RECOG_JSON}); "
                "train one with `unidg train reward-recog --data UDG_FOLDER --out FOLDER`"
            )


@dataclass
class RewardConfig:
    """One table per term; weight 0 turns a term off (paper: w_gen = w_det = 0.5)."""

    judge: JudgeConfig = field(default_factory=JudgeConfig)
    recog: RecogConfig = field(default_factory=RecogConfig)
    color: ColorConfig = field(default_factory=ColorConfig)

    def validate(self, where: str) -> None:
        terms = {"judge": self.judge.weight, "recog": self.recog.weight, "color": self.color.weight}
        for name, weight in terms.items():
            if weight < 0:
                raise ConfigError(f"{where}: {name}.weight must be >= 0 (got {weight})")
        if not any(weight > 0 for weight in terms.values()):
            raise ConfigError(f"{where}: no reward term has a weight > 0; give [judge], [recog] or [color] a weight")
        if self.judge.weight > 0:
            self.judge.validate(where)
        if self.recog.weight > 0:
            self.recog.validate(where)


class WeightedReward:
    """r = sum_k w_k r_k over the configured terms; details hold each term's score and its own details."""

    name = "weighted"

    def __init__(self, terms: list[tuple[float, Reward]]) -> None:
        if not terms:
            raise ValueError("a weighted reward needs at least one term")
        self.terms = terms

    def score(self, inputs: RewardInputs) -> RewardOutput:
        total = np.zeros(inputs.batch)
        details: dict[str, np.ndarray] = {}
        for weight, reward in self.terms:
            output = checked(reward.name, reward.score(inputs), inputs)
            total += weight * output.scores
            details[reward.name] = output.scores
            details.update(output.details)
        return RewardOutput(total, details)

    def close(self) -> None:
        for _, reward in self.terms:
            close = getattr(reward, "close", None)
            if close is not None:
                close()


def build_reward(config: RewardConfig) -> WeightedReward:
    terms: list[tuple[float, Reward]] = []
    if config.judge.weight > 0:
        terms.append((config.judge.weight, DefectUndJudge(config.judge)))
    if config.recog.weight > 0:
        terms.append((config.recog.weight, DefectRecogReward(config.recog.checkpoint)))
    if config.color.weight > 0:
        terms.append((config.color.weight, ColorAdherenceReward()))
    return WeightedReward(terms)


def load_reward_config(path: str | Path) -> RewardConfig:
    """A reward config file (TOML/JSON with ``[judge]`` / ``[color]`` tables), validated."""
    config = from_dict(RewardConfig, read_config_file(path), str(path))
    config.validate(str(path))
    return config


__all__ = [
    "ColorAdherenceReward",
    "Reward",
    "RewardConfig",
    "RewardError",
    "RewardInputs",
    "RewardOutput",
    "WeightedReward",
    "build_reward",
    "checked",
    "load_reward_config",
]
