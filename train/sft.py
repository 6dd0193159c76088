"""Diversity-SFT (paper Sec. 5.3, App. C): flow matching on the Fill layout with a LoRA, normal regularization and
defect attention; checkpoints that resume on the same loss curve.

Flow convention (the one the samplers integrate): sigma = t in [0, 1], x_t = t * noise + (1 - t) * x0, with x0 the
clean latents of D_res and noise ~ N(0, 1) (the paper's X1 = noise, X0 = data, Eq. 3); the model predicts the
velocity v = noise - x0 (Eq. 4), and a sampler steps x <- x + (sigma_next - sigma) * v from sigma = 1 to 0.
The predicted clean latents are z0_hat = x_t - t * v_hat. t is logit-normal (mu = 0, sigma = 1).

Loss = MSE(v_hat, noise - x0) over all image tokens (target-mask tokens optionally weighted up)
     + w * mean_b ReLU(mean_{i in target tokens of b} cos(z0_hat_i, z_normal_i) - tau)      (Eq. 9, tau = 0.5)

Determinism: which pairs a step sees and its noise/t are pure functions of (seed, step), and checkpoints hold the
trainable weights, the optimizer state (safetensors tensors + JSON scalars, no pickle) and the step; so a resumed run
reproduces the uninterrupted run's losses.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unidg.runtime.attention_bias import build_key_bias
from unidg.runtime.manifest import atomic_write_text
from unidg.runtime.settings import UniDGSettings
from unidg.train.config import LoraConfig, LossConfig, OptimConfig, SFTConfig, settings_of, to_dict
from unidg.train.dataset import LatentPairs

CHECKPOINTS = "checkpoints"
LOG_FILE = "log.jsonl"
LORA_FILE = "lora.safetensors"
LORA_CONFIG_FILE = "lora.json"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
STATE_FILE = "state.json"


# ============================================================================ losses
def logit_normal_t(generator: torch.Generator, batch: int, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """t ~ logit-normal(mean, std): sigmoid of a normal sample (Esser et al. 2024)."""
    return torch.sigmoid(mean + std * torch.randn(batch, generator=generator))


def velocity_mse(
    v_pred: torch.Tensor, v_target: torch.Tensor, token_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared velocity error over tokens and channels; ``token_weight`` (B, N) reweights tokens."""
    error = (v_pred.float() - v_target.float()).pow(2).mean(dim=-1)
    if token_weight is None:
        return error.mean()
    return (error * token_weight).sum() / token_weight.sum()


def normal_regularization(
    z0_pred: torch.Tensor, z_normal: torch.Tensor, target_tokens: torch.Tensor, tau: float = 0.5
) -> torch.Tensor:
    """Paper Eq. 9: mean over the batch of ReLU(s_b - tau), s_b = mean over target tokens of cos(z0_pred, z_normal).

    Samples without target tokens contribute 0.
    """
    cosine = F.cosine_similarity(z0_pred.float(), z_normal.float(), dim=-1, eps=1e-6)  # (B, N)
    weight = target_tokens.float()
    count = weight.sum(dim=1)
    mean_cos = (cosine * weight).sum(dim=1) / count.clamp(min=1.0)
    return torch.where(count > 0, F.relu(mean_cos - tau), torch.zeros_like(mean_cos)).mean()


@dataclass
class StepInputs:
    """What a loss evaluation needs besides the model; built from a cached batch."""

    x0: torch.Tensor
    cond: torch.Tensor
    reference: torch.Tensor
    key_bias: torch.Tensor | None
    defect_tokens: torch.Tensor
    target_tokens: torch.Tensor
    normal: torch.Tensor | None


