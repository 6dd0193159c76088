"""Zero-shot references (paper App. B.4): an offline repository of defect references per category, and the retrieval of
a same-category reference for a request that brings none.

A repository folder (``unidg data references``) holds ``references.jsonl`` (id, category, object name, image and mask
files), the reference images and masks, ``embeddings.npy`` (float32, one L2-normalised row a reference) and
``manifest.json`` (kind "reference-library", with the fingerprint of the bundle whose image encoder made the
embeddings). A reference's embedding is the mean of the image-encoder tokens of its Alg. 1 crop (the same crop and
encoder a request's reference goes through); the query of a request is the same embedding of the source's crop around
its target region, so the retrieved reference is the one of the category that looks most like the place it goes to.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from unidg.core.errors import UniDGError
from unidg.core.geometry import adaptive_reference_crop
from unidg.core.images import load_image, load_mask
from unidg.core.latents import pixels_to_model
from unidg.core.manifest import (
    atomic_write_text,
    read_library,
    write_manifest,
)
from unidg.core.staging import staged_folder
from unidg.core.udg import check_category, read_index
from unidg.runtime.synthesizer import DefectSynthesizer, resize_reference

REFERENCES_KIND = "reference-library"
REFERENCES_FILE = "references.jsonl"
EMBEDDINGS_FILE = "embeddings.npy"


class ReferenceLibraryError(UniDGError):
    """A reference repository that cannot be used with this bundle or request."""


@dataclass(frozen=True)
class ReferenceEntry:
    id: str
    category: str
    object_name: str
    image: str  # relative to the repository folder
    mask: str


def embed_defect(synth: DefectSynthesizer, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """float32 (joint_dim,) L2-normalised: the mean image-encoder token of the Alg. 1 crop of ``mask`` in ``image``."""
    settings, bundle = synth.settings, synth.bundle
    crop = adaptive_reference_crop(image, mask, bundle.resolution, settings.beta, settings.threshold)
    pixels = pixels_to_model(resize_reference(crop.image, bundle.reference_size))
    tokens = synth.backend.encode_reference(pixels)[0].astype(np.float64)
    vector = tokens.mean(axis=0)
    return (vector / max(float(np.linalg.norm(vector)), 1e-12)).astype(np.float32)


def build_reference_library(
    udg: str | Path, synth: DefectSynthesizer, out: str | Path, *, overwrite: bool = False, progress: bool = True
) -> dict[str, int]:
    """Write the repository ``out`` from every quadruplet of ``udg`` (abnormal image + mask); returns counts per
    category."""
    quadruplets = read_index(udg)
    if not quadruplets:
        raise ReferenceLibraryError(f"--udg {udg} holds no quadruplets; the repository needs defect references")
    counts: dict[str, int] = {}
    with staged_folder(out, replace=overwrite) as staging:
        (staging / "images").mkdir()
        (staging / "masks").mkdir()
        lines, vectors = [], []
        for quadruplet in tqdm(quadruplets, desc="references", unit="reference", disable=not progress):
            mask = quadruplet.load_mask()
            if not mask.any():
                continue
            image = quadruplet.load_abnormal()
            entry = ReferenceEntry(
                id=quadruplet.id,
                category=quadruplet.category,
                object_name=quadruplet.object_name,
                image=f"images/{quadruplet.id}.png",
                mask=f"masks/{quadruplet.id}.png",
            )
            shutil.copyfile(quadruplet.path("abnormal"), staging / entry.image)
            shutil.copyfile(quadruplet.path("mask"), staging / entry.mask)
            vectors.append(embed_defect(synth, image, mask))
            lines.append(json.dumps(entry.__dict__))
            counts[entry.category] = counts.get(entry.category, 0) + 1
        if not lines:
            raise ReferenceLibraryError(f"--udg {udg}: every mask is empty; the repository needs defect masks")
        atomic_write_text(staging / REFERENCES_FILE, "\n".join(lines) + "\n")
        np.save(staging / EMBEDDINGS_FILE, np.stack(vectors), allow_pickle=False)
        write_manifest(
            staging,
            REFERENCES_KIND,
            {"source": str(udg), "bundle_fingerprint": synth.bundle.fingerprint, "categories": counts},
        )
    return counts


class ReferenceLibrary:
    """A checked repository: entries, their embeddings, and retrieval by category."""

    def __init__(self, path: Path, entries: list[ReferenceEntry], embeddings: np.ndarray, fingerprint: str) -> None:
        self.path = path
        self.entries = entries
        self.embeddings = embeddings
        self.fingerprint = fingerprint

    @classmethod
    def load(cls, folder: str | Path, *, verify: bool = True) -> ReferenceLibrary:
        folder = Path(folder)
        manifest = read_library(
            folder,
            REFERENCES_KIND,
            verify=verify,
            option="--zero-shot",
            build="unidg data references",
            error=ReferenceLibraryError,
        )
        lines = (folder / REFERENCES_FILE).read_text(encoding="utf-8").splitlines()
        entries = [ReferenceEntry(**json.loads(line)) for line in lines]
        embeddings = np.load(folder / EMBEDDINGS_FILE, allow_pickle=False)
        if embeddings.shape[0] != len(entries):
            raise ReferenceLibraryError(
                f"--zero-shot {folder}: {len(entries)} references but {embeddings.shape[0]} embeddings; rebuild it"
            )
        return cls(folder, entries, embeddings, str(manifest.metadata.get("bundle_fingerprint", "")))

    def check_bundle(self, fingerprint: str) -> None:
        if fingerprint != self.fingerprint:
            raise ReferenceLibraryError(
                f"--zero-shot {self.path} was embedded by another bundle ({self.fingerprint[:12]}, this one is "
                f"{fingerprint[:12]}); rebuild it with `unidg data references --bundle` of this bundle"
            )

    def retrieve(self, category: str, query: np.ndarray | None, rng: np.random.Generator) -> ReferenceEntry:
        """The reference of ``category`` most similar to ``query`` (cosine; ties and no query: at random)."""
        check_category(category)
        candidates = [i for i, entry in enumerate(self.entries) if entry.category == category]
        if not candidates:
            have = sorted({entry.category for entry in self.entries})
            raise ReferenceLibraryError(
                f"--category {category!r}: {self.path} has no reference of it; it has {', '.join(have)}"
            )
        if query is None:
            return self.entries[candidates[int(rng.integers(len(candidates)))]]
        scores = self.embeddings[candidates] @ query.astype(np.float32)
        best = np.flatnonzero(scores >= scores.max() - 1e-6)
        return self.entries[candidates[int(best[int(rng.integers(len(best)))])]]

    def load_reference(self, entry: ReferenceEntry) -> tuple[np.ndarray, np.ndarray]:
        """The reference image (RGB uint8) and its defect mask (bool)."""
        return load_image(self.path / entry.image, "--zero-shot reference"), load_mask(
            self.path / entry.mask, "--zero-shot reference mask"
        )
