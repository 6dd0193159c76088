"""``unidg train text``: UniDG-Text (paper App. B.3) — instruction-based defect editing fine-tuned from the merged
Diversity-SFT weights on two data distributions built from UDG quadruplets:

* **reference form**: every Diversity-SFT pair (the three distributions of ``unidg.train.pairs``), its diptych as in
  reference mode, the instruction ``REFERENCE_INSTRUCTION``;
* **no-reference form**: every target quadruplet once, the diptych of ``unidg.core.geometry.build_text_diptych``
  (black left half), zero Redux tokens, the instruction "Add the {attributes} {category} defect to the image." with
  attributes drawn from the caption by (``text.instruction_seed``, quadruplet id).

Each batch mixes the forms in the ratio ``text.no_reference`` (the reference form's share keeps ``train.mix``
between the three distributions), interleaved deterministically as SFT interleaves its distributions.

Everything else is Diversity-SFT's: ``unidg.train.sft.train_sft`` runs the same trainer, LoRA, checkpoints, resume and
torch.distributed path, and the latents are cached by the same code (in memory, or the sharded cache of
``data.latent_cache``). What is added here: the samples of the two forms (``TextPair``), the instructions' CLIP pooled
outputs and T5 hidden states computed once with the frozen encoders and kept beside the latents
(``text-features.safetensors``, keyed by the encoders' files, the instruction seed, K and the sample list, so a
change of any of them recomputes it), and the batches that carry them to ``model.context(text_states=)`` /
``model.velocity(pooled=)``. The run's LoRA folds in with ``unidg train merge`` as SFT's does; its lora.json and the
merged folder's manifest record ``text`` (the encoders, K, the forms' ratio).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from unidg.core.errors import UniDGError
from unidg.core.instructions import REFERENCE_INSTRUCTION, UNSAID, defect_attributes, instruction
from unidg.core.manifest import WEIGHTS_KIND, ManifestError, read_manifest
from unidg.core.settings import UniDGSettings
from unidg.core.staging import staged_folder
from unidg.core.text import FLUX_TEXT_FOLDERS, T5_MAX_LENGTH
from unidg.core.udg import Quadruplet
from unidg.train.config import ConfigError, SFTConfig, _check, load_config, settings_of
from unidg.train.dataset import LatentPairs, pair_key
from unidg.train.latent_cache import (
    DamagedManifest,
    StreamedLatents,
    build_cache,
    cache_key,
    data_digest,
    key_differences,
)
from unidg.train.latent_cache import read_manifest as read_cache_manifest
from unidg.train.pairs import DISTRIBUTIONS, TrainingPair, prepare_pairs, select_pairs
from unidg.train.run_setup import frozen_model, open_run_folder, training_dtype
from unidg.train.sft import SFTRun, train_sft
from unidg.train.text_encoders import (
    TEXT_PRESETS,
    TextEncoderError,
    load_text_encoders,
    make_text_encoders,
    save_text_encoders,
)
from unidg.train.trainer import Placement, barrier, distributed

TEXT_FEATURES_FILE = "text-features.safetensors"
TEXT_FEATURES_VERSION = 1
RANDOM_ENCODERS_FOLDER = "text_encoders"  # OUTPUT/text_encoders: the random encoders of text.random_encoders
TEXT_FORMS = "reference+no-reference/1"  # the sample list's layout, part of the latent cache's key
SMALL_FILE = 64 << 20  # encoder files up to this size are hashed whole; larger ones (weights) by size and mtime
ENCODE_BATCH = 16


# ============================================================================ configuration
@dataclass
class TextConfig:
    encoders: str = ""  # a FLUX-layout folder: text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/
    random_encoders: str = ""  # "nano": random encoders saved in OUTPUT/text_encoders (an end-to-end test, no quality)
    no_reference: float = 0.5  # share of no-reference samples in every batch
    instruction_seed: int = 0  # which caption attributes each no-reference instruction says

    def validate(self, where: str) -> None:
        if bool(self.encoders) == bool(self.random_encoders):
            raise ConfigError(
                f"{where}: set exactly one of text.encoders (a FLUX.1 folder with {', '.join(FLUX_TEXT_FOLDERS)}) "
                'and text.random_encoders ("nano": random encoders for tests)'
            )
        _check(
            self.random_encoders in ("", *TEXT_PRESETS),
            where,
            "text.random_encoders",
            f"must be one of {sorted(TEXT_PRESETS)} (or empty with text.encoders)",
            self.random_encoders,
        )
        _check(0 <= self.no_reference <= 1, where, "text.no_reference", "must be in [0, 1]", self.no_reference)
        _check(self.instruction_seed >= 0, where, "text.instruction_seed", "must be >= 0", self.instruction_seed)


@dataclass
class TextSFTConfig(SFTConfig):
    """``unidg train text``: an SFT config (base = the merged SFT weights) plus the ``[text]`` table."""

    text: TextConfig = field(default_factory=TextConfig)

    def validate(self, where: str) -> None:
        super().validate(where)
        self.text.validate(where)
        if self.settings.get("fold_text_tokens"):
            raise ConfigError(
                f"{where}: settings.fold_text_tokens must be false for UniDG-Text: an instruction's text tokens "
                "differ from one another and cannot be folded (leave it out: text runs set it false)"
            )
        _check(
            1 <= settings_of(self).text_tokens <= T5_MAX_LENGTH,
            where,
            "settings.text_tokens",
            f"must be in [1, {T5_MAX_LENGTH}] (T5 tokens per instruction)",
            settings_of(self).text_tokens,
        )


def load_text_config(path: str | Path, overrides: list[str] | None = None) -> TextSFTConfig:
    return load_config(path, TextSFTConfig, overrides)


def check_merged_sft(base: str | Path) -> dict:
    """The manifest metadata of ``base``, refused unless it is a merged weights folder (``unidg train merge``)."""
    folder = Path(base)
    fix = (
        "UniDG-Text fine-tunes the merged Diversity-SFT model (paper B.3): run `unidg train sft`, fold its LoRA with "
        "`unidg train merge --base BASE --lora RUN --out W` and set base = W"
    )
    if not folder.is_dir():
        raise ConfigError(f"base {folder} is not a folder; {fix}")
    try:
        metadata = read_manifest(folder, kind=WEIGHTS_KIND).metadata
    except ManifestError as error:
        raise ConfigError(f"base {folder}: {error}; {fix}") from error
    if metadata.get("stage") != "merged":
        raise ConfigError(
            f"base {folder} is a {metadata.get('stage', 'unknown')!r} weights folder, not merged SFT weights; {fix}"
        )
    return metadata


def text_mode(folder: str | Path) -> dict | None:
    """The ``text`` record of a weights folder's manifest (a UniDG-Text model), or None (reference mode)."""
    return read_manifest(folder, kind=WEIGHTS_KIND).metadata.get("text")


