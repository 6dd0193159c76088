"""``unidg train rft``: Consistency-RFT (paper Sec. 3.4, App. D.2, Alg. 3) — Flow-GRPO on the merged SFT weights.

The merged SFT weights folder is the frozen base; a new LoRA (paper: r = 64, alpha = 128) is the policy, so the
reference policy of the KL term is the same model with the adapters switched off (peft's adapter layers disabled).
Each step, for each of ``train.batch_size`` prompts (reference/target pairs of the UDG folder, the Diversity-SFT
distributions mixed by ``train.mix``):

1. **Rollouts** (no gradient): G samples by the SDE sampler (``unidg.train.sde_sampler``), each with its own noise
   and its own draw of the App. D.2 variety: the step count from ``rollout.steps`` (paper: T = 8), the CFG scale from
   ``rollout.cfg_scales`` (1: none; otherwise v = v_neg + s (v - v_neg) with a negative reference: a blank white
   reference or another prompt's), at the FLUX guidance input ``rollout.guidance`` (default: the weights' own, what
   SFT trained at and inference uses; the paper's 3.5 on request). Every latent and every step's log-density is
   recorded.
2. **Rewards and advantages**: the configured reward (``unidg.train.rewards``) scores the decoded targets; Eq. 13
   per group.
3. **Policy update**: for ``grpo.inner_epochs`` epochs, the GRPO loss (``unidg.train.grpo``: clipped ratio + beta
   KL to the adapters-off policy) over every (rollout, step) transition, one AdamW step; then the EMA of the LoRA
   weights is updated.

Data-parallel on torch.distributed like SFT (``torchrun``; gloo on the CPU, NCCL on CUDA): the prompts of a step are
split over the processes (groups stay whole, so advantages are local), the loss is normalised by the global number of
transitions and the gradients are summed over processes. Which prompts, noises and variety a step uses are pure
functions of (seed, step), so a resumed run reproduces the uninterrupted run. ``lora.safetensors`` holds the EMA
weights (the raw ones with ``grpo.ema_decay = 0``) and ``unidg train merge`` folds them into the SFT weights.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from unidg.core.manifest import atomic_write_text
from unidg.core.staging import give_usual_mode
from unidg.train.config import (
    ConfigError,
    DataConfig,
    LoraConfig,
    OptimConfig,
    _check,
    _settings,
    check_run_options,
    load_config,
    to_dict,
)
from unidg.train.rewards import RewardConfig

NEGATIVE_REFERENCES = ("blank", "other")
KL_VARIANCES = ("flow_grpo", "step")
EMA_FILE = "ema.safetensors"


# ============================================================================ config
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
        _check(
            self.negative_reference in NEGATIVE_REFERENCES,
            where,
            "rollout.negative_reference",
            f"must be one of {list(NEGATIVE_REFERENCES)}",
            self.negative_reference,
        )
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
        _check(
            self.kl_variance in KL_VARIANCES,
            where,
            "grpo.kl_variance",
            f"must be one of {list(KL_VARIANCES)}",
            self.kl_variance,
        )
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
        if not self.base:
            raise ConfigError(f"{where}: 'base' is required (the merged SFT weights folder of `unidg train merge`)")
        if not self.output:
            raise ConfigError(f"{where}: 'output' is required (the run folder for checkpoints and logs)")
        _check(self.seed >= 0, where, "seed", "must be >= 0", self.seed)
        for section in (self.data, self.lora, self.optim, self.rollout, self.grpo, self.train):
            section.validate(where)
        self.reward.validate(f"{where} [reward]")
        if self.train.eval_every and not self.data.heldout:
            raise ConfigError(f"{where}: train.eval_every needs data.heldout (a UDG folder not used in training)")
        _settings(self.settings, where)


def load_rft_config(path: str | Path, overrides: list[str] | None = None) -> RFTConfig:
    return load_config(path, RFTConfig, overrides)


# ============================================================================ adapters and velocity
@contextlib.contextmanager
def adapters_disabled(module: nn.Module) -> Iterator[None]:
    """The reference policy: every peft adapter layer of ``module`` switched off (what PeftModel.disable_adapter
    does), restored on exit."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise ValueError("the model has no adapter layers to disable")
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


