"""``unidg weights import``: FLUX.1-Fill-dev, FLUX.1-Redux-dev and SigLIP so400m downloads -> a weights folder.

Sources, mixed freely (one per component; an explicit component option wins over ``--fill`` / ``--redux``):

* a diffusers folder: ``FluxFillPipeline`` (transformer/, vae/), ``FluxPriorReduxPipeline`` (image_embedder/,
  image_encoder/), or one component's folder (config.json + safetensors, sharded or not);
* Black Forest Labs' single files: flux1-fill-dev.safetensors (+ ae.safetensors beside it), flux1-redux-dev.safetensors;
* an offline Hugging Face cache: a ``models--ORG--NAME`` folder, a ``snapshots/<hash>`` folder, or a repo id
  looked up in ``--hf-cache`` (never downloaded).

Every source is checked against the preset before anything is written — keys, shapes and dtypes, in the source's
own key names, so a partial download, FLUX.1-dev instead of FLUX.1-Fill-dev or an fp8 checkpoint is refused naming
the file and key. Then each component is copied one tensor group (a block) at a time, BFL keys converted by
diffusers' single-file converters (``unidg.train.loading``), into the folder layout ``save_model`` writes, with a
manifest naming the sources, their sha256 and their license files (copied to ``licenses/``). The folder is built
beside its destination and renamed into place at the end; a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from huggingface_hub import metadata_load, snapshot_download
from huggingface_hub.constants import HF_HUB_CACHE
from huggingface_hub.errors import LocalEntryNotFoundError
from torch import nn
from tqdm import tqdm

from unidg.core.manifest import WEIGHTS_KIND, WeightsError, sha256_file, tool_versions, write_manifest
from unidg.core.staging import check_output_folder, staged_folder
from unidg.train.loading import (
    BFL_PREFIX,
    BFL_REDUX_FILE,
    BFL_TRANSFORMER_FILE,
    BFL_VAE_FILE,
    REDUX_FOLDERS,
    bfl_transformer_state_dict,
    bfl_vae_state_dict,
    convert_bfl_transformer,
)
from unidg.train.model import COMPONENTS, UniDGModel
from unidg.train.presets import UniDGPreset, get_preset
from unidg.train.weights_files import (
    COMPONENT_WEIGHTS_NAMES,
    DEFAULT_SHARD_BYTES,
    FLOAT_DTYPES,
    Checkpoint,
    ShardWriter,
    component_files,
)

FILL_REPO = "black-forest-labs/FLUX.1-Fill-dev"
REDUX_REPO = "black-forest-labs/FLUX.1-Redux-dev"
SIGLIP_REPO = "google/siglip-so400m-patch14-384"
LICENSES_FOLDER = "licenses"

WHAT = {
    "transformer": "FLUX.1-Fill transformer",
    "vae": "FLUX VAE",
    "image_encoder": "SigLIP image encoder",
    "redux": "FLUX.1-Redux image embedder",
}
DIFFUSERS_CLASSES = {"transformer": "FluxTransformer2DModel", "vae": "AutoencoderKL", "redux": "ReduxImageEncoder"}
# Subfolders of a diffusers pipeline folder that hold each component (FluxFillPipeline, FluxPriorReduxPipeline).
PIPELINE_FOLDERS = {
    "transformer": ("transformer",),
    "vae": ("vae",),
    "image_encoder": ("image_encoder",),
    "redux": REDUX_FOLDERS,
}
BFL_FILES = {"transformer": BFL_TRANSFORMER_FILE, "vae": BFL_VAE_FILE, "redux": BFL_REDUX_FILE}
# A full SiglipModel checkpoint (google/siglip-so400m-patch14-384) also holds the text tower: not needed.
SIGLIP_IGNORED = ("text_model.", "logit_scale", "logit_bias")
_LICENSE_NAME = re.compile(r"^(licen[cs]e|copying|notice)([._-].*)?$", re.IGNORECASE)


@dataclass
class ComponentSource:
    """Where one component comes from, and what its checkpoint holds (headers only)."""

    component: str
    option: str  # the command-line option that named it
    layout: str  # "diffusers" or "bfl"
    path: Path  # the component folder or single file
    checkpoint: Checkpoint
    license_root: Path  # the download's top folder, where its license lives
    ignored: tuple[str, ...] = ()
    drop_prefix: str = ""  # SigLIP saved by transformers 4 ("vision_model.") read by transformers 5, ...
    add_prefix: str = ""  # ... and the other way round

    def source_key(self, key: str) -> str:
        """The key in the converter's (or the model's) namespace."""
        if self.layout == "bfl":
            return key.removeprefix(BFL_PREFIX)  # some BFL exports carry ComfyUI's prefix
        return self.add_prefix + key.removeprefix(self.drop_prefix)

    def kept_keys(self) -> list[str]:
        return [key for key in self.checkpoint.tensors if not key.startswith(self.ignored)]


@dataclass
class ImportSources:
    """The command line's sources, as given (paths, folders or repo ids)."""

    fill: str | None = None
    redux: str | None = None
    transformer: str | None = None
    vae: str | None = None
    image_encoder: str | None = None
    image_embedder: str | None = None
    hf_cache: str | None = None


