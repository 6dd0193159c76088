"""Procedural UDG data: shape-prior masks (kinds, sizes, region rule), the synth generator's output (readable by
read_index and `unidg data validate`, deterministic, covering all 28 categories' tables), and the data commands."""

from __future__ import annotations

import colorsys
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from unidg.cli import main
from unidg.core.udg import CATEGORIES, INDEX_FILE, caption_problems, read_index
from unidg.train.pairs import count_pairs, diversity_sft_pairs
from unidg.train.procedural import (
    DATASET_FILE,
    DEFECTS,
    SURFACES,
    check_tables,
    defect_category,
    look_color,
    plan,
    synthesize,
)
from unidg.train.shape_masks import (
    LOCAL_KINDS,
    MASK_KINDS,
    MAX_REGIONS,
    SIZE_RANGES,
    count_regions,
    random_shape_mask,
    shape_mask,
)

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


def test_a_lot_is_one_product_flipped(udg):
    lots: dict[int, list] = {}
    for q in read_index(udg):
        lots.setdefault(q.extra["lot"], []).append(q)
    compared = 0
    for members in lots.values():
        assert len({(q.object_name, q.extra["defect_type"]) for q in members}) == 1
        first = members[0].load_normal()
        for q in members[1:]:
            if q.size != members[0].size:
                continue
            normal = q.load_normal()
            variants = [first, first[::-1], first[:, ::-1], first[::-1, ::-1]]
            assert any(np.array_equal(normal, v) for v in variants), q.id
            compared += 1
    assert compared >= 5


def test_a_family_shares_a_look_across_its_two_objects(udg):
    families: dict[int, list] = {}
    for q in read_index(udg):
        families.setdefault(q.extra["family"], []).append(q)
    colors = {}
    for family, members in families.items():
        assert len({q.category for q in members}) == 1
        colors[family] = [q.load_abnormal()[q.load_mask()].mean(axis=0) for q in members]
    assert sum(len({q.object_name for q in members}) == 2 for members in families.values()) >= 4
    within = [np.linalg.norm(a - b) for c in colors.values() for i, a in enumerate(c) for b in c[i + 1 :]]
    pairs = [(c, d) for f, c in colors.items() for g, d in colors.items() if f < g]
    across = [np.linalg.norm(a - b) for c, d in pairs for a in c for b in d]
    assert np.median(within) < 0.6 * np.median(across)


def test_look_color_is_stable_within_a_look_and_inside_the_defect_ranges():
    rust = DEFECTS["rust"]
    look = np.array([0.3, 0.6, 0.5])
    rng = np.random.default_rng(0)
    same = np.stack([look_color(rust, look, rng) for _ in range(20)])
    other = np.stack([look_color(rust, np.array([0.9, 0.1, 0.9]), rng) for _ in range(20)])
    assert same.std(axis=0).max() < 0.06
    assert np.linalg.norm(same.mean(axis=0) - other.mean(axis=0)) > 0.2
    for rgb in np.concatenate([same, other]):
        h, s_, v = colorsys.rgb_to_hsv(*rgb)
        assert rust.saturation[0] - 1e-6 <= s_ <= rust.saturation[1] + 1e-6
        assert rust.value[0] - 1e-6 <= v <= rust.value[1] + 1e-6
        centre = sum(rust.hue) / 2
        assert abs((h - centre + 0.5) % 1.0 - 0.5) <= (rust.hue[1] - rust.hue[0]) / 2 + 0.06  # hue is circular


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
    with pytest.raises(ValueError, match="already holds a UDG index.*--overwrite"):
        synthesize(tmp_path / "udg", 3, seed=0, size=48, progress=False)
    synthesize(tmp_path / "udg", 2, seed=1, size=48, progress=False, overwrite=True)
    assert len(read_index(tmp_path / "udg")) == 2
    assert len(list((tmp_path / "udg" / "mask").iterdir())) == 2
    # A UDG folder synth did not write (a curated one: no dataset.json) is never cleared, even with --overwrite.
    (tmp_path / "udg" / "dataset.json").unlink()
    with pytest.raises(ValueError, match="did not write"):
        synthesize(tmp_path / "udg", 2, seed=1, size=48, progress=False, overwrite=True)
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
    assert "--overwrite" in capsys.readouterr().err


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
        "print(sorted(m for m in ('torch', 'scipy', 'skimage', 'unidg.train.procedural') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