# ============================================================================ samples
@dataclass(frozen=True)
class TextPair(TrainingPair):
    """One UniDG-Text sample: a Diversity-SFT pair in the reference form, or a target quadruplet without reference
    (``reference`` is then the target itself and unused: the left half is black, the Redux tokens zero)."""

    with_reference: bool = True
    instruction: str = REFERENCE_INSTRUCTION


def check_caption(quadruplet: Quadruplet, folder: str | Path) -> None:
    """Refuse a caption that says nothing of its defect: its no-reference instruction would be blind."""
    caption = quadruplet.caption if isinstance(quadruplet.caption, dict) else {}
    entries = caption.get("defect-level") or [{}]
    defect = entries[0] if isinstance(entries[0], dict) else {}
    said = [
        text
        for text in (defect.get("type"), defect.get("summary"), caption.get("summary"))
        if isinstance(text, str) and text.strip().lower() not in UNSAID
    ]
    if not said and not defect_attributes(caption):
        raise UniDGError(
            f"UDG folder {folder}: quadruplet {quadruplet.id} has an empty caption (no defect type, attribute or "
            "summary), so its no-reference instruction would name only the category; fill its caption "
            "(`unidg data check` validates the folder) or leave the quadruplet out"
        )


def text_pairs(pairs: Sequence[TrainingPair], instruction_seed: int, folder: str | Path = "") -> list[TextPair]:
    """The samples of both forms: every pair with the reference instruction, then every target once without a
    reference, its instruction drawn from its caption by (``instruction_seed``, id)."""
    samples = [TextPair(p.reference, p.target, p.distribution) for p in pairs]
    seen: set[str] = set()
    for pair in pairs:
        target = pair.target
        if target.id in seen:
            continue
        seen.add(target.id)
        check_caption(target, folder)
        text = instruction(
            target.caption, target.category, with_reference=False, seed=instruction_seed, sample_id=target.id
        )
        samples.append(TextPair(target, target, DISTRIBUTIONS[0], with_reference=False, instruction=text))
    return samples


