"""Building the mask-template library (paper App. A.1): the masks of a UDG folder clustered per category.

Each mask is described by its shape (cropped to its bounding box, resampled to 16 x 16), the log aspect ratio and the
square root of its box's share of the image; k-means (scipy, k-means++ seeding) groups a category's masks into
``clusters`` groups (the paper: 100 per category, 2800 templates over 28 categories; fewer when a category has fewer
masks). The library is read and used by ``unidg.runtime.mask_templates``.
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.cluster.vq import kmeans2
from tqdm import tqdm

from unidg.core.errors import UniDGError
from unidg.core.geometry import mask_bbox
from unidg.core.manifest import atomic_write_text, write_manifest
from unidg.core.staging import staged_folder
from unidg.core.udg import read_index
from unidg.runtime.mask_templates import TEMPLATES_FILE, TEMPLATES_KIND, MaskTemplate, category_folder

DESCRIPTOR_SIDE = 16
DEFAULT_CLUSTERS = 100
# Weights of the two size features beside the 256 shape values (each in [0, 1]): enough that a thin scratch and a
# round blob of one shape class do not share a cluster, not so much that size alone decides.
ASPECT_WEIGHT = 4.0
SIZE_WEIGHT = 8.0


def mask_descriptor(mask: np.ndarray) -> np.ndarray:
    """float32 (DESCRIPTOR_SIDE**2 + 2,) shape-and-size description of a bool mask."""
    top, bottom, left, right = (int(v) for v in mask_bbox(mask))
    crop = mask[top:bottom, left:right]
    shape = Image.fromarray(crop.astype(np.uint8) * 255).resize(
        (DESCRIPTOR_SIDE, DESCRIPTOR_SIDE), Image.Resampling.BILINEAR
    )
    values = np.asarray(shape, dtype=np.float32).ravel() / 255.0
    aspect = np.log(crop.shape[1] / crop.shape[0])
    size = np.sqrt(crop.size / mask.size)
    return np.concatenate([values, [ASPECT_WEIGHT * aspect, SIZE_WEIGHT * size]]).astype(np.float32)


def cluster_descriptors(descriptors: np.ndarray, clusters: int, seed: int) -> np.ndarray:
    """Cluster labels 0..k-1 (every label used) of k-means with k = min(clusters, len(descriptors))."""
    count = len(descriptors)
    k = min(clusters, count)
    if k == count:
        return np.arange(count)
    with warnings.catch_warnings():  # an empty cluster is dropped below; scipy warns about it
        warnings.simplefilter("ignore")
        _, labels = kmeans2(descriptors.astype(np.float64), k, minit="++", seed=np.random.default_rng(seed))
    _, labels = np.unique(labels, return_inverse=True)
    return labels


def build_template_library(
    udg: str | Path,
    out: str | Path,
    *,
    clusters: int = DEFAULT_CLUSTERS,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write the library folder ``out`` from the masks of UDG folder ``udg``; returns a summary per category."""
    if clusters < 1:
        raise UniDGError(f"--clusters must be >= 1 (got {clusters})")
    quadruplets = read_index(udg)
    if not quadruplets:
        raise UniDGError(f"--udg {udg} holds no quadruplets; make some with `unidg data synth` or `unidg data curate`")
    by_category: dict[str, list] = defaultdict(list)
    for quadruplet in quadruplets:
        by_category[quadruplet.category].append(quadruplet)
    summary: dict[str, dict] = {}
    with staged_folder(out, replace=overwrite) as staging:
        lines = []
        bar = tqdm(total=len(quadruplets), desc="templates", unit="mask", disable=not progress)
        for index, (category, members) in enumerate(sorted(by_category.items())):
            masks = [q.load_mask() for q in members]
            kept = [(q, m) for q, m in zip(members, masks) if m.any()]
            bar.update(len(members))
            if not kept:
                continue
            descriptors = np.stack([mask_descriptor(m) for _, m in kept])
            labels = cluster_descriptors(descriptors, clusters, seed + index)
            folder = staging / "masks" / category_folder(category)
            folder.mkdir(parents=True, exist_ok=True)
            for (quadruplet, mask), label in zip(kept, labels):
                top, bottom, left, right = (int(v) for v in mask_bbox(mask))
                name = f"masks/{category_folder(category)}/{quadruplet.id}.png"
                Image.fromarray(mask[top:bottom, left:right].astype(np.uint8) * 255).save(staging / name)
                template = MaskTemplate(
                    id=quadruplet.id,
                    category=category,
                    cluster=int(label),
                    file=name,
                    height_ratio=(bottom - top) / mask.shape[0],
                    width_ratio=(right - left) / mask.shape[1],
                    source=str(quadruplet.id),
                )
                lines.append(json.dumps(template.to_json()))
            summary[category] = {"masks": len(kept), "clusters": int(labels.max()) + 1}
        bar.close()
        if not lines:
            raise UniDGError(f"--udg {udg}: every mask is empty; the library needs defect masks")
        atomic_write_text(staging / TEMPLATES_FILE, "\n".join(lines) + "\n")
        write_manifest(
            staging,
            TEMPLATES_KIND,
            {"source": str(udg), "clusters_requested": clusters, "seed": seed, "categories": summary},
        )
    return summary