# ---------------------------------------------------------------------------------------------- finding the sources
def resolve_location(value: str, option: str, hf_cache: str | Path | None) -> Path:
    """A file or folder on disk; a Hugging Face cache repo folder or repo id becomes its snapshot folder."""
    path = Path(value).expanduser()
    if path.exists():
        if path.is_dir() and path.name.startswith("models--") and (path / "snapshots").is_dir():
            return _snapshot(path.name.removeprefix("models--").replace("--", "/"), path.parent, option)
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", value) and not value.startswith("."):
        return _snapshot(value, hf_cache, option)
    raise WeightsError(f"{option} {value}: no such file or folder")


def _snapshot(repo: str, cache: str | Path | None, option: str) -> Path:
    cache_dir = Path(cache).expanduser() if cache else Path(HF_HUB_CACHE)
    try:
        return Path(snapshot_download(repo, cache_dir=str(cache_dir), local_files_only=True))
    except LocalEntryNotFoundError:
        raise WeightsError(
            f"{option} {repo}: no snapshot of it in the Hugging Face cache {cache_dir}; download it where the hub is "
            f"reachable (`hf download {repo}`) and pass --hf-cache, or pass the downloaded folder"
        ) from None


def _diffusers_source(folder: Path, component: str, option: str, license_root: Path) -> ComponentSource:
    label = f"{option} {folder}"
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise WeightsError(f"{label}: {config_path} is missing or unreadable ({error})") from error
    ignored: tuple[str, ...] = ()
    if component == "image_encoder":
        model_type = config.get("model_type")
        if model_type not in ("siglip_vision_model", "siglip"):
            raise WeightsError(
                f"{label}: {config_path} is a {model_type!r} model; the image encoder is SigLIP so400m "
                f"({SIGLIP_REPO}, or FLUX.1-Redux-dev's image_encoder/)"
            )
        ignored = SIGLIP_IGNORED if model_type == "siglip" else ()
    elif config.get("_class_name") != DIFFUSERS_CLASSES[component]:
        raise WeightsError(
            f"{label}: {config_path} describes a {config.get('_class_name')!r}; the {WHAT[component]} is a "
            f"diffusers {DIFFUSERS_CLASSES[component]}"
        )
    files = component_files(folder, COMPONENT_WEIGHTS_NAMES[component], label)
    return ComponentSource(
        component, option, "diffusers", folder, Checkpoint(files, label), license_root, ignored=ignored
    )


def _bfl_source(file: Path, component: str, option: str) -> ComponentSource:
    if component == "image_encoder":
        raise WeightsError(f"{option} {file}: the image encoder is a folder (config.json + model.safetensors)")
    if file.suffix != ".safetensors":
        raise WeightsError(f"{option} {file}: not a .safetensors file; unidg reads safetensors only")
    return ComponentSource(component, option, "bfl", file, Checkpoint([file], f"{option} {file}"), file.parent)


def _license_root(folder: Path) -> Path:
    """A component folder downloaded on its own carries its license; one inside a pipeline, its parent does."""
    has_card = any(_LICENSE_NAME.match(path.name) or path.name == "README.md" for path in folder.iterdir())
    return folder if has_card else folder.parent


def component_source(location: Path, component: str, option: str, *, required: bool = True) -> ComponentSource | None:
    """One component from a file or folder: a BFL single file, a component folder, a pipeline folder (its
    subfolder), or a folder holding the BFL file."""
    if location.is_file():
        return _bfl_source(location, component, option)
    if (location / "config.json").is_file() and not any(
        (location / name / "config.json").is_file() for name in PIPELINE_FOLDERS[component]
    ):
        return _diffusers_source(location, component, option, _license_root(location))
    for name in PIPELINE_FOLDERS[component]:
        if (location / name / "config.json").is_file():
            return _diffusers_source(location / name, component, option, location)
    bfl_name = BFL_FILES.get(component)
    if bfl_name and (location / bfl_name).is_file():
        return _bfl_source(location / bfl_name, component, option)
    if not required:
        return None
    looked_for = [f"{name}/config.json" for name in PIPELINE_FOLDERS[component]] + ([bfl_name] if bfl_name else [])
    raise WeightsError(f"{option} {location}: no {WHAT[component]} in it (looked for {', '.join(looked_for)})")


