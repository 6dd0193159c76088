"""``unidg eval run``: the training sets (i)-(v) side by side, detectors trained on each, scored on real test images.

Per seed and object: a binary U-Net (AUROC-I/P, AP-I/P, PRO) and a ResNet-34 defect-type classifier (accuracy) per
training set; per seed: one multi-class U-Net over every object's defect types (mIoU, BG/FG mIoU, and the merged
binary metrics of Table 2). Metrics are averaged over objects, then given as mean +- std over seeds.

Resumable: every trained detector is stored under ``OUTPUT/cache/models/<key>.safetensors`` and its scores under
``OUTPUT/cache/results/<key>.json``, the key hashing the config (output folder and seed list aside), seed, object,
training set and model; generated images are cached per object and seed. A rerun skips what is there.

Every score comes with its bootstrap replicates over test images (``bootstrap``; the draws shared by every set and
seed), from which ``summarize`` gives each table value an interval and each difference between sets a paired one.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
from safetensors.torch import load_file, save
from tqdm import tqdm

from unidg.core.manifest import atomic_write_bytes, atomic_write_text
from unidg.runtime.mask_templates import TemplateError, TemplateLibrary
from unidg.runtime.synthesizer import DefectSynthesizer
from unidg.train.config import ConfigError, to_dict
from unidg.train.detectors import MultiTaskUNet, ResNet34, UNet
from unidg.train.evaluation import bootstrap
from unidg.train.evaluation import detector_training as dt
from unidg.train.evaluation.config import EvalConfig, generated_count, rule_count
from unidg.train.evaluation.datasets import (
    DatasetLayoutError,
    InspectionSplit,
    read_mvtec,
    read_udg,
    read_visa,
)
from unidg.train.evaluation.report import write_report
from unidg.train.evaluation.training_sets import (
    LabelledSet,
    generated_set,
    load_good,
    load_samples,
    references,
    retrieval_filter,
    round_robin,
    rule_set,
)
from unidg.train.trainer import check_run_folder

BINARY_METRICS = ("auroc_i", "ap_i", "auroc_p", "ap_p", "pro")
TABLE_METRICS = (*BINARY_METRICS, "accuracy", "miou", "bg_miou", "fg_miou")


def load_splits(config: EvalConfig, progress: bool = True) -> list[InspectionSplit]:
    data = config.data
    objects = data.objects or None
    if data.kind == "udg":
        folder = Path(data.path)
        if not (folder / "index.jsonl").exists():
            if not data.synth_count:
                raise DatasetLayoutError(
                    f"data.path {folder} holds no UDG index (index.jsonl); make it with `unidg data synth --out "
                    f"{folder}` or set data.synth_count"
                )
            from unidg.train.procedural import synthesize

            synthesize(folder, data.synth_count, data.synth_seed, data.synth_size, progress=progress)
        elif data.synth_count:
            _check_synthesized(folder, data.synth_count, data.synth_seed, data.synth_size)
        splits = read_udg(folder, objects)
    elif data.kind == "mvtec":
        splits = read_mvtec(data.path, objects, reference_shots=data.reference_shots)
    else:
        splits = read_visa(data.path, data.split_csv, objects)
    splits = [s for s in splits if s.train_defects and any(t.is_defect for t in s.test)]
    if data.max_objects:
        splits = splits[: data.max_objects]
    if not splits:
        raise ValueError(f"{data.path}: no object has both real defect references and defective test images")
    return splits


def _check_synthesized(folder: Path, count: int, seed: int, size: int) -> None:
    """A folder the config would synthesize must hold what it would synthesize (not an older, smaller one)."""
    info_path = folder / "dataset.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if info.get("generator") != "unidg.train.procedural":
        return  # a folder made otherwise: the config's synth settings do not describe it
    found = {"count": info.get("count"), "seed": info.get("seed"), "size": info.get("size")}
    wanted = {"count": count, "seed": seed, "size": size}
    if found != wanted:
        raise DatasetLayoutError(
            f"{folder} was synthesized with {found}, the config asks for {wanted}; remove the folder or point "
            "data.path at a new one"
        )


def _set_key(config: EvalConfig, set_name: str) -> str:
    """A set's name in cache keys: (v)'s carries its selection settings and the compare arm its bundle and cache, so
    changing them retrains that set alone."""
    generation = config.generation
    if set_name == "selected":
        return f"selected@{generation.consistency_threshold},{generation.consistency_floor}"
    if set_name == "compare":
        return f"compare@{generation.compare_bundle},{generation.compare_cache}"
    return set_name


def _template_library(config: EvalConfig, splits: list[InspectionSplit]) -> TemplateLibrary | None:
    """generation.mask_templates, loaded and checked to hold every reference's category (before anything runs)."""
    folder = config.generation.mask_templates
    if not folder:
        return None
    try:
        library = TemplateLibrary.load(folder)
    except TemplateError as error:
        raise ConfigError(f"generation.mask_templates: {error}") from error
    shots = config.data.reference_shots
    wanted = {r.template_category for split in splits for r in references(split, shots)}
    missing = sorted(wanted - set(library.clusters))
    if missing:
        raise ConfigError(
            f"generation.mask_templates {folder} has no templates of {', '.join(missing)} (the references' "
            f"categories); build the library from a UDG folder with those categories (`unidg data templates`) or "
            'set generation.mask_templates = "" for random shapes'
        )
    return library


