"""The plan of a procedural UDG folder (lots and defect families) and ``synthesize``, which writes it."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unidg.core.errors import UniDGError
from unidg.core.manifest import atomic_write_text
from unidg.core.staging import OUTPUT_MARKER, is_unidg_output
from unidg.core.udg import CATEGORIES, INDEX_FILE, UDGWriter
from unidg.train.procedural.defects import COMBINED, DEFECTS, defect_category
from unidg.train.procedural.samples import make_sample
from unidg.train.procedural.surfaces import SURFACES

GENERATOR_VERSION = 2  # 2: product lots and defect families

DATASET_FILE = "dataset.json"


def sample_shapes(size: int) -> tuple[tuple[int, int], ...]:
    """Image sizes (H, W): mostly square, some 4:5 and 5:4 to exercise pad-to-square."""
    long_side = max(8, int(round(size * 1.25 / 8)) * 8)
    return (size, size), (size, long_side), (long_side, size)


@dataclass(frozen=True)
class PlannedSample:
    """One sample of the plan: what it shows, and the lot and defect family it belongs to."""

    object_name: str
    defect_name: str
    lot: int  # samples of one lot are one product (the same normal image, flipped at random)
    family: int  # lots of one family share a defect look (colour), across objects


def plan(count: int, seed: int) -> list[PlannedSample]:
    """The samples to make, in order: categories in shuffled rounds; in each round a category goes on two objects
    (two lots of 2-3 samples) that share one defect look, so small datasets already hold intra-object and
    cross-object pairs whose defects look alike, as one defect kind on one production line does."""
    rng = np.random.default_rng([seed, 0])
    by_category: dict[str, list[tuple[str, str]]] = {}
    for surface in SURFACES:
        for defect_name in surface.defects:
            by_category.setdefault(defect_category(defect_name), []).append((surface.name, defect_name))
    categories = sorted(by_category)
    jobs: list[PlannedSample] = []
    lot = family = 0
    while len(jobs) < count:
        for c in rng.permutation(len(categories)):
            combos = by_category[categories[c]]
            for i in rng.choice(len(combos), size=min(2, len(combos)), replace=False):
                jobs.extend([PlannedSample(*combos[i], lot=lot, family=family)] * int(rng.integers(2, 4)))
                lot += 1
            family += 1
            if len(jobs) >= count:
                break
    return jobs[:count]


def synthesize(
    out: str | Path,
    count: int,
    seed: int = 0,
    size: int = 256,
    progress: bool = True,
    overwrite: bool = False,
    non_square_fraction: float = 0.2,
) -> dict:
    """Write ``count`` quadruplets to the UDG folder ``out`` (+ ``dataset.json``); returns the summary written.

    Deterministic for (count, seed, size): sample i uses its own Generator seeded with (seed, i + 1).
    """
    from tqdm import tqdm

    if count < 1:
        raise UniDGError(f"count must be >= 1 (got {count})")
    if size < 32:
        raise UniDGError(f"size must be >= 32 pixels (got {size})")
    if not 0.0 <= non_square_fraction <= 1.0:
        raise UniDGError(f"the non-square fraction must be in [0, 1] (got {non_square_fraction})")
    out = Path(out)
    if (out / INDEX_FILE).exists():
        if not overwrite:
            raise UniDGError(f"{out} already holds a UDG index; choose a new folder or pass --overwrite to replace it")
        # Only a folder this command wrote is cleared: a curated or hand-made UDG folder keeps its images.
        if not (is_unidg_output(out) or (out / DATASET_FILE).is_file()):
            raise UniDGError(
                f"{out} holds a UDG index that `unidg data synth` did not write (no {DATASET_FILE}, no "
                f"{OUTPUT_MARKER}), so --overwrite never clears it; choose a new folder, or empty it yourself"
            )
        for name in (INDEX_FILE, DATASET_FILE):
            (out / name).unlink(missing_ok=True)
        for name in ("normal", "abnormal", "mask"):
            shutil.rmtree(out / name, ignore_errors=True)
    surfaces = {surface.name: surface for surface in SURFACES}
    shapes = sample_shapes(size)
    summary: dict = {"categories": {}, "objects": {}, "object_categories": {}, "defect_types": {}, "image_sizes": {}}
    with UDGWriter(out, compress_level=1) as writer:  # PNG level 1: ~10 % larger files, faster writes
        for i, job in enumerate(tqdm(plan(count, seed), desc="synth", disable=not progress)):
            rng = np.random.default_rng([seed, i + 1])
            shape = shapes[0] if rng.random() >= non_square_fraction else shapes[1 + int(rng.integers(2))]
            product_rng = np.random.default_rng([seed, 1, job.lot])
            look = np.random.default_rng([seed, 2, job.family]).random(3)
            sample = make_sample(surfaces[job.object_name], job.defect_name, shape, rng, product_rng, look)
            writer.add(
                sample.normal,
                sample.abnormal,
                sample.mask,
                sample.caption,
                sample.object_name,
                sample.category,
                sample_id=f"{i:06d}",
                extra={"defect_type": sample.defect_type, "lot": job.lot, "family": job.family},
            )
            for key, value in (
                ("categories", sample.category),
                ("objects", sample.object_name),
                ("defect_types", sample.defect_type),
                ("image_sizes", f"{shape[0]}x{shape[1]}"),
            ):
                summary[key][value] = summary[key].get(value, 0) + 1
            per_object = summary["object_categories"].setdefault(sample.object_name, {})
            per_object[sample.category] = per_object.get(sample.category, 0) + 1
    document = {
        "generator": "unidg.train.procedural",
        "version": GENERATOR_VERSION,
        "count": count,
        "seed": seed,
        "size": size,
        **{key: dict(sorted(value.items())) for key, value in summary.items()},
    }
    atomic_write_text(out / DATASET_FILE, json.dumps(document, indent=2) + "\n")
    return document


def check_tables() -> None:
    """Every defect maps to a standardized category and every object's defects exist (run by the tests)."""
    for defect in DEFECTS.values():
        if defect.category not in CATEGORIES:
            raise ValueError(f"defect {defect.name!r} maps to unknown category {defect.category!r}")
    for surface in SURFACES:
        for name in surface.defects:
            if name != COMBINED and name not in DEFECTS:
                raise ValueError(f"surface {surface.name!r} lists unknown defect {name!r}")
