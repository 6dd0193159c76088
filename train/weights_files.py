"""Safetensors checkpoints read and written one tensor group at a time, and the component folders of a weights folder.

A checkpoint is one ``.safetensors`` file or several shards; ``Checkpoint`` maps every key to its file from the headers
alone and reads the tensors of one group (one transformer block, one VAE level, ...) per call, opening and closing
its files each time, so a 24 GB model never sits in memory whole (safetensors maps the file; closing it unmaps the
pages that were read). ``ShardWriter`` writes a component back the way ``save_pretrained`` does: one file, or
numbered shards plus ``*.safetensors.index.json``, each shard flushed once it reaches the size limit.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from unidg.core.manifest import WeightsError, atomic_write_text
from unidg.core.weights_folder import read_weights

# Diffusers models (transformer, vae, redux) and transformers models (SigLIP) name their weight files differently.
DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS_NAME = "model.safetensors"
# The weight file of each component of a weights folder (``unidg.train.loading.save_model``'s layout).
COMPONENT_WEIGHTS_NAMES = {
    "transformer": DIFFUSERS_WEIGHTS_NAME,
    "vae": DIFFUSERS_WEIGHTS_NAME,
    "image_encoder": TRANSFORMERS_WEIGHTS_NAME,
    "redux": DIFFUSERS_WEIGHTS_NAME,
}
INDEX_SUFFIX = ".index.json"
DEFAULT_SHARD_BYTES = 2 << 30
# dtypes a weights folder may hold; quantized checkpoints (fp8, int8) are refused.
FLOAT_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_GROUP = re.compile(r"^(.*?\.\d+)\.")


def group_of(key: str) -> str:
    """The tensor group a key belongs to: its prefix up to the first numbered module (a block), else ``""``."""
    match = _GROUP.match(key)
    return match.group(1) if match else ""


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: F32, BF16, ...

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @property
    def nbytes(self) -> int:
        return self.numel * {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1}.get(self.dtype, 4)


class Checkpoint:
    """The tensors of one or several safetensors files, known by their headers; read group by group."""

    def __init__(self, files: Iterable[Path], label: str) -> None:
        self.label = label
        self.files = [Path(file) for file in files]
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        for file in self.files:
            if not file.is_file():
                raise WeightsError(f"{label}: {file} is missing (an incomplete download?); fetch the file again")
            try:
                with safe_open(str(file), framework="pt") as handle:
                    self.metadata.update(handle.metadata() or {})
                    for key in handle.keys():
                        view = handle.get_slice(key)
                        if key in self.tensors:
                            raise WeightsError(f"{label}: {key} is in both {self.tensors[key].file} and {file}")
                        self.tensors[key] = TensorInfo(file, tuple(view.get_shape()), view.get_dtype())
            except SafetensorError as error:
                raise WeightsError(
                    f"{label}: {file} is not a readable safetensors file ({error}); it may be truncated — "
                    "fetch it again"
                ) from error

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def groups(self, keys: Iterable[str] | None = None) -> dict[str, list[str]]:
        """Keys by group, groups in first-seen order."""
        grouped: dict[str, list[str]] = {}
        for key in keys if keys is not None else self.tensors:
            grouped.setdefault(group_of(key), []).append(key)
        return grouped

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors (copies in memory); each file is opened for this call only."""
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.tensors[key].file, []).append(key)
        out = {}
        for file, names in by_file.items():
            try:
                with safe_open(str(file), framework="pt") as handle:
                    for name in names:
                        out[name] = handle.get_tensor(name)
            except SafetensorError as error:
                raise WeightsError(f"{self.label}: reading {file} failed ({error}); fetch the file again") from error
        return out