def _synthesizer(config: EvalConfig, bundle: str, cache: str):
    """A synthesizer for ``bundle`` with the step-cache setting ``cache`` ("": the bundle's gated default)."""
    generation, threads = config.generation, config.detectors.threads
    options = {"threads": threads} if threads and generation.backend == "onnxruntime" else {}
    return DefectSynthesizer.from_bundle(bundle, generation.backend, cache=cache or None, **options)


def config_hash(config: EvalConfig) -> str:
    data = to_dict(config)
    data.pop("output")
    data.pop("seeds")
    data.pop("sets")
    data.pop("report")  # intervals are computed from a model's predictions: the models stay valid
    data["detectors"].pop("threads")  # how many threads train a detector does not change what it learns
    # They shape (v) or the compare arm only: in those sets' keys (_set_key).
    for key in ("consistency_threshold", "consistency_floor", "compare_bundle", "compare_cache", "compare_label"):
        data["generation"].pop(key)
    if not data["generation"]["mask_templates"]:  # unset: runs from before the option keep their cached detectors
        data["generation"].pop("mask_templates")
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class Cache:
    def __init__(self, folder: Path, config_key: str) -> None:
        self.folder, self.config_key = folder, config_key

    def key(self, *parts: object) -> str:
        return hashlib.sha256(json.dumps([self.config_key, *map(str, parts)]).encode()).hexdigest()[:20]

    def result(self, key: str) -> dict | None:
        path = self.folder / "results" / f"{key}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def store_result(self, key: str, result: dict) -> None:
        atomic_write_text(self.folder / "results" / f"{key}.json", json.dumps(result) + "\n")

    def model(self, key: str, model):
        path = self.folder / "models" / f"{key}.safetensors"
        if not path.is_file():
            return None
        model.load_state_dict(load_file(path))
        return model.eval()

    def store_model(self, key: str, model) -> None:
        state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
        atomic_write_bytes(self.folder / "models" / f"{key}.safetensors", save(state))


def _cached_model(cache: Cache, key: str, build, train):
    """The model stored under ``key``, or ``train()``'s, stored."""
    model = cache.model(key, build())
    if model is None:
        model = train()
        cache.store_model(key, model)
    return model


def run_benchmark(config: EvalConfig, progress: bool = True) -> dict:
    """Train and score every detector of ``config``; write report.json, report.md and plots to ``config.output``."""
    import torch

    threads = torch.get_num_threads()
    if config.detectors.threads:
        torch.set_num_threads(config.detectors.threads)
    try:
        return _run_benchmark(config, progress)
    finally:
        torch.set_num_threads(threads)  # the caller's setting, whatever the config asked for


def _run_benchmark(config: EvalConfig, progress: bool) -> dict:
    started = time.time()
    out = check_run_folder(config.output, what="report folder")
    splits = load_splits(config, progress)  # a missing or unreadable dataset is refused before out is made
    generating = bool({"generated", "two_stage", "selected", "compare"} & set(config.sets))
    templates = _template_library(config, splits) if generating else None  # refused before out is made, too
    out.mkdir(parents=True, exist_ok=True)
    run = BenchmarkRun(config, out, splits, templates, progress)
    try:
        runs = [result for seed in config.seeds for result in run.seed_runs(seed)]
    finally:
        run.close()
    report = summarize(config, runs, splits, time.time() - started)
    write_report(out, report, runs, run.samples_for_grid)
    return report


