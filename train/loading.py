"""Load and save UniDG weights from local folders only (safetensors; never a hub).

Two input layouts:

* **diffusers layout** (what ``save_model`` writes and ``load_model`` reads)::

      folder/transformer/{config.json, *.safetensors}     FluxTransformer2DModel (FLUX.1-Fill)
      folder/vae/{config.json, *.safetensors}             AutoencoderKL (FLUX VAE)
      folder/image_encoder/{config.json, *.safetensors}   SiglipVisionModel (SigLIP so400m)
      folder/redux/{config.json, *.safetensors}           ReduxImageEncoder ("image_embedder" is accepted too)
      folder/unidg.json                                   UniDGSettings
      folder/manifest.json                                kind "weights", sha256 of every file

* **BFL single files** (``load_bfl``): ``flux1-fill-dev.safetensors``, ``ae.safetensors``,
  ``flux1-redux-dev.safetensors`` plus a local SigLIP folder; shapes come from a preset (a local config), keys are
  converted with diffusers' own single-file converters.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from diffusers.loaders.single_file_utils import (
    convert_flux_transformer_checkpoint_to_diffusers,
    convert_ldm_vae_checkpoint,
)
from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
from safetensors.torch import load_file
from torch import nn
from transformers import SiglipVisionModel

from unidg.core.manifest import WEIGHTS_KIND, WeightsError, tool_versions, write_manifest
from unidg.core.settings import SETTINGS_FILE, UniDGSettings
from unidg.core.staging import staged_folder
from unidg.core.weights_folder import WeightsInfo
from unidg.train.model import COMPONENTS, UniDGModel
from unidg.train.presets import UniDGPreset, get_preset

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from local folders only

BFL_TRANSFORMER_FILE = "flux1-fill-dev.safetensors"
BFL_VAE_FILE = "ae.safetensors"
BFL_REDUX_FILE = "flux1-redux-dev.safetensors"
REDUX_FOLDERS = ("redux", "image_embedder")  # ours, FLUX.1-Redux-dev's diffusers repo
BFL_PREFIX = "model.diffusion_model."
# diffusers' converter splits single-block linear1 at FLUX's width; other widths (nano) are split here.
_CONVERTER_INNER_DIM = 3072


# ---------------------------------------------------------------------------------------------- diffusers layout
def save_model(model: UniDGModel, folder: str | Path, *, metadata: dict | None = None, overwrite: bool = False) -> Path:
    """Write ``model`` as a diffusers-layout weights folder (safetensors only) with unidg.json and manifest.json.

    The folder is written beside its destination and renamed into place, so a reader never sees half of it.
    """
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise WeightsError(f"{folder} already exists; choose a new folder or pass overwrite=True")
    with staged_folder(folder, replace=True, flag="weights folder") as staging:
        model.transformer.save_pretrained(staging / "transformer", safe_serialization=True)
        model.vae.save_pretrained(staging / "vae", safe_serialization=True)
        model.image_encoder.save_pretrained(staging / "image_encoder", safe_serialization=True)
        model.redux.save_pretrained(staging / "redux", safe_serialization=True)
        model.settings.save(staging)
        info = {
            "format": "diffusers",
            "parameters": model.parameter_count(),
            "dtype": str(model.dtype).removeprefix("torch."),
            "tools": tool_versions("unidg", "torch", "diffusers", "transformers"),
            **(metadata or {}),
        }
        write_manifest(staging, WEIGHTS_KIND, info)
    return folder


def _component_folder(folder: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (folder / name / "config.json").is_file():
            return folder / name
    raise WeightsError(
        f"{folder} has no {' or '.join(f'{name}/config.json' for name in names)}; a UniDG weights folder needs "
        f"{', '.join(COMPONENTS)} subfolders (diffusers layout, as written by save_model / `unidg train merge`)"
    )


def load_model(
    folder: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    settings: UniDGSettings | None = None,
    attention_backend: str = "sdpa",
) -> UniDGModel:
    """A UniDGModel from a diffusers-layout folder (local files only).

    Settings: ``settings`` if given, else the folder's unidg.json (a folder without one needs ``settings``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"{folder} is not a folder; pass a UniDG weights folder (diffusers layout)")
    if settings is None:
        if not (folder / SETTINGS_FILE).is_file():
            raise WeightsError(f"{folder} has no {SETTINGS_FILE}; pass settings=UniDGSettings(...) for this model")
        settings = UniDGSettings.load(folder)
    common = {"local_files_only": True}
    transformer = FluxTransformer2DModel.from_pretrained(
        _component_folder(folder, ("transformer",)), torch_dtype=dtype, **common
    )
    vae = AutoencoderKL.from_pretrained(_component_folder(folder, ("vae",)), torch_dtype=dtype, **common)
    image_encoder = SiglipVisionModel.from_pretrained(
        _component_folder(folder, ("image_encoder",)), dtype=dtype, **common
    )
    redux = ReduxImageEncoder.from_pretrained(_component_folder(folder, REDUX_FOLDERS), torch_dtype=dtype, **common)
    model = UniDGModel(transformer, vae, image_encoder, redux, settings, attention_backend)
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------- BFL single files
def _split_single_linear1(state: dict[str, torch.Tensor], inner_dim: int) -> dict[str, tuple[torch.Tensor, ...]]:
    """Take single-block linear1 (q, k, v, mlp stacked) out of ``state``; leave zero-byte stand-ins of FLUX's width
    so diffusers' converter (which splits at width 3072) runs for any width."""
    mlp_dim = 4 * inner_dim
    stand_in_rows = 3 * _CONVERTER_INNER_DIM + 4 * _CONVERTER_INNER_DIM
    splits = {}
    for key in [key for key in state if re.fullmatch(r"single_blocks\.\d+\.linear1\.(weight|bias)", key)]:
        tensor = state.pop(key)
        if tensor.shape[0] != 3 * inner_dim + mlp_dim:
            raise WeightsError(f"{key} has {tensor.shape[0]} rows; a width-{inner_dim} model needs {7 * inner_dim}")
        splits[key] = torch.split(tensor, (inner_dim, inner_dim, inner_dim, mlp_dim), dim=0)
        state[key] = torch.empty((stand_in_rows, *tensor.shape[1:]), device="meta")
    return splits


