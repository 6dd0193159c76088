"""Training configurations (``unidg train base|sft --config FILE``): dataclasses loaded from TOML or JSON, validated.

A config file has top-level keys (``output``, ``seed``, ...) and one table per section (``[data]``, ``[lora]``,
``[optim]``, ``[loss]``, ``[train]``, ``[settings]``; the base config has ``[vae]`` and ``[inpainter]`` instead of
``[lora]``/``[optim]``/``[loss]``/``[train]``). Unknown keys, wrong types and out-of-range values are refused with a
message naming the file, the key and the accepted values. Relative paths are taken relative to the working directory
(run the commands from the repository root). ``--set section.key=value`` overrides any value from the command line.
"""

from __future__ import annotations

import json
import math
import re
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Union

from unidg.core.errors import UniDGError
from unidg.core.settings import UniDGSettings
from unidg.train.pairs import DISTRIBUTIONS


class ConfigError(UniDGError):
    """A training config file is missing, malformed or has an invalid value."""


# LoRA targets of diffusers' FluxTransformer2DModel: attention and MLP projections of the double blocks
# (image and context streams) and of the single blocks; embedders and the output layer stay frozen.
FLUX_LORA_TARGETS: tuple[str, ...] = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "proj_mlp",
    "proj_out",
)


@dataclass
class DataConfig:
    train: str = ""  # UDG folder (``unidg data synth``) with the training quadruplets
    heldout: str = ""  # optional UDG folder used by evaluation (never for training)
    limit: int = 0  # use only the first N quadruplets (0: all)
    cache: bool = True  # cache VAE latents of every training pair in the output folder (in memory while training)
    latent_cache: str = ""  # sharded on-disk latent cache (`unidg train cache`), streamed while training; "": off
    shard_size: int = 256  # pairs per shard of the on-disk latent cache

    def validate(self, where: str) -> None:
        if not self.train:
            raise ConfigError(f"{where}: [data] train is required (a UDG folder made by `unidg data synth`)")
        _check(self.limit >= 0, where, "data.limit", "must be >= 0", self.limit)
        _check(self.shard_size >= 1, where, "data.shard_size", "must be >= 1", self.shard_size)


@dataclass
class LoraConfig:
    rank: int = 256
    alpha: float = 0.0  # LoRA scale alpha/rank; 0 means alpha = rank (scale 1)
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(FLUX_LORA_TARGETS))

    def validate(self, where: str) -> None:
        _check(self.rank >= 1, where, "lora.rank", "must be >= 1", self.rank)
        _check(self.alpha >= 0, where, "lora.alpha", "must be >= 0", self.alpha)
        _check(0 <= self.dropout < 1, where, "lora.dropout", "must be in [0, 1)", self.dropout)
        _check(len(self.targets) > 0, where, "lora.targets", "must name at least one module suffix", self.targets)

    @property
    def scale_alpha(self) -> float:
        return float(self.alpha or self.rank)


@dataclass
class OptimConfig:
    name: str = "prodigy"  # "prodigy" (paper) or "adamw"
    lr: float = 1.0  # Prodigy: multiplier of its adaptive step size (1.0 as recommended); AdamW: the step size
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0  # linear warm-up of lr
    grad_clip: float = 1.0  # max gradient norm (0: off)
    use_bias_correction: bool = True  # Prodigy only
    safeguard_warmup: bool = True  # Prodigy only

    def validate(self, where: str) -> None:
        _check(self.name in ("prodigy", "adamw"), where, "optim.name", "must be 'prodigy' or 'adamw'", self.name)
        _check(self.lr > 0, where, "optim.lr", "must be > 0", self.lr)
        _check(self.weight_decay >= 0, where, "optim.weight_decay", "must be >= 0", self.weight_decay)
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            where,
            "optim.betas",
            "must be two numbers in [0, 1)",
            self.betas,
        )
        _check(self.eps > 0, where, "optim.eps", "must be > 0", self.eps)
        _check(self.warmup_steps >= 0, where, "optim.warmup_steps", "must be >= 0", self.warmup_steps)
        _check(self.grad_clip >= 0, where, "optim.grad_clip", "must be >= 0 (0: off)", self.grad_clip)


