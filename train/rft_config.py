"""The config of ``unidg train rft`` (Consistency-RFT, ``unidg.train.rft``): its [rollout], [grpo] and [train]
tables on top of the [data], [lora], [optim] and [reward] tables the other recipes share."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from unidg.train.config import (
    ConfigError,
    DataConfig,
    LoraConfig,
    OptimConfig,
    _check,
    _settings,
    check_choice,
    check_fine_tuning_run,
    check_run_options,
    load_config,
)
from unidg.train.rewards import RewardConfig

NEGATIVE_REFERENCES = ("blank", "other")
KL_VARIANCES = ("flow_grpo", "step")
EMA_FILE = "ema.safetensors"


@dataclass
class RolloutConfig:
    group_size: int = 8  # G rollouts per prompt (paper: 8)
    steps: list[int] = field(default_factory=lambda: [8])  # step counts drawn per rollout (paper: T = 8)
    # FLUX guidance input in rollouts and held-out evaluation; < 0: the weights' settings (what SFT trained at and a
    # bundle samples at: 30 for FLUX.1-Fill, 1 for UniDG-nano). The paper's 3.5 tunes a regime never deployed.
    guidance: float = -1.0
    cfg_scales: list[float] = field(default_factory=lambda: [1.0])  # CFG scales drawn per rollout (1: no CFG)
    negative_reference: str = "blank"  # the CFG's negative condition: "blank" (white) or "other" (another prompt's)
    noise_level: float = 0.7  # a of the SDE sampler (Flow-GRPO: 0.7)
    micro_batch: int = 0  # rollouts per forward pass (0: all of one step count at once)

    def validate(self, where: str) -> None:
        _check(self.group_size >= 2, where, "rollout.group_size", "must be >= 2", self.group_size)
        _check(bool(self.steps) and all(s >= 1 for s in self.steps), where, "rollout.steps", "must be >= 1", self.steps)
        _check(
            bool(self.cfg_scales) and all(s > 0 for s in self.cfg_scales),
            where,
            "rollout.cfg_scales",
            "must be > 0 (1: no CFG)",
            self.cfg_scales,
        )
        check_choice(self.negative_reference, NEGATIVE_REFERENCES, where, "rollout.negative_reference")
        _check(self.noise_level > 0, where, "rollout.noise_level", "must be > 0", self.noise_level)
        _check(self.micro_batch >= 0, where, "rollout.micro_batch", "must be >= 0", self.micro_batch)


@dataclass
class GRPOConfig:
    beta: float = 0.001  # KL weight (paper: 0.001)
    # Which variance divides the KL (unidg.train.grpo): "flow_grpo" (the noise level's, without Delta t: Flow-GRPO's
    # official code, on which the paper's beta was set) or "step" (the transition's, with Delta t: the exact KL of
    # Eq. 16, 1 / Delta t = 3-25x stronger at the same beta).
    kl_variance: str = "flow_grpo"
    clip_range: float = 1e-5  # PPO clip of the ratio (paper: 1e-5; Flow-GRPO's code: 1e-4)
    adv_eps: float = 1e-5  # epsilon of Eq. 13 (paper: 1e-5)
    adv_clip: float = 5.0  # |A| bound (Flow-GRPO: 5; 0: off)
    inner_epochs: int = 1  # K of Alg. 3
    micro_batch: int = 0  # transitions per forward/backward pass (0: all)
    ema_decay: float = 0.9  # EMA of the LoRA weights after each step (0: off)

    def validate(self, where: str) -> None:
        _check(self.beta >= 0, where, "grpo.beta", "must be >= 0", self.beta)
        _check(self.clip_range > 0, where, "grpo.clip_range", "must be > 0", self.clip_range)
        check_choice(self.kl_variance, KL_VARIANCES, where, "grpo.kl_variance")
        _check(self.adv_eps > 0, where, "grpo.adv_eps", "must be > 0", self.adv_eps)
        _check(self.adv_clip >= 0, where, "grpo.adv_clip", "must be >= 0", self.adv_clip)
        _check(self.inner_epochs >= 1, where, "grpo.inner_epochs", "must be >= 1", self.inner_epochs)
        _check(self.micro_batch >= 0, where, "grpo.micro_batch", "must be >= 0", self.micro_batch)
        _check(0 <= self.ema_decay < 1, where, "grpo.ema_decay", "must be in [0, 1)", self.ema_decay)


@dataclass
class RFTLoopConfig:
    steps: int = 100
    batch_size: int = 1  # prompts per step over all processes (each gets group_size rollouts)
    device: str = "cpu"  # "cpu", "cuda" (under torchrun: cuda:LOCAL_RANK) or "cuda:N"
    precision: str = "fp32"  # "fp32" or "bf16" (autocast; on CUDA the frozen weights are stored in bf16)
    gradient_checkpointing: bool = False
    checkpoint_every: int = 10  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2
    mix: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  # defect-fill : intra-object : cross-object
    defect_attention: bool = True
    eval_every: int = 0  # steps between held-out evaluations (0: off; needs data.heldout)
    eval_pairs: int = 8  # held-out prompts, one ODE sample each at the first rollout step count
    threads: int = 0
    progress: bool = True

    def validate(self, where: str) -> None:
        check_run_options(self, where)
        _check(self.eval_every >= 0, where, "train.eval_every", "must be >= 0", self.eval_every)
        _check(self.eval_pairs >= 1, where, "train.eval_pairs", "must be >= 1", self.eval_pairs)


@dataclass
class RFTConfig:
    """``unidg train rft``: Consistency-RFT of a new LoRA on a merged SFT weights folder."""

    base: str = ""  # merged SFT weights folder (``unidg train merge`` output)
    output: str = ""
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(rank=64, alpha=128.0))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(name="adamw", lr=1e-4, weight_decay=1e-4))
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    train: RFTLoopConfig = field(default_factory=RFTLoopConfig)
    settings: dict = field(default_factory=dict)  # overrides of the base's unidg.json settings

    def validate(self, where: str) -> None:
        check_fine_tuning_run(self, where, "the merged SFT weights folder of `unidg train merge`")
        for section in (self.data, self.lora, self.optim, self.rollout, self.grpo, self.train):
            section.validate(where)
        self.reward.validate(f"{where} [reward]")
        if self.train.eval_every and not self.data.heldout:
            raise ConfigError(f"{where}: train.eval_every needs data.heldout (a UDG folder not used in training)")
        _settings(self.settings, where)


def load_rft_config(path: str | Path, overrides: list[str] | None = None) -> RFTConfig:
    return load_config(path, RFTConfig, overrides)