class BenchmarkRun:
    """What one ``unidg eval run`` shares across seeds: the loaded images, the bootstrap draws, the synthesizers of
    the generated arms, the cache and the progress bars."""

    def __init__(
        self,
        config: EvalConfig,
        out: Path,
        splits: list[InspectionSplit],
        templates: TemplateLibrary | None,
        progress: bool,
    ) -> None:
        self.config, self.out, self.splits, self.templates = config, out, splits, templates
        self.cache = Cache(out / "cache", config_hash(config))
        size, generation, sets = config.detectors.size, config.generation, config.sets
        self.needs_generation = bool({"generated", "two_stage", "selected"} & set(sets))
        self.synthesizers = {}
        if self.needs_generation:
            self.synthesizers["generated"] = _synthesizer(config, generation.bundle, generation.cache)
        if "compare" in sets:
            self.synthesizers["compare"] = _synthesizer(
                config, generation.compare_bundle or generation.bundle, generation.compare_cache
            )
        self.goods = {s.object_name: load_good(s.train_good, size) for s in splits}
        self.refs = {s.object_name: load_samples(references(s, config.data.reference_shots), size) for s in splits}
        self.tests = {s.object_name: load_samples(s.test, size) for s in splits}
        # One draw of test images per object and replicate, shared by every set and seed: differences are paired.
        report_cfg = config.report
        self.counts = {
            name: bootstrap.resample_counts(
                [d != "good" for d in test.defects], report_cfg.bootstrap, report_cfg.bootstrap_seed, name
            )
            if report_cfg.bootstrap
            else None
            for name, test in self.tests.items()
        }
        self.interval_tag = (report_cfg.bootstrap, report_cfg.bootstrap_seed)
        self.textures = [g.images[0] for g in self.goods.values()]
        self.samples_for_grid: list[tuple[np.ndarray, np.ndarray, str]] = []
        self.bar = tqdm(total=len(config.seeds) * (len(splits) + 1) * len(sets), desc="eval", disable=not progress)
        self.generation_bar = tqdm(
            total=len(config.seeds) * len(splits) * generated_count(config) * len(self.synthesizers),
            desc="generate",
            disable=not (progress and self.synthesizers),
        )

    def close(self) -> None:
        self.bar.close()
        self.generation_bar.close()
        for synthesizer in self.synthesizers.values():
            synthesizer.close()

    def seed_runs(self, seed: int) -> list[dict]:
        """Every object's detectors on every set, then the multi-class U-Nets over all objects, for one seed."""
        data: dict[str, dict[str, LabelledSet]] = {
            name: {} for name in ("rule", "generated", "filtered", "real", "selected", "compare")
        }
        runs = []
        for split in self.splits:
            self._training_sets(seed, split, data)
            runs += self._object_runs(seed, split.object_name, data)
        return runs + self._multiclass_runs(seed, data)

    def _training_sets(self, seed: int, split: InspectionSplit, data: dict[str, dict[str, LabelledSet]]) -> None:
        """Fill ``data[set][object]`` for one object and seed: the rule-based, generated (both arms), filtered,
        selected and real training defects the configured sets need."""

        config, cfg, sets, name = self.config, self.config.detectors, self.config.sets, split.object_name
        generation = config.generation
        if {"rule", "two_stage"} & set(sets):
            data["rule"][name] = rule_set(self.goods[name], self.textures, rule_count(config), seed)
        for arm, synthesizer in self.synthesizers.items():  # the same requests for both arms: paired images
            data[arm][name] = generated_set(
                synthesizer,
                split,
                config.data.reference_shots,
                generated_count(config),
                generation.steps,
                seed,
                cfg.size,
                cache=self.out / "cache" / "generated",
                progress=self.generation_bar.update,
                templates=self.templates,
            )
        if self.needs_generation:
            generated, refs = data["generated"][name], self.refs[name]
            data["filtered"][name] = retrieval_filter(generated, refs, generation.keep_fraction)
            if "selected" in sets:
                scores = dt.category_consistency(generated, refs, cfg, seed)
                data["selected"][name] = dt.consistent_subset(
                    generated, scores, generation.consistency_threshold, generation.consistency_floor
                )
            if seed == config.seeds[0]:
                self.samples_for_grid += [
                    (generated.images[i], generated.masks[i], f"{name}: {generated.defects[i]}")
                    for i in range(min(4, len(generated)))
                ]
        if "real" in sets:
            real = split.train_defects
            if cfg.defects_per_set:
                real = round_robin(real, cfg.defects_per_set)
            data["real"][name] = load_samples(real, cfg.size)

    def _object_runs(self, seed: int, name: str, data: dict[str, dict[str, LabelledSet]]) -> list[dict]:

        config, cache, runs = self.config, self.cache, []
        classes = sorted({d for d in self.refs[name].defects})
        for set_name in config.sets:
            set_key = _set_key(config, set_name)
            key = cache.key(seed, name, set_key, "object", self.interval_tag)
            result = cache.result(key)
            if result is None:
                good, test, counts = self.goods[name], self.tests[name], self.counts[name]
                result = _object_run(
                    cache, seed, name, set_name, set_key, data, good, test, counts, classes, config.detectors, dt,
                    UNet, ResNet34,
                )  # fmt: skip
                cache.store_result(key, result)
            runs.append({"seed": seed, "object": name, "set": set_name, **result})
            self.bar.update(1)
        return runs

    def _multiclass_runs(self, seed: int, data: dict[str, dict[str, LabelledSet]]) -> list[dict]:

        config, cache, splits, runs = self.config, self.cache, self.splits, []
        all_classes = ["background"] + sorted(
            {f"{s.object_name}/{d}" for s in splits for d in self.refs[s.object_name].defects}
        )
        test_all = LabelledSet.concat(*(_qualified(self.tests[s.object_name], s.object_name) for s in splits))
        all_counts = None
        if config.report.bootstrap:
            all_counts = np.concatenate([self.counts[s.object_name] for s in splits], axis=1)
        for set_name in config.sets:
            set_key = _set_key(config, set_name)
            key = cache.key(seed, "*", set_key, "multiclass", self.interval_tag)
            result = cache.result(key)
            if result is None:
                result = _multiclass_run(
                    cache, seed, set_name, set_key, data, splits, test_all, all_counts, all_classes, config.detectors,
                    dt, UNet,
                )  # fmt: skip
                cache.store_result(key, result)
            runs.append({"seed": seed, "object": "*", "set": set_name, **result})
            self.bar.update(1)
        return runs