def config_text_pairs(config: TextSFTConfig) -> list[TextPair]:
    pairs = select_pairs(prepare_pairs(config.data.train, config.seed, config.data.limit), config.train.mix)
    return text_pairs(pairs, config.text.instruction_seed, config.data.train)


# ============================================================================ encoders
def encoders_digest(folder: str | Path) -> str:
    """Hash of a text-encoder folder's four subfolders: small files (configs, tokenizers) by content, weight files
    by name, size and modification time (hashing 9.5 GB of T5-XXL on every launch would cost a minute)."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for name in FLUX_TEXT_FOLDERS:
        for path in sorted(p for p in (folder / name).rglob("*") if p.is_file()):
            stat = path.stat()
            digest.update(f"{path.relative_to(folder).as_posix()}:{stat.st_size}".encode())
            if stat.st_size <= SMALL_FILE:
                digest.update(path.read_bytes())
            else:
                digest.update(str(stat.st_mtime_ns).encode())
    return digest.hexdigest()


def prepare_encoders(config: TextSFTConfig, placement: Placement) -> Path:
    """The folder of the run's text encoders: ``text.encoders`` (checked), or the random encoders of
    ``text.random_encoders`` made once (rank 0) into OUTPUT/text_encoders and kept for resumes and merges."""
    if config.text.random_encoders:
        folder = Path(config.output) / RANDOM_ENCODERS_FOLDER
        if placement.is_main and not all((folder / name).is_dir() for name in FLUX_TEXT_FOLDERS):
            encoders = make_text_encoders(config.text.random_encoders, seed=config.seed)
            with staged_folder(folder, replace=True, flag="text encoders") as staging:
                save_text_encoders(encoders, staging)
        barrier(placement)
        return folder
    folder = Path(config.text.encoders)
    missing = [name for name in FLUX_TEXT_FOLDERS if not (folder / name).is_dir()]
    if not folder.is_dir() or missing:
        what = "is not a folder" if not folder.is_dir() else f"has no {', '.join(f'{m}/' for m in missing)}"
        raise TextEncoderError(
            f"text.encoders {folder} {what}; point it at a FLUX.1 pipeline folder holding "
            f"{', '.join(f'{name}/' for name in FLUX_TEXT_FOLDERS)} (e.g. the FLUX.1-Fill-dev download), or set "
            'text.random_encoders = "nano" (and text.encoders = "") for a test model'
        )
    return folder


# ============================================================================ cached text features
def features_key(config: TextSFTConfig, encoders: Path, keys: Sequence[str], settings: UniDGSettings) -> dict:
    """What the cached text features depend on: the encoders' files, the instructions (the UDG index and the
    instruction seed), K and the sample list."""
    return {
        "version": TEXT_FEATURES_VERSION,
        "encoders": encoders_digest(encoders),
        "instruction_seed": config.text.instruction_seed,
        "text_tokens": settings.text_tokens,
        "data": data_digest(config),
        "samples": hashlib.sha256(json.dumps(list(keys)).encode()).hexdigest(),
    }


@torch.no_grad()
def encode_features(pairs: Sequence[TextPair], encoders, text_tokens: int, dtype: torch.dtype) -> dict:
    """Tensors of the text-features file: each distinct instruction encoded once (pooled (U, P), hidden (U, K, D)),
    and per sample its instruction's row and whether it has a reference."""
    texts = list(dict.fromkeys(pair.instruction for pair in pairs))
    row = {text: index for index, text in enumerate(texts)}
    pooled, hidden = [], []
    for start in range(0, len(texts), ENCODE_BATCH):
        p, h = encoders.encode(texts[start : start + ENCODE_BATCH], max_length=text_tokens)
        pooled.append(p.to("cpu", dtype))
        hidden.append(h.to("cpu", dtype))
    return {
        "pooled": torch.cat(pooled).contiguous(),
        "hidden": torch.cat(hidden).contiguous(),
        "text_index": torch.tensor([row[pair.instruction] for pair in pairs], dtype=torch.int64),
        "with_reference": torch.tensor([pair.with_reference for pair in pairs], dtype=torch.uint8),
    }, texts