@dataclass
class LossConfig:
    logit_mean: float = 0.0  # logit-normal t: mu
    logit_std: float = 1.0  # logit-normal t: sigma
    normal_reg_weight: float = 0.1  # weight of the normal regularization (paper Eq. 9); 0: off
    normal_reg_tau: float = 0.5  # similarity margin tau of Eq. 9
    mask_weight: float = 1.0  # extra weight of target-mask tokens in the velocity MSE (1: plain MSE)

    def validate(self, where: str) -> None:
        _check(self.logit_std > 0, where, "loss.logit_std", "must be > 0", self.logit_std)
        _check(self.normal_reg_weight >= 0, where, "loss.normal_reg_weight", "must be >= 0", self.normal_reg_weight)
        _check(-1 <= self.normal_reg_tau <= 1, where, "loss.normal_reg_tau", "must be in [-1, 1]", self.normal_reg_tau)
        _check(self.mask_weight >= 1, where, "loss.mask_weight", "must be >= 1", self.mask_weight)


@dataclass
class LoopConfig:
    steps: int = 1000
    batch_size: int = 4  # the global batch, over all processes and accumulation steps
    micro_batch: int = 0  # pairs per forward pass in each process (0: the process's whole share, no accumulation)
    device: str = "cpu"  # "cpu", "cuda" (under torchrun: cuda:LOCAL_RANK) or "cuda:N"
    precision: str = "fp32"  # "fp32" or "bf16" (autocast; on CUDA the frozen weights are stored in bf16)
    gradient_checkpointing: bool = False
    checkpoint_every: int = 250  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2  # most recent checkpoints kept (the final one always)
    mix: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  # defect-fill : intra-object : cross-object
    guidance: float = -1.0  # guidance input during training; < 0: the settings' guidance
    defect_attention: bool = True  # key bias log(alpha) on reference-defect and target tokens
    threads: int = 0  # torch CPU threads (0: torch's default)
    progress: bool = True  # tqdm progress bar

    def validate(self, where: str) -> None:
        check_run_options(self, where)
        _check(self.micro_batch >= 0, where, "train.micro_batch", "must be >= 0 (0: no accumulation)", self.micro_batch)


@dataclass
class SFTConfig:
    """``unidg train sft``: Diversity-SFT of a LoRA on a base weights folder."""

    base: str = ""  # weights folder (``unidg train base`` or ``unidg train merge`` output)
    output: str = ""  # run folder: checkpoints, log, final LoRA
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    settings: dict = field(default_factory=dict)  # UniDGSettings overrides written to the merged unidg.json

    def validate(self, where: str) -> None:
        check_fine_tuning_run(self, where, "a weights folder made by `unidg train base`")
        for section in (self.data, self.lora, self.optim, self.loss, self.train):
            section.validate(where)
        _settings(self.settings, where)


@dataclass
class VAEStageConfig:
    steps: int = 1500
    batch_size: int = 8
    crop: int = 64  # random square crops (pixels) the autoencoder trains on (it is fully convolutional)
    lr: float = 1e-3
    kl_weight: float = 1e-6
    color_weight: float = 1.0  # L1 of 4x4-pooled colours (colour fidelity first)
    color_path: bool = False  # start with colour carried through (base.start_with_color_path)
    initial_log_variance: float | None = None  # the posterior's starting log-variance (None: the encoder's init)
    defect_crop_fraction: float = 0.0  # share of crops centred on a defect pixel
    defect_weight: float = 0.0  # extra L1 averaged over defect pixels only
    moment_weight: float = 0.0  # pulls the normalized latents towards zero mean, unit std per channel while training
    decoder_finetune_steps: int = -1  # after the normalization fold; -1: steps // 8
    scale_fit_batches: int = 8  # batches used to make the normalized latents zero-mean, unit-std (folded in)

    def validate(self, where: str) -> None:
        _check(self.steps >= 0, where, "vae.steps", "must be >= 0", self.steps)
        _check(self.batch_size >= 1, where, "vae.batch_size", "must be >= 1", self.batch_size)
        _check(self.crop >= 16 and self.crop % 16 == 0, where, "vae.crop", "must be a multiple of 16", self.crop)
        _check(self.lr > 0, where, "vae.lr", "must be > 0", self.lr)
        _check(self.kl_weight >= 0, where, "vae.kl_weight", "must be >= 0", self.kl_weight)
        _check(self.color_weight >= 0, where, "vae.color_weight", "must be >= 0", self.color_weight)
        _check(
            0 <= self.defect_crop_fraction <= 1,
            where,
            "vae.defect_crop_fraction",
            "must be in [0, 1]",
            self.defect_crop_fraction,
        )
        _check(self.defect_weight >= 0, where, "vae.defect_weight", "must be >= 0", self.defect_weight)
        _check(self.moment_weight >= 0, where, "vae.moment_weight", "must be >= 0", self.moment_weight)
        _check(
            self.decoder_finetune_steps >= -1,
            where,
            "vae.decoder_finetune_steps",
            "must be >= 0 (or -1 for steps // 8)",
            self.decoder_finetune_steps,
        )
        _check(self.scale_fit_batches >= 1, where, "vae.scale_fit_batches", "must be >= 1", self.scale_fit_batches)


