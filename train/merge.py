"""``unidg train merge``: fold a Diversity-SFT LoRA into its base weights -> a merged weights folder.

W' = W + (alpha / rank) * B @ A for every adapted linear layer (computed in float64, stored in the base dtype). The
folder is written by ``unidg.train.loading.save_model`` (diffusers layout, safetensors only, ``unidg.json`` with
the UniDG settings alpha, beta, T, S, K, steps, guidance, and ``manifest.json`` kind "weights" with sha256 of every
file). Before writing, the merged model's velocity is compared with the unmerged LoRA model's on a fixed probe input
and the max abs difference is recorded in the manifest (the merge is refused above ``tolerance``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from unidg.core.attention_bias import build_key_bias
from unidg.core.errors import UniDGError
from unidg.core.manifest import read_manifest
from unidg.core.settings import UniDGSettings
from unidg.train.config import LoraConfig
from unidg.train.loading import load_model, save_model
from unidg.train.lora import LORA_CONFIG_FILE, LORA_FILE, add_lora, load_lora_state_dict
from unidg.train.model import image_ids

MERGE_TOLERANCE = 1e-4


def read_lora(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """LoRA tensors and lora.json of an SFT run folder."""
    folder = Path(folder)
    if not (folder / LORA_FILE).is_file() or not (folder / LORA_CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"{folder} has no {LORA_FILE} + {LORA_CONFIG_FILE}; pass the output folder of `unidg train sft`"
        )
    return load_file(str(folder / LORA_FILE)), json.loads((folder / LORA_CONFIG_FILE).read_text())


def fold_lora(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale * B @ A, computed in float64, returned in W's dtype (every merge of a LoRA goes through here)."""
    return (weight.double() + scale * (b.double() @ a.double())).to(weight.dtype)


def merged_state_dict(
    transformer_state: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], scale: float, modules: list[str]
) -> dict[str, torch.Tensor]:
    """Base transformer state with every adapted weight replaced by W + scale * B @ A."""
    merged = dict(transformer_state)
    for module in modules:
        key = f"{module}.weight"
        if key not in merged:
            raise UniDGError(f"LoRA adapts {module}, which the base transformer does not have (wrong base?)")
        merged[key] = fold_lora(merged[key], lora[f"{module}.lora_A.weight"], lora[f"{module}.lora_B.weight"], scale)
    return merged


def probe_inputs(model, seed: int = 0, batch: int = 2) -> dict:
    """A fixed random probe (noisy latents, condition, reference, key bias) at the model's resolution."""
    tokens = model.settings.layout.image_tokens
    generator = torch.Generator().manual_seed(seed)
    defect = torch.rand(batch, tokens, generator=generator) < 0.2
    key_bias = build_key_bias(
        defect.numpy(),
        model.reference_tokens,
        model.settings.text_tokens,
        model.settings.alpha,
        model.settings.fold_text_tokens,
    )
    return {
        "x": torch.randn(batch, tokens, 64, generator=generator),
        "cond": torch.randn(batch, tokens, 320, generator=generator),
        "reference": torch.rand(batch, 3, model.reference_size, model.reference_size, generator=generator) * 2 - 1,
        "key_bias": torch.from_numpy(key_bias),
        "sigma": torch.tensor([0.7, 0.3][:batch] + [0.5] * max(batch - 2, 0)),
        "img_ids": image_ids(*model.settings.layout.token_hw),
    }


@torch.no_grad()
def probe_velocity(model, probe: dict, guidance: float) -> torch.Tensor:
    ctx, txt_ids = model.context(model.encode_reference(probe["reference"]))
    return model.velocity(
        probe["x"], probe["cond"], ctx, probe["key_bias"], probe["sigma"], guidance, probe["img_ids"], txt_ids
    )


def merge_lora(
    base: str | Path,
    lora_folder: str | Path,
    out: str | Path,
    settings_overrides: dict | None = None,
    overwrite: bool = False,
    tolerance: float = MERGE_TOLERANCE,
) -> dict:
    """Merge ``lora_folder`` (``unidg train sft`` output) into ``base`` and write the merged folder ``out``.

    Settings: the base's unidg.json, then the settings the LoRA was trained with, then ``settings_overrides``.
    Returns a report (max abs velocity difference merged vs. unmerged, file sizes).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise UniDGError(f"{out} already exists; choose a new folder or pass --overwrite to replace it")
    tensors, info = read_lora(lora_folder)
    model = load_model(base)
    settings = {**model.settings.to_dict(), **info.get("settings", {}), **(settings_overrides or {})}
    model.settings = UniDGSettings.from_dict(settings)
    guidance = model.settings.guidance

    base_state = {k: v.clone() for k, v in model.transformer.state_dict().items()}
    scale = float(info["alpha"]) / float(info["rank"])
    merged = merged_state_dict(base_state, tensors, scale, list(info["modules"]))

    # Unmerged reference: the base with the LoRA adapters (peft) carrying the trained weights.
    lora = LoraConfig(rank=int(info["rank"]), alpha=float(info["alpha"]), targets=list(info["targets"]))
    modules = add_lora(model.transformer, lora)
    if sorted(modules) != sorted(info["modules"]):
        raise UniDGError(f"{lora_folder}: the LoRA's modules do not match this base's layers (wrong base?)")
    load_lora_state_dict(model.transformer, tensors)
    probe = probe_inputs(model)
    reference = probe_velocity(model.eval(), probe, guidance)

    merged_model = load_model(base)
    merged_model.settings = model.settings
    merged_model.transformer.load_state_dict(merged, strict=True)
    merged_velocity = probe_velocity(merged_model.eval(), probe, guidance)
    max_abs_diff = float((merged_velocity - reference).abs().max())
    # The base under the merged settings: the probe's key bias is built for them (K and folding may differ).
    plain = load_model(base, settings=model.settings).eval()
    lora_effect = float((reference - probe_velocity(plain, probe, guidance)).abs().max())
    if not max_abs_diff <= tolerance:
        raise UniDGError(f"merged model differs from the LoRA model by {max_abs_diff:.3g} > {tolerance}; not written")

    report = {
        "merge": {
            "lora": str(lora_folder),
            "lora_rank": int(info["rank"]),
            "lora_alpha": float(info["alpha"]),
            "modules": len(info["modules"]),
            "max_abs_diff_vs_unmerged": max_abs_diff,
            "max_abs_lora_effect": lora_effect,
            "base_fingerprint": read_manifest(base).fingerprint,
            "sft_steps": info.get("steps"),
        }
    }
    if "text" in info:  # a UniDG-Text LoRA (unidg train text): the merged folder is an instruction-mode model
        report["text"] = info["text"]
    folder = save_model(merged_model, out, metadata={"stage": "merged", **report}, overwrite=overwrite)
    report["folder"] = str(folder)
    report["bytes"] = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    report["settings"] = model.settings.to_dict()
    return report
