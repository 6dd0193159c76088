"""``unidg train plan``: parameter counts and a per-GPU memory estimate of an SFT config, built on the meta device
(no weights are read or allocated).

Data parallel (``unidg.train.trainer``): every GPU holds a whole replica, so the estimate per GPU does not shrink
with the GPU count; what the count changes is the micro-batches each GPU runs per step (gradient accumulation).

  frozen weights      every frozen parameter, bf16 on CUDA with train.precision = "bf16" (fp32 otherwise)
  LoRA                weights + gradients in fp32 (DDP's buckets are views of the gradients)
  optimizer state     fp32: Prodigy keeps 4 tensors per parameter (exp_avg, exp_avg_sq, s, p0), AdamW 2
  activations         per micro-batch sample, with gradient checkpointing: each block's input is kept (double
                      blocks: both streams; single blocks: the joint sequence) plus one block recomputed in full
                      (~16 values per token and width: q, k, v, attention output, norms, the 4x MLP); without
                      checkpointing every block's full activations are kept.
The activation figures are an estimate (kernels' workspaces and the allocator's fragmentation come on top).
"""

from __future__ import annotations

import json

from unidg.core.errors import OptionError
from unidg.train.config import ConfigError, settings_of
from unidg.train.lora import lora_parameter_count
from unidg.train.model import UniDGModel

GIB = 1024**3
VALUES_PER_TOKEN_IN_A_BLOCK = 16  # q, k, v, attention out, 2 norms, 4x MLP up + activation, ... (per width unit)
OPTIMIZER_TENSORS = {"prodigy": 4, "adamw": 2}


def meta_model(preset: str = "full"):
    """A preset's model on the meta device (shapes only; the full preset is FLUX.1-Fill + SigLIP so400m + Redux)."""
    return UniDGModel.from_preset(preset, device="meta", seed=None)


def memory_plan(config, gpus: int, preset: str = "full") -> dict:
    """Counts and bytes per GPU for ``gpus`` data-parallel processes, for the model of ``preset``."""
    if gpus < 1:
        raise OptionError(f"--gpus must be >= 1 (got {gpus})")
    batch = config.train.batch_size
    if batch % gpus:
        raise ConfigError(
            f"train.batch_size {batch} (the global batch) does not split over {gpus} GPUs; pick a multiple of {gpus}"
        )
    model = meta_model(preset)
    counts = model.parameter_count()
    lora = lora_parameter_count(model.transformer, config.lora)
    bf16 = config.train.precision == "bf16"
    frozen_bytes = counts["total"] * (2 if bf16 else 4)
    lora_bytes = lora * 4 * 2
    optimizer_bytes = lora * 4 * OPTIMIZER_TENSORS[config.optim.name]
    per_gpu = batch // gpus
    micro = config.train.micro_batch or per_gpu
    if per_gpu % micro:
        raise ConfigError(
            f"train.micro_batch {micro} does not divide the {per_gpu} pairs per GPU; pick a divisor of {per_gpu}"
        )
    settings = settings_of(config)
    transformer = model.transformer.config
    width = transformer.num_attention_heads * transformer.attention_head_dim
    image_tokens = settings.image_tokens
    context_tokens = (1 if settings.fold_text_tokens else settings.text_tokens) + model.reference_tokens
    tokens = image_tokens + context_tokens
    blocks = transformer.num_layers + transformer.num_single_layers
    value = 2 if bf16 else 4
    full_block = VALUES_PER_TOKEN_IN_A_BLOCK * tokens * width * value
    if config.train.gradient_checkpointing:
        activations = blocks * tokens * width * value + full_block
    else:
        activations = blocks * full_block
    activation_bytes = micro * activations
    total = frozen_bytes + lora_bytes + optimizer_bytes + activation_bytes
    return {
        "model": f"preset {preset}",
        "gpus": gpus,
        "parameters": {**counts, "lora": lora},
        "global_batch": batch,
        "per_gpu_batch": per_gpu,
        "micro_batch": micro,
        "accumulation_steps": per_gpu // micro,
        "tokens_per_sample": {"image": image_tokens, "context": context_tokens},
        "gradient_checkpointing": config.train.gradient_checkpointing,
        "per_gpu_gib": {
            "frozen_weights": round(frozen_bytes / GIB, 2),
            "lora_weights_and_grads": round(lora_bytes / GIB, 2),
            "optimizer_state": round(optimizer_bytes / GIB, 2),
            "activations": round(activation_bytes / GIB, 2),
            "total": round(total / GIB, 2),
        },
    }


def format_plan(plan: dict) -> str:
    counts = plan["parameters"]
    lines = [
        f"model: {plan['model']}",
        "parameters: "
        + ", ".join(f"{name} {counts[name]:,}" for name in ("transformer", "vae", "image_encoder", "redux", "total"))
        + f"; LoRA {counts['lora']:,}",
        f"{plan['gpus']} GPU(s), data parallel: global batch {plan['global_batch']} = {plan['gpus']} x "
        f"{plan['accumulation_steps']} accumulation step(s) x micro-batch {plan['micro_batch']}",
        f"tokens per sample: {plan['tokens_per_sample']['image']} image + {plan['tokens_per_sample']['context']} "
        f"context; gradient checkpointing {'on' if plan['gradient_checkpointing'] else 'off'}",
        "per GPU (GiB): " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in plan["per_gpu_gib"].items()),
    ]
    return "\n".join(lines)


def plan_json(plan: dict) -> str:
    return json.dumps(plan, indent=2)
