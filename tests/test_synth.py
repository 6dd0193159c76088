"""Procedural UDG data: shape-prior masks (kinds, sizes, region rule), the synth generator's output (readable by
read_index and `unidg data validate`, deterministic, covering all 28 categories' tables), and the data commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from unidg.cli import main
from unidg.runtime.udg import CATEGORIES, INDEX_FILE, caption_problems, read_index
from unidg.train.sampling import count_pairs, diversity_sft_pairs
from unidg.train.shape_masks import (
    LOCAL_KINDS,
    MASK_KINDS,
    MAX_REGIONS,
    SIZE_RANGES,
    count_regions,
    random_shape_mask,
    shape_mask,
)
from unidg.train.synth import DATASET_FILE, DEFECTS, SURFACES, check_tables, defect_category, plan, synthesize

COUNT, SIZE = 30, 64


@pytest.fixture(scope="module")
def udg(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("synth") / "udg"
    synthesize(folder, COUNT, seed=11, size=SIZE, progress=False, non_square_fraction=0.3)
    return folder


# ------------------------------------------------------------------------------------------------------ shape masks
@pytest.mark.parametrize("shape", [(64, 64), (96, 128)])
@pytest.mark.parametrize("size", list(SIZE_RANGES))
@pytest.mark.parametrize("kind", LOCAL_KINDS)
def test_every_kind_at_every_size_is_non_empty_in_range_and_obeys_the_region_rule(kind, size, shape):
    low, high = SIZE_RANGES[size]
    regions = []
    for seed in range(4):
        mask = shape_mask(kind, size, shape, np.random.default_rng(seed))
        assert mask.dtype == np.bool_ and mask.shape == shape and mask.any()
        assert low <= mask.mean() <= high, f"{kind} {size}: area {mask.mean():.4f} outside [{low}, {high}]"
        regions.append(count_regions(mask))
    if kind != "perlin":
        assert max(regions) <= MAX_REGIONS


def test_perlin_is_the_kind_allowed_many_regions():
    most = max(count_regions(shape_mask("perlin", "large", (128, 128), np.random.default_rng(s))) for s in range(8))
    assert most > MAX_REGIONS


def test_masks_are_deterministic_and_clipped_to_the_foreground():
    first = shape_mask("polygon", "medium", (64, 80), np.random.default_rng(5))
    assert np.array_equal(first, shape_mask("polygon", "medium", (64, 80), np.random.default_rng(5)))
    assert not np.array_equal(first, shape_mask("polygon", "medium", (64, 80), np.random.default_rng(6)))
    yy, xx = np.mgrid[0:64, 0:64]
    disc = (yy - 32) ** 2 + (xx - 32) ** 2 <= 24**2
    for kind in MASK_KINDS:
        mask = shape_mask(kind, "small", (64, 64), np.random.default_rng(1), foreground=disc)
        assert mask.any() and not (mask & ~disc).any(), kind
    assert np.array_equal(shape_mask("foreground", "large", (64, 64), np.random.default_rng(0), disc), disc)
    mask, kind, size = random_shape_mask((64, 64), np.random.default_rng(2))
    assert kind in LOCAL_KINDS and size in SIZE_RANGES and mask.any()


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda rng: shape_mask("star", "small", (64, 64), rng), "unknown mask kind 'star'"),
        (lambda rng: shape_mask("ellipse", "huge", (64, 64), rng), "unknown mask size 'huge'"),
        (lambda rng: shape_mask("ellipse", "small", (4, 64), rng), "at least 8x8"),
        (lambda rng: shape_mask("foreground", "small", (64, 64), rng), "needs the object foreground"),
        (lambda rng: shape_mask("line", "small", (64, 64), rng, np.zeros((64, 64), bool)), "foreground is empty"),
    ],
)
def test_mask_refusals(call, words):
    with pytest.raises(ValueError, match=words):
        call(np.random.default_rng(0))


# --------------------------------------------------------------------------------------------------- the generator
def test_tables_cover_the_28_categories_on_several_objects():
    check_tables()
    objects_of: dict[str, set[str]] = {}
    for surface in SURFACES:
        for name in surface.defects:
            objects_of.setdefault(defect_category(name), set()).add(surface.name)
    assert set(objects_of) == set(CATEGORIES)
    assert min(len(objects) for objects in objects_of.values()) >= 2  # every category has cross-object pairs
    assert {d.name for d in DEFECTS.values()} >= {"scratch", "hole", "stain", "dirt", "crack", "rust", "bubble"}


def test_plan_is_a_prefix_for_larger_counts():
    assert plan(40, seed=3)[:25] == plan(25, seed=3)
    assert plan(40, seed=3) != plan(40, seed=4)


def test_output_passes_read_index_and_matches_dataset_json(udg):
    quadruplets = read_index(udg)
    assert [q.id for q in quadruplets] == [f"{i:06d}" for i in range(COUNT)]
    summary = json.loads((udg / DATASET_FILE).read_text())
    assert summary["count"] == COUNT and summary["seed"] == 11 and summary["size"] == SIZE
    assert sum(summary["categories"].values()) == COUNT
    categories = {}
    for q in quadruplets:
        categories[q.category] = categories.get(q.category, 0) + 1
    assert summary["categories"] == dict(sorted(categories.items()))
    sizes = {q.size for q in quadruplets}
    assert (SIZE, SIZE) in sizes and sizes & {(SIZE, 80), (80, SIZE)}  # some 4:5 / 5:4 images


def test_abnormal_equals_normal_outside_the_mask_and_differs_inside(udg):
    visible = 0
    for q in read_index(udg):
        normal, abnormal, mask = q.load_normal(), q.load_abnormal(), q.load_mask()
        assert np.array_equal(normal[~mask], abnormal[~mask]), q.id
        visible += np.abs(normal[mask].astype(int) - abnormal[mask]).mean() >= 6.0
    assert visible >= 0.9 * COUNT


def test_captions_follow_fig7_and_describe_the_defects(udg):
    for q in read_index(udg):
        assert caption_problems(q.caption) == []
        entries = q.caption["defect-level"]
        assert len(entries) == (2 if q.category == "combined" else 1)
        if q.category != "combined":
            assert defect_category(entries[0]["type"]) == q.category == defect_category(q.extra["defect_type"])
        assert q.caption["image-level"][0]["foreground-object"] == q.object_name
        assert q.caption["Confidence"] == 1.0


def test_defect_colours_vary_within_one_object_and_defect(udg):
    groups: dict[tuple[str, str], list[np.ndarray]] = {}
    for q in read_index(udg):
        groups.setdefault((q.object_name, q.extra["defect_type"]), []).append(
            q.load_abnormal()[q.load_mask()].mean(axis=0)
        )
    spreads = [np.ptp(np.stack(colors), axis=0).max() for colors in groups.values() if len(colors) > 1]
    assert spreads and np.median(spreads) > 5.0


def test_holds_all_three_distributions(udg):
    counts = count_pairs(diversity_sft_pairs(read_index(udg), seed=0))
    assert counts["defect-fill"] == COUNT and counts["intra-object"] >= COUNT // 3 and counts["cross-object"] >= 6


def test_deterministic_per_seed(tmp_path, udg):
    synthesize(tmp_path / "again", 6, seed=11, size=SIZE, progress=False, non_square_fraction=0.3)
    synthesize(tmp_path / "other", 6, seed=12, size=SIZE, progress=False, non_square_fraction=0.3)
    first, again, other = read_index(udg)[:6], read_index(tmp_path / "again"), read_index(tmp_path / "other")
    for a, b in zip(first, again):
        assert a.to_json() == b.to_json()
        assert np.array_equal(a.load_abnormal(), b.load_abnormal()) and np.array_equal(a.load_mask(), b.load_mask())
    assert [q.to_json() for q in other] != [q.to_json() for q in first]


def test_existing_folder_needs_force(tmp_path):
    synthesize(tmp_path / "udg", 3, seed=0, size=48, progress=False)
    with pytest.raises(ValueError, match="already holds a UDG index.*--force"):
        synthesize(tmp_path / "udg", 3, seed=0, size=48, progress=False)
    synthesize(tmp_path / "udg", 2, seed=1, size=48, progress=False, overwrite=True)
    assert len(read_index(tmp_path / "udg")) == 2
    assert len(list((tmp_path / "udg" / "mask").iterdir())) == 2
    with pytest.raises(ValueError, match="count must be >= 1"):
        synthesize(tmp_path / "x", 0)
    with pytest.raises(ValueError, match="size must be >= 32"):
        synthesize(tmp_path / "x", 1, size=16)


# ------------------------------------------------------------------------------------------------------ commands
def test_data_synth_and_validate_commands(tmp_path, capsys):
    out = tmp_path / "udg"
    assert main(["data", "synth", "--out", str(out), "--count", "8", "--seed", "2", "--size", "48", "--quiet"]) == 0
    assert "8 quadruplets" in capsys.readouterr().out
    assert main(["data", "validate", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "8 valid quadruplets, 0 bad lines" in printed
    assert "per category (objects):" in printed and "per object (categories):" in printed
    assert main(["data", "synth", "--out", str(out), "--count", "8", "--size", "48", "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err


def test_validate_exits_non_zero_listing_every_problem(udg, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(udg, broken)
    lines = (broken / INDEX_FILE).read_text().splitlines()
    lines[1] = lines[1][:40]  # truncated JSON
    entry = json.loads(lines[4])
    entry["category"] = "crack"
    lines[4] = json.dumps(entry)
    (broken / INDEX_FILE).write_text("\n".join(lines) + "\n")
    (broken / "normal" / "000007.png").unlink()
    assert main(["data", "validate", str(broken)]) == 1
    captured = capsys.readouterr()
    assert f"{COUNT - 3} valid quadruplets, 3 bad lines" in captured.out
    index = str(broken / INDEX_FILE)
    for line, words in ((2, "is not valid JSON"), (5, "'crack' is not one of the 28"), (8, "does not exist")):
        assert f"{index} line {line}: " in captured.err and words in captured.err
    assert main(["data", "validate", str(tmp_path / "missing")]) == 2


def test_data_help_imports_no_heavy_module():
    code = (
        "import sys; from unidg.cli import build_parser; build_parser().parse_args(['data', 'validate', 'x']); "
        "print(sorted(m for m in ('torch', 'scipy', 'skimage', 'unidg.train.synth') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
