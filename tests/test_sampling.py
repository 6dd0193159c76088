"""Diversity-SFT sampling: Alg. 2 scores against hand-computed values, the three distributions' rules (same/different
object, same category, one pass), determinism per seed and the 1:1:1 mixture."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import numpy as np
import pytest

from unidg.core.udg import Quadruplet, UDGWriter, caption_stub, read_index
from unidg.train.pairs import (
    DISTRIBUTIONS,
    DefectStats,
    TrainingPair,
    area_score,
    compute_stats,
    connectivity_score,
    count_components,
    count_pairs,
    cross_pairs,
    defect_type,
    diversity_sft_pairs,
    mix_pairs,
    reference_quality,
    reference_quality_images,
)

# ------------------------------------------------------------------------------------------------------- Alg. 2
SIDE = 200  # 40 000 pixels: 0.75 % is exactly 300 pixels


@pytest.mark.parametrize(
    ("pixels", "score"),
    [
        (0, 0.1),
        (39, 0.1),  # 0.0975 % < 0.1 %
        (40, 0.5),  # 0.1 %: [0.1 %, 0.5 %) is closed on the left
        (199, 0.5),
        (200, 1.0),  # 0.5 %: [0.5 %, 1 %]
        (300, 1.0),
        (400, 1.0),  # 1 %: still the top band
        (401, 0.7),  # (1 %, 5 %]
        (2000, 0.7),  # 5 %
        (2001, 0.1),
        (40000, 0.1),
    ],
)
def test_area_score_bands_and_their_ends(pixels, score):
    assert area_score(pixels, SIDE * SIDE) == score


def test_connectivity_score():
    assert [connectivity_score(n) for n in range(6)] == [0.0, 1.0, 0.5, 0.5, 0.0, 0.0]


def blobs(*boxes: tuple[int, int, int, int]) -> np.ndarray:
    mask = np.zeros((SIDE, SIDE), dtype=bool)
    for y, x, h, w in boxes:
        mask[y : y + h, x : x + w] = True
    return mask


def test_components_use_8_connectivity():
    assert count_components(blobs((10, 10, 5, 5))) == 1
    assert count_components(blobs((10, 10, 5, 5), (15, 15, 5, 5))) == 1  # corners touch
    assert count_components(blobs((10, 10, 5, 5), (16, 16, 5, 5))) == 2
    assert count_components(blobs((0, 0, 2, 2), (0, 10, 2, 2), (0, 20, 2, 2), (0, 30, 2, 2))) == 4
    assert count_components(np.zeros((4, 4), bool)) == 0


def painted(mask: np.ndarray, color: tuple[int, int, int], seed: int) -> np.ndarray:
    """Random pixels outside ``mask`` (they must not matter), ``color`` inside."""
    image = np.random.default_rng(seed).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    image[mask] = color
    return image


def test_one_blob_of_075_percent_with_the_same_colour_scores_one():
    mask = blobs((50, 60, 15, 20))  # 300 px = 0.75 %
    reference = painted(mask, (51, 102, 153), seed=0)
    target_mask = blobs((120, 10, 30, 30))  # the target's area and shape play no part
    target = painted(target_mask, (51, 102, 153), seed=1)
    score = reference_quality_images(reference, mask, target, target_mask)
    assert (score.area, score.connectivity, score.color) == (1.0, 1.0, 1.0)
    assert score.total == pytest.approx(1.0)


def test_two_blobs_and_a_hand_computed_colour_distance():
    mask = blobs((10, 10, 10, 15), (100, 100, 10, 15))  # two blobs of 150 px: 0.75 % in all
    reference = painted(mask, (51, 102, 153), seed=2)  # mean (0.2, 0.4, 0.6) on [0, 1]
    target_mask = blobs((40, 40, 10, 20))
    target = painted(target_mask, (51, 51, 153), seed=3)
    target[40:50, 40:50, 0] = 0  # half the red channel at 0: mean red 25.5 / 255 = 0.1
    # d^2 = 0.1^2 + 0.2^2 + 0 = 0.05; s = exp(-0.05 / (2 * 0.1^2)) = exp(-2.5)
    score = reference_quality_images(reference, mask, target, target_mask)
    assert score.area == 1.0 and score.connectivity == 0.5
    assert score.color == pytest.approx(math.exp(-2.5), rel=1e-9)
    assert score.total == pytest.approx(0.3 * 1.0 + 0.4 * 0.5 + 0.3 * math.exp(-2.5), rel=1e-9)


def test_colour_score_at_one_sigma_and_large_masks():
    mask = blobs((0, 0, 100, 100))  # 25 %: area 0.1
    reference = painted(mask, (51, 102, 153), seed=4)
    target = painted(mask, (51 + 25, 102, 153), seed=5)  # off by 25/255 ~ 0.098 on red
    score = reference_quality_images(reference, mask, target, mask)
    assert score.area == 0.1 and score.connectivity == 1.0
    assert score.color == pytest.approx(math.exp(-((25 / 255) ** 2) / 0.02), rel=1e-9)


def test_stats_score_matches_the_array_score():
    mask = blobs((5, 5, 10, 10), (50, 50, 3, 3), (90, 90, 3, 3), (150, 150, 2, 2))  # 4 regions: conn 0
    reference = painted(mask, (200, 10, 10), seed=6)
    target = painted(blobs((60, 60, 9, 9)), (180, 30, 10), seed=7)
    by_arrays = reference_quality_images(reference, mask, target, blobs((60, 60, 9, 9)))
    by_stats = reference_quality(
        DefectStats.from_arrays(reference, mask), DefectStats.from_arrays(target, blobs((60, 60, 9, 9)))
    )
    assert by_arrays == by_stats and by_arrays.connectivity == 0.0 and by_arrays.area == 0.5


# ------------------------------------------------------------------------------------------------ distributions
def quad(sample_id: str, object_name: str, category: str) -> Quadruplet:
    return Quadruplet(
        id=sample_id,
        normal=f"normal/{sample_id}.png",
        abnormal=f"abnormal/{sample_id}.png",
        mask=f"mask/{sample_id}.png",
        caption=caption_stub(category, object_name),
        object_name=object_name,
        category=category,
    )


def synthetic_index(seed: int = 0) -> tuple[list[Quadruplet], dict[str, DefectStats]]:
    """~60 quadruplets on 4 objects and 5 categories, with random Alg. 2 statistics (no images needed)."""
    rng = np.random.default_rng(seed)
    objects = ("plate", "cable", "bottle", "wood")
    categories = ("scratch", "hole", "rust", "dirt", "bubble")
    quadruplets, stats = [], {}
    for i in range(60):
        q = quad(f"{i:04d}", objects[int(rng.integers(4))], categories[int(rng.integers(5))])
        quadruplets.append(q)
        stats[q.id] = DefectStats(
            int(rng.integers(10, 3000)), 40000, int(rng.integers(1, 5)), tuple(float(c) for c in rng.random(3))
        )
    quadruplets.append(quad("lonely", "plate", "glue"))  # a category seen once: in no cross pair
    stats["lonely"] = DefectStats(300, 40000, 1, (0.5, 0.5, 0.5))
    return quadruplets, stats


def pair_ids(pairs: list[TrainingPair]) -> list[tuple[str, str, str]]:
    return [(p.distribution, p.reference.id, p.target.id) for p in pairs]


def test_the_three_distributions_obey_their_rules():
    quadruplets, stats = synthetic_index()
    pairs = diversity_sft_pairs(quadruplets, seed=0, stats=stats)
    counts = count_pairs(pairs)
    assert counts["defect-fill"] == len(quadruplets)
    assert counts["intra-object"] > 10 and counts["cross-object"] > 20
    for pair in pairs:
        assert pair.distribution in DISTRIBUTIONS and pair.source is pair.target
        assert pair.reference.category == pair.target.category
        if pair.distribution == "defect-fill":
            assert pair.reference is pair.target
        elif pair.distribution == "intra-object":
            assert pair.reference.id != pair.target.id
            assert pair.reference.object_name == pair.target.object_name
        else:
            assert pair.reference.object_name != pair.target.object_name
    # One pass: within a distribution, a quadruplet is a reference at most once and a target at most once.
    for name in DISTRIBUTIONS:
        chosen = [p for p in pairs if p.distribution == name]
        assert max(Counter(p.reference.id for p in chosen).values()) == 1
        assert max(Counter(p.target.id for p in chosen).values()) == 1
    assert not any(p.target.id == "lonely" for p in pairs if p.distribution != "defect-fill")


def test_every_possible_cross_target_is_served_when_references_abound():
    # Two objects, one category: every quadruplet can be a cross-object target and has partners left.
    quadruplets = [quad(f"a{i}", "plate", "hole") for i in range(4)] + [quad(f"b{i}", "cup", "hole") for i in range(4)]
    stats = {q.id: DefectStats(300, 40000, 1, (0.5, 0.5, 0.5)) for q in quadruplets}
    pairs = cross_pairs(quadruplets, stats, np.random.default_rng(0), same_object=False)
    assert sorted(p.target.id for p in pairs) == sorted(q.id for q in quadruplets)
    assert sorted(p.reference.id for p in pairs) == sorted(q.id for q in quadruplets)


def test_deterministic_per_seed_other_seeds_differ_input_order_does_not_matter():
    quadruplets, stats = synthetic_index()
    first = pair_ids(diversity_sft_pairs(quadruplets, seed=7, stats=stats))
    assert first == pair_ids(diversity_sft_pairs(quadruplets, seed=7, stats=stats))
    assert first != pair_ids(diversity_sft_pairs(quadruplets, seed=8, stats=stats))
    shuffled = [quadruplets[i] for i in np.random.default_rng(1).permutation(len(quadruplets))]
    again = pair_ids(diversity_sft_pairs(shuffled, seed=7, stats=stats))
    assert [p for p in again if p[0] != "defect-fill"] == [p for p in first if p[0] != "defect-fill"]


def test_reference_is_drawn_from_the_top_three():
    # Target T (object "cup") and four cross-object candidates with total scores 1.0 > 0.91 > 0.85 > 0.73.
    target = quad("t", "cup", "scratch")
    candidates = [quad(f"c{i}", "plate", "scratch") for i in range(4)]
    color = (0.3, 0.3, 0.3)
    pixels = {"c0": 300, "c1": 1000, "c2": 100, "c3": 20}  # area scores 1.0, 0.7, 0.5, 0.1
    stats = {"t": DefectStats(300, 40000, 1, color)} | {
        c.id: DefectStats(pixels[c.id], 40000, 1, color) for c in candidates
    }
    chosen = Counter()
    for seed in range(40):
        pairs = cross_pairs([target, *candidates], stats, np.random.default_rng(seed), same_object=False)
        chosen.update(p.reference.id for p in pairs if p.target.id == "t")
    assert set(chosen) == {"c0", "c1", "c2"} and sum(chosen.values()) == 40


def test_mixture_is_one_to_one_to_one_and_seeded():
    quadruplets, stats = synthetic_index()
    pairs = diversity_sft_pairs(quadruplets, seed=0, stats=stats)
    mixed = mix_pairs(pairs, seed=3)
    smallest = min(count_pairs(pairs).values())
    assert len(mixed) == 3 * smallest
    for k in range(1, smallest + 1):  # every prefix of 3k pairs is balanced
        assert Counter(p.distribution for p in mixed[: 3 * k]) == dict.fromkeys(DISTRIBUTIONS, k)
    assert pair_ids(mixed) == pair_ids(mix_pairs(pairs, seed=3))
    assert pair_ids(mixed) != pair_ids(mix_pairs(pairs, seed=4))
    longer = mix_pairs(pairs, seed=3, per_distribution=100)  # cycles the smaller distributions
    assert count_pairs(longer) == dict.fromkeys(DISTRIBUTIONS, 100)
    fill_only = [p for p in pairs if p.distribution == "defect-fill"]
    with pytest.raises(ValueError, match="no intra-object / cross-object pairs"):
        mix_pairs(fill_only, seed=0)
    assert count_pairs(mix_pairs(fill_only, seed=0, allow_missing=True))["defect-fill"] == len(fill_only)


def test_bad_inputs():
    quadruplets, stats = synthetic_index()
    with pytest.raises(ValueError, match="no quadruplets"):
        diversity_sft_pairs([], seed=0)
    with pytest.raises(ValueError, match="ids repeat"):
        diversity_sft_pairs(quadruplets + quadruplets[:1], seed=0, stats=stats)
    with pytest.raises(ValueError, match="no defect statistics"):
        diversity_sft_pairs(quadruplets, seed=0, stats={})
    with pytest.raises(ValueError, match="mask is empty"):
        DefectStats.from_arrays(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), bool))


def test_statistics_from_a_udg_folder(tmp_path):
    rng = np.random.default_rng(0)
    with UDGWriter(tmp_path / "udg") as writer:
        for i, (obj, category) in enumerate([("cup", "hole"), ("cup", "hole"), ("plate", "hole"), ("plate", "rust")]):
            mask = np.zeros((40, 50), dtype=bool)
            mask[5 + i : 12 + i, 10:20] = True
            normal = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
            abnormal = normal.copy()
            abnormal[mask] = (40 * i, 80, 120)
            writer.add(normal, abnormal, mask, caption_stub(category, obj), obj, category)
    quadruplets = read_index(tmp_path / "udg")
    stats = compute_stats(quadruplets)
    assert stats["000002"] == DefectStats(70, 2000, 1, (80 / 255, 80 / 255, 120 / 255))
    pairs = diversity_sft_pairs(quadruplets, seed=0)
    assert count_pairs(pairs) == {"defect-fill": 4, "intra-object": 2, "cross-object": 2}
    assert pair_ids(pairs) == pair_ids(diversity_sft_pairs(quadruplets, seed=0, stats=stats))


def test_intra_object_pairs_share_the_caption_defect_type_not_just_the_category():
    """(b) is "same object, same defect type": two defect types mapped onto one category never pair up."""

    def typed(sample_id: str, defect: str | None) -> Quadruplet:
        q = quad(sample_id, "plate", "scratch")
        caption = dict(q.caption)
        entries = [dict(entry) for entry in caption["defect-level"]]
        if defect is None:
            entries = [{k: v for k, v in entry.items() if k != "type"} for entry in entries]
        else:
            entries[0]["type"] = defect
        caption["defect-level"] = entries
        return dataclasses.replace(q, caption=caption)

    quadruplets = [typed(f"h{i}", "Hairline Scratch") for i in range(3)] + [typed(f"g{i}", "gouge") for i in range(3)]
    quadruplets += [typed(f"n{i}", None) for i in range(2)]  # no type in the caption: grouped by the category
    assert defect_type(quadruplets[0]) == "hairline scratch" and defect_type(quadruplets[-1]) == "scratch"
    stats = {q.id: DefectStats(300, 40000, 1, (0.5, 0.5, 0.5)) for q in quadruplets}
    for seed in range(10):
        pairs = cross_pairs(quadruplets, stats, np.random.default_rng(seed), same_object=True)
        assert len(pairs) >= 5
        assert all(p.reference.id[0] == p.target.id[0] for p in pairs)  # h with h, g with g, n with n
