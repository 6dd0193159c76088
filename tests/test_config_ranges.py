"""Every numeric value of every training / evaluation config schema is finite and in range at load: NaN, ±infinity,
-1 and 0 are tried on each one (through the same loader as a config file and ``--set``); a value that is refused is
refused naming its key, and the few values that are accepted are the documented ones (0: off / all / default)."""

from __future__ import annotations

import copy
import math
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest

from unidg.core.settings import UniDGSettings
from unidg.train.config import BaseConfig, ConfigError, SFTConfig, from_dict, load_config
from unidg.train.evaluation.config import EvalConfig
from unidg.train.judge import JudgeConfig
from unidg.train.reward_recog import RecogTrainConfig
from unidg.train.rft_config import RFTConfig

JUDGE = {"url": "http://127.0.0.1:9/v1", "model": "m", "weight": 0.5}
ROOTS: dict[str, tuple[type, dict]] = {
    "sft": (SFTConfig, {"base": "b", "output": "o", "data": {"train": "t"}}),
    "base": (BaseConfig, {"output": "o", "data": {"train": "t"}}),
    "rft": (
        RFTConfig,
        {"base": "b", "output": "o", "data": {"train": "t"}, "reward": {"judge": JUDGE, "color": {"weight": 1.0}}},
    ),
    "eval": (EvalConfig, {"output": "o", "data": {"path": "p"}}),
    "reward-recog": (RecogTrainConfig, {}),
}
# The values below 1 that mean something (documented beside each field); every other one must be refused.
ZERO_MEANS_SOMETHING = {
    "seed",  # a seed
    "seeds",
    "data.synth_seed",
    "data.limit",  # all
    "data.max_objects",
    "data.synth_count",  # no synthesis
    "lora.alpha",  # alpha = rank
    "lora.dropout",
    "optim.weight_decay",
    "optim.warmup_steps",
    "optim.grad_clip",  # off
    "loss.logit_mean",
    "loss.normal_reg_weight",  # off
    "loss.normal_reg_tau",
    "train.micro_batch",  # no accumulation
    "train.checkpoint_every",  # only at the end
    "train.guidance",
    "train.threads",  # torch's default
    "train.eval_every",  # off
    "vae.steps",
    "vae.kl_weight",
    "vae.color_weight",
    "vae.initial_log_variance",
    "vae.defect_crop_fraction",
    "vae.defect_weight",
    "vae.moment_weight",
    "vae.decoder_finetune_steps",
    "inpainter.steps",
    "inpainter.weight_decay",
    "inpainter.warmup_steps",
    "inpainter.grad_clip",
    "rollout.guidance",
    "rollout.micro_batch",
    "grpo.beta",  # no KL term
    "grpo.adv_clip",  # off
    "grpo.micro_batch",
    "grpo.ema_decay",  # no EMA
    "reward.judge.weight",  # term off
    "reward.judge.retries",
    "reward.judge.temperature",
    "reward.recog.weight",
    "reward.color.weight",
    "generation.steps",  # the bundle's
    "generation.consistency_threshold",  # in [0, 1]
    "generation.consistency_floor",
    "detectors.threads",
    "detectors.defects_per_set",  # each set's own count
    "report.bootstrap",  # no intervals
    "report.bootstrap_seed",
}
NEGATIVE_MEANS_SOMETHING = {
    "loss.logit_mean",  # mu of the logit-normal
    "loss.normal_reg_tau",  # in [-1, 1]
    "train.guidance",  # < 0: the settings' guidance
    "rollout.guidance",
    "vae.initial_log_variance",
    "vae.decoder_finetune_steps",  # -1: steps // 8
}


def numeric_leaves(cls: type, prefix: str = "") -> list[tuple[str, typing.Any]]:
    hints = typing.get_type_hints(cls)
    found = []
    for spec in fields(cls):
        annotation, key = hints[spec.name], prefix + spec.name
        if is_dataclass(annotation):
            found += numeric_leaves(annotation, key + ".")
            continue
        options = set(typing.get_args(annotation)) if typing.get_origin(annotation) is not list else set()
        item = typing.get_args(annotation)[0] if typing.get_origin(annotation) is list else None
        if annotation in (int, float) or item in (int, float) or float in options:
            found.append((key, annotation))
    return found


def with_value(base: dict, key: str, value: float, annotation: typing.Any) -> dict:
    data = copy.deepcopy(base)
    node = data
    *sections, name = key.split(".")
    for section in sections:
        node = node.setdefault(section, {})
    node[name] = [value] if typing.get_origin(annotation) is list else value
    return data


def load(cls: type, data: dict) -> typing.Any:
    config = from_dict(cls, data, "c.toml")
    config.validate("c.toml")
    return config


CASES = [
    (root, key, annotation, value)
    for root, (cls, _) in ROOTS.items()
    for key, annotation in numeric_leaves(cls)
    for value in (math.nan, math.inf, -math.inf, -1, 0)
]


def test_the_walk_covers_every_schema() -> None:
    keys = {key for _, key, _, _ in CASES}
    assert len(CASES) >= 650, len(CASES)  # 131 values x 5
    assert {"optim.lr", "grpo.beta", "rollout.noise_level", "reward.judge.timeout_s", "detectors.resnet_width"} <= keys
    for cls, base in ROOTS.values():
        load(cls, copy.deepcopy(base))  # the base of each walk is itself valid


@pytest.mark.parametrize(("root", "key", "annotation", "value"), CASES, ids=[f"{c[0]}:{c[1]}={c[3]}" for c in CASES])
def test_every_numeric_value_is_finite_and_in_range(root, key, annotation, value) -> None:
    cls, base = ROOTS[root]
    data = with_value(base, key, value, annotation)
    accepted = (value == 0 and key in ZERO_MEANS_SOMETHING) or (value == -1 and key in NEGATIVE_MEANS_SOMETHING)
    if accepted:
        load(cls, data)
        return
    with pytest.raises(ConfigError) as refused:
        load(cls, data)
    message = str(refused.value)
    name = key.split(".")[-1]  # reward-recog's values are command-line options: --resnet-width
    assert (name in message or "--" + name.replace("_", "-") in message) and "\n" not in message, message


@pytest.mark.parametrize("name", [f.name for f in fields(UniDGSettings) if f.type in ("int", "float")])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -1])
def test_every_settings_value_is_finite_and_in_range(name: str, value: float) -> None:
    """The [settings] table (UniDGSettings overrides): no NaN or infinity anywhere, no negative value."""
    cls, base = ROOTS["sft"]
    with pytest.raises(ConfigError, match=name):
        load(cls, {**base, "settings": {name: value}})


@pytest.mark.parametrize("text", ["optim.lr=inf", "grpo.beta=inf", "rollout.noise_level=inf", "optim.lr=nan"])
def test_set_overrides_of_non_finite_numbers_are_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "rft.toml"
    path.write_text('base = "b"\noutput = "o"\n[data]\ntrain = "t"\n[reward.color]\nweight = 1.0\n')
    with pytest.raises(ConfigError, match=rf"{text.split('=')[0]} must be a finite number \(got (inf|nan)\)"):
        load_config(path, RFTConfig, [text])


@pytest.mark.parametrize("key", ["timeout_s", "backoff_s", "max_backoff_s"])
@pytest.mark.parametrize("value", [math.nan, math.inf, 0.0])
def test_a_judge_config_made_in_code_is_checked_too(key: str, value: float) -> None:
    config = JudgeConfig(**{**JUDGE, key: value})
    with pytest.raises(ConfigError, match=f"judge.{key} must be a finite number of seconds > 0"):
        config.validate("judge")
