"""Diversity-SFT training pairs from a UDG index (paper Sec. 5.3, App. C.1, Alg. 2).

Three distributions, mixed 1:1:1:
  (a) "defect-fill":  reference = target = one quadruplet's abnormal image; source = its normal image.
  (b) "intra-object": target from one quadruplet; reference from another with the same object_name and the same
      defect type: the caption's ``defect-level[0].type`` (the original defect name; real UDG maps 269 of them onto
      28 categories), or the category where the caption names none.
  (c) "cross-object": target from one quadruplet; reference from another with the same category, different object_name.
For (b) and (c) the reference is drawn uniformly from the top 3 candidates by the Alg. 2 quality score. The index is
traversed once: within each distribution a quadruplet is a target at most once and a reference at most once.

Alg. 2, as implemented here:
  area:         r = |M_ref| / (H W);  1.0 if r in [0.5%, 1%], 0.7 if r in (1%, 5%], 0.5 if r in [0.1%, 0.5%), else 0.1
                (exact integer comparisons, so the interval ends are honoured).
  connectivity: N_cc = connected components of M_ref with 8-connectivity, background excluded (the paper's
                "ConnectedComponents - 1" counts the background label as one); 1.0 if N_cc = 1, 0.5 if 2-3, else 0.
  colour:       mu = per-channel mean RGB inside the mask of the abnormal image, scaled to [0, 1] (sigma = 0.1 only
                makes sense on that scale); d = ||mu_ref - mu_tar||_2; s = exp(-d^2 / (2 sigma^2)).
  total:        Q = 0.3 area + 0.4 connectivity + 0.3 colour.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from unidg.core.errors import UniDGError
from unidg.core.udg import Quadruplet, read_index
from unidg.train.shape_masks import count_regions

DISTRIBUTIONS: tuple[str, ...] = ("defect-fill", "intra-object", "cross-object")
CONNECTIVITY = 8  # pixels touching at a corner belong to one component
COLOR_SIGMA = 0.1  # on RGB means scaled to [0, 1]
AREA_WEIGHT, CONNECTIVITY_WEIGHT, COLOR_WEIGHT = 0.3, 0.4, 0.3
TOP_K = 3


# --------------------------------------------------------------------------------------------------------- Alg. 2
def area_score(defect_pixels: int, total_pixels: int) -> float:
    """Alg. 2 area-ratio score of a reference mask with ``defect_pixels`` of ``total_pixels``."""
    if total_pixels <= 0:
        raise UniDGError(f"total_pixels must be > 0 (got {total_pixels})")
    p, n = int(defect_pixels), int(total_pixels)
    # r in [a%, b%]  <=>  100 * p >= a * n  and  100 * p <= b * n (scaled by 10 for the 0.1 % and 0.5 % ends).
    if 200 * p >= n and 100 * p <= n:  # [0.5 %, 1 %]
        return 1.0
    if 100 * p > n and 20 * p <= n:  # (1 %, 5 %]
        return 0.7
    if 1000 * p >= n and 200 * p < n:  # [0.1 %, 0.5 %)
        return 0.5
    return 0.1


def count_components(mask: np.ndarray) -> int:
    """Connected defect regions of a bool mask, 8-connectivity, background not counted."""
    return count_regions(mask)


def connectivity_score(num_components: int) -> float:
    if num_components == 1:
        return 1.0
    if 2 <= num_components <= 3:
        return 0.5
    return 0.0


def mean_defect_color(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-channel mean of ``image`` (uint8 RGB) inside ``mask``, scaled to [0, 1]: float64 (3,)."""
    mask = np.asarray(mask, dtype=bool)
    if image.shape[:2] != mask.shape:
        raise UniDGError(f"image {image.shape[:2]} and mask {mask.shape} must have the same size")
    if not mask.any():
        raise UniDGError("mask is empty: a defect colour needs at least one masked pixel")
    return image[mask].astype(np.float64).mean(axis=0) / 255.0


def color_score(reference_color: np.ndarray, target_color: np.ndarray, sigma: float = COLOR_SIGMA) -> float:
    distance_sq = float(np.sum((np.asarray(reference_color) - np.asarray(target_color)) ** 2))
    return math.exp(-distance_sq / (2.0 * sigma**2))


@dataclass(frozen=True)
class DefectStats:
    """What Alg. 2 needs of one quadruplet's defect (abnormal image + mask), computed once per quadruplet."""

    defect_pixels: int
    total_pixels: int
    components: int
    mean_color: tuple[float, float, float]  # RGB in [0, 1]

    @classmethod
    def from_arrays(cls, image: np.ndarray, mask: np.ndarray) -> DefectStats:
        mask = np.asarray(mask, dtype=bool)
        color = mean_defect_color(image, mask)
        return cls(int(mask.sum()), int(mask.size), count_components(mask), tuple(float(c) for c in color))

    @property
    def area_ratio(self) -> float:
        return self.defect_pixels / self.total_pixels


