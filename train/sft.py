"""``unidg train sft``: the Diversity-SFT recipe (paper Sec. 5.3, App. C) — a LoRA on a base weights folder, trained
by flow matching on the Fill layout with normal regularization (Eq. 9) and defect attention, over the three pair
distributions of ``unidg.train.pairs``.

The pieces live in their own modules: the objective in ``unidg.train.flow``, the setup shared with RFT (frozen
base, LoRA, run folder) in ``unidg.train.run_setup``, the loop (device, precision, optimizer, torch.distributed) in
``unidg.train.trainer``, checkpoints in ``unidg.train.checkpoints``, the adapters in ``unidg.train.lora``, the cached
training tensors in ``unidg.train.dataset`` (in memory) and ``unidg.train.latent_cache`` (sharded, streamed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from unidg.core.settings import UniDGSettings
from unidg.train.config import ConfigError, SFTConfig, settings_of, to_dict
from unidg.train.dataset import LatentPairs
from unidg.train.latent_cache import open_cache
from unidg.train.lora import save_lora
from unidg.train.pairs import pools_of, prepare_pairs, select_pairs
from unidg.train.run_setup import attach_lora, frozen_model, limit_threads, open_run_folder
from unidg.train.trainer import (
    FlowTrainer,
    Placement,
    current_placement,
    distributed,
    recipe_trainer,
    sample_schedule,
)


def load_training_data(config: SFTConfig, model, settings: UniDGSettings, placement: Placement):
    """The streamed latent cache of ``data.latent_cache`` (checked against this model, data and settings), or the
    in-memory latents of the run folder."""
    if config.data.latent_cache:
        return open_cache(config, model, settings)  # the pair list is the cache's: no image is read
    pairs = select_pairs(prepare_pairs(config.data.train, config.seed, config.data.limit), config.train.mix)
    cache_dir = Path(config.output) / "cache" if config.data.cache else None
    return LatentPairs.cached(
        model,
        pairs,
        settings,
        cache_dir,
        with_normal=config.loss.normal_reg_weight > 0,
        progress=placement.is_main,
        write=placement.is_main,
    )


@dataclass
class SFTRun:
    model: object
    trainer: FlowTrainer
    lora_modules: list[str]
    settings: UniDGSettings


def setup_sft(config: SFTConfig, model=None, data=None, placement: Placement | None = None) -> SFTRun:
    """Model (base + LoRA), cached data, optimizer and trainer of an SFT config (``model``/``data`` for tests)."""
    limit_threads(config.train.threads)
    placement = placement or current_placement()
    settings = settings_of(config)
    model = frozen_model(config.base, model, config.train.precision, placement)
    model.settings = settings
    if data is None:
        data = load_training_data(config, model, settings, placement)
    if data.resolution != settings.resolution:
        raise ConfigError(
            f"latents are at S={data.resolution} but settings.resolution is {settings.resolution}; use a latent "
            "cache built for these settings, or set settings.resolution to match it"
        )
    modules, trainable = attach_lora(model, config.lora, config.seed, config.train.gradient_checkpointing)
    # A dataset with other pools than the three distributions (UniDG-Text's two forms) says how to draw from them.
    pools, weights = (
        data.schedule_pools(config.train.mix) if hasattr(data, "schedule_pools") else (pools_of(data), config.train.mix)
    )
    schedule = sample_schedule(pools, weights, config.train.steps, config.train.batch_size, config.seed)
    # Not the step count: the schedule's prefix and the lr (constant after warm-up) do not depend on it, so a finished
    # run resumed with more steps continues exactly as a longer run from scratch would. Not the [train] table
    # either: device, micro-batch and world size change how a step is computed, not what it computes.
    fingerprint = {
        "data": data.keys[:3] + [len(data.keys)],
        "config": {k: v for k, v in to_dict(config).items() if k not in ("train",)},
        "batch_size": config.train.batch_size,
        "mix": list(config.train.mix),
    }
    trainer = recipe_trainer(
        model,
        data,
        trainable,
        config.optim,
        schedule,
        config.loss,
        settings,
        config.train,
        config.seed,
        Path(config.output),
        fingerprint=fingerprint,
        description="diversity-sft",
        placement=placement,
    )
    return SFTRun(model, trainer, modules, settings)


def train_sft(config: SFTConfig, resume: bool = True, model=None, data=None, extra: dict | None = None) -> SFTRun:
    """``unidg train sft``: train, then write OUTPUT/lora.safetensors + lora.json (+ config.json, log.jsonl).

    Under ``torchrun`` every process runs this; rank 0 writes the files. ``extra``: more lora.json entries."""
    with distributed(config.train.device) as placement:
        output = open_run_folder(config, placement)
        run = setup_sft(config, model=model, data=data, placement=placement)
        started = time.time()
        run.trainer.run(resume=resume)
        if placement.is_main:
            extra = {
                "base": str(config.base),
                "settings": run.settings.to_dict(),
                "guidance_trained": run.trainer.guidance,
                "steps": run.trainer.step,
                "seconds": round(time.time() - started, 1),
                "world_size": placement.world_size,
                **(extra or {}),
            }
            save_lora(output, run.model.transformer, config.lora, run.lora_modules, extra)
        return run