def component_files(folder: Path, weights_name: str, label: str) -> list[Path]:
    """The safetensors files of a model folder: its index's shards, else the standard file, else its only file."""
    index = folder / f"{weights_name}{INDEX_SUFFIX}"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise WeightsError(f"{label}: {index} is not a shard index ({error}); fetch it again") from error
        return [folder / name for name in dict.fromkeys(weight_map.values())]
    if (folder / weights_name).is_file():
        return [folder / weights_name]
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return found
    if found:
        raise WeightsError(
            f"{label}: {folder} holds several safetensors files ({', '.join(p.name for p in found)}) and no "
            f"{weights_name}{INDEX_SUFFIX}; pass the folder of one model"
        )
    pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
    if pickled:
        raise WeightsError(
            f"{label}: {folder} has only {', '.join(pickled)}; unidg reads safetensors only — convert them first"
        )
    raise WeightsError(f"{label}: {folder} has no {weights_name} (an incomplete download?)")


def shard_name(weights_name: str, index: int, count: int) -> str:
    """``save_pretrained``'s shard names: model-00001-of-00003.safetensors."""
    stem = weights_name.removesuffix(".safetensors")
    return f"{stem}-{index:05d}-of-{count:05d}.safetensors"


class ShardWriter:
    """Write a component's tensors as ``save_pretrained`` lays them out, holding at most one shard in memory."""

    def __init__(self, folder: Path, weights_name: str, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        self.folder = folder
        self.weights_name = weights_name
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[key] = tensor
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        if not self._pending:
            return
        path = self.folder / f".shard-{len(self._written):05d}.tmp"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._written.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[Path]:
        """Name the shards and write the index (only when there are several); returns the weight files."""
        self._flush()
        if not self._written:
            raise WeightsError(f"{self.folder}: no tensors were written")
        if len(self._written) == 1:
            target = self.folder / self.weights_name
            self._written[0][0].replace(target)
            return [target]
        weight_map, files = {}, []
        for number, (path, keys) in enumerate(self._written, start=1):
            target = self.folder / shard_name(self.weights_name, number, len(self._written))
            path.replace(target)
            files.append(target)
            weight_map.update(dict.fromkeys(keys, target.name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write_text(self.folder / f"{self.weights_name}{INDEX_SUFFIX}", json.dumps(index, indent=2) + "\n")
        return files


def iter_groups(checkpoint: Checkpoint) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """(group, tensors) for every group of ``checkpoint``, one group in memory at a time."""
    for group, keys in checkpoint.groups().items():
        yield group, checkpoint.read(keys)


# ---------------------------------------------------------------------------------------------- describing a folder
def _dtype_name(safetensors_dtype: str) -> str:
    kind = FLOAT_DTYPES.get(safetensors_dtype)
    return str(kind).removeprefix("torch.") if kind is not None else safetensors_dtype


def describe_weights(folder: str | Path, *, verify: bool = False) -> dict:
    """What a weights folder holds: its manifest's story (stage, sources, licenses, LoRA merges), settings, and per
    component the class, tensors, parameters, dtypes and bytes read from the safetensors headers."""
    if not Path(folder).is_dir():
        raise WeightsError(f"{folder} is not a folder; pass a weights folder (unidg weights import / train merge)")
    weights = read_weights(folder, verify=verify)
    components = {}
    for component, weights_name in COMPONENT_WEIGHTS_NAMES.items():
        path = weights.path / component
        if component == "redux" and not path.is_dir():
            path = weights.path / "image_embedder"
        config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        checkpoint = Checkpoint(component_files(path, weights_name, str(weights.path)), str(path))
        dtypes = sorted({_dtype_name(info.dtype) for info in checkpoint.tensors.values()})
        components[component] = {
            "class": config.get("_class_name") or (config.get("architectures") or [config.get("model_type")])[0],
            "tensors": len(checkpoint.tensors),
            "parameters": sum(info.numel for info in checkpoint.tensors.values()),
            "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
            "files": len(checkpoint.files),
            "bytes": sum(file.stat().st_size for file in checkpoint.files),
        }
    metadata = weights.manifest.metadata
    return {
        "folder": str(weights.path),
        "fingerprint": weights.fingerprint,
        "verified": verify,
        "stage": metadata.get("stage", "unknown"),
        "preset": metadata.get("preset"),
        "settings": weights.settings.to_dict(),
        "components": components,
        "sources": metadata.get("sources"),
        "licenses": metadata.get("licenses"),
        "lora": metadata.get("lora") or metadata.get("merge"),
    }