@dataclass(frozen=True)
class QualityScore:
    area: float
    connectivity: float
    color: float

    @property
    def total(self) -> float:
        return AREA_WEIGHT * self.area + CONNECTIVITY_WEIGHT * self.connectivity + COLOR_WEIGHT * self.color


def reference_quality(reference: DefectStats, target: DefectStats, sigma: float = COLOR_SIGMA) -> QualityScore:
    """Alg. 2 score of a candidate reference defect for a target defect."""
    return QualityScore(
        area=area_score(reference.defect_pixels, reference.total_pixels),
        connectivity=connectivity_score(reference.components),
        color=color_score(np.array(reference.mean_color), np.array(target.mean_color), sigma),
    )


def reference_quality_images(
    reference_image: np.ndarray,
    reference_mask: np.ndarray,
    target_image: np.ndarray,
    target_mask: np.ndarray,
    sigma: float = COLOR_SIGMA,
) -> QualityScore:
    """Alg. 2 on arrays: candidate reference (image, mask) against the target (image, mask)."""
    reference = DefectStats.from_arrays(reference_image, reference_mask)
    target = DefectStats.from_arrays(target_image, target_mask)
    return reference_quality(reference, target, sigma)


def compute_stats(quadruplets: Sequence[Quadruplet], progress: bool = False) -> dict[str, DefectStats]:
    """Load every quadruplet's abnormal image and mask once and keep its Alg. 2 statistics, keyed by id."""
    stats = {}
    for quadruplet in tqdm(quadruplets, desc="defect statistics", disable=not progress, unit="sample"):
        stats[quadruplet.id] = DefectStats.from_arrays(quadruplet.load_abnormal(), quadruplet.load_mask())
    return stats


# ------------------------------------------------------------------------------------------------ distributions
@dataclass(frozen=True)
class TrainingPair:
    """One Diversity-SFT sample: the reference defect (reference.abnormal, reference.mask) goes into the target
    region (target.mask) of the source (target.normal); the training target is target.abnormal."""

    reference: Quadruplet
    target: Quadruplet
    distribution: str  # one of DISTRIBUTIONS

    @property
    def source(self) -> Quadruplet:
        return self.target


def defect_type(quadruplet: Quadruplet) -> str:
    """The defect type of (b): the caption's first ``defect-level`` type, lower-cased; the category without one."""
    entries = quadruplet.caption.get("defect-level") if isinstance(quadruplet.caption, dict) else None
    for entry in entries or []:
        name = entry.get("type") if isinstance(entry, dict) else None
        if isinstance(name, str) and name.strip():
            return name.strip().lower()
    return quadruplet.category


def defect_fill_pairs(quadruplets: Sequence[Quadruplet]) -> list[TrainingPair]:
    """Distribution (a): every quadruplet is its own reference (the adaptive crop keeps the two halves different)."""
    return [TrainingPair(q, q, "defect-fill") for q in quadruplets]


def cross_pairs(
    quadruplets: Sequence[Quadruplet],
    stats: Mapping[str, DefectStats],
    rng: np.random.Generator,
    same_object: bool,
    top_k: int = TOP_K,
    sigma: float = COLOR_SIGMA,
) -> list[TrainingPair]:
    """Distributions (b) (``same_object``: grouped by ``defect_type``) and (c) (grouped by category): one pass over
    the targets in random order; each target takes a reference from the top ``top_k`` unused candidates by Alg. 2
    score; a quadruplet is a reference at most once."""
    distribution = "intra-object" if same_object else "cross-object"
    group_of = defect_type if same_object else (lambda q: q.category)
    groups: dict[str, list[Quadruplet]] = defaultdict(list)
    for quadruplet in sorted(quadruplets, key=lambda q: q.id):
        groups[group_of(quadruplet)].append(quadruplet)
    pairs = []
    for category in sorted(groups):
        members = groups[category]
        if len(members) < 2:
            continue
        try:
            member_stats = [stats[q.id] for q in members]
        except KeyError as error:
            raise UniDGError(f"no defect statistics for quadruplet {error.args[0]}; pass compute_stats(...)") from None
        # The reference-only part of Q is fixed per candidate; only the colour term depends on the target.
        static = np.array(
            [
                AREA_WEIGHT * area_score(s.defect_pixels, s.total_pixels)
                + CONNECTIVITY_WEIGHT * connectivity_score(s.components)
                for s in member_stats
            ]
        )
        colors = np.array([s.mean_color for s in member_stats], dtype=np.float64)
        objects = np.array([q.object_name for q in members], dtype=object)
        available = np.ones(len(members), dtype=bool)
        for t in rng.permutation(len(members)):
            allowed = available & ((objects == objects[t]) if same_object else (objects != objects[t]))
            allowed[t] = False
            candidates = np.flatnonzero(allowed)
            if candidates.size == 0:
                continue
            distance_sq = np.sum((colors[candidates] - colors[t]) ** 2, axis=1)
            scores = static[candidates] + COLOR_WEIGHT * np.exp(-distance_sq / (2.0 * sigma**2))
            # Highest score first; ties broken by id order (members are sorted by id) for reproducibility.
            order = np.lexsort((candidates, -scores))[:top_k]
            chosen = candidates[order[rng.integers(len(order))]]
            available[chosen] = False
            pairs.append(TrainingPair(members[chosen], members[t], distribution))
    return pairs