def _qualified(data: LabelledSet, object_name: str) -> LabelledSet:
    return LabelledSet(
        data.images, data.masks, [d if d in ("good", "") else f"{object_name}/{d}" for d in data.defects]
    )


def _object_run(
    cache, seed, name, set_name, set_key, data, good, test, counts, classes, cfg, dt, UNet, ResNet34
) -> dict:
    """Binary U-Net and classifier of one object trained on one set."""
    unet_key = cache.key(seed, name, set_key, "unet")
    result: dict = {}
    if set_name == "selected":
        return _multitask_run(cache, unet_key, seed, data["selected"][name], good, test, counts, classes, cfg, dt)
    if set_name == "two_stage":
        rule_unet = _cached_model(
            cache,
            cache.key(seed, name, "rule", "unet"),
            lambda: UNet(1, cfg.unet_width, cfg.unet_depth),
            lambda: dt.train_binary_unet(LabelledSet.concat(data["rule"][name], good), cfg, seed, cfg.seg_epochs),
        )
        train = LabelledSet.concat(data["filtered"][name], good)
        unet = _cached_model(
            cache,
            unet_key,
            lambda: UNet(1, cfg.unet_width, cfg.unet_depth),
            lambda: dt.train_binary_unet(train, cfg, seed, cfg.finetune_epochs, model=rule_unet),
        )
    else:
        train = LabelledSet.concat(data[set_name][name], good)
        unet = _cached_model(
            cache,
            unet_key,
            lambda: UNet(1, cfg.unet_width, cfg.unet_depth),
            lambda: dt.train_binary_unet(train, cfg, seed, cfg.seg_epochs),
        )
    result.update(dt.evaluate_binary(unet, test, counts))
    result["train_images"] = len(train)
    # The classifier needs defect types: rule-based defects have none.
    if set_name == "rule" or len(classes) < 2:
        result.update(accuracy=None, classified=0)
        return result
    typed = data["filtered" if set_name == "two_stage" else set_name][name]
    typed = typed.subset([i for i, d in enumerate(typed.defects) if d in classes])
    if set_name == "two_stage":
        stage_one = LabelledSet.concat(data["rule"][name], good)
        stage_one = LabelledSet(
            stage_one.images, stage_one.masks, ["anomaly" if d == "" else d for d in stage_one.defects]
        )
        pretrained = _cached_model(
            cache,
            cache.key(seed, name, "rule", "classifier-pretrain"),
            lambda: ResNet34(2, cfg.resnet_width),
            lambda: dt.train_classifier(stage_one, ["good", "anomaly"], cfg, seed, cfg.cls_epochs),
        )
        classifier = _cached_model(
            cache,
            cache.key(seed, name, set_name, "classifier"),
            lambda: ResNet34(len(classes), cfg.resnet_width),
            lambda: dt.train_classifier(typed, classes, cfg, seed, cfg.finetune_epochs, model=pretrained),
        )
    else:
        classifier = _cached_model(
            cache,
            cache.key(seed, name, set_name, "classifier"),
            lambda: ResNet34(len(classes), cfg.resnet_width),
            lambda: dt.train_classifier(typed, classes, cfg, seed, cfg.cls_epochs),
        )
    accuracy = dt.evaluate_classifier(classifier, test, classes, counts)
    result["bootstrap"] = {**result.get("bootstrap", {}), **accuracy.pop("bootstrap", {})}
    result.update(accuracy)
    return result