def find_sources(sources: ImportSources) -> dict[str, ComponentSource]:
    """The source of every component; refuses a missing one naming the option that supplies it."""
    fill, redux = sources.fill, sources.redux
    if sources.hf_cache and not any(
        (fill, redux, sources.transformer, sources.vae, sources.image_encoder, sources.image_embedder)
    ):
        fill, redux = FILL_REPO, REDUX_REPO
    found: dict[str, ComponentSource] = {}
    if fill:
        location = resolve_location(fill, "--fill", sources.hf_cache)
        if location.is_file():  # flux1-fill-dev.safetensors; ae.safetensors is expected beside it
            found["transformer"] = _bfl_source(location, "transformer", "--fill")
            if (location.parent / BFL_VAE_FILE).is_file():
                found["vae"] = _bfl_source(location.parent / BFL_VAE_FILE, "vae", "--fill")
        else:
            for component in ("transformer", "vae"):
                source = component_source(location, component, "--fill", required=False)
                if source:
                    found[component] = source
            if not found:
                raise WeightsError(
                    f"--fill {location}: neither a FluxFillPipeline folder (transformer/, vae/) nor BFL's "
                    f"{BFL_TRANSFORMER_FILE} + {BFL_VAE_FILE}"
                )
    if redux:
        location = resolve_location(redux, "--redux", sources.hf_cache)
        if location.is_file():
            found["redux"] = _bfl_source(location, "redux", "--redux")
        else:
            for component in ("redux", "image_encoder"):
                source = component_source(location, component, "--redux", required=False)
                if source:
                    found[component] = source
            if "redux" not in found:
                raise WeightsError(
                    f"--redux {location}: neither a FluxPriorReduxPipeline folder (image_embedder/, image_encoder/) "
                    f"nor BFL's {BFL_REDUX_FILE}"
                )
    explicit = {
        "transformer": (sources.transformer, "--transformer"),
        "vae": (sources.vae, "--vae"),
        "image_encoder": (sources.image_encoder, "--image-encoder"),
        "redux": (sources.image_embedder, "--image-embedder"),
    }
    for component, (value, option) in explicit.items():
        if value:
            found[component] = component_source(resolve_location(value, option, sources.hf_cache), component, option)
    supplied_by = {
        "transformer": "--fill (FLUX.1-Fill-dev) or --transformer",
        "vae": f"--fill (FLUX.1-Fill-dev, or {BFL_VAE_FILE} beside {BFL_TRANSFORMER_FILE}) or --vae",
        "image_encoder": f"--redux (FLUX.1-Redux-dev's diffusers folder) or --image-encoder ({SIGLIP_REPO})",
        "redux": "--redux (FLUX.1-Redux-dev) or --image-embedder",
    }
    missing = [component for component in COMPONENTS if component not in found]
    if missing:
        raise WeightsError(
            "no source for the "
            + "; ".join(f"{WHAT[component]}: pass {supplied_by[component]}" for component in missing)
        )
    return found