def step_inputs(batch: dict[str, torch.Tensor], model, settings: UniDGSettings, defect_attention: bool) -> StepInputs:
    key_bias = None
    if defect_attention:
        key_bias = torch.from_numpy(
            build_key_bias(
                batch["defect_tokens"].numpy(),
                model.reference_tokens,
                settings.text_tokens,
                settings.alpha,
                settings.fold_text_tokens,
            )
        )
    elif settings.fold_text_tokens:
        # Folding is exact only with log K on the kept zero text key: keep it even without defect attention.
        nothing = np.zeros_like(batch["defect_tokens"].numpy())
        key_bias = torch.from_numpy(
            build_key_bias(nothing, model.reference_tokens, settings.text_tokens, 1.0, settings.fold_text_tokens)
        )
    return StepInputs(
        x0=batch["x0"],
        cond=batch["cond"],
        reference=batch["reference"],
        key_bias=key_bias,
        defect_tokens=batch["defect_tokens"],
        target_tokens=batch["target_tokens"],
        normal=batch.get("normal"),
    )


def flow_matching_loss(
    model,
    inputs: StepInputs,
    generator: torch.Generator,
    loss: LossConfig,
    guidance: float,
    img_ids: torch.Tensor,
    precision: str = "fp32",
) -> tuple[torch.Tensor, dict[str, float]]:
    """One Diversity-SFT loss evaluation; noise and t are drawn from ``generator`` (so a step is reproducible)."""
    batch = inputs.x0.shape[0]
    noise = torch.randn(inputs.x0.shape, generator=generator)
    t = logit_normal_t(generator, batch, loss.logit_mean, loss.logit_std)
    t_tokens = t[:, None, None]
    x_t = t_tokens * noise + (1.0 - t_tokens) * inputs.x0
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        ctx, txt_ids = model.context(model.encode_reference(inputs.reference))
        v_pred = model.velocity(x_t, inputs.cond, ctx, inputs.key_bias, t, guidance, img_ids, txt_ids)
    v_pred = v_pred.float()
    token_weight = None
    if loss.mask_weight != 1.0:
        token_weight = 1.0 + (loss.mask_weight - 1.0) * inputs.target_tokens.float()
    velocity = velocity_mse(v_pred, noise - inputs.x0, token_weight)
    total = velocity
    parts = {"velocity": float(velocity.detach())}
    if loss.normal_reg_weight > 0:
        if inputs.normal is None:
            raise ValueError("normal regularization needs the normal-counterpart latents; rebuild the latent cache")
        z0_pred = x_t - t_tokens * v_pred
        regularization = normal_regularization(z0_pred, inputs.normal, inputs.target_tokens, loss.normal_reg_tau)
        total = total + loss.normal_reg_weight * regularization
        parts["normal_reg"] = float(regularization.detach())
    parts["loss"] = float(total.detach())
    parts["t_mean"] = float(t.mean())
    return total, parts


# ============================================================================ data order
def step_generator(seed: int, step: int) -> torch.Generator:
    """The RNG of one training step: a pure function of (seed, step), so resuming needs no RNG state."""
    sequence = np.random.SeedSequence([int(seed), int(step), 0x5F7])
    return torch.Generator().manual_seed(int(sequence.generate_state(1, dtype=np.uint64)[0] >> 1))


def distribution_sequence(weights: Sequence[float], count: int) -> np.ndarray:
    """Deterministic interleaving of distributions in proportion to ``weights`` (1:1:1 -> 0,1,2,0,1,2,...)."""
    from fractions import Fraction

    shares = [Fraction(w).limit_denominator(10_000) for w in weights]
    total = sum(shares)
    shares = [share / total for share in shares]  # exact arithmetic: no drift over long runs
    credit = [Fraction(0)] * len(shares)
    out = np.empty(count, dtype=np.int64)
    for i in range(count):
        credit = [c + share for c, share in zip(credit, shares)]
        choice = max(range(len(credit)), key=lambda d: (credit[d], -d))
        credit[choice] -= 1
        out[i] = choice
    return out