def diversity_sft_pairs(
    quadruplets: Sequence[Quadruplet], seed: int, stats: Mapping[str, DefectStats] | None = None
) -> list[TrainingPair]:
    """All pairs of the three distributions (a), (b), (c), deterministic for a seed.

    ``stats`` (from ``compute_stats``) avoids re-reading images when pairs are drawn more than once.
    """
    if not quadruplets:
        raise UniDGError("no quadruplets: pass a non-empty UDG index (read_index(folder))")
    ids = [q.id for q in quadruplets]
    if len(set(ids)) != len(ids):
        raise UniDGError("quadruplet ids repeat; each quadruplet must appear once (check the UDG index)")
    if stats is None:
        stats = compute_stats(quadruplets)
    intra = cross_pairs(quadruplets, stats, np.random.default_rng([seed, 1]), same_object=True)
    cross = cross_pairs(quadruplets, stats, np.random.default_rng([seed, 2]), same_object=False)
    return defect_fill_pairs(quadruplets) + intra + cross


def count_pairs(pairs: Iterable[TrainingPair]) -> dict[str, int]:
    counts = dict.fromkeys(DISTRIBUTIONS, 0)
    for pair in pairs:
        counts[pair.distribution] += 1
    return counts


def mix_pairs(
    pairs: Sequence[TrainingPair], seed: int, per_distribution: int | None = None, allow_missing: bool = False
) -> list[TrainingPair]:
    """The 1:1:1 mixture: ``per_distribution`` pairs of each distribution (default: the smallest one's size, so no
    pair repeats), interleaved a, b, c, a, b, c, ... so every prefix of 3k pairs is balanced. A distribution with
    fewer pairs than asked is cycled, reshuffled each time. An empty distribution is an error unless
    ``allow_missing``, in which case the others are mixed equally."""
    rng = np.random.default_rng([seed, 3])
    groups = {name: [p for p in pairs if p.distribution == name] for name in DISTRIBUTIONS}
    empty = [name for name, group in groups.items() if not group]
    if empty and not allow_missing:
        raise UniDGError(
            f"no {' / '.join(empty)} pairs: intra-object needs two quadruplets of one object and category, "
            "cross-object needs one category on two objects; add such data or pass allow_missing=True"
        )
    groups = {name: group for name, group in groups.items() if group}
    if not groups:
        raise UniDGError("no training pairs to mix")
    count = min(len(group) for group in groups.values()) if per_distribution is None else per_distribution
    if count < 1:
        raise UniDGError(f"per_distribution must be >= 1 (got {count})")
    streams = {}
    for name, group in groups.items():
        drawn: list[TrainingPair] = []
        while len(drawn) < count:
            drawn.extend(group[i] for i in rng.permutation(len(group)))
        streams[name] = drawn[:count]
    return [streams[name][i] for i in range(count) for name in streams]


def prepare_pairs(folder: str | Path, seed: int, limit: int = 0) -> list[TrainingPair]:
    """All Diversity-SFT pairs of a UDG folder (deterministic for ``seed``)."""
    quadruplets = list(read_index(folder))
    if limit:
        quadruplets = quadruplets[:limit]
    if not quadruplets:
        raise UniDGError(f"{folder} holds no quadruplets; make some with `unidg data synth --out {folder}`")
    return diversity_sft_pairs(quadruplets, seed)


def pools_of(data) -> list[np.ndarray]:
    return [data.indices_of(name) for name in DISTRIBUTIONS]


def select_pairs(pairs: Sequence[TrainingPair], weights: Sequence[float]) -> list[TrainingPair]:
    """Only the pairs of distributions with a non-zero mix weight (those are all a run ever reads)."""
    wanted = {name for name, weight in zip(DISTRIBUTIONS, weights) if weight > 0}
    return [pair for pair in pairs if pair.distribution in wanted]
