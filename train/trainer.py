"""The flow-matching trainer shared by ``unidg train base`` (inpainter stage) and ``unidg train sft``: device and
precision, data order, optimizer, checkpoints, and data-parallel training on torch.distributed.

Distributed: one process per GPU (or per CPU worker), launched by ``torchrun``; the trainer wraps the objective in
DistributedDataParallel (NCCL on CUDA, gloo on the CPU). The global batch ``train.batch_size`` is split evenly over
the processes and, within a process, into micro-batches of ``train.micro_batch`` with gradient accumulation. Which
pairs a step sees and their noise and t are pure functions of (seed, step, position in the global batch), and the
loss is normalised by the global batch's totals, so a run gives the same loss curve and weights at any world size
and accumulation (up to the order of float sums) and a checkpoint written at one world size resumes at another.
Only rank 0 writes the log, the progress bar and checkpoints.

Checkpoints (``unidg.train.checkpoints``) hold the trainable weights, the optimizer state and the step; a resumed run
reproduces the uninterrupted run's losses.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from unidg.core.errors import UniDGError
from unidg.core.layout import DiptychLayout
from unidg.core.settings import UniDGSettings
from unidg.train.checkpoints import LOG_FILE, CheckpointFolder, append_record, check_step_finite, trim_log
from unidg.train.config import ConfigError, LoopConfig, LossConfig, OptimConfig
from unidg.train.flow import (
    FlowObjective,
    combine_terms,
    draw_noise_and_t,
    step_generator,
    step_inputs,
    token_weights,
)
from unidg.train.model import image_ids

DEVICE_PATTERN = re.compile(r"^(cpu|cuda|cuda:\d+)$")


# ============================================================================ device and processes
class DeviceError(UniDGError):
    """The requested training device does not exist on this machine."""


def check_run_folder(output: str | Path, what: str = "run folder") -> Path:
    """Refuse, before any work, an ``output`` folder that is a file or that cannot be created or written."""
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output {path} is a file; name a {what} (new, or one to resume)")
    place = path
    while not place.exists() and place != place.parent:
        place = place.parent
    if not place.is_dir():
        raise ConfigError(f"output {path}: {place} is a file, not a folder; name a {what} inside a folder")
    if not os.access(place, os.W_OK | os.X_OK):
        raise ConfigError(f"output {path}: {place} is not writable; name a {what} you can write in")
    return path


@dataclass(frozen=True)
class Placement:
    """Where this process trains: its device, its rank and the number of processes."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``cpu``, ``cuda`` (this process's GPU: cuda:LOCAL_RANK) or ``cuda:N``; refused clearly where it is absent."""
    if not DEVICE_PATTERN.match(name):
        raise DeviceError(f"--device {name!r}: use cpu, cuda or cuda:N")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise DeviceError(
            f"--device {name}: no CUDA device is available (torch {torch.__version__}, {build}); "
            "train with --device cpu, or install a CUDA build of torch on a machine with an NVIDIA GPU"
        )
    index = local_rank if name == "cuda" else int(name.split(":")[1])
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(f"--device {name}: this machine has {count} CUDA device(s) (0-{count - 1})")
    return torch.device("cuda", index)


@contextlib.contextmanager
def distributed(device: str) -> Iterator[Placement]:
    """This process's placement; under ``torchrun`` (WORLD_SIZE > 1) the process group is joined here (NCCL on
    CUDA, gloo on the CPU) and left on exit."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield Placement(resolve_device(device))
        return
    import torch.distributed as dist

    if re.match(r"^cuda:\d+$", device):
        raise DeviceError(f"--device {device} picks one GPU; under torchrun pass --device cuda (cuda:LOCAL_RANK each)")
    resolved = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    joined = not dist.is_initialized()
    if joined:
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
    try:
        yield Placement(resolved, dist.get_rank(), dist.get_world_size())
    finally:
        if joined:
            dist.destroy_process_group()


def current_placement(device: torch.device | str = "cpu") -> Placement:
    """The placement of a process that is already in a process group (or alone)."""
    import torch.distributed as dist

    device = torch.device(device)
    if dist.is_available() and dist.is_initialized():
        return Placement(device, dist.get_rank(), dist.get_world_size())
    return Placement(device)


def place_model(model: nn.Module, device: torch.device, precision: str) -> None:
    """Move the model to ``device``; with bf16 on CUDA the frozen weights are stored in bf16 (trainable ones and the
    optimizer state stay fp32). Parameters keep their identity, so an optimizer built before stays valid."""
    model.to(device)
    if device.type == "cuda" and precision == "bf16":
        for parameter in model.parameters():
            if not parameter.requires_grad and parameter.dtype == torch.float32:
                parameter.data = parameter.data.to(torch.bfloat16)


def all_reduce_sum(values: torch.Tensor, placement: Placement) -> torch.Tensor:
    if placement.world_size == 1:
        return values
    import torch.distributed as dist

    values = values.to(placement.device)
    dist.all_reduce(values)
    return values.cpu()


def barrier(placement: Placement) -> None:
    if placement.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def process_seed(seed: int, step: int, rank: int) -> int:
    """Seed of torch's global RNG for one process and step (only LoRA dropout draws from it)."""
    sequence = np.random.SeedSequence([int(seed), int(step), int(rank), 0xD0])
    return int(sequence.generate_state(1, dtype=np.uint64)[0] >> 1)