def sample_schedule(
    pools: Sequence[np.ndarray], weights: Sequence[float], steps: int, batch_size: int, seed: int
) -> np.ndarray:
    """(steps, batch_size) dataset indices: distributions interleaved by ``weights``, each distribution's pairs in
    a fresh permutation per pass (every pair once per pass). Empty pools are dropped (their weight goes to the rest)."""
    weights = [w if len(pool) else 0.0 for w, pool in zip(weights, pools)]
    if sum(weights) <= 0:
        raise ValueError("no training pairs for the distributions with a non-zero mix weight")
    choices = distribution_sequence(weights, steps * batch_size)
    out = np.empty(steps * batch_size, dtype=np.int64)
    for d, pool in enumerate(pools):
        where = np.flatnonzero(choices == d)
        if where.size == 0:
            continue
        passes = -(-where.size // len(pool))
        rng = np.random.default_rng([int(seed), d, 0xDA7A])
        order = np.concatenate([rng.permutation(pool) for _ in range(passes)])
        out[where] = order[: where.size]
    return out.reshape(steps, batch_size)


# ============================================================================ optimizer
def build_optimizer(params: Sequence[nn.Parameter], optim: OptimConfig) -> torch.optim.Optimizer:
    if optim.name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(
            params,
            lr=optim.lr,
            betas=tuple(optim.betas),
            weight_decay=optim.weight_decay,
            eps=optim.eps,
            use_bias_correction=optim.use_bias_correction,
            safeguard_warmup=optim.safeguard_warmup,
            decouple=True,
        )
    return torch.optim.AdamW(
        params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay, eps=optim.eps
    )


def lr_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up to 1 over ``warmup_steps`` (step counts from 1), then constant."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


def optimizer_state_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and JSON-able scalars, without pickle."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for param_id, entries in state["state"].items():
        kept = {}
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param_id}.{name}"] = value.detach().cpu().contiguous()
            else:
                kept[name] = value
        scalars[str(param_id)] = kept
    groups = [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()} for group in state["param_groups"]
    ]
    return tensors, {"state": scalars, "param_groups": groups, "class": type(optimizer).__name__}