def convert_bfl_transformer(state_dict: dict[str, torch.Tensor], inner_dim: int) -> dict[str, torch.Tensor]:
    """BFL FLUX transformer keys (``double_blocks.*``, ``single_blocks.*``, ...) -> diffusers keys."""
    state = {key.removeprefix(BFL_PREFIX): value for key, value in state_dict.items()}
    splits = _split_single_linear1(state, inner_dim)
    converted = convert_flux_transformer_checkpoint_to_diffusers(state)
    if state:
        raise WeightsError(f"unrecognised FLUX transformer keys: {sorted(state)[:5]}")
    for key, (q, k, v, mlp) in splits.items():
        block, kind = re.fullmatch(r"single_blocks\.(\d+)\.linear1\.(weight|bias)", key).groups()
        prefix = f"single_transformer_blocks.{block}."
        for name, tensor in (("attn.to_q", q), ("attn.to_k", k), ("attn.to_v", v), ("proj_mlp", mlp)):
            converted[f"{prefix}{name}.{kind}"] = tensor.contiguous()
    return converted


def bfl_transformer_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers FluxTransformer2DModel keys -> BFL keys (the inverse of convert_bfl_transformer)."""
    state = dict(state_dict)
    out: dict[str, torch.Tensor] = {}

    def move(source: str, target: str) -> None:
        for kind in ("weight", "bias"):
            if f"{source}.{kind}" in state:
                out[f"{target}.{kind}"] = state.pop(f"{source}.{kind}")

    def stack(sources: list[str], target: str) -> None:
        for kind in ("weight", "bias"):
            out[f"{target}.{kind}"] = torch.cat([state.pop(f"{source}.{kind}") for source in sources])

    move("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer")
    move("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer")
    move("time_text_embed.text_embedder.linear_1", "vector_in.in_layer")
    move("time_text_embed.text_embedder.linear_2", "vector_in.out_layer")
    move("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer")
    move("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer")
    move("context_embedder", "txt_in")
    move("x_embedder", "img_in")
    move("proj_out", "final_layer.linear")
    for kind in ("weight", "bias"):  # diffusers' AdaLayerNormContinuous is (scale, shift); BFL's is (shift, scale)
        scale, shift = state.pop(f"norm_out.linear.{kind}").chunk(2, dim=0)
        out[f"final_layer.adaLN_modulation.1.{kind}"] = torch.cat([shift, scale])

    double = sorted({int(key.split(".")[1]) for key in state if key.startswith("transformer_blocks.")})
    for i in double:
        p, q = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        move(p + "norm1.linear", q + "img_mod.lin")
        move(p + "norm1_context.linear", q + "txt_mod.lin")
        stack([p + "attn.to_q", p + "attn.to_k", p + "attn.to_v"], q + "img_attn.qkv")
        stack([p + "attn.add_q_proj", p + "attn.add_k_proj", p + "attn.add_v_proj"], q + "txt_attn.qkv")
        out[q + "img_attn.norm.query_norm.scale"] = state.pop(p + "attn.norm_q.weight")
        out[q + "img_attn.norm.key_norm.scale"] = state.pop(p + "attn.norm_k.weight")
        out[q + "txt_attn.norm.query_norm.scale"] = state.pop(p + "attn.norm_added_q.weight")
        out[q + "txt_attn.norm.key_norm.scale"] = state.pop(p + "attn.norm_added_k.weight")
        move(p + "ff.net.0.proj", q + "img_mlp.0")
        move(p + "ff.net.2", q + "img_mlp.2")
        move(p + "ff_context.net.0.proj", q + "txt_mlp.0")
        move(p + "ff_context.net.2", q + "txt_mlp.2")
        move(p + "attn.to_out.0", q + "img_attn.proj")
        move(p + "attn.to_add_out", q + "txt_attn.proj")

    single = sorted({int(key.split(".")[1]) for key in state if key.startswith("single_transformer_blocks.")})
    for i in single:
        p, q = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        move(p + "norm.linear", q + "modulation.lin")
        stack([p + "attn.to_q", p + "attn.to_k", p + "attn.to_v", p + "proj_mlp"], q + "linear1")
        out[q + "norm.query_norm.scale"] = state.pop(p + "attn.norm_q.weight")
        out[q + "norm.key_norm.scale"] = state.pop(p + "attn.norm_k.weight")
        move(p + "proj_out", q + "linear2")
    if state:
        raise WeightsError(f"no BFL name for transformer keys {sorted(state)[:5]}")
    return out


def bfl_vae_state_dict(state_dict: dict[str, torch.Tensor], num_blocks: int = 4) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys -> BFL ``ae.safetensors`` keys (inverse of diffusers' convert_ldm_vae_checkpoint;
    the mid-block attention becomes 1x1 convolutions as in the original)."""
    out = {}
    for key, tensor in state_dict.items():
        name = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        name = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", name)
        name = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", name)
        level = re.search(r"up_blocks\.(\d+)\.", name)
        if level:  # diffusers counts decoder levels from the lowest resolution, BFL from the highest
            bfl_level = num_blocks - 1 - int(level.group(1))
            name = re.sub(r"up_blocks\.\d+\.resnets\.", f"up.{bfl_level}.block.", name)
            name = re.sub(r"up_blocks\.\d+\.upsamplers\.0\.", f"up.{bfl_level}.upsample.", name)
        name = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}.", name)
        if "mid_block.attentions.0." in name:
            name = name.replace("mid_block.attentions.0.", "mid.attn_1.")
            for diffusers_name, bfl_name in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v")):
                name = name.replace(f".{diffusers_name}.", f".{bfl_name}.")
            name = name.replace(".to_out.0.", ".proj_out.")
            if tensor.ndim == 2:
                tensor = tensor[:, :, None, None]
        out[name] = tensor
    return out