def _multitask_run(cache, key, seed, selected, good, test, counts, classes, cfg, dt) -> dict:
    """Seed 004's arm: the multi-task discriminator trained on the category-consistent generated images."""
    typed = selected.subset([i for i, d in enumerate(selected.defects) if d in classes])
    train = LabelledSet.concat(typed, good)
    model = _cached_model(
        cache,
        key,
        lambda: MultiTaskUNet(len(classes) + 1, cfg.unet_width, cfg.unet_depth),
        lambda: dt.train_multitask(train, classes, cfg, seed, cfg.seg_epochs),
    )
    result = dt.evaluate_binary(model, test, counts)
    types = dt.evaluate_multitask_types(model, test, classes, counts)
    result["bootstrap"] = {**result.get("bootstrap", {}), **types.pop("bootstrap", {})}
    return {**result, **types, "train_images": len(train), "selected": len(typed)}


def _multiclass_run(cache, seed, set_name, set_key, data, splits, test_all, counts, classes, cfg, dt, UNet) -> dict:
    if set_name == "rule":
        return {"miou": None, "bg_miou": None, "fg_miou": None}
    names = [s.object_name for s in splits]
    source = "filtered" if set_name == "two_stage" else set_name
    train = LabelledSet.concat(*(_qualified(data[source][n], n) for n in names))
    train = train.subset([i for i, d in enumerate(train.defects) if d in classes])
    model = None
    if set_name == "two_stage":
        stage_one = LabelledSet.concat(*(data["rule"][n] for n in names))
        stage_one = LabelledSet(stage_one.images, stage_one.masks, ["anomaly"] * len(stage_one))
        model = _cached_model(
            cache,
            cache.key(seed, "*", "rule", "multiclass-pretrain"),
            lambda: UNet(2, cfg.unet_width, cfg.unet_depth),
            lambda: dt.train_multiclass_unet(stage_one, ["background", "anomaly"], cfg, seed, cfg.seg_epochs),
        )
    epochs = cfg.finetune_epochs if model is not None else cfg.seg_epochs
    unet = _cached_model(
        cache,
        cache.key(seed, "*", set_key, "multiclass-unet"),
        lambda: UNet(len(classes), cfg.unet_width, cfg.unet_depth),
        lambda: dt.train_multiclass_unet(train, classes, cfg, seed, epochs, model=model),
    )
    return dt.evaluate_multiclass(unet, test_all, classes, counts)


