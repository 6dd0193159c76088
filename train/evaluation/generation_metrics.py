"""Generation metrics: the revised reference-adherence ("transfer") figure and diversity IL.

Revised transfer. ``unidg train eval-nano`` counts a sample as a transfer when the mean colour of the output inside
the target mask is closer to the reference defect's mean colour than to the clean source's. Two things made its old
>= 80 % target unreachable: shading-type defects (``SHADING_DEFECT_TYPES``: fold, wrinkle, dent, bump, warp, blur
blend at most 30 % of a colour over the target's own shading) take the target's colour, so even the ground truth fails
them; and the autoencoder round trip moves colours. The revised figure therefore keeps pairs whose *reference* defect
type carries colour, and divides the model's pass rate by the pass rate of the ground truth after the model's own
autoencoder round trip (what a generator reproducing the training target exactly would score), on >= 200 pairs, with
binomial standard errors. The ratio's error treats the two rates as independent, which overstates it (they are
measured on the same pairs and correlate positively).

Diversity IL (paper Sec. 6.1): the mean pairwise distance between samples generated for one input with different
seeds, averaged over inputs; IL-a restricts it to the bounding box of the dilated target region. The paper's distance
is LPIPS, which needs pretrained AlexNet/VGG weights that are never downloaded: given a local checkpoint
(``--lpips PATH``, layout in ``unidg.train.evaluation.lpips``) it is used; otherwise the substitute used and reported
under its own name is "1 - SSIM"
(scikit-image's ``structural_similarity``, 7x7 windows, over RGB). It is 0 for identical images, like LPIPS, but not
on LPIPS's scale: compare IL-SSIM figures only with each other.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from unidg.core.udg import read_index
from unidg.runtime.synthesizer import DefectSynthesizer, SynthesisRequest
from unidg.train.eval_nano import evaluation_pairs

SHADING_DEFECT_TYPES: tuple[str, ...] = ("fold", "wrinkle", "dent", "bump", "warp", "blur")
MIN_TRANSFER_PAIRS = 200


def colour_carrying(defect_type: str) -> bool:
    """Whether a procedural defect type paints its own colour (``combined`` mixes two types: not counted)."""
    return defect_type not in SHADING_DEFECT_TYPES and defect_type != "combined"


def reference_carries_colour(pair) -> bool:
    """Whether a ``TrainingPair``'s reference defect type carries colour (the pairs the revised figure keeps)."""
    return colour_carrying(str(pair.reference.extra.get("defect_type", pair.reference.category)))


def binomial_se(rate: float, count: int) -> float:
    return math.sqrt(rate * (1.0 - rate) / count) if count else float("nan")


def revised_transfer(samples: list[dict], defect_types: dict[str, str], min_pairs: int = MIN_TRANSFER_PAIRS) -> dict:
    """The revised figure from ``evaluate_transfer(..., ceilings=True)`` samples; ``defect_types`` maps a quadruplet
    id to its defect type (``defect_types_of``). Refuses fewer than ``min_pairs`` colour-carrying pairs."""
    missing = [s["reference"] for s in samples if s["reference"] not in defect_types]
    if missing:
        raise ValueError(f"reference ids {missing[:3]} have no defect type; pass the folder the pairs came from")
    if any("round_trip_transfer" not in s for s in samples):
        raise ValueError("the samples lack round_trip_transfer; evaluate with ceilings=True")
    kept = [s for s in samples if colour_carrying(defect_types[s["reference"]])]
    if len(kept) < min_pairs:
        raise ValueError(
            f"{len(kept)} colour-carrying pairs of {len(samples)}; the revised transfer figure needs >= {min_pairs}: "
            f"raise --count to about {math.ceil(min_pairs * len(samples) / max(len(kept), 1))}"
        )
    n = len(kept)
    rate = float(np.mean([s["transfer"] for s in kept]))
    ceiling = float(np.mean([s["round_trip_transfer"] for s in kept]))
    truth = float(np.mean([s["truth_transfer"] for s in kept]))
    rate_se, ceiling_se = binomial_se(rate, n), binomial_se(ceiling, n)
    relative = rate / ceiling if ceiling else float("nan")
    relative_se = (
        relative * math.sqrt((rate_se / rate) ** 2 + (ceiling_se / ceiling) ** 2) if rate and ceiling else float("nan")
    )
    return {
        "pairs": n,
        "excluded_pairs": len(samples) - n,
        "transfer_rate": rate,
        "transfer_rate_se": rate_se,
        "round_trip_ceiling": ceiling,
        "round_trip_ceiling_se": ceiling_se,
        "truth_rate": truth,
        "relative_transfer": relative,
        "relative_transfer_se": relative_se,
    }