# ============================================================================ data order
def distribution_sequence(weights: Sequence[float], count: int) -> np.ndarray:
    """Deterministic interleaving of distributions in proportion to ``weights`` (1:1:1 -> 0,1,2,0,1,2,...)."""
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
        raise UniDGError("no training pairs for the distributions with a non-zero mix weight")
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
def run_options(train: LoopConfig) -> dict:
    """The FlowTrainer keywords every recipe (base inpainter, Diversity-SFT) takes from its [train] table."""
    return {
        "precision": train.precision,
        "checkpoint_every": train.checkpoint_every,
        "keep_checkpoints": train.keep_checkpoints,
        "defect_attention": train.defect_attention,
        "progress": train.progress,
        "micro_batch": train.micro_batch,
    }


def training_guidance(configured: float, settings: UniDGSettings) -> float:
    return settings.guidance if configured < 0 else configured


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


# ============================================================================ the loop
class FlowTrainer:
    """The flow-matching loop shared by ``unidg train base`` (inpainter stage) and ``unidg train sft``.

    ``trainable`` names the parameters that are optimized and checkpointed (LoRA weights, or the whole transformer +
    image encoder); everything else is frozen. ``run_dir`` receives ``log.jsonl`` and ``checkpoints/step-NNNNNN``.
    ``schedule`` (steps, global batch) lists the pairs of each step; ``micro_batch`` (0: this process's whole share)
    sets gradient accumulation.
    """

    def __init__(
        self,
        model,
        data,
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
        placement: Placement | None = None,
        micro_batch: int = 0,
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
        self.placement = placement or current_placement()
        self.global_batch = int(schedule.shape[1])
        world = self.placement.world_size
        if self.global_batch % world:
            raise UniDGError(
                f"train.batch_size {self.global_batch} (the global batch) does not split over {world} processes; "
                f"use a multiple of {world}, or launch a world size that divides it"
            )
        self.local_batch = self.global_batch // world
        self.micro_batch = micro_batch or self.local_batch
        if self.local_batch % self.micro_batch:
            raise UniDGError(
                f"train.micro_batch {self.micro_batch} does not divide the {self.local_batch} pairs each of the "
                f"{world} process(es) gets of train.batch_size {self.global_batch}; pick a divisor of "
                f"{self.local_batch} (0: all of them)"
            )
        device = self.placement.device
        place_model(model, device, precision)
        token_hw = DiptychLayout(data.resolution).token_hw
        objective = FlowObjective(model, loss, guidance, image_ids(*token_hw), precision).to(device)
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # device_ids=None: inputs are already on this process's device (and CPU modules need None).
            objective = DistributedDataParallel(objective, device_ids=None, gradient_as_bucket_view=True)
        self.objective = objective
        self.checkpoints = CheckpointFolder(self.run_dir, keep_checkpoints)
        self.step = 0

    @property
    def steps(self) -> int:
        return int(self.schedule.shape[0])

    @property
    def accumulation(self) -> int:
        return self.local_batch // self.micro_batch

    # -------------------------------------------------------------- checkpoints
    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints.path(step)

    def save_checkpoint(self) -> Path:
        """Rank 0 writes (temp folder, then rename); every process waits for it."""
        final = self.checkpoint_dir(self.step)
        if self.placement.is_main:
            self._write_checkpoint(final)
        barrier(self.placement)
        return final

    def _write_checkpoint(self, final: Path) -> None:
        state = {"step": self.step, "seed": self.seed, "fingerprint": self.fingerprint}
        state["world_size"] = self.placement.world_size  # informative: any world size resumes it
        self.checkpoints.write(self.step, self.trainable, self.optimizer, state)

    def latest_checkpoint(self) -> Path | None:
        return self.checkpoints.latest()

    def load_checkpoint(self, folder: str | Path) -> None:
        self.step = self.checkpoints.restore(
            folder, self.seed, self.fingerprint, self.steps, self.trainable, self.optimizer
        )
        self.base_lrs = [group.get("initial_lr", group["lr"]) for group in self.optimizer.param_groups]

    # -------------------------------------------------------------- one step
    def train_step(self, step: int) -> dict[str, float]:
        placement, loss = self.placement, self.loss
        device = placement.device
        indices = self.schedule[step - 1]
        first = placement.rank * self.local_batch
        batch = self.data.batch(indices[first : first + self.local_batch])
        inputs = step_inputs(batch, self.model, self.settings, self.defect_attention).to(device)
        noise, t = draw_noise_and_t(step_generator(self.seed, step), (self.global_batch, *inputs.x0.shape[1:]), loss)
        local_weight = token_weights(inputs.target_tokens, loss.mask_weight).sum().double().cpu()
        weight_total = float(all_reduce_sum(local_weight.reshape(1), placement)[0])
        factor = lr_factor(step, self.warmup_steps)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["initial_lr"] = base_lr
            group["lr"] = base_lr * factor
        self.optimizer.zero_grad(set_to_none=True)
        torch.manual_seed(process_seed(self.seed, step, placement.rank))
        sums = torch.zeros(2, dtype=torch.float64)
        for k in range(self.accumulation):
            start, stop = k * self.micro_batch, (k + 1) * self.micro_batch
            rows = slice(first + start, first + stop)
            last = k == self.accumulation - 1
            sync = contextlib.nullcontext() if placement.world_size == 1 or last else self.objective.no_sync()
            with sync:
                terms = self.objective(inputs.rows(start, stop), noise[rows].to(device), t[rows].to(device))
                share = combine_terms(terms.velocity, terms.hinge, weight_total, self.global_batch, loss)
                # DDP averages gradients over processes; each process holds 1/world of the global loss.
                (share * placement.world_size).backward()
            sums += torch.tensor([float(terms.velocity.detach()), float(terms.hinge.detach())], dtype=torch.float64)
        sums = all_reduce_sum(sums, placement)
        velocity, normal_reg = float(sums[0]) / weight_total, float(sums[1]) / self.global_batch
        parts = {"velocity": velocity}
        if loss.normal_reg_weight > 0:
            parts["normal_reg"] = normal_reg
        parts["loss"] = velocity + loss.normal_reg_weight * normal_reg
        parts["t_mean"] = float(t.mean())
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), self.grad_clip)
            parts["grad_norm"] = float(norm)
        self.optimizer.step()
        parts["lr"] = self.optimizer.param_groups[0]["lr"]
        if "d" in self.optimizer.param_groups[0]:  # Prodigy's adapted step size
            parts["prodigy_d"] = float(self.optimizer.param_groups[0]["d"])
        return parts

    def run(self, resume: bool = False, stop_after: int | None = None, on_step: Callable | None = None) -> list[dict]:
        """Train to the end of the schedule (or ``stop_after`` steps, for tests); returns this call's log records."""
        main = self.placement.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        barrier(self.placement)
        if resume:
            latest = self.latest_checkpoint()
            if latest is not None:
                self.load_checkpoint(latest)
        if main:
            trim_log(self.run_dir, self.step)
        records = []
        last = self.steps if stop_after is None else min(self.steps, stop_after)
        self.model.train()
        bar = tqdm(
            total=self.steps,
            initial=self.step,
            desc=self.description,
            unit="step",
            disable=not (self.progress and main),
        )
        with open(self.run_dir / LOG_FILE, "a") if main else contextlib.nullcontext() as log:
            while self.step < last:
                started = time.perf_counter()
                parts = self.train_step(self.step + 1)
                self.step += 1
                elapsed = time.perf_counter() - started
                record = {"step": self.step, **parts, "it_s": 1.0 / max(elapsed, 1e-9), "time": time.time()}
                check_step_finite(
                    self.step,
                    {"loss": record["loss"]},
                    self.trainable,
                    self.latest_checkpoint(),
                    "lower optim.lr (or raise optim.warmup_steps) and train into a new output folder",
                )
                append_record(log, records, record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", it_s=f"{record['it_s']:.2f}")
                bar.update(1)
                if on_step is not None and main:
                    on_step(record)
                if self.checkpoint_every and self.step % self.checkpoint_every == 0 and self.step < self.steps:
                    self.save_checkpoint()
        bar.close()
        if self.step == self.steps:
            self.save_checkpoint()
        self.model.eval()
        return records


def recipe_trainer(
    model,
    data,
    trainable: dict[str, nn.Parameter],
    optim: OptimConfig,
    schedule: np.ndarray,
    loss: LossConfig,
    settings: UniDGSettings,
    train: LoopConfig,
    seed: int,
    run_dir: str | Path,
    *,
    fingerprint: dict,
    description: str,
    placement: Placement | None = None,
) -> FlowTrainer:
    """The FlowTrainer of a recipe (base inpainter, Diversity-SFT): ``optim``'s optimizer over ``trainable`` with its
    warm-up and gradient clipping, the guidance of ``train.guidance`` (< 0: the settings'), the loop options of
    ``run_options(train)``, and ``fingerprint`` as JSON stores it, so it compares equal to the one read back on
    resume."""
    return FlowTrainer(
        model,
        data,
        trainable,
        build_optimizer(list(trainable.values()), optim),
        schedule,
        loss,
        settings,
        training_guidance(train.guidance, settings),
        seed,
        run_dir,
        grad_clip=optim.grad_clip,
        warmup_steps=optim.warmup_steps,
        fingerprint=json.loads(json.dumps(fingerprint)),
        description=description,
        placement=placement,
        **run_options(train),
    )