class TextFeatures:
    """The text-features file of a run: per sample the row of its instruction and its form; the rows (pooled and
    hidden) are read per batch, so a large table is never held in memory."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = path
        with safe_open(str(path), framework="pt") as handle:
            self.text_index = handle.get_tensor("text_index").numpy()
            self.with_reference = handle.get_tensor("with_reference").numpy().astype(bool)
            self.metadata = handle.metadata() or {}

    @property
    def texts(self) -> list[str]:
        return json.loads(self.metadata["texts"])

    @staticmethod
    def stored_key(path: Path) -> dict | None:
        from safetensors import safe_open

        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                return json.loads((handle.metadata() or {}).get("key", "null"))
        except Exception:  # a torn or foreign file is rebuilt like a stale one
            return None

    @staticmethod
    def write(path: Path, tensors: dict, texts: list[str], key: dict) -> None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata={"key": json.dumps(key, sort_keys=True), "texts": json.dumps(texts)})
        tmp.replace(path)

    def rows(self, samples: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled (B, P), hidden (B, K, D)) float32 of the given samples."""
        from safetensors import safe_open

        rows = self.text_index[np.asarray(samples, dtype=np.int64)]
        with safe_open(str(self.path), framework="pt") as handle:
            pooled, hidden = handle.get_slice("pooled"), handle.get_slice("hidden")
            p = torch.cat([pooled[int(r) : int(r) + 1] for r in rows])
            h = torch.cat([hidden[int(r) : int(r) + 1] for r in rows])
        return p.float(), h.float()


class TextLatents:
    """The cached latents of the samples (``LatentPairs`` or ``StreamedLatents``) with their text features: what
    ``FlowTrainer`` reads. Batches carry ``text_states``, ``pooled`` and ``with_reference``."""

    def __init__(self, latents, features: TextFeatures, no_reference: float) -> None:
        if len(features.text_index) != len(latents):
            raise UniDGError(
                f"text features {features.path} list {len(features.text_index)} samples, the latents {len(latents)}; "
                "delete the file and run again"
            )
        self.latents = latents
        self.features = features
        self.no_reference = no_reference
        self.keys = latents.keys
        self.resolution = latents.resolution

    def __len__(self) -> int:
        return len(self.latents)

    @property
    def has_normal(self) -> bool:
        return self.latents.has_normal

    def indices_of(self, distribution: str) -> np.ndarray:
        """The reference-form samples of one Diversity-SFT distribution."""
        indices = self.latents.indices_of(distribution)
        return indices[self.features.with_reference[indices]]

    def no_reference_indices(self) -> np.ndarray:
        return np.flatnonzero(~self.features.with_reference)

    def schedule_pools(self, mix: Sequence[float]) -> tuple[list[np.ndarray], list[float]]:
        """Four pools for ``sample_schedule``: the reference form's three distributions (sharing 1 - no_reference
        by ``train.mix``) and the no-reference form (``no_reference``)."""
        total = float(sum(mix))
        weights = [(1.0 - self.no_reference) * float(w) / total for w in mix] + [self.no_reference]
        return [self.indices_of(name) for name in DISTRIBUTIONS] + [self.no_reference_indices()], weights

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        out = self.latents.batch(indices)
        out["pooled"], out["text_states"] = self.features.rows(indices)
        selected = self.features.with_reference[np.asarray(indices, dtype=np.int64)]
        out["with_reference"] = torch.from_numpy(selected.astype(np.float32))
        return out