def _mean_std(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return None
    return {
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def _aggregate(runs: list[dict], seeds: list[int], metric: str) -> tuple[dict | None, np.ndarray | None]:
    """Per seed the mean over ``runs`` (objects) of ``metric``, then mean +- std over seeds; and the bootstrap
    replicates of that mean of means (None without intervals)."""
    per_seed, replicates = [], []
    for seed in seeds:
        chosen = [r for r in runs if r["seed"] == seed and r.get(metric) is not None]
        per_seed.append(float(np.mean([r[metric] for r in chosen])) if chosen else None)
        if chosen and all(metric in r.get("bootstrap", {}) for r in chosen):
            replicates.append(np.mean([r["bootstrap"][metric] for r in chosen], axis=0))
    entry = _mean_std(per_seed)
    if entry is not None:
        entry["per_seed"] = per_seed  # in seed order, None where the seed has no value
    if entry is None or not replicates or len(replicates) != entry["n"]:
        return entry, None
    return entry, np.mean(replicates, axis=0)


def _seed_differences(a: dict, b: dict) -> dict:
    """Seed by seed, the difference of two sets' values, and whether every seed puts it on the same side of zero: a
    difference the seeds disagree on is within the detectors' training noise, which the interval (over test images,
    the detectors fixed) does not carry."""
    pairs = zip(a.get("per_seed") or [], b.get("per_seed") or [])
    per_seed = [x - y for x, y in pairs if x is not None and y is not None]
    if len(per_seed) < 2:
        return {"per_seed": per_seed}
    return {"per_seed": per_seed, "seeds_agree": not (any(d > 0 for d in per_seed) and any(d < 0 for d in per_seed))}


def _with_interval(entry: dict | None, replicates: np.ndarray | None, confidence: float) -> dict | None:
    if entry is not None and replicates is not None:
        entry["low"], entry["high"] = bootstrap.interval(replicates, confidence)
    return entry


def summarize(config: EvalConfig, runs: list[dict], splits: list[InspectionSplit], seconds: float) -> dict:
    """Per set and metric: the object mean per seed, then mean +- std over seeds, with the bootstrap interval over
    test images; the same per object; and every pair of sets' difference with its paired interval."""
    confidence = config.report.confidence
    objects = [s.object_name for s in splits]
    table: dict[str, dict] = {}
    per_object: dict[str, dict] = {name: {} for name in objects}
    replicates: dict[str, dict[str, np.ndarray]] = {}
    for set_name in config.sets:
        row, set_replicates = {}, {}
        for metric in TABLE_METRICS:
            object_level = metric in BINARY_METRICS or metric == "accuracy"
            chosen = [r for r in runs if r["set"] == set_name and (r["object"] != "*") == object_level]
            entry, values = _aggregate(chosen, config.seeds, metric)
            row[metric] = _with_interval(entry, values, confidence)
            if values is not None:
                set_replicates[metric] = values
            if object_level:
                for name in objects:
                    mine = [r for r in chosen if r["object"] == name]
                    per_object[name].setdefault(set_name, {})[metric] = _with_interval(
                        *_aggregate(mine, config.seeds, metric), confidence
                    )
        table[set_name] = row
        replicates[set_name] = set_replicates
    differences = []
    for j, minuend in enumerate(config.sets):
        for subtrahend in config.sets[:j]:
            entry = {"minuend": minuend, "subtrahend": subtrahend, "metrics": {}}
            for metric in TABLE_METRICS:
                a, b = table[minuend][metric], table[subtrahend][metric]
                if not (a and b):
                    continue
                value = {"difference": a["mean"] - b["mean"], **_seed_differences(a, b)}
                if metric in replicates[minuend] and metric in replicates[subtrahend]:
                    low, high = bootstrap.interval(
                        replicates[minuend][metric] - replicates[subtrahend][metric], confidence
                    )
                    value.update(low=low, high=high, resolved=bool(low > 0 or high < 0))
                entry["metrics"][metric] = value
            if entry["metrics"]:
                differences.append(entry)
    return {
        "config": to_dict(config),
        "objects": objects,
        "test_images": {s.object_name: len(s.test) for s in splits},
        "table": table,
        "per_object": per_object,
        "differences": differences,
        "adequacy": adequacy(config, differences),
        "seconds": round(seconds, 1),
    }


def adequacy(config: EvalConfig, differences: list[dict]) -> list[str]:
    """Why the config is too small to mean anything (empty when it is not): one seed, no intervals, or no
    difference between sets whose interval excludes zero."""
    reasons = []
    if len(config.seeds) < 2:
        reasons.append("one seed: the spread between detector seeds is not measured")
    if not config.report.bootstrap:
        reasons.append("report.bootstrap = 0: no interval over test images")
    else:
        compared = [v for d in differences for v in d["metrics"].values() if "resolved" in v]
        resolved = sum(v["resolved"] for v in compared)
        if compared and not resolved:
            reasons.append(
                f"every one of the {len(compared)} differences between sets has an interval that contains zero: "
                "the test-sampling error is wider than the differences"
            )
    return reasons
