"""LoRA adapters on the FLUX transformer's double and single blocks (peft): injection, state dicts, files.

``unidg train sft`` trains them; ``unidg train merge`` reads them back and folds them into the base weights.
A LoRA folder holds ``lora.safetensors`` (``{module}.lora_A.weight`` / ``{module}.lora_B.weight``) and ``lora.json``
(rank, alpha, targets, adapted modules and what the run recorded).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from unidg.core.manifest import atomic_write_text
from unidg.core.staging import give_usual_mode
from unidg.train.config import ConfigError, LoraConfig

LORA_FILE = "lora.safetensors"
LORA_CONFIG_FILE = "lora.json"
BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")


def lora_module_names(transformer: nn.Module, targets: Sequence[str]) -> list[str]:
    """Full names of the nn.Linear modules of the double and single blocks whose name ends with a target suffix."""
    names = []
    for name, module in transformer.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if not name.startswith(BLOCK_PREFIXES):
            continue
        if any(name == t or name.endswith("." + t) for t in targets):
            names.append(name)
    if not names:
        raise ConfigError(
            f"lora.targets {list(targets)} match no linear layer of the transformer's blocks; name layers of its "
            "double and single blocks (e.g. to_q, to_k, to_v)"
        )
    return names


def lora_parameter_count(transformer: nn.Module, lora: LoraConfig) -> int:
    """Parameters the adapters add: rank * (in + out) per adapted linear layer (works on the meta device)."""
    modules = dict(transformer.named_modules())
    return sum(
        lora.rank * (modules[name].in_features + modules[name].out_features)
        for name in lora_module_names(transformer, lora.targets)
    )


def add_lora(transformer: nn.Module, lora: LoraConfig, seed: int = 0) -> list[str]:
    """Inject LoRA adapters (peft) into the transformer's blocks; returns the adapted module names.

    lora_B starts at zero, so the adapted model computes exactly the base model until trained. The adapters are
    created in float32 on the device of the layer they adapt (the frozen layer may be bf16).
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
        is_lora = "lora_" in name
        parameter.requires_grad_(is_lora)
        if is_lora and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
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
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{LORA_FILE}.tmp"
    save_file(lora_state_dict(transformer), str(tmp), metadata={"format": "unidg-lora"})
    give_usual_mode(tmp)
    tmp.replace(folder / LORA_FILE)
    document = {"rank": lora.rank, "alpha": lora.scale_alpha, "targets": list(lora.targets), "modules": modules}
    atomic_write_text(folder / LORA_CONFIG_FILE, json.dumps({**document, **extra}, indent=2) + "\n")
    return folder / LORA_FILE