def optimizer_state_from_files(tensors: dict[str, torch.Tensor], document: dict) -> dict:
    state: dict[int, dict] = {int(k): dict(v) for k, v in document["state"].items()}
    for key, tensor in tensors.items():
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = tensor
    groups = []
    for group in document["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


# ============================================================================ LoRA
def lora_module_names(transformer: nn.Module, targets: Sequence[str]) -> list[str]:
    """Full names of the nn.Linear modules of the double and single blocks whose name ends with a target suffix."""
    names = []
    for name, module in transformer.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if not name.startswith(("transformer_blocks.", "single_transformer_blocks.")):
            continue
        if any(name == t or name.endswith("." + t) for t in targets):
            names.append(name)
    if not names:
        raise ValueError(f"lora.targets {list(targets)} match no linear layer of the transformer's blocks")
    return names


def add_lora(transformer: nn.Module, lora: LoraConfig, seed: int = 0) -> list[str]:
    """Inject LoRA adapters (peft) into the transformer's blocks; returns the adapted module names.

    lora_B starts at zero, so the adapted model computes exactly the base model until trained.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    names = lora_module_names(transformer, lora.targets)
    config = PeftLoraConfig(
        r=lora.rank, lora_alpha=lora.scale_alpha, lora_dropout=lora.dropout, target_modules=names, bias="none"
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        inject_adapter_in_model(config, transformer)
    for name, parameter in transformer.named_parameters():
        parameter.requires_grad_("lora_" in name)
    return names


def lora_state_dict(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA weights as ``{module}.lora_A.weight`` / ``{module}.lora_B.weight`` (adapter name dropped)."""
    out = {}
    for name, tensor in transformer.state_dict().items():
        if "lora_" in name:
            out[name.replace(".default", "")] = tensor.detach().cpu().contiguous()
    return out


def load_lora_state_dict(transformer: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    own = {name.replace(".default", ""): name for name in transformer.state_dict() if "lora_" in name}
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(f"LoRA weights do not fit the adapters: missing {missing[:4]}, unexpected {unexpected[:4]}")
    transformer.load_state_dict({own[k]: v for k, v in tensors.items()}, strict=False)


def save_lora(folder: str | Path, transformer: nn.Module, lora: LoraConfig, modules: list[str], extra: dict) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{LORA_FILE}.tmp"
    save_file(lora_state_dict(transformer), str(tmp), metadata={"format": "unidg-lora"})
    tmp.replace(folder / LORA_FILE)
    document = {"rank": lora.rank, "alpha": lora.scale_alpha, "targets": list(lora.targets), "modules": modules}
    atomic_write_text(folder / LORA_CONFIG_FILE, json.dumps({**document, **extra}, indent=2) + "\n")
    return folder / LORA_FILE


# ============================================================================ the loop
class FlowTrainer:
    """The flow-matching loop shared by ``unidg train base`` (inpainter stage) and ``unidg train sft``.

    ``trainable`` names the parameters that are optimized and checkpointed (LoRA weights, or the whole transformer +
    image encoder); everything else is frozen. ``run_dir`` receives ``log.jsonl`` and ``checkpoints/step-NNNNNN``.
    """

    def __init__(
        self,
        model,
        data: LatentPairs,
        trainable: dict[str, nn.Parameter],
        optimizer: torch.optim.Optimizer,
        schedule: np.ndarray,
        loss: LossConfig,
        settings: UniDGSettings,
        guidance: float,
        seed: int,
        run_dir: str | Path,
        precision: str = "fp32",
        grad_clip: float = 1.0,
        warmup_steps: int = 0,
        checkpoint_every: int = 0,
        keep_checkpoints: int = 2,
        defect_attention: bool = True,
        progress: bool = True,
        fingerprint: dict | None = None,
        description: str = "train",
    ) -> None:
        self.model = model
        self.data = data
        self.trainable = trainable
        self.optimizer = optimizer
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.schedule = schedule
        self.loss = loss
        self.settings = settings
        self.guidance = guidance
        self.seed = seed
        self.run_dir = Path(run_dir)
        self.precision = precision
        self.grad_clip = grad_clip
        self.warmup_steps = warmup_steps
        self.checkpoint_every = checkpoint_every
        self.keep_checkpoints = keep_checkpoints
        self.defect_attention = defect_attention
        self.progress = progress
        self.fingerprint = fingerprint or {}
        self.description = description
        size = data.resolution
        from unidg.train.model import image_ids

        self.img_ids = image_ids(size // 16, 2 * size // 16)
        self.step = 0

    @property
    def steps(self) -> int:
        return int(self.schedule.shape[0])

    # -------------------------------------------------------------- checkpoints
    def checkpoint_dir(self, step: int) -> Path:
        return self.run_dir / CHECKPOINTS / f"step-{step:06d}"

    def save_checkpoint(self) -> Path:
        from safetensors.torch import save_file

        final = self.checkpoint_dir(self.step)
        tmp = final.with_name(f".{final.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: p.detach().cpu().contiguous() for k, p in self.trainable.items()}, str(tmp / TRAINABLE_FILE))
        tensors, document = optimizer_state_to_files(self.optimizer)
        save_file(tensors, str(tmp / OPTIMIZER_TENSORS))
        (tmp / OPTIMIZER_JSON).write_text(json.dumps(document, indent=1) + "\n")
        (tmp / STATE_FILE).write_text(
            json.dumps({"step": self.step, "seed": self.seed, "fingerprint": self.fingerprint}, indent=2) + "\n"
        )
        shutil.rmtree(final, ignore_errors=True)
        tmp.replace(final)
        kept = sorted((self.run_dir / CHECKPOINTS).glob("step-*"))
        for old in kept[: -self.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def latest_checkpoint(self) -> Path | None:
        found = sorted((self.run_dir / CHECKPOINTS).glob("step-*"))
        return found[-1] if found else None

    def load_checkpoint(self, folder: str | Path) -> None:
        from safetensors.torch import load_file

        folder = Path(folder)
        state = json.loads((folder / STATE_FILE).read_text())
        if state.get("seed") != self.seed or state.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"checkpoint {folder} was made by a different run (seed, data or settings differ); "
                "resume with the same config, or start a new output folder"
            )
        if state["step"] > self.steps:
            raise ValueError(
                f"checkpoint {folder} is at step {state['step']}, past this run's {self.steps} steps; "
                "raise the steps to continue it, or start a new output folder"
            )
        weights = load_file(str(folder / TRAINABLE_FILE))
        if set(weights) != set(self.trainable):
            raise ValueError(f"checkpoint {folder} holds other trainable weights than this run; use the same config")
        with torch.no_grad():
            for name, parameter in self.trainable.items():
                parameter.copy_(weights[name])
        document = json.loads((folder / OPTIMIZER_JSON).read_text())
        tensors = load_file(str(folder / OPTIMIZER_TENSORS))
        self.optimizer.load_state_dict(optimizer_state_from_files(tensors, document))
        self.base_lrs = [group.get("initial_lr", group["lr"]) for group in self.optimizer.param_groups]
        self.step = int(state["step"])

    # -------------------------------------------------------------- one step
    def train_step(self, step: int) -> dict[str, float]:
        batch = self.data.batch(self.schedule[step - 1])
        inputs = step_inputs(batch, self.model, self.settings, self.defect_attention)
        generator = step_generator(self.seed, step)
        factor = lr_factor(step, self.warmup_steps)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["initial_lr"] = base_lr
            group["lr"] = base_lr * factor
        self.optimizer.zero_grad(set_to_none=True)
        total, parts = flow_matching_loss(
            self.model, inputs, generator, self.loss, self.guidance, self.img_ids, self.precision
        )
        total.backward()
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), self.grad_clip)
            parts["grad_norm"] = float(norm)
        self.optimizer.step()
        parts["lr"] = self.optimizer.param_groups[0]["lr"]
        if "d" in self.optimizer.param_groups[0]:  # Prodigy's adapted step size
            parts["prodigy_d"] = float(self.optimizer.param_groups[0]["d"])
        return parts

    def _trim_log(self, upto: int) -> None:
        path = self.run_dir / LOG_FILE
        if not path.is_file():
            return
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= upto]
        atomic_write_text(path, "".join(line + "\n" for line in kept))

    def run(self, resume: bool = False, stop_after: int | None = None, on_step: Callable | None = None) -> list[dict]:
        """Train to the end of the schedule (or ``stop_after`` steps, for tests); returns this call's log records."""
        from tqdm import tqdm

        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            latest = self.latest_checkpoint()
            if latest is not None:
                self.load_checkpoint(latest)
        self._trim_log(self.step)
        records = []
        last = self.steps if stop_after is None else min(self.steps, stop_after)
        self.model.train()
        bar = tqdm(total=self.steps, initial=self.step, desc=self.description, unit="step", disable=not self.progress)
        with open(self.run_dir / LOG_FILE, "a") as log:
            while self.step < last:
                started = time.perf_counter()
                parts = self.train_step(self.step + 1)
                self.step += 1
                elapsed = time.perf_counter() - started
                record = {"step": self.step, **parts, "it_s": 1.0 / max(elapsed, 1e-9), "time": time.time()}
                if not math.isfinite(record["loss"]):
                    raise FloatingPointError(f"loss became {record['loss']} at step {self.step}; lower the lr")
                log.write(json.dumps(record) + "\n")
                log.flush()
                records.append(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", it_s=f"{record['it_s']:.2f}")
                bar.update(1)
                if on_step is not None:
                    on_step(record)
                if self.checkpoint_every and self.step % self.checkpoint_every == 0 and self.step < self.steps:
                    self.save_checkpoint()
        bar.close()
        if self.step == self.steps:
            self.save_checkpoint()
        self.model.eval()
        return records


def read_log(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / LOG_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


# ============================================================================ unidg train sft
def prepare_pairs(folder: str | Path, seed: int, limit: int = 0):
    """All Diversity-SFT pairs of a UDG folder (deterministic for ``seed``)."""
    from unidg.runtime.udg import read_index
    from unidg.train.sampling import diversity_sft_pairs

    quadruplets = list(read_index(folder))
    if limit:
        quadruplets = quadruplets[:limit]
    if not quadruplets:
        raise ValueError(f"{folder} holds no quadruplets; make some with `unidg data synth --out {folder}`")
    return diversity_sft_pairs(quadruplets, seed)


def pools_of(data: LatentPairs) -> list[np.ndarray]:
    from unidg.train.sampling import DISTRIBUTIONS

    return [data.indices_of(name) for name in DISTRIBUTIONS]


def select_pairs(pairs, weights: Sequence[float]):
    """Only the pairs of distributions with a non-zero mix weight (those are all a run ever reads)."""
    from unidg.train.sampling import DISTRIBUTIONS

    wanted = {name for name, weight in zip(DISTRIBUTIONS, weights) if weight > 0}
    return [pair for pair in pairs if pair.distribution in wanted]


def training_guidance(configured: float, settings: UniDGSettings) -> float:
    return settings.guidance if configured < 0 else configured


@dataclass
class SFTRun:
    model: object
    trainer: FlowTrainer
    lora_modules: list[str]
    settings: UniDGSettings


def setup_sft(config: SFTConfig, model=None, data: LatentPairs | None = None) -> SFTRun:
    """Model (base + LoRA), cached data, optimizer and trainer of an SFT config (``model``/``data`` for tests)."""
    from unidg.train.model import UniDGModel

    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    settings = settings_of(config)
    if model is None:
        from unidg.train.loading import load_model

        model = load_model(config.base)
    if not isinstance(model, UniDGModel):
        raise TypeError("model must be a UniDGModel")
    model.settings = settings
    model.requires_grad_(False)
    run_dir = Path(config.output)
    if data is None:
        pairs = select_pairs(prepare_pairs(config.data.train, config.seed, config.data.limit), config.train.mix)
        cache_dir = run_dir / "cache" if config.data.cache else None
        data = LatentPairs.cached(
            model, pairs, settings, cache_dir, with_normal=config.loss.normal_reg_weight > 0, progress=True
        )
    if data.resolution != settings.resolution:
        raise ValueError(f"latents are at S={data.resolution} but settings.resolution is {settings.resolution}")
    modules = add_lora(model.transformer, config.lora, seed=config.seed)
    if config.train.gradient_checkpointing:
        model.transformer.enable_gradient_checkpointing()
    trainable = {f"transformer.{k}": p for k, p in model.transformer.named_parameters() if p.requires_grad}
    optimizer = build_optimizer(list(trainable.values()), config.optim)
    schedule = sample_schedule(
        pools_of(data), config.train.mix, config.train.steps, config.train.batch_size, config.seed
    )
    # Not the step count: the schedule's prefix and the lr (constant after warm-up) do not depend on it, so a finished
    # run resumed with more steps continues exactly as a longer run from scratch would.
    fingerprint = {
        "data": data.keys[:3] + [len(data.keys)],
        "config": {k: v for k, v in to_dict(config).items() if k not in ("train",)},
        "batch_size": config.train.batch_size,
        "mix": list(config.train.mix),
    }
    trainer = FlowTrainer(
        model,
        data,
        trainable,
        optimizer,
        schedule,
        config.loss,
        settings,
        training_guidance(config.train.guidance, settings),
        config.seed,
        run_dir,
        precision=config.train.precision,
        grad_clip=config.optim.grad_clip,
        warmup_steps=config.optim.warmup_steps,
        checkpoint_every=config.train.checkpoint_every,
        keep_checkpoints=config.train.keep_checkpoints,
        defect_attention=config.train.defect_attention,
        progress=config.train.progress,
        fingerprint=json.loads(json.dumps(fingerprint)),
        description="diversity-sft",
    )
    return SFTRun(model, trainer, modules, settings)


def train_sft(config: SFTConfig, resume: bool = True, model=None, data: LatentPairs | None = None) -> SFTRun:
    """``unidg train sft``: train, then write OUTPUT/lora.safetensors + lora.json (+ config.json, log.jsonl)."""
    run = setup_sft(config, model=model, data=data)
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output / "config.json", json.dumps(to_dict(config), indent=2) + "\n")
    started = time.time()
    run.trainer.run(resume=resume)
    extra = {
        "base": str(config.base),
        "settings": run.settings.to_dict(),
        "guidance_trained": run.trainer.guidance,
        "steps": run.trainer.step,
        "seconds": round(time.time() - started, 1),
    }
    save_lora(output, run.model.transformer, config.lora, run.lora_modules, extra)
    return run