@dataclass
class PromptBatch:
    """Per-rollout conditioning rows (B rollouts) and the variety each was drawn with."""

    cond: torch.Tensor  # (B, N, 320)
    ctx: torch.Tensor  # (B, C, D)
    negative_ctx: torch.Tensor  # (B, C, D) the CFG's negative reference
    key_bias: torch.Tensor  # (B, C + N)
    cfg: torch.Tensor  # (B,)

    def rows(self, index: torch.Tensor | slice) -> PromptBatch:
        return PromptBatch(
            self.cond[index], self.ctx[index], self.negative_ctx[index], self.key_bias[index], self.cfg[index]
        )


def guided_velocity(model, x, sigma, prompts: PromptBatch, guidance: float, img_ids, txt_ids, precision: str):
    """v(x, sigma) with per-row CFG against the negative reference: v_neg + s (v - v_neg) where s != 1."""
    device = x.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        v = model.velocity(x, prompts.cond, prompts.ctx, prompts.key_bias, sigma, guidance, img_ids, txt_ids).float()
        guided = prompts.cfg != 1.0
        if bool(guided.any()):
            rows = torch.nonzero(guided).flatten()
            v_neg = model.velocity(
                x[rows],
                prompts.cond[rows],
                prompts.negative_ctx[rows],
                prompts.key_bias[rows],
                sigma[rows],
                guidance,
                img_ids,
                txt_ids,
            ).float()
            scale = prompts.cfg[rows].reshape(-1, 1, 1)
            v = v.clone()
            v[rows] = v_neg + scale * (v[rows] - v_neg)
    return v


# ============================================================================ the run
def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass
class Rollouts:
    """One step's rollouts in this process: R = prompts x G rows."""

    latents: list[torch.Tensor]  # R x (T_r + 1, N, 64)
    log_probs: list[torch.Tensor]  # R x (T_r,)
    sigmas: list[torch.Tensor]  # R x (T_r + 1,)
    prompts: PromptBatch
    rewards: torch.Tensor  # (P, G)
    advantages: torch.Tensor  # (R,)
    details: dict[str, float]