def _latents(config: TextSFTConfig, model, settings: UniDGSettings, placement: Placement, pairs_of):
    """The samples' latents: the streamed cache of ``data.latent_cache`` (built or finished here by
    ``latent_cache.build_cache``, the key marking the text layout) or the in-memory ``LatentPairs`` of OUTPUT/cache."""
    with_normal = config.loss.normal_reg_weight > 0
    if not config.data.latent_cache:
        cache_dir = Path(config.output) / "cache" if config.data.cache else None
        return LatentPairs.cached(
            model,
            pairs_of(),
            settings,
            cache_dir,
            with_normal=with_normal,
            progress=placement.is_main,
            write=placement.is_main,
        )
    folder = Path(config.data.latent_cache)
    key = cache_key(config, model, settings)
    key["settings"]["text_forms"] = TEXT_FORMS  # a Diversity-SFT cache holds only the reference form
    try:
        manifest = read_cache_manifest(folder)
    except DamagedManifest:
        manifest = None  # build_cache says so and rebuilds it
    if manifest is None or not manifest["complete"] or key_differences(manifest["key"], key):
        build_cache(
            folder,
            model,
            pairs_of(),
            settings,
            with_normal,
            config.data.shard_size,
            progress=placement.is_main,
            key=key,
            placement=placement,
        )  # refuses a folder holding another key, naming what differs
    return StreamedLatents(folder)


def text_training_data(
    config: TextSFTConfig, model, settings: UniDGSettings, encoders: Path, placement: Placement
) -> TextLatents:
    """Latents and text features of a text config, computed where missing or stale (the T5/CLIP encoders are
    loaded only then, on rank 0, and freed before training)."""
    pairs: list[TextPair] = []

    def pairs_of() -> list[TextPair]:
        if not pairs:
            pairs.extend(config_text_pairs(config))
        return pairs

    latents = _latents(config, model, settings, placement, pairs_of)
    folder = Path(config.data.latent_cache) if config.data.latent_cache else Path(config.output) / "cache"
    path = folder / TEXT_FEATURES_FILE
    key = features_key(config, encoders, latents.keys, settings)
    if placement.is_main and TextFeatures.stored_key(path) != key:
        samples = pairs_of()
        if [pair_key(pair) for pair in samples] != list(latents.keys):
            raise UniDGError(f"the latents of {folder} list other samples than this config; delete them and run again")
        dtype = training_dtype(config.train.precision, placement)
        text_encoders = load_text_encoders(encoders, dtype=dtype, device=placement.device)
        text_encoders.check_transformer(
            model.transformer.config.pooled_projection_dim, model.transformer.config.joint_attention_dim
        )
        tensors, texts = encode_features(samples, text_encoders, settings.text_tokens, dtype)
        del text_encoders
        if placement.device.type == "cuda":
            torch.cuda.empty_cache()
        TextFeatures.write(path, tensors, texts, key)
    barrier(placement)
    return TextLatents(latents, TextFeatures(path), config.text.no_reference)


# ============================================================================ the run
def text_record(config: TextSFTConfig, encoders: Path, settings: UniDGSettings) -> dict:
    """What lora.json and the merged folder's manifest say of a UniDG-Text model."""
    return {
        "mode": "instruction",
        "encoders": str(encoders),
        "encoders_sha256": encoders_digest(encoders),
        "random_encoders": config.text.random_encoders or None,
        "text_tokens": settings.text_tokens,
        "no_reference": config.text.no_reference,
        "instruction_seed": config.text.instruction_seed,
        "reference_instruction": REFERENCE_INSTRUCTION,
    }


def with_base_settings(config: TextSFTConfig) -> TextSFTConfig:
    """The config with the base's unidg.json settings under its own ``[settings]``, text tokens unfolded."""
    base = UniDGSettings.load(config.base).to_dict()
    return replace(config, settings={**base, **config.settings, "fold_text_tokens": False})


def train_text(config: TextSFTConfig, resume: bool = True) -> SFTRun:
    """``unidg train text``: train a LoRA on the merged SFT weights with both instruction forms, then write
    OUTPUT/lora.safetensors + lora.json (with its ``text`` record) for ``unidg train merge``."""
    check_merged_sft(config.base)
    config = with_base_settings(config)
    with distributed(config.train.device) as placement:
        open_run_folder(config, placement)
        encoders = prepare_encoders(config, placement)
        settings = settings_of(config)
        model = frozen_model(config.base, None, config.train.precision, placement).to(placement.device)
        model.settings = settings
        data = text_training_data(config, model, settings, encoders, placement)
        extra = {"stage": "unidg-text", "text": text_record(config, encoders, settings)}
        return train_sft(config, resume=resume, model=model, data=data, extra=extra)