# ---------------------------------------------------------------------------------------------- checking
def expected_source_shapes(source: ComponentSource, module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Key -> shape the preset needs, in the source's own key names."""
    state = module.state_dict()
    if source.layout == "bfl" and source.component == "transformer":
        state = bfl_transformer_state_dict(state)
    elif source.layout == "bfl" and source.component == "vae":
        state = bfl_vae_state_dict(state, num_blocks=len(module.config.block_out_channels))
    return {key: tuple(tensor.shape) for key, tensor in state.items()}


def _shape_hint(source: ComponentSource, key: str, shape: tuple[int, ...]) -> str:
    if source.component == "transformer" and key in ("x_embedder.weight", "img_in.weight") and shape[-1] == 64:
        return " — this is FLUX.1-dev (64 input channels); import FLUX.1-Fill-dev (384)"
    return " — a checkpoint for another model or preset (--preset)"


def _align_prefix(source: ComponentSource, expected: dict[str, tuple[int, ...]], prefix: str) -> None:
    """transformers 4 saved SigLIP's weights under ``vision_model.``, transformers 5 without: read either."""
    keys = source.kept_keys()
    if any(source.source_key(key) in expected for key in keys):
        return
    if any(key.startswith(prefix) for key in keys) and not any(key.startswith(prefix) for key in expected):
        source.drop_prefix = prefix
    elif any(key.startswith(prefix) for key in expected):
        source.add_prefix = prefix


def check_source(source: ComponentSource, expected: dict[str, tuple[int, ...]], preset: UniDGPreset) -> None:
    """Refuse unknown keys, missing keys, wrong shapes and non-float dtypes, naming the file and the key."""
    if source.component == "image_encoder":
        _align_prefix(source, expected, "vision_model.")
    tensors = source.checkpoint.tensors
    label = f"{source.option} {WHAT[source.component]}"
    present = set()
    for key in source.kept_keys():
        info, name = tensors[key], source.source_key(key)
        if name not in expected:
            raise WeightsError(
                f"{label}: {info.file} has the unknown key {key!r}; it is not a {WHAT[source.component]} checkpoint"
                f" (preset {preset.name})"
            )
        if info.shape != expected[name]:
            raise WeightsError(
                f"{label}: {info.file}: {key} has shape {info.shape}, preset {preset.name} needs "
                f"{expected[name]}{_shape_hint(source, name, info.shape)}"
            )
        if info.dtype not in FLOAT_DTYPES:
            raise WeightsError(
                f"{label}: {info.file}: {key} is {info.dtype}; a weights folder holds float32, bfloat16 or float16 "
                "(quantized checkpoints are not imported: quantize with `unidg export quantize` instead)"
            )
        present.add(name)
    missing = [key for key in expected if key not in present]
    if missing:
        where = source.path if source.path.is_file() else ", ".join(str(f) for f in source.checkpoint.files)
        raise WeightsError(
            f"{label}: {where} lacks {missing[0]!r}"
            + (f" and {len(missing) - 1} more keys" if len(missing) > 1 else "")
            + " — a partial download or another model; fetch the complete files"
        )


# ---------------------------------------------------------------------------------------------- writing
def _converter(source: ComponentSource, preset: UniDGPreset) -> Callable[[dict], dict] | None:
    if source.layout != "bfl":
        return None
    if source.component == "transformer":
        return lambda state: convert_bfl_transformer(state, preset.transformer.inner_dim)
    if source.component == "vae":
        return lambda state: convert_ldm_vae_checkpoint(state, preset.vae.config())
    return None  # flux1-redux-dev.safetensors already has diffusers' ReduxImageEncoder keys


def write_component(
    source: ComponentSource,
    module: nn.Module,
    folder: Path,
    *,
    preset: UniDGPreset,
    dtype: torch.dtype | None,
    shard_bytes: int,
    bar: tqdm,
) -> dict:
    """Copy one component group by group into ``folder`` (config.json + safetensors); returns its summary.

    A BFL converter needs the whole state dict's keys: it is handed the group's tensors plus zero-byte meta stand-ins
    for every other key, and only the real tensors it returns are kept (FLUX's conversions never mix blocks).
    """
    expected = {key: tuple(tensor.shape) for key, tensor in module.state_dict().items()}
    converter = _converter(source, preset)
    checkpoint = source.checkpoint
    keys = source.kept_keys()
    stand_ins = {
        source.source_key(key): (checkpoint.tensors[key].shape, FLOAT_DTYPES[checkpoint.tensors[key].dtype])
        for key in keys
    }
    writer = ShardWriter(folder, COMPONENT_WEIGHTS_NAMES[source.component], shard_bytes)
    written: set[str] = set()
    dtypes: set[str] = set()
    parameters = 0
    for group_keys in checkpoint.groups(keys).values():
        tensors = {source.source_key(key): tensor for key, tensor in checkpoint.read(group_keys).items()}
        bar.update(sum(checkpoint.tensors[key].nbytes for key in group_keys))
        if converter is not None:
            state = {
                key: torch.empty(shape, dtype=kind, device="meta")
                for key, (shape, kind) in stand_ins.items()
                if key not in tensors
            }
            state.update(tensors)
            converted = {key: value for key, value in converter(state).items() if not value.is_meta}
        else:
            converted = tensors
        for key, tensor in converted.items():
            if key not in expected or key in written or tuple(tensor.shape) != expected[key]:
                raise WeightsError(f"{source.option} {source.path}: converting it gave an unexpected tensor {key}")
            # A copy: converters return views (q, k, v of one qkv tensor) that share storage.
            copy = tensor.to(dtype=dtype or tensor.dtype, copy=True).contiguous()
            writer.add(key, copy)
            written.add(key)
            dtypes.add(str(copy.dtype).removeprefix("torch."))
            parameters += copy.numel()
        del tensors, converted
    missing = sorted(set(expected) - written)
    if missing:
        raise WeightsError(f"{source.option} {source.path}: nothing converted to {missing[0]}; a partial checkpoint")
    files = writer.finish()
    if source.component == "image_encoder":
        module.config.architectures = [type(module).__name__]
        module.config.save_pretrained(folder)
    else:
        module.save_config(folder)
    return {
        "layout": source.layout,
        "tensors": len(written),
        "parameters": parameters,
        "dtype": dtypes.pop() if len(dtypes) == 1 else sorted(dtypes),
        "files": len(files),
    }


# ---------------------------------------------------------------------------------------------- provenance
def _file_sha256(path: Path) -> str:
    """The sha256 of a file; a Hugging Face cache blob is named by it already."""
    blob = path.resolve()
    if path.is_symlink() and blob.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", blob.name):
        return blob.name
    return sha256_file(path)


def license_of(root: Path, label: str, licenses: Path) -> dict:
    """Copy the license files of a download into ``licenses/LABEL/``; read its model card's license fields."""
    entry: dict = {"files": []}
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if path.is_file() and _LICENSE_NAME.match(path.name):
            target = licenses / label / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            entry["files"].append(target.relative_to(licenses.parent).as_posix())
    card = root / "README.md"
    if card.is_file():
        try:
            metadata = metadata_load(card) or {}
        except Exception:  # a model card with broken front matter still imports; its license is read from LICENSE*
            metadata = {}
        entry.update({key: metadata[key] for key in ("license", "license_name", "license_link") if key in metadata})
    return entry


def _describe_source(source: ComponentSource, hashes: bool) -> dict:
    files = []
    for file in source.checkpoint.files:
        item = {"name": file.name, "bytes": file.stat().st_size}
        if hashes:
            item["sha256"] = _file_sha256(file)
        files.append(item)
    return {"option": source.option, "layout": source.layout, "path": str(source.path), "files": files}


# ---------------------------------------------------------------------------------------------- the command
def import_weights(
    out: str | Path,
    sources: ImportSources,
    *,
    preset: str | UniDGPreset = "full",
    dtype: torch.dtype | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    hash_sources: bool = True,
    progress: bool = True,
) -> dict:
    """Check every source against ``preset``, then write the weights folder ``out``; returns a report."""
    start = time.perf_counter()
    preset = get_preset(preset)
    out = check_output_folder(out, replace=overwrite)
    found = find_sources(sources)
    meta = UniDGModel.from_preset(preset, device="meta")
    modules = {component: getattr(meta, component) for component in COMPONENTS}
    for component in COMPONENTS:
        check_source(found[component], expected_source_shapes(found[component], modules[component]), preset)

    total = sum(source.checkpoint.nbytes for source in found.values())
    components, described, licenses = {}, {}, {}
    with staged_folder(out, replace=overwrite) as staging:
        with tqdm(total=total, unit="B", unit_scale=True, desc="importing", disable=not progress) as bar:
            for component in COMPONENTS:
                bar.set_postfix_str(component)
                components[component] = write_component(
                    found[component],
                    modules[component],
                    staging / component,
                    preset=preset,
                    dtype=dtype,
                    shard_bytes=shard_bytes,
                    bar=bar,
                )
        for component in COMPONENTS:
            source = found[component]
            described[component] = _describe_source(source, hash_sources)
            label = source.option.removeprefix("--")
            if label not in licenses:
                licenses[label] = {"root": str(source.license_root)} | license_of(
                    source.license_root, label, staging / LICENSES_FOLDER
                )
        preset.settings.save(staging)
        parameters = {component: entry["parameters"] for component, entry in components.items()}
        parameters["total"] = sum(parameters.values())  # as save_model records it
        kinds = {str(entry["dtype"]) for entry in components.values()}
        metadata = {
            "format": "diffusers",
            "stage": "imported",
            "preset": preset.name,
            "parameters": parameters,
            "dtype": kinds.pop() if len(kinds) == 1 else "mixed",
            "components": components,
            "sources": described,
            "licenses": licenses,
            "tools": tool_versions("unidg", "torch", "diffusers", "transformers", "safetensors"),
        }
        write_manifest(staging, WEIGHTS_KIND, metadata)
    return {"folder": str(out), "seconds": round(time.perf_counter() - start, 2), **metadata}
