"""``unidg eval run --config FILE``: the benchmark's configuration (TOML or JSON, as the training configs).

Unknown keys, wrong types and out-of-range values are refused naming the file and the key (``unidg.train.config``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from unidg.train.config import ConfigError, _check, load_config

DEFAULT_SETS: tuple[str, ...] = ("rule", "generated", "two_stage", "real")
# "selected": seed 004's arm, (ii) filtered by category consistency and learnt by a multi-task discriminator.
# "compare": (ii) again from another bundle or cache setting (generation.compare_*), paired with (ii) image by image.
TRAINING_SETS: tuple[str, ...] = (*DEFAULT_SETS, "selected", "compare")
CACHE_SETTINGS: tuple[str, ...] = ("", "off", "static", "dynamic")  # "": the bundle's gated default
DATA_KINDS: tuple[str, ...] = ("udg", "mvtec", "visa")


@dataclass
class EvalDataConfig:
    kind: str = "udg"  # udg (a UDG folder, split by lot) | mvtec | visa
    path: str = ""  # dataset root (udg: the folder; made by `unidg data synth` when synth_count > 0 and absent)
    split_csv: str = ""  # visa: the split CSV
    synth_count: int = 0  # udg: quadruplets to synthesize into ``path`` when it holds no index
    synth_seed: int = 9001  # a seed used for nothing else (held-out objects)
    synth_size: int = 96
    objects: list[str] = field(default_factory=list)  # default: every object
    max_objects: int = 0  # keep the first N objects (0: all)
    reference_shots: int = 4  # real defect references per defect type given to generation and retrieval

    def validate(self, where: str) -> None:
        _check(self.kind in DATA_KINDS, where, "data.kind", f"must be one of {', '.join(DATA_KINDS)}", self.kind)
        _check(bool(self.path), where, "data.path", "is required (the dataset root)", self.path)
        _check(self.kind != "visa" or bool(self.split_csv), where, "data.split_csv", "is required for visa", "")
        _check(self.reference_shots >= 1, where, "data.reference_shots", "must be >= 1", self.reference_shots)
        _check(self.max_objects >= 0, where, "data.max_objects", "must be >= 0 (0: all)", self.max_objects)
        _check(self.synth_count >= 0, where, "data.synth_count", "must be >= 0", self.synth_count)
        _check(self.synth_seed >= 0, where, "data.synth_seed", "must be >= 0", self.synth_seed)
        _check(self.synth_size >= 32, where, "data.synth_size", "must be >= 32 pixels", self.synth_size)


@dataclass
class GenerationConfig:
    bundle: str = "runtime/assets/unidg-nano-bundle"  # a UniDG bundle (unidg export)
    backend: str = "onnxruntime"
    per_object: int = 32  # generated training images per object and seed
    steps: int = 0  # 0: the bundle's own step count
    keep_fraction: float = 0.5  # two-stage: share of generated images kept by retrieval similarity
    # "selected": keep a generated image when a classifier trained on the real references gives its labelled type
    # at least this probability; and at least the best consistency_floor share whatever the classifier says.
    consistency_threshold: float = 0.5
    consistency_floor: float = 0.25
    cache: str = ""  # step caching: "" the bundle's gated default, or off | static | dynamic
    # Target regions: "" random UniADC shapes (small or medium); a mask-template library folder (`unidg data
    # templates`): a template of the reference's category placed on the good image's foreground, as batch jobs do.
    mask_templates: str = ""
    # "compare": the same requests (sources, references, regions, seeds) as (ii), run by another bundle (e.g. the
    # RFT-merged weights) and/or cache setting (e.g. off): its difference to (ii) is paired image by image.
    compare_bundle: str = ""  # "": generation.bundle
    compare_cache: str = ""  # "": the compare bundle's gated default
    compare_label: str = ""  # how the report names the arm, e.g. "RFT-merged" or "cache off"

    def validate(self, where: str) -> None:
        _check(self.per_object >= 1, where, "generation.per_object", "must be >= 1", self.per_object)
        for key in ("cache", "compare_cache"):
            value = getattr(self, key)
            _check(value in CACHE_SETTINGS, where, f"generation.{key}", 'must be off, static, dynamic or ""', value)
        _check(self.steps >= 0, where, "generation.steps", "must be >= 0", self.steps)
        _check(0 < self.keep_fraction <= 1, where, "generation.keep_fraction", "must be in (0, 1]", self.keep_fraction)
        for key in ("consistency_threshold", "consistency_floor"):
            value = getattr(self, key)
            _check(0 <= value <= 1, where, f"generation.{key}", "must be in [0, 1]", value)


@dataclass
class DetectorConfig:
    size: int = 64  # detector input side (images resized; a multiple of 8)
    rule_per_object: int = 64  # rule-based defect images per object and seed
    seg_epochs: int = 12
    cls_epochs: int = 12
    finetune_epochs: int = 8  # two-stage: epochs on the filtered generated set after pre-training on rule defects
    batch: int = 16
    lr: float = 1e-3
    unet_width: int = 16
    unet_depth: int = 3
    resnet_width: int = 64  # 64 is ResNet-34 proper; less is a narrower ResNet-34 for quick runs
    threads: int = 0  # torch (and onnxruntime) threads; 0: their defaults. 1 is fastest on a busy machine
    # > 0: every set trains on this many defect images per object and seed (rule_per_object and
    # generation.per_object are then ignored; the real defects are subsampled round-robin over defect types, or all
    # of them where an object has fewer), so the sets differ in what their defects are, not in how many.
    defects_per_set: int = 0

    def validate(self, where: str) -> None:
        _check(
            self.size >= 16 and self.size % 8 == 0, where, "detectors.size", "must be a multiple of 8 >= 16", self.size
        )
        for name in ("rule_per_object", "seg_epochs", "cls_epochs", "finetune_epochs", "batch", "unet_width"):
            _check(getattr(self, name) >= 1, where, f"detectors.{name}", "must be >= 1", getattr(self, name))
        _check(self.resnet_width >= 1, where, "detectors.resnet_width", "must be >= 1", self.resnet_width)
        _check(self.defects_per_set >= 0, where, "detectors.defects_per_set", "must be >= 0", self.defects_per_set)
        _check(self.unet_depth >= 1, where, "detectors.unet_depth", "must be >= 1", self.unet_depth)
        _check(self.threads >= 0, where, "detectors.threads", "must be >= 0 (0: the default)", self.threads)
        _check(math.isfinite(self.lr) and self.lr > 0, where, "detectors.lr", "must be a finite number > 0", self.lr)


@dataclass
class ReportConfig:
    bootstrap: int = 1000  # replicates of the bootstrap over test images (0: no intervals)
    bootstrap_seed: int = 0  # the draws depend on this and the object only: every set and seed sees the same ones
    confidence: float = 0.95  # of the percentile intervals

    def validate(self, where: str) -> None:
        _check(self.bootstrap >= 0, where, "report.bootstrap", "must be >= 0 (0: no intervals)", self.bootstrap)
        _check(self.bootstrap_seed >= 0, where, "report.bootstrap_seed", "must be >= 0", self.bootstrap_seed)
        _check(0 < self.confidence < 1, where, "report.confidence", "must be in (0, 1)", self.confidence)


@dataclass
class EvalConfig:
    output: str = ""  # report folder (report.md, report.json, plots, cache/)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    sets: list[str] = field(default_factory=lambda: list(DEFAULT_SETS))
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    detectors: DetectorConfig = field(default_factory=DetectorConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def validate(self, where: str) -> None:
        _check(bool(self.output), where, "output", "is required (the report folder)", self.output)
        _check(bool(self.seeds), where, "seeds", "must list at least one seed", self.seeds)
        _check(all(seed >= 0 for seed in self.seeds), where, "seeds", "must be >= 0", self.seeds)
        unknown = [s for s in self.sets if s not in TRAINING_SETS]
        _check(bool(self.sets) and not unknown, where, "sets", f"must be among {', '.join(TRAINING_SETS)}", self.sets)
        generation = self.generation
        if "compare" in self.sets and not (generation.compare_bundle or generation.compare_cache):
            raise ConfigError(
                f"{where}: the compare set needs generation.compare_bundle or generation.compare_cache (another "
                "bundle or cache setting than (ii)'s); without either it would repeat (ii)"
            )
        self.data.validate(where)
        self.generation.validate(where)
        self.detectors.validate(where)
        self.report.validate(where)
        # A detector trains with BatchNorm, which needs two images: each generated training set must hold two.
        count = generated_count(self)
        if {"generated", "two_stage", "compare"} & set(self.sets) and count < 2:
            raise ConfigError(
                f"{where}: generation.per_object (or detectors.defects_per_set) {count} gives one generated image per "
                "object; the detectors need at least 2 (BatchNorm): raise it"
            )
        kept = max(1, int(round(generation.keep_fraction * count)))  # as retrieval_filter keeps
        if "two_stage" in self.sets and kept < 2:
            raise ConfigError(
                f"{where}: {count} generated images x keep_fraction {generation.keep_fraction} "
                f"keeps {kept} image per object for the two-stage detector, which needs at least 2 (BatchNorm): raise "
                "generation.per_object or generation.keep_fraction"
            )


def rule_count(config: EvalConfig) -> int:
    return config.detectors.defects_per_set or config.detectors.rule_per_object


def generated_count(config: EvalConfig) -> int:
    return config.detectors.defects_per_set or config.generation.per_object


def load_eval_config(path: str | Path, overrides: list[str] | None = None) -> EvalConfig:
    return load_config(path, EvalConfig, overrides)