@dataclass
class InpainterStageConfig:
    steps: int = 2000
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    grad_clip: float = 1.0
    mix: list[float] = field(default_factory=lambda: [1.0, 0.0, 0.0])  # defect-fill only: the Fill-model analogue

    def validate(self, where: str) -> None:
        _check(self.steps >= 0, where, "inpainter.steps", "must be >= 0", self.steps)
        _check(self.batch_size >= 1, where, "inpainter.batch_size", "must be >= 1", self.batch_size)
        _check(self.lr > 0, where, "inpainter.lr", "must be > 0", self.lr)
        _check(self.weight_decay >= 0, where, "inpainter.weight_decay", "must be >= 0", self.weight_decay)
        _check(self.warmup_steps >= 0, where, "inpainter.warmup_steps", "must be >= 0", self.warmup_steps)
        _check(self.grad_clip >= 0, where, "inpainter.grad_clip", "must be >= 0", self.grad_clip)
        _check_mix(self.mix, where, "inpainter.mix")


@dataclass
class BaseConfig:
    """``unidg train base``: a from-scratch base model (autoencoder, then diptych inpainter + image encoder)."""

    preset: str = "nano"
    output: str = ""  # run folder; the base weights folder is written to OUTPUT/model
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    vae: VAEStageConfig = field(default_factory=VAEStageConfig)
    inpainter: InpainterStageConfig = field(default_factory=InpainterStageConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: LoopConfig = field(default_factory=LoopConfig)  # precision, threads, checkpointing, progress, guidance
    settings: dict = field(default_factory=dict)

    def validate(self, where: str) -> None:
        _check(self.preset in ("nano", "full"), where, "preset", "must be 'nano' or 'full'", self.preset)
        if not self.output:
            raise ConfigError(f"{where}: 'output' is required (the run folder)")
        _check(self.seed >= 0, where, "seed", "must be >= 0", self.seed)
        for section in (self.data, self.vae, self.inpainter, self.loss, self.train):
            section.validate(where)
        _settings(self.settings, where)


def check_run_options(train: Any, where: str) -> None:
    """The checks every trainer's [train] table shares (SFT, base, RFT): steps, batch, device, precision,
    checkpoints, the distribution mix and threads."""
    _check(train.steps >= 1, where, "train.steps", "must be >= 1", train.steps)
    _check(train.batch_size >= 1, where, "train.batch_size", "must be >= 1", train.batch_size)
    _check(
        re.match(r"^(cpu|cuda|cuda:\d+)$", train.device) is not None,
        where,
        "train.device",
        "must be 'cpu', 'cuda' or 'cuda:N'",
        train.device,
    )
    _check(train.precision in ("fp32", "bf16"), where, "train.precision", "must be 'fp32' or 'bf16'", train.precision)
    _check(train.checkpoint_every >= 0, where, "train.checkpoint_every", "must be >= 0", train.checkpoint_every)
    _check(train.keep_checkpoints >= 1, where, "train.keep_checkpoints", "must be >= 1", train.keep_checkpoints)
    _check_mix(train.mix, where, "train.mix")
    _check(train.threads >= 0, where, "train.threads", "must be >= 0", train.threads)


def _check(ok: bool, where: str, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{where}: {key} {rule} (got {value!r})")


def _check_mix(mix: list[float], where: str, key: str) -> None:
    """A distribution mix: three weights >= 0, not all 0, one per pair distribution."""
    rule = f"must be three weights >= 0 (not all 0) for {list(DISTRIBUTIONS)}"
    _check(len(mix) == 3 and all(w >= 0 for w in mix) and sum(mix) > 0, where, key, rule, mix)


def check_choice(value: str, choices: tuple[str, ...], where: str, key: str) -> None:
    """``value`` is one of ``choices``; the refusal lists them."""
    _check(value in choices, where, key, f"must be one of {list(choices)}", value)


def check_fine_tuning_run(config: Any, where: str, base: str) -> None:
    """The top-level keys of a fine-tuning run (SFT, RFT): its input weights folder 'base' (``base`` says which
    one), its run folder 'output' and its seed."""
    if not config.base:
        raise ConfigError(f"{where}: 'base' is required ({base})")
    if not config.output:
        raise ConfigError(f"{where}: 'output' is required (the run folder for checkpoints and logs)")
    _check(config.seed >= 0, where, "seed", "must be >= 0", config.seed)


def _settings(overrides: dict, where: str) -> UniDGSettings:
    try:
        return UniDGSettings.from_dict(dict(overrides))
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: [settings] {error}") from error


def settings_of(config: SFTConfig | BaseConfig) -> UniDGSettings:
    """The UniDG settings a config trains for (defaults overridden by its ``[settings]`` table)."""
    return _settings(config.settings, "config")


def _type_ok(value: Any, annotation: Any) -> tuple[bool, Any]:
    """Check (and lightly coerce: int -> float, list -> list of the item type) a value against an annotation."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True, value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False, value
        return True, float(value)
    if annotation is int:
        return (isinstance(value, int) and not isinstance(value, bool)), value
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is str:
        return isinstance(value, str), value
    if annotation is dict or origin is dict:
        return isinstance(value, dict), value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return False, value
        (item_type,) = typing.get_args(annotation)
        items = []
        for item in value:
            ok, coerced = _type_ok(item, item_type)
            if not ok:
                return False, value
            items.append(coerced)
        return True, items
    if origin in (Union, types.UnionType):
        for option in typing.get_args(annotation):
            ok, coerced = _type_ok(value, option)
            if ok:
                return True, coerced
        return False, value
    return isinstance(value, annotation), value


def _all_finite(value: Any) -> bool:
    """No NaN or infinity in a config value (a number, or a list or table of them): none is a valid setting."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_all_finite(item) for item in value)
    if isinstance(value, dict):
        return all(_all_finite(item) for item in value.values())
    return True


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is list:
        return f"a list of {_type_name(typing.get_args(annotation)[0])}"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a table"}
    return names.get(annotation, str(annotation))


def from_dict(cls: type, data: dict, where: str, section: str = "") -> Any:
    """Build dataclass ``cls`` from a dict, refusing unknown keys and wrong types with a message naming the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: [{section}] must be a table (got {type(data).__name__})")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        prefix = f"[{section}] " if section else ""
        raise ConfigError(f"{where}: {prefix}unknown key(s) {unknown}; known keys: {sorted(known)}")
    values = {}
    for name, value in data.items():
        annotation = hints[name]
        key = f"{section}.{name}" if section else name
        if is_dataclass(annotation):
            values[name] = from_dict(annotation, value, where, key)
            continue
        ok, coerced = _type_ok(value, annotation)
        if not ok:
            raise ConfigError(f"{where}: {key} must be {_type_name(annotation)} (got {value!r})")
        if not _all_finite(coerced):
            raise ConfigError(f"{where}: {key} must be a finite number (got {value!r})")
        values[name] = coerced
    for name, spec in known.items():
        if name not in values and spec.default is MISSING and spec.default_factory is MISSING:
            raise ConfigError(f"{where}: {section + '.' if section else ''}{name} is required")
    return cls(**values)


def to_dict(config: Any) -> dict:
    """A config as plain data (what ``config.json`` in a run folder records)."""
    out = {}
    for spec in fields(config):
        value = getattr(config, spec.name)
        out[spec.name] = to_dict(value) if is_dataclass(value) else value
    return out


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected SECTION.KEY=VALUE (e.g. train.steps=20)")
    key, raw = text.split("=", 1)
    try:
        value = _toml_loads(f"v = {raw}")["v"]
    except Exception:
        value = raw  # a bare word is taken as a string
    return key.strip().split("."), value


def _toml_loads(text: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads(text)


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        elif path.suffix == ".toml":
            data = _toml_loads(text)
        else:
            raise ConfigError(f"{path}: config files must end in .toml or .json")
    except ConfigError:
        raise
    except Exception as error:  # tomllib.TOMLDecodeError / json.JSONDecodeError
        raise ConfigError(f"{path}: not valid {path.suffix[1:].upper()} ({error})") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a table of keys")
    return data


def load_config(path: str | Path, cls: type, overrides: list[str] | None = None) -> Any:
    """Read, override (``SECTION.KEY=VALUE`` strings) and validate a config of dataclass ``cls``."""
    where = str(path)
    data = read_config_file(path)
    for text in overrides or []:
        keys, value = _parse_override(text)
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: {key} is not a section")
        node[keys[-1]] = value
    config = from_dict(cls, data, where)
    config.validate(where)
    return config


def load_sft_config(path: str | Path, overrides: list[str] | None = None) -> SFTConfig:
    return load_config(path, SFTConfig, overrides)


def load_base_config(path: str | Path, overrides: list[str] | None = None) -> BaseConfig:
    return load_config(path, BaseConfig, overrides)


def with_updates(config: Any, **changes: Any) -> Any:
    return replace(config, **changes)