class RFTRun:
    """Model + adapters, prompts, reward, optimizer, EMA, checkpoints of an RFT config (``model`` for tests)."""

    def __init__(self, config: RFTConfig, model=None, placement=None, reward=None) -> None:
        from unidg.core.settings import UniDGSettings
        from unidg.train.lora import add_lora
        from unidg.train.model import UniDGModel, image_ids
        from unidg.train.pairs import prepare_pairs, select_pairs
        from unidg.train.rewards import build_reward
        from unidg.train.trainer import build_optimizer, current_placement, place_model, sample_schedule

        if config.train.threads:
            torch.set_num_threads(config.train.threads)
        self.config = config
        self.placement = placement or current_placement()
        device = self.placement.device
        if model is None:
            from unidg.train.loading import load_model

            base = Path(config.base)
            if not base.is_dir():
                raise ConfigError(f"base {base} not found; pass the merged SFT weights (`unidg train merge`)")
            dtype = torch.bfloat16 if device.type == "cuda" and config.train.precision == "bf16" else torch.float32
            model = load_model(base, dtype=dtype)
        if not isinstance(model, UniDGModel):
            raise TypeError("model must be a UniDGModel")
        model.settings = UniDGSettings.from_dict({**model.settings.to_dict(), **config.settings})
        model.requires_grad_(False)
        self.model = model
        self.settings = model.settings
        self.reward = reward if reward is not None else build_reward(config.reward)  # config errors surface here
        self.pairs = select_pairs(prepare_pairs(config.data.train, config.seed, config.data.limit), config.train.mix)
        self.heldout = []
        if config.train.eval_every:
            self.heldout = prepare_pairs(config.data.heldout, config.seed + 1)[: config.train.eval_pairs]
        self.modules = add_lora(model.transformer, config.lora, seed=config.seed)
        if config.train.gradient_checkpointing:
            model.transformer.enable_gradient_checkpointing()
        place_model(model, device, config.train.precision)
        self.trainable = {f"transformer.{k}": p for k, p in model.transformer.named_parameters() if p.requires_grad}
        self.optimizer = build_optimizer(list(self.trainable.values()), config.optim)
        self.ema = {name: p.detach().clone() for name, p in self.trainable.items()}
        from unidg.train.pairs import DISTRIBUTIONS

        pools = [np.flatnonzero([p.distribution == name for p in self.pairs]) for name in DISTRIBUTIONS]
        self.schedule = sample_schedule(
            pools, config.train.mix, config.train.steps, config.train.batch_size, config.seed
        )
        world = self.placement.world_size
        if config.train.batch_size % world:
            raise ConfigError(
                f"train.batch_size {config.train.batch_size} (prompts per step) does not split over {world} processes"
            )
        self.local_prompts = config.train.batch_size // world
        self.img_ids = image_ids(*self.settings.layout.token_hw, device=device)
        self.fingerprint = json.loads(
            json.dumps({"config": {k: v for k, v in to_dict(config).items() if k != "train"}, "pairs": len(self.pairs)})
        )
        self.run_dir = Path(config.output)
        self.step = 0
        self._blank: torch.Tensor | None = None

    # ------------------------------------------------------------------ prompts
    def _diptych(self, pair):
        return self.settings.diptych(
            pair.reference.load_abnormal(),
            pair.reference.load_mask(),
            pair.target.load_normal(),
            pair.target.load_mask(),
        )

    def _inputs(self, diptych):
        from unidg.core.geometry import defect_token_mask
        from unidg.train.sampler import prepare_inputs

        defect = defect_token_mask(diptych) if self.config.train.defect_attention else None
        return prepare_inputs(self.model, diptych.image, diptych.mask, defect)

    def _blank_ctx(self) -> torch.Tensor:
        if self._blank is None:
            size = self.model.reference_size
            white = torch.ones(1, 3, size, size, device=self.placement.device)
            with torch.no_grad():
                self._blank = self.model.context(self.model.encode_reference(white))[0].float()
        return self._blank

    def prompt_rows(self, inputs: list, repeats: int, cfg: torch.Tensor) -> PromptBatch:
        """Rows for ``repeats`` rollouts of each prompt (prompt-major), with the negative reference of each."""
        ctx = torch.cat([i.ctx for i in inputs])
        if self.config.rollout.negative_reference == "other" and len(inputs) > 1:
            negative = torch.roll(ctx, shifts=1, dims=0)
        else:
            negative = self._blank_ctx().expand_as(ctx)
        cond = torch.cat([i.cond for i in inputs])
        bias = torch.cat([i.key_bias for i in inputs])
        rep = lambda t: t.repeat_interleave(repeats, dim=0)  # noqa: E731
        return PromptBatch(rep(cond), rep(ctx), rep(negative), rep(bias), cfg.to(cond.device))

    # ------------------------------------------------------------------ rollouts
    def velocity(self, x, sigma, prompts: PromptBatch, txt_ids) -> torch.Tensor:
        guidance = self.config.rollout.guidance if self.config.rollout.guidance >= 0 else self.settings.guidance
        return guided_velocity(
            self.model, x, sigma, prompts, guidance, self.img_ids, txt_ids, self.config.train.precision
        )

    @torch.no_grad()
    def rollout_group(self, prompts: PromptBatch, steps: int, seeds: list[int], txt_ids, noise_level: float):
        from unidg.runtime.sampler import sampling_sigmas
        from unidg.train.sampler import get_noise
        from unidg.train.sde_sampler import sde_rollout

        tokens = prompts.cond.shape[1]
        sigmas = sampling_sigmas(steps, tokens).tolist()
        chunk = self.config.rollout.micro_batch or len(seeds)
        parts = []
        for start in range(0, len(seeds), chunk):
            rows = slice(start, start + chunk)
            batch = prompts.rows(rows)
            noise = get_noise(seeds[rows], tokens, self.placement.device)
            parts.append(
                sde_rollout(
                    lambda x, s, batch=batch: self.velocity(x, s, batch, txt_ids),
                    noise,
                    sigmas,
                    noise_level,
                    seeds[rows],
                )
            )
        latents = torch.cat([p.latents for p in parts])
        log_probs = torch.cat([p.log_probs for p in parts]) if parts[0].log_probs is not None else None
        return latents, log_probs, parts[0].sigmas

    def collect(self, step: int) -> Rollouts:
        from unidg.train.grpo import group_advantages
        from unidg.train.sampler import decode

        config, rollout = self.config, self.config.rollout
        rank = self.placement.rank
        first = rank * self.local_prompts
        positions = list(range(first, first + self.local_prompts))
        pairs = [self.pairs[int(self.schedule[step - 1][p])] for p in positions]
        diptychs = [self._diptych(pair) for pair in pairs]
        inputs = [self._inputs(d) for d in diptychs]
        group = rollout.group_size
        count = len(pairs) * group
        seeds, step_counts, cfg = [], [], []
        for p in positions:
            for g in range(group):
                seed = _derived_seed(config.seed, step, p, g, 0xA11)
                rng = np.random.default_rng(seed)
                seeds.append(seed)
                step_counts.append(int(rng.choice(rollout.steps)))
                cfg.append(float(rng.choice(rollout.cfg_scales)))
        prompts = self.prompt_rows(inputs, group, torch.tensor(cfg))
        txt_ids = inputs[0].txt_ids
        latents: list[torch.Tensor | None] = [None] * count
        log_probs: list[torch.Tensor | None] = [None] * count
        sigmas: list[torch.Tensor | None] = [None] * count
        self.model.eval()
        for steps in sorted(set(step_counts)):
            rows = [r for r in range(count) if step_counts[r] == steps]
            index = torch.tensor(rows)
            lat, logp, sig = self.rollout_group(
                prompts.rows(index.to(prompts.cond.device)),
                steps,
                [seeds[r] for r in rows],
                txt_ids,
                rollout.noise_level,
            )
            for k, r in enumerate(rows):
                latents[r], log_probs[r], sigmas[r] = lat[k], logp[k], sig
        finals = torch.stack([lat[-1] for lat in latents])
        images = decode(self.model, finals, inputs[0])
        reward_inputs = self._reward_inputs(diptychs, images, group, pairs)
        output = self.reward.score(reward_inputs)
        from unidg.train.rewards import checked

        output = checked(self.reward.name, output, reward_inputs)
        rewards = torch.from_numpy(output.scores).float().reshape(len(pairs), group)
        advantages = group_advantages(rewards, config.grpo.adv_eps, config.grpo.adv_clip).reshape(-1)
        details = {f"reward/{k}": float(np.mean(v)) for k, v in output.details.items()}
        return Rollouts(latents, log_probs, sigmas, prompts, rewards, advantages, details)

    def _reward_inputs(self, diptychs, images: np.ndarray, group: int, pairs):
        from unidg.train.rewards import RewardInputs

        rep = lambda items: np.stack([item for item in items for _ in range(group)])  # noqa: E731
        size = self.settings.resolution
        return RewardInputs(
            reference=rep([d.reference.image for d in diptychs]),
            reference_mask=rep([d.reference.mask for d in diptychs]),
            generated=images[:, :, size:],
            target_mask=rep([d.target_mask_square for d in diptychs]),
            source=rep([d.source_square for d in diptychs]),
            categories=[pair.reference.category for pair in pairs for _ in range(group)],
            ids=[f"{pair.reference.id}->{pair.target.id}#{g}" for pair in pairs for g in range(group)],
        )

    # ------------------------------------------------------------------ policy update
    def update(self, rollouts: Rollouts) -> dict[str, float]:
        from unidg.train.grpo import grpo_loss
        from unidg.train.sde_sampler import sde_step
        from unidg.train.trainer import _all_reduce_sum

        config, grpo = self.config, self.config.grpo
        transitions = [(r, j) for r, lp in enumerate(rollouts.log_probs) for j in range(lp.numel())]
        total = float(_all_reduce_sum(torch.tensor([float(len(transitions))], dtype=torch.float64), self.placement)[0])
        chunk = grpo.micro_batch or len(transitions)
        txt_ids = torch.zeros(rollouts.prompts.ctx.shape[1], 3, device=self.placement.device)
        sums = torch.zeros(4, dtype=torch.float64)  # policy, kl, clip fraction, |ratio - 1| (sums over rows)
        grad_norm = 0.0
        self.model.eval()
        for _ in range(grpo.inner_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            sums.zero_()
            for start in range(0, len(transitions), chunk):
                rows = transitions[start : start + chunk]
                r_index = torch.tensor([r for r, _ in rows])
                x = torch.stack([rollouts.latents[r][j] for r, j in rows])
                x_next = torch.stack([rollouts.latents[r][j + 1] for r, j in rows])
                sigma = torch.stack([rollouts.sigmas[r][j] for r, j in rows]).to(x.device)
                sigma_next = torch.stack([rollouts.sigmas[r][j + 1] for r, j in rows]).to(x.device)
                cap = torch.stack([rollouts.sigmas[r][1] for r, _ in rows]).to(x.device)
                old = torch.stack([rollouts.log_probs[r][j] for r, j in rows]).to(x.device)
                prompts = rollouts.prompts.rows(r_index.to(rollouts.prompts.cond.device))
                advantages = rollouts.advantages[r_index].to(x.device)
                noise_level = config.rollout.noise_level
                with torch.no_grad(), adapters_disabled(self.model.transformer):
                    v_ref = self.velocity(x, sigma, prompts, txt_ids)
                reference = sde_step(x, v_ref, sigma, sigma_next, noise_level, cap, x_next=x_next)
                v = self.velocity(x, sigma, prompts, txt_ids)
                step = sde_step(x, v, sigma, sigma_next, noise_level, cap, x_next=x_next)
                kl_scale = (sigma - sigma_next).float() if grpo.kl_variance == "flow_grpo" else None
                terms = grpo_loss(
                    step.log_prob,
                    old,
                    advantages,
                    grpo.clip_range,
                    grpo.beta,
                    step.mean,
                    reference.mean,
                    step.std,
                    kl_scale=kl_scale,
                )
                (terms.loss * (len(rows) / total)).backward()
                values = (terms.policy, terms.kl, terms.clip_fraction, terms.ratio_deviation)
                sums += torch.tensor([float(t.detach()) * len(rows) for t in values], dtype=torch.float64)
            self._reduce_gradients()
            if config.optim.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), config.optim.grad_clip))
            self.optimizer.step()
        self._update_ema()
        sums = _all_reduce_sum(sums, self.placement) / total
        return {
            "policy_loss": float(sums[0]),
            "kl": float(sums[1]),
            "clip_fraction": float(sums[2]),
            "ratio_deviation": float(sums[3]),
            "grad_norm": grad_norm,
            "transitions": total,
        }

    def _reduce_gradients(self) -> None:
        if self.placement.world_size == 1:
            return
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.trainable.values()]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for parameter, grad in zip(self.trainable.values(), grads):
            parameter.grad = flat[offset : offset + grad.numel()].view_as(grad).clone()
            offset += grad.numel()

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.config.grpo.ema_decay
        for name, parameter in self.trainable.items():
            self.ema[name].mul_(decay).add_(parameter.detach(), alpha=1.0 - decay)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, use_ema: bool = True) -> float:
        """Mean reward on the held-out prompts: one deterministic (ODE) sample each at the first rollout step
        count, with the EMA weights (what the merged folder will hold)."""
        from unidg.train.sampler import decode

        if not self.heldout:
            raise ValueError("no held-out prompts: set data.heldout and train.eval_every")
        with self.ema_weights(use_ema):
            diptychs = [self._diptych(pair) for pair in self.heldout]
            inputs = [self._inputs(d) for d in diptychs]
            prompts = self.prompt_rows(inputs, 1, torch.ones(len(inputs)))
            seeds = [_derived_seed(self.config.seed, i, 0xE7A1) for i in range(len(inputs))]
            lat, _, _ = self.rollout_group(prompts, self.config.rollout.steps[0], seeds, inputs[0].txt_ids, 0.0)
            images = decode(self.model, lat[:, -1], inputs[0])
        output = self.reward.score(self._reward_inputs(diptychs, images, 1, self.heldout))
        return float(np.mean(output.scores))

    @contextlib.contextmanager
    def ema_weights(self, enabled: bool = True) -> Iterator[None]:
        if not enabled or self.config.grpo.ema_decay == 0:
            yield
            return
        saved = {name: p.detach().clone() for name, p in self.trainable.items()}
        with torch.no_grad():
            for name, parameter in self.trainable.items():
                parameter.copy_(self.ema[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, parameter in self.trainable.items():
                    parameter.copy_(saved[name])

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        from safetensors.torch import save_file

        from unidg.train.trainer import (
            CHECKPOINTS,
            OPTIMIZER_JSON,
            OPTIMIZER_TENSORS,
            STATE_FILE,
            TRAINABLE_FILE,
            optimizer_state_to_files,
        )

        if not self.placement.is_main:
            return
        folder = self.run_dir / CHECKPOINTS
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"step-{self.step:06d}"
        tmp = folder / f".step-{self.step:06d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in self.trainable.items()}, str(tmp / TRAINABLE_FILE))
        save_file({k: v.cpu().contiguous() for k, v in self.ema.items()}, str(tmp / EMA_FILE))
        tensors, document = optimizer_state_to_files(self.optimizer)
        save_file(tensors, str(tmp / OPTIMIZER_TENSORS))
        (tmp / OPTIMIZER_JSON).write_text(json.dumps(document, indent=1) + "\n")
        state = {"step": self.step, "seed": self.config.seed, "fingerprint": self.fingerprint}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        for file in tmp.iterdir():
            give_usual_mode(file)
        shutil.rmtree(final, ignore_errors=True)
        tmp.replace(final)
        for old in sorted(folder.glob("step-*"))[: -self.config.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def latest_checkpoint(self) -> Path | None:
        from unidg.train.trainer import CHECKPOINTS

        found = sorted((self.run_dir / CHECKPOINTS).glob("step-*"))
        return found[-1] if found else None

    def load_latest(self) -> bool:
        from safetensors.torch import load_file

        from unidg.train.trainer import (
            CHECKPOINTS,
            OPTIMIZER_JSON,
            OPTIMIZER_TENSORS,
            STATE_FILE,
            TRAINABLE_FILE,
            optimizer_state_from_files,
        )

        found = sorted((self.run_dir / CHECKPOINTS).glob("step-*"))
        if not found:
            return False
        folder = found[-1]
        state = json.loads((folder / STATE_FILE).read_text())
        if state.get("seed") != self.config.seed or state.get("fingerprint") != self.fingerprint:
            raise ConfigError(
                f"checkpoint {folder} was made by a different run (seed, data or settings differ); "
                "resume with the same config, or start a new output folder"
            )
        if state["step"] > self.config.train.steps:
            raise ConfigError(
                f"checkpoint {folder} is at step {state['step']}, past this run's {self.config.train.steps}"
            )
        weights, ema = load_file(str(folder / TRAINABLE_FILE)), load_file(str(folder / EMA_FILE))
        if set(weights) != set(self.trainable):
            raise ConfigError(f"checkpoint {folder} holds other trainable weights than this run; use the same config")
        device = self.placement.device
        with torch.no_grad():
            for name, parameter in self.trainable.items():
                parameter.copy_(weights[name])
                self.ema[name] = ema[name].to(device)
        document = json.loads((folder / OPTIMIZER_JSON).read_text())
        self.optimizer.load_state_dict(optimizer_state_from_files(load_file(str(folder / OPTIMIZER_TENSORS)), document))
        self.step = int(state["step"])
        return True

    # ------------------------------------------------------------------ the loop
    def train_step(self, step: int) -> dict[str, float]:
        from unidg.train.trainer import _all_reduce_sum

        rollouts = self.collect(step)
        stats = self.update(rollouts)
        rewards = rollouts.rewards.double()
        moments = torch.tensor([float(rewards.sum()), float((rewards**2).sum()), float(rewards.numel())])
        moments = _all_reduce_sum(moments.double(), self.placement)
        mean = float(moments[0] / moments[2])
        std = math.sqrt(max(float(moments[1] / moments[2]) - mean**2, 0.0))
        keys = sorted(rollouts.details)  # every process has the same terms and as many rollouts
        values = _all_reduce_sum(torch.tensor([rollouts.details[k] for k in keys], dtype=torch.float64), self.placement)
        details = {k: float(v) / self.placement.world_size for k, v in zip(keys, values)}
        return {"reward_mean": mean, "reward_std": std, **stats, **details}

    def run(self, resume: bool = True, stop_after: int | None = None) -> list[dict]:
        from tqdm import tqdm

        from unidg.train.trainer import LOG_FILE, barrier, check_step_finite

        main = self.placement.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        barrier(self.placement)
        if resume:
            self.load_latest()
        log_path = self.run_dir / LOG_FILE
        if main and log_path.is_file():  # drop records past the checkpoint resumed from
            kept = [
                line for line in log_path.read_text().splitlines() if line and json.loads(line)["step"] <= self.step
            ]
            atomic_write_text(log_path, "".join(line + "\n" for line in kept))
        last = self.config.train.steps if stop_after is None else min(self.config.train.steps, stop_after)
        records = []
        bar = tqdm(
            total=self.config.train.steps,
            initial=self.step,
            desc="consistency-rft",
            unit="step",
            disable=not (self.config.train.progress and main),
        )
        every = self.config.train.eval_every
        with open(log_path, "a") if main else contextlib.nullcontext() as log:
            if every and self.step == 0 and main:
                record = {"step": 0, "heldout_reward": self.evaluate(use_ema=False), "time": time.time()}
                log.write(json.dumps(record) + "\n")
                records.append(record)
            while self.step < last:
                started = time.perf_counter()
                parts = self.train_step(self.step + 1)
                self.step += 1
                record = {"step": self.step, **parts, "seconds": round(time.perf_counter() - started, 3)}
                if every and self.step % every == 0 and main:
                    record["heldout_reward"] = self.evaluate()
                record["time"] = time.time()
                check_step_finite(
                    self.step,
                    {"policy_loss": record["policy_loss"], "kl": record["kl"]},
                    {**self.trainable, **{f"ema.{name}": value for name, value in self.ema.items()}},
                    self.latest_checkpoint(),
                    "lower optim.lr or grpo.beta and train into a new output folder",
                )
                if log is not None:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                records.append(record)
                bar.set_postfix(reward=f"{record['reward_mean']:.3f}", kl=f"{record['kl']:.2e}")
                bar.update(1)
                every_ckpt = self.config.train.checkpoint_every
                if every_ckpt and self.step % every_ckpt == 0 and self.step < self.config.train.steps:
                    self.save_checkpoint()
        bar.close()
        if self.step == self.config.train.steps:
            self.save_checkpoint()
        return records

    def save_lora(self) -> Path:
        """OUTPUT/lora.safetensors (EMA weights) + lora.json: what ``unidg train merge --lora OUTPUT`` reads."""
        from unidg.train.lora import save_lora

        extra = {
            "stage": "consistency-rft",
            "base": str(self.config.base),
            "settings": self.settings.to_dict(),
            "steps": self.step,
            "ema_decay": self.config.grpo.ema_decay,
            "weights": "ema" if self.config.grpo.ema_decay > 0 else "raw",
        }
        with self.ema_weights():
            return save_lora(self.run_dir, self.model.transformer, self.config.lora, self.modules, extra)


def train_rft(config: RFTConfig, resume: bool = True, model=None, reward=None) -> RFTRun:
    """``unidg train rft``: train, then write OUTPUT/lora.safetensors + lora.json (+ config.json, log.jsonl)."""
    from unidg.train.trainer import check_run_folder, distributed

    with distributed(config.train.device) as placement:
        output = check_run_folder(config.output)
        if placement.is_main:
            output.mkdir(parents=True, exist_ok=True)
            atomic_write_text(output / "config.json", json.dumps(to_dict(config), indent=2) + "\n")
        run = RFTRun(config, model=model, placement=placement, reward=reward)
        try:
            run.run(resume=resume)
        finally:
            close = getattr(run.reward, "close", None)
            if close is not None:
                close()
        if placement.is_main:
            run.save_lora()
            plot_rft_log(output / "log.jsonl", output / "curves.png")
        return run


def plot_rft_log(log_path: str | Path, out: str | Path) -> Path | None:
    """A PNG of an RFT log: the held-out reward at its evaluation steps, the rollouts' mean reward and the KL to the SFT
    policy per step. Returns its path, or None (with a line on stdout) where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print("curves.png skipped: matplotlib is not installed (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{log_path} holds no records: run `unidg train rft` first")
    evaluated = [(r["step"], r["heldout_reward"]) for r in records if "heldout_reward" in r]
    trained = [r for r in records if "reward_mean" in r]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    if evaluated:
        axes[0].plot(*zip(*evaluated), "o-", color="tab:green")
    axes[0].set(title="held-out mean reward (ODE samples)", xlabel="RFT step")
    axes[1].plot([r["step"] for r in trained], [r["reward_mean"] for r in trained], ".-", color="tab:blue")
    axes[1].set(title="rollout mean reward", xlabel="RFT step")
    axes[2].plot([r["step"] for r in trained], [r["kl"] for r in trained], ".-", color="tab:red")
    axes[2].set(title="KL to the SFT policy (per element)", xlabel="RFT step")
    for axis in axes:
        axis.grid(alpha=0.3)
    figure.tight_layout()
    out = Path(out)
    partial = out.with_name(f".{out.name}.partial.png")
    figure.savefig(partial, dpi=100)
    plt.close(figure)
    partial.replace(out)
    return out
