"""``unidg weights lora``: a published FLUX LoRA file folded into a weights folder's transformer.

Layouts read (the file's keys decide):

* **diffusers / peft**: ``transformer.{module}.lora_A.weight`` / ``lora_B.weight`` (``base_model.model.{module}``
  as peft saves it, or bare ``{module}`` as ``unidg train sft`` writes). alpha, in this order: ``lora.json`` beside
  the file (``unidg train sft``), peft's ``adapter_config.json`` beside it, the file's ``lora_adapter_metadata``
  (diffusers), per-module ``{module}.alpha`` tensors; else alpha = rank. The scale of each module is the one peft
  gives its layer for that config (rank and alpha patterns, rsLoRA included).
* **kohya**: ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` / ``lora_up.weight`` / ``.alpha``, and the
  same modules under BFL's names (``[diffusion_model.]double_blocks.0.img_attn.qkv.lora_down.weight``, or
  ``lora_A`` / ``lora_B``): converted by diffusers' ``FluxLoraLoaderMixin.lora_state_dict`` (alpha folded into the
  factors, here in float64), except two modules read here: the single blocks' fused ``linear1``, which diffusers
  splits at FLUX's width only (split here at the base's width), and the final layer, whose alpha diffusers' converter
  ignores (diffusers 0.42).

The merge is ``unidg train merge``'s: ``W + scale * B @ A`` in float64 (``unidg.train.merge.fold_lora``), stored in
the base's dtype, streamed one transformer block at a time. A LoRA whose shapes do not fit the base (FLUX.1-dev's
``x_embedder``, another width) is refused naming the first key that does not fit.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders import FluxLoraLoaderMixin
from diffusers.loaders.lora_conversion_utils import swap_scale_shift
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from tqdm import tqdm

from unidg.core.manifest import MANIFEST_FILE, WEIGHTS_KIND, WeightsError, sha256_file, write_manifest
from unidg.core.staging import check_output_folder, staged_folder
from unidg.core.weights_folder import read_weights
from unidg.train.lora import LORA_CONFIG_FILE, LORA_FILE
from unidg.train.merge import fold_lora
from unidg.train.weights_files import (
    DEFAULT_SHARD_BYTES,
    DIFFUSERS_WEIGHTS_NAME,
    Checkpoint,
    ShardWriter,
    component_files,
)

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
# Top-level modules of BFL's FLUX transformer (the names kohya's lora_unet_ keys are built from).
BFL_MODULES = ("double_blocks.", "single_blocks.", "img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.")
BFL_MODULES += ("final_layer.",)
_BFL_SUFFIX = re.compile(r"^(?P<module>.+?)\.(?P<part>lora_down|lora_up|lora_A|lora_B)\.weight$|^(?P<alpha>.+)\.alpha$")
_LINEAR1 = re.compile(r"^lora_unet_single_blocks_(\d+)_linear1$")


@dataclass(frozen=True)
class LoraFactor:
    """One adapted linear layer: ``W + scale * b @ a``; ``key`` names it in the file (for messages)."""

    a: torch.Tensor  # (rank, in)
    b: torch.Tensor  # (out, rank)
    scale: float
    key: str


@dataclass
class LoraFile:
    path: Path
    layout: str  # "peft", "unidg", "kohya"
    factors: dict[str, LoraFactor]  # diffusers module name -> factors
    alpha_from: str

    def summary(self) -> dict:
        ranks = sorted({factor.a.shape[0] for factor in self.factors.values()})
        scales = sorted({round(factor.scale, 6) for factor in self.factors.values()})
        return {
            "file": self.path.name,
            "sha256": sha256_file(self.path),
            "layout": self.layout,
            "modules": len(self.factors),
            "ranks": ranks,
            "scales": scales if len(scales) <= 4 else [scales[0], scales[-1]],
            "alpha_from": self.alpha_from,
        }


# ---------------------------------------------------------------------------------------------- reading
def _weights_file(path: Path) -> Path:
    if path.is_dir():
        for name in (LORA_FILE, PEFT_WEIGHTS_FILE, "pytorch_lora_weights.safetensors"):
            if (path / name).is_file():
                return path / name
        raise WeightsError(f"--lora {path}: no {LORA_FILE}, {PEFT_WEIGHTS_FILE} or pytorch_lora_weights.safetensors")
    if not path.is_file():
        raise WeightsError(f"--lora {path}: no such file")
    return path


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return load_file(str(path)), metadata
    except SafetensorError as error:
        raise WeightsError(f"--lora {path} is not a readable safetensors file ({error}); fetch it again") from error


def _strip(key: str) -> str:
    for prefix in ("base_model.model.", "transformer.", "model.diffusion_model.", "diffusion_model."):
        key = key.removeprefix(prefix)
    return key


def _is_kohya(keys: list[str]) -> bool:
    return any(key.startswith("lora_unet_") or _strip(key).startswith(BFL_MODULES) for key in keys)


def _refuse_foreign(keys: list[str], path: Path) -> None:
    for key in keys:
        if key.startswith(("lora_te", "text_encoder", "te.")) or ".dora_scale" in key or "lora_magnitude" in key:
            what = "a DoRA magnitude" if "dora" in key or "magnitude" in key else "a text-encoder LoRA key"
            raise WeightsError(
                f"--lora {path}: {key} is {what}; UniDG folds plain LoRA factors into the transformer only "
                "(its text branch is zero)"
            )


def _peft_config(path: Path, metadata: dict[str, str]) -> tuple[PeftLoraConfig | None, str]:
    folder = path.parent
    if (folder / LORA_CONFIG_FILE).is_file():
        info = json.loads((folder / LORA_CONFIG_FILE).read_text())
        return PeftLoraConfig(r=int(info["rank"]), lora_alpha=float(info["alpha"])), LORA_CONFIG_FILE
    if (folder / PEFT_CONFIG_FILE).is_file():
        return PeftLoraConfig.from_pretrained(str(folder)), PEFT_CONFIG_FILE
    if DIFFUSERS_METADATA_KEY in metadata:
        packed = json.loads(metadata[DIFFUSERS_METADATA_KEY])
        fields = {field.name for field in dataclasses.fields(PeftLoraConfig)}
        kwargs = {
            key.removeprefix("transformer."): value
            for key, value in packed.items()
            if key.startswith("transformer.") and key.removeprefix("transformer.") in fields
        }
        if kwargs:
            return PeftLoraConfig(**kwargs), DIFFUSERS_METADATA_KEY
    return None, ""


def _peft_scales(config: PeftLoraConfig, modules: list[str], transformer_config: dict) -> dict[str, tuple[int, float]]:
    """(rank, scale) peft gives each module's layer under ``config`` (built on the meta device: no memory)."""
    config = dataclasses.replace(config, target_modules=set(modules), lora_dropout=0.0)
    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(transformer_config)
        inject_adapter_in_model(config, transformer)
    out = {}
    for module in modules:
        layer = transformer.get_submodule(module)
        out[module] = (layer.r["default"], float(layer.scaling["default"]))
    return out