def _load_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsError(f"{what} file {path} not found")
    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise WeightsError(f"{path} is not a readable safetensors file ({error})") from error


def _assign(module: nn.Module, state: dict[str, torch.Tensor], source: Path, dtype: torch.dtype) -> nn.Module:
    """Load ``state`` into a meta-device ``module`` (no second copy of the weights), strictly."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise WeightsError(f"{source} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise WeightsError(
                f"{source}: {key} has shape {tuple(tensor.shape)}, the configured model needs "
                f"{tuple(expected[key].shape)} (wrong preset for these weights?)"
            )
    module.load_state_dict({key: tensor.to(dtype) for key, tensor in state.items()}, strict=True, assign=True)
    if any(tensor.is_meta for tensor in [*module.parameters(), *module.buffers()]):
        raise WeightsError(f"{source}: some tensors of {type(module).__name__} were not loaded")
    return module


def load_bfl(
    folder: str | Path | None = None,
    *,
    preset: str | UniDGPreset = "full",
    settings: UniDGSettings | None = None,
    transformer_file: str | Path | None = None,
    vae_file: str | Path | None = None,
    redux_file: str | Path | None = None,
    image_encoder_folder: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attention_backend: str = "sdpa",
) -> UniDGModel:
    """A UniDGModel from Black Forest Labs' single files, shaped by ``preset`` (a local config, no hub).

    By default ``folder`` holds flux1-fill-dev.safetensors, ae.safetensors, flux1-redux-dev.safetensors and
    image_encoder/ (a SigLIP so400m SiglipVisionModel folder, e.g. FLUX.1-Redux-dev's); each can be given
    explicitly instead.
    """
    preset = get_preset(preset)
    base = Path(folder) if folder is not None else None

    def path_of(explicit: str | Path | None, default: str, what: str) -> Path:
        if explicit is not None:
            return Path(explicit)
        if base is None:
            raise WeightsError(f"pass folder= or the {what} path explicitly")
        return base / default

    transformer_path = path_of(transformer_file, BFL_TRANSFORMER_FILE, "transformer_file")
    vae_path = path_of(vae_file, BFL_VAE_FILE, "vae_file")
    redux_path = path_of(redux_file, BFL_REDUX_FILE, "redux_file")
    encoder_path = path_of(image_encoder_folder, "image_encoder", "image_encoder_folder")

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**preset.transformer.config())
        vae = AutoencoderKL(**preset.vae.config())
        redux = ReduxImageEncoder(**preset.redux.config())
    transformer_state = convert_bfl_transformer(
        _load_safetensors(transformer_path, "FLUX.1-Fill transformer"), preset.transformer.inner_dim
    )
    _assign(transformer, transformer_state, transformer_path, dtype)
    del transformer_state
    vae_state = convert_ldm_vae_checkpoint(_load_safetensors(vae_path, "FLUX VAE"), preset.vae.config())
    _assign(vae, vae_state, vae_path, dtype)
    _assign(redux, _load_safetensors(redux_path, "FLUX.1-Redux"), redux_path, dtype)
    image_encoder = SiglipVisionModel.from_pretrained(
        _component_folder(encoder_path.parent, (encoder_path.name,)), dtype=dtype, local_files_only=True
    )
    model = UniDGModel(transformer, vae, image_encoder, redux, settings or preset.settings, attention_backend)
    return model.to(device).eval()


def load_weights_model(weights: WeightsInfo, settings: UniDGSettings | None = None) -> UniDGModel:
    """The UniDGModel of a checked weights folder (float32, CPU, eval mode)."""
    return load_model(weights.path, settings=settings or weights.settings).eval()