def paired_transfer(first: list[dict], second: list[dict], defect_types: dict[str, str]) -> dict:
    """The second run's transfer rate minus the first's over the same colour-carrying pairs (same noise), with the
    standard error of the paired difference and how many pairs changed outcome either way."""
    if [(s["reference"], s["target"]) for s in first] != [(s["reference"], s["target"]) for s in second]:
        raise ValueError("the two transfer runs did not generate the same pairs in the same order")
    kept = [i for i, s in enumerate(first) if colour_carrying(defect_types[s["reference"]])]
    differences = np.array([int(second[i]["transfer"]) - int(first[i]["transfer"]) for i in kept], dtype=np.float64)
    n = len(differences)
    return {
        "pairs": n,
        "difference": float(differences.mean()) if n else float("nan"),
        "difference_se": float(differences.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
        "gained": int((differences > 0).sum()),
        "lost": int((differences < 0).sum()),
    }


def defect_types_of(folder: str | Path) -> dict[str, str]:
    """Quadruplet id -> defect type (the ``defect_type`` key of ``unidg data synth``, else the category)."""
    return {q.id: str(q.extra.get("defect_type", q.category)) for q in read_index(folder)}


# ----------------------------------------------------------------------------------------------------- diversity
def ssim_distance(a: np.ndarray, b: np.ndarray) -> float:
    """1 - SSIM over RGB (the documented LPIPS substitute)."""
    from skimage.metrics import structural_similarity

    window = min(7, *a.shape[:2])
    window -= 1 - window % 2  # odd
    return 1.0 - float(structural_similarity(a, b, channel_axis=2, data_range=255, win_size=max(window, 3)))


def bounding_box(mask: np.ndarray) -> tuple[slice, slice]:
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise ValueError("the target region is empty")
    return slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1)


def intra_cluster_distance(
    clusters: list[list[np.ndarray]],
    regions: list[np.ndarray] | None = None,
    distance: Callable[[np.ndarray, np.ndarray], float] | None = None,
) -> float:
    """Mean over clusters of the mean pairwise ``distance`` (default ``ssim_distance``) within a cluster (clusters of
    >= 2 samples of one input). With ``regions`` (one bool mask per cluster), over the masks' bounding boxes only
    (IL-a)."""
    distance = distance or ssim_distance
    means = []
    for index, cluster in enumerate(clusters):
        if len(cluster) < 2:
            raise ValueError(f"cluster {index} holds {len(cluster)} sample(s); IL needs >= 2 samples per input")
        crop = bounding_box(regions[index]) if regions is not None else (slice(None), slice(None))
        distances = [
            distance(cluster[i][crop], cluster[j][crop])
            for i in range(len(cluster))
            for j in range(i + 1, len(cluster))
        ]
        means.append(float(np.mean(distances)))
    return float(np.mean(means))


def diversity(
    bundle: str | Path,
    data: str | Path,
    inputs: int,
    samples: int,
    seed: int = 0,
    steps: int = 0,
    lpips: str | Path | None = None,
) -> dict:
    """IL and IL-a of a bundle: ``inputs`` held-out pairs (the Diversity-SFT mix), ``samples`` seeds each. With
    ``lpips`` (a local LPIPS AlexNet checkpoint, ``unidg.train.evaluation.lpips``) the paper's LPIPS distance
    (``il_lpips``, ``il_a_lpips``), else the 1 - SSIM substitute (``il_ssim``, ``il_a_ssim``)."""
    if samples < 2:
        raise ValueError(f"--samples must be >= 2 (got {samples}); IL compares samples of one input")
    distance, name, label = ssim_distance, "ssim", "1 - SSIM (LPIPS substitute: no local LPIPS checkpoint given)"
    if lpips is not None:
        # LPIPS loads torch: only with a checkpoint given (the SSIM substitute needs numpy alone).
        from unidg.train.evaluation.lpips import load_lpips, lpips_distance

        distance = partial(lpips_distance, load_lpips(lpips))  # loaded (and checked) before anything is generated
        name, label = "lpips", f"LPIPS (AlexNet, local checkpoint {lpips})"
    clusters, regions = [], []
    with DefectSynthesizer.from_bundle(bundle) as synthesizer:
        for index, pair in enumerate(tqdm(evaluation_pairs(data, inputs, seed), desc="diversity")):
            base = SynthesisRequest(
                pair.reference.load_abnormal(),
                pair.reference.load_mask(),
                pair.target.load_normal(),
                pair.target.load_mask(),
                steps=steps or None,
                name=f"pair {index}",
            )
            results = [synthesizer.generate(replace(base, seed=seed * 1000 + index * 37 + k)) for k in range(samples)]
            clusters.append([r.image for r in results])
            regions.append(results[0].mask)
    return {
        "inputs": len(clusters),
        "samples_per_input": samples,
        f"il_{name}": intra_cluster_distance(clusters, distance=distance),
        f"il_a_{name}": intra_cluster_distance(clusters, regions, distance=distance),
        "distance": label,
    }