def _read_peft(path: Path, tensors: dict, metadata: dict, transformer_config: dict) -> LoraFile:
    parts: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        match = re.fullmatch(r"(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|alpha)", _strip(key))
        if not match:
            raise WeightsError(
                f"--lora {path}: unknown key {key!r}; a LoRA holds {{module}}.lora_A.weight / lora_B.weight (+ alpha)"
            )
        module = match["module"].replace(".default", "")
        parts.setdefault(module, {})[match["part"]] = (key, tensor)
    modules = sorted(parts)
    for module in modules:
        for part in ("lora_A.weight", "lora_B.weight"):
            if part not in parts[module]:
                raise WeightsError(f"--lora {path}: {module} has no {part} (a truncated or partial LoRA file)")
    config, alpha_from = _peft_config(path, metadata)
    if config is not None:
        ranks_scales = _peft_scales(config, modules, transformer_config)
    else:
        ranks_scales = {}
        for module in modules:
            rank = parts[module]["lora_A.weight"][1].shape[0]
            alpha = float(parts[module]["alpha"][1]) if "alpha" in parts[module] else float(rank)
            ranks_scales[module] = (rank, alpha / rank)
        alpha_from = ".alpha tensors" if any("alpha" in part for part in parts.values()) else "alpha = rank"
    factors = {}
    for module in modules:
        key_a, a = parts[module]["lora_A.weight"]
        key_b, b = parts[module]["lora_B.weight"]
        rank, scale = ranks_scales[module]
        if a.shape[0] != rank or b.shape[-1] != a.shape[0]:
            raise WeightsError(
                f"--lora {path}: {key_a} has rank {a.shape[0]} and {key_b} shape {tuple(b.shape)}; the config "
                f"({alpha_from or 'defaults'}) says rank {rank}"
            )
        factors[module] = LoraFactor(a, b, scale, key_a)
    layout = "unidg" if alpha_from == LORA_CONFIG_FILE else "peft"
    return LoraFile(path, layout, factors, alpha_from)


