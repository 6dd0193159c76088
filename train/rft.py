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
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from tqdm import tqdm

from unidg.core.geometry import defect_token_mask
from unidg.core.settings import UniDGSettings
from unidg.runtime.sampler import sampling_sigmas
from unidg.train.checkpoints import LOG_FILE, CheckpointFolder, append_record, check_step_finite, trim_log
from unidg.train.config import ConfigError, to_dict
from unidg.train.grpo import group_advantages, grpo_loss
from unidg.train.lora import save_lora
from unidg.train.model import image_ids
from unidg.train.pairs import DISTRIBUTIONS, prepare_pairs, select_pairs
from unidg.train.rewards import RewardInputs, build_reward, checked
from unidg.train.rft_config import RFTConfig
from unidg.train.rft_curves import plot_rft_log
from unidg.train.rft_policy import PromptBatch, adapters_disabled, guided_velocity
from unidg.train.run_setup import attach_lora, frozen_model, limit_threads, open_run_folder
from unidg.train.sampler import decode, get_noise, prepare_inputs
from unidg.train.sde_sampler import sde_rollout, sde_step
from unidg.train.trainer import (
    all_reduce_sum,
    barrier,
    build_optimizer,
    current_placement,
    distributed,
    place_model,
    sample_schedule,
)

EMA_FILE = "ema.safetensors"


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
        limit_threads(config.train.threads)
        self.config = config
        self.placement = placement or current_placement()
        device = self.placement.device
        base = Path(config.base)
        if model is None and not base.is_dir():
            raise ConfigError(f"base {base} not found; pass the merged SFT weights (`unidg train merge`)")
        model = frozen_model(base, model, config.train.precision, self.placement)
        model.settings = UniDGSettings.from_dict({**model.settings.to_dict(), **config.settings})
        self.model = model
        self.settings = model.settings
        self.reward = reward if reward is not None else build_reward(config.reward)  # config errors surface here
        self.pairs = select_pairs(prepare_pairs(config.data.train, config.seed, config.data.limit), config.train.mix)
        self.heldout = []
        if config.train.eval_every:
            self.heldout = prepare_pairs(config.data.heldout, config.seed + 1)[: config.train.eval_pairs]
        self.modules, self.trainable = attach_lora(model, config.lora, config.seed, config.train.gradient_checkpointing)
        place_model(model, device, config.train.precision)
        self.optimizer = build_optimizer(list(self.trainable.values()), config.optim)
        self.ema = {name: p.detach().clone() for name, p in self.trainable.items()}
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
        self.checkpoints = CheckpointFolder(self.run_dir, config.train.keep_checkpoints)
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

        output = checked(self.reward.name, output, reward_inputs)
        rewards = torch.from_numpy(output.scores).float().reshape(len(pairs), group)
        advantages = group_advantages(rewards, config.grpo.adv_eps, config.grpo.adv_clip).reshape(-1)
        details = {f"reward/{k}": float(np.mean(v)) for k, v in output.details.items()}
        return Rollouts(latents, log_probs, sigmas, prompts, rewards, advantages, details)

    def _reward_inputs(self, diptychs, images: np.ndarray, group: int, pairs):
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
        config, grpo = self.config, self.config.grpo
        transitions = [(r, j) for r, lp in enumerate(rollouts.log_probs) for j in range(lp.numel())]
        total = float(all_reduce_sum(torch.tensor([float(len(transitions))], dtype=torch.float64), self.placement)[0])
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
        sums = all_reduce_sum(sums, self.placement) / total
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
        if not self.heldout:
            raise ConfigError("no held-out prompts: set data.heldout and train.eval_every")
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
        if not self.placement.is_main:
            return
        state = {"step": self.step, "seed": self.config.seed, "fingerprint": self.fingerprint}
        self.checkpoints.write(self.step, self.trainable, self.optimizer, state, extra={EMA_FILE: self.ema})

    def latest_checkpoint(self) -> Path | None:
        return self.checkpoints.latest()

    def load_latest(self) -> bool:
        folder = self.checkpoints.latest()
        if folder is None:
            return False
        config = self.config
        step = self.checkpoints.restore(
            folder, config.seed, self.fingerprint, config.train.steps, self.trainable, self.optimizer
        )
        ema = load_file(str(folder / EMA_FILE))
        for name in self.trainable:
            self.ema[name] = ema[name].to(self.placement.device)
        self.step = step
        return True

    # ------------------------------------------------------------------ the loop
    def train_step(self, step: int) -> dict[str, float]:
        rollouts = self.collect(step)
        stats = self.update(rollouts)
        rewards = rollouts.rewards.double()
        moments = torch.tensor([float(rewards.sum()), float((rewards**2).sum()), float(rewards.numel())])
        moments = all_reduce_sum(moments.double(), self.placement)
        mean = float(moments[0] / moments[2])
        std = math.sqrt(max(float(moments[1] / moments[2]) - mean**2, 0.0))
        keys = sorted(rollouts.details)  # every process has the same terms and as many rollouts
        values = all_reduce_sum(torch.tensor([rollouts.details[k] for k in keys], dtype=torch.float64), self.placement)
        details = {k: float(v) / self.placement.world_size for k, v in zip(keys, values)}
        return {"reward_mean": mean, "reward_std": std, **stats, **details}

    def run(self, resume: bool = True, stop_after: int | None = None) -> list[dict]:
        main = self.placement.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        barrier(self.placement)
        if resume:
            self.load_latest()
        log_path = self.run_dir / LOG_FILE
        if main:  # drop records past the checkpoint resumed from
            trim_log(self.run_dir, self.step)
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
                append_record(log, records, record)
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
                append_record(log, records, record)
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
    with distributed(config.train.device) as placement:
        output = open_run_folder(config, placement)
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
