"""The setup every LoRA recipe shares (``unidg train sft`` and ``unidg train rft``): threads, the frozen base model
at the training dtype, the LoRA adapters and their trainable weights, and the run folder with its config.json.

The recipe then adds its own: SFT its cached latents and the flow-matching ``FlowTrainer``, RFT its prompts, reward,
EMA and the GRPO loop. Devices and processes (``distributed``, ``Placement``), the optimizer and the data order live
in ``unidg.train.trainer``; checkpoints in ``unidg.train.checkpoints``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from unidg.core.manifest import atomic_write_text
from unidg.train.config import LoraConfig, to_dict
from unidg.train.loading import load_model
from unidg.train.lora import add_lora
from unidg.train.model import UniDGModel
from unidg.train.trainer import Placement, check_run_folder


def limit_threads(threads: int) -> None:
    """``train.threads``: torch's intra-op threads of this process (0: torch's default)."""
    if threads:
        torch.set_num_threads(threads)


def training_dtype(precision: str, placement: Placement) -> torch.dtype:
    """Frozen weights load in bf16 for bf16 training on CUDA (a 12B transformer does not fit in fp32)."""
    return torch.bfloat16 if placement.device.type == "cuda" and precision == "bf16" else torch.float32


def frozen_model(base: str | Path, model, precision: str, placement: Placement) -> UniDGModel:
    """The weights folder ``base`` loaded at the training dtype (or ``model``, for tests), every weight frozen."""
    if model is None:
        model = load_model(base, dtype=training_dtype(precision, placement))
    if not isinstance(model, UniDGModel):
        raise TypeError("model must be a UniDGModel")
    model.requires_grad_(False)
    return model


def attach_lora(
    model: UniDGModel, lora: LoraConfig, seed: int, gradient_checkpointing: bool
) -> tuple[list[str], dict[str, nn.Parameter]]:
    """LoRA adapters on the transformer: the adapted module names and the trainable weights by checkpoint name."""
    modules = add_lora(model.transformer, lora, seed=seed)
    if gradient_checkpointing:
        model.transformer.enable_gradient_checkpointing()
    trainable = {f"transformer.{k}": p for k, p in model.transformer.named_parameters() if p.requires_grad}
    return modules, trainable


def open_run_folder(config, placement: Placement) -> Path:
    """``config.output``, refused before any work if unusable; rank 0 creates it and writes its config.json."""
    output = check_run_folder(config.output)
    if placement.is_main:
        output.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output / "config.json", json.dumps(to_dict(config), indent=2) + "\n")
    return output