def _to_kohya(key: str) -> str:
    """A BFL-named LoRA key -> kohya's lora_unet_ name (lora_A/B read as lora_down/up)."""
    if key.startswith("lora_unet_"):
        return key
    name = _strip(key)
    match = _BFL_SUFFIX.match(name)
    if not match or not name.startswith(BFL_MODULES):
        return key  # left for diffusers' converter to refuse by name
    if match["alpha"]:
        return f"lora_unet_{match['alpha'].replace('.', '_')}.alpha"
    part = {"lora_A": "lora_down", "lora_B": "lora_up"}.get(match["part"], match["part"])
    return f"lora_unet_{match['module'].replace('.', '_')}.{part}.weight"


def _pop_kohya(state: dict[str, torch.Tensor], name: str, path: Path) -> tuple[torch.Tensor, torch.Tensor, float]:
    """lora_down, lora_up and alpha / rank of one kohya module, taken out of ``state``."""
    down, up = state.pop(f"{name}.lora_down.weight", None), state.pop(f"{name}.lora_up.weight", None)
    if down is None or up is None:
        raise WeightsError(f"--lora {path}: {name} lacks lora_down or lora_up (a partial LoRA file)")
    rank = down.shape[0]
    alpha = state.pop(f"{name}.alpha", None)
    return down, up, (float(alpha) if alpha is not None else float(rank)) / rank


def _final_layer(state: dict[str, torch.Tensor], path: Path) -> dict[str, LoraFactor]:
    """The final layer's LoRAs with their alpha (diffusers' converter drops it there)."""
    factors = {}
    if "lora_unet_final_layer_linear.lora_down.weight" in state:
        down, up, scale = _pop_kohya(state, "lora_unet_final_layer_linear", path)
        factors["proj_out"] = LoraFactor(down, up, scale, "lora_unet_final_layer_linear.lora_up.weight")
    if "lora_unet_final_layer_adaLN_modulation_1.lora_down.weight" in state:
        down, up, scale = _pop_kohya(state, "lora_unet_final_layer_adaLN_modulation_1", path)
        key = "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"
        factors["norm_out.linear"] = LoraFactor(down, swap_scale_shift(up), scale, key)  # BFL: shift, scale
    return factors


def _split_linear1(state: dict[str, torch.Tensor], inner_dim: int, path: Path) -> dict[str, LoraFactor]:
    """Single-block ``linear1`` LoRAs (q, k, v, mlp stacked) split at ``inner_dim``: the same A, B's rows split."""
    factors = {}
    for name in sorted({key.split(".")[0] for key in state if _LINEAR1.match(key.split(".")[0])}):
        down, up, scale = _pop_kohya(state, name, path)
        if up.shape[0] != 7 * inner_dim:
            raise WeightsError(
                f"--lora {path}: {name}.lora_up.weight has {up.shape[0]} rows; the base's single blocks need "
                f"{7 * inner_dim} (a LoRA for another model)"
            )
        block = _LINEAR1.match(name).group(1)
        pieces = torch.split(up, (inner_dim, inner_dim, inner_dim, 4 * inner_dim), dim=0)
        for target, piece in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), pieces, strict=True):
            factors[f"single_transformer_blocks.{block}.{target}"] = LoraFactor(
                down, piece.contiguous(), scale, f"{name}.lora_up.weight"
            )
    return factors


def _read_kohya(path: Path, tensors: dict, inner_dim: int) -> LoraFile:
    state = {_to_kohya(key): tensor for key, tensor in tensors.items()}
    factors = {**_split_linear1(state, inner_dim, path), **_final_layer(state, path)}
    # One module at a time, so that every converted factor keeps the file key it came from (for messages); in
    # float64, so that diffusers' folding of alpha / rank into the factors is exact to float64 rounding.
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        by_module.setdefault(key.split(".")[0], {})[key] = tensor.double()
    for name, module_state in by_module.items():
        source_key = next((key for key in module_state if key.endswith((".lora_down.weight", ".lora_up.weight"))), None)
        if source_key is None:
            raise WeightsError(f"--lora {path}: {name} has no lora_down / lora_up weights (a partial LoRA file)")
        try:
            converted = FluxLoraLoaderMixin.lora_state_dict(module_state)
        except (ValueError, KeyError, AssertionError) as error:
            raise WeightsError(
                f"--lora {path}: diffusers' FLUX LoRA converter does not know {name} ({error})"
            ) from error
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in converted.items():
            # diffusers prefixes the blocks' factors with "transformer." but not the embedders' and final layer's.
            match = re.fullmatch(r"(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight", key.removeprefix("transformer."))
            if not match:
                raise WeightsError(f"--lora {path}: {name} converted to {key}, which is not a transformer LoRA factor")
            parts.setdefault(match["module"], {})[match["part"]] = tensor
        if not parts:
            raise WeightsError(f"--lora {path}: diffusers' FLUX LoRA converter does not know {source_key}")
        for module, factor in parts.items():
            factors[module] = LoraFactor(factor["lora_A"], factor["lora_B"], 1.0, source_key)
    return LoraFile(path, "kohya", factors, ".alpha tensors (folded by diffusers' converter)")


def read_lora_file(path: str | Path, transformer_config: dict) -> LoraFile:
    """The factors of a LoRA file (or folder) in diffusers module names, for a base with ``transformer_config``."""
    path = _weights_file(Path(path))
    tensors, metadata = _load(path)
    if not tensors:
        raise WeightsError(f"--lora {path} holds no tensors")
    keys = list(tensors)
    _refuse_foreign(keys, path)
    inner_dim = transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"]
    if _is_kohya(keys) or any(".lora_down." in key for key in keys):
        return _read_kohya(path, tensors, inner_dim)
    return _read_peft(path, tensors, metadata, transformer_config)


def check_fits(lora: LoraFile, base: Checkpoint) -> None:
    """Refuse, naming the first key, a LoRA whose modules the base lacks or whose shapes differ."""
    for module, factor in sorted(lora.factors.items(), key=lambda item: item[1].key):
        weight = base.tensors.get(f"{module}.weight")
        if weight is None or len(weight.shape) != 2:
            raise WeightsError(
                f"--lora {lora.path}: {factor.key} adapts {module}, which the base transformer has no linear layer "
                "for (a LoRA for another model)"
            )
        out_features, in_features = weight.shape
        rank = factor.a.shape[0]
        if factor.a.shape[1] != in_features or tuple(factor.b.shape) != (out_features, rank):
            raise WeightsError(
                f"--lora {lora.path}: {factor.key} gives {module} an update of shape "
                f"({factor.b.shape[0]}, {factor.a.shape[1]}); the base's {module}.weight is "
                f"{(out_features, in_features)} (a LoRA for another model, e.g. FLUX.1-dev, or another width)"
            )


# ---------------------------------------------------------------------------------------------- merging
def merge_lora_file(
    base: str | Path,
    lora_path: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
) -> dict:
    """Fold ``lora_path`` into the weights folder ``base`` and write ``out``; the other components are copied."""
    start = time.perf_counter()
    out = check_output_folder(out, replace=overwrite)
    if not Path(base).is_dir():
        raise WeightsError(f"--base {base} is not a folder; pass a weights folder (unidg weights import / train merge)")
    weights = read_weights(base, verify=True)
    base = weights.path
    transformer_folder = base / "transformer"
    config = FluxTransformer2DModel.load_config(str(transformer_folder))
    checkpoint = Checkpoint(
        component_files(transformer_folder, DIFFUSERS_WEIGHTS_NAME, f"--base {base}"), f"--base {base}"
    )
    lora = read_lora_file(lora_path, dict(config))
    check_fits(lora, checkpoint)
    summary = lora.summary()
    with staged_folder(out, replace=overwrite) as staging:
        for item in sorted(base.iterdir()):
            if item.name in ("transformer", MANIFEST_FILE):
                continue
            if item.is_dir():
                shutil.copytree(item, staging / item.name)
            else:
                shutil.copy2(item, staging / item.name)
        (staging / "transformer").mkdir()
        shutil.copy2(transformer_folder / "config.json", staging / "transformer" / "config.json")
        writer = ShardWriter(staging / "transformer", DIFFUSERS_WEIGHTS_NAME, shard_bytes)
        folded = 0
        with tqdm(total=checkpoint.nbytes, unit="B", unit_scale=True, desc="merging", disable=not progress) as bar:
            for keys in checkpoint.groups().values():
                for key, tensor in checkpoint.read(keys).items():
                    factor = lora.factors.get(key.removesuffix(".weight")) if key.endswith(".weight") else None
                    if factor is not None:
                        tensor = fold_lora(tensor, factor.a, factor.b, factor.scale)
                        folded += 1
                    writer.add(key, tensor)
                bar.update(sum(checkpoint.tensors[key].nbytes for key in keys))
        writer.finish()
        if folded != len(lora.factors):
            raise WeightsError(f"--lora {lora.path}: {len(lora.factors) - folded} modules were not folded")
        metadata = {
            **weights.manifest.metadata,
            "stage": "merged",
            "lora": {**summary, "base_fingerprint": weights.fingerprint, "base": str(base)},
        }
        write_manifest(staging, WEIGHTS_KIND, metadata)
    return {"folder": str(out), "seconds": round(time.perf_counter() - start, 2), "lora": summary}
