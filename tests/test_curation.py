"""Mask-template library (clustering, placement inside the foreground) and zero-shot reference retrieval, on procedural
UDG data and the shipped UniDG-nano bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from skimage.filters import threshold_otsu
from train_fixtures import udg_fixture

from unidg.cli import main
from unidg.core.udg import read_index
from unidg.runtime.mask_templates import TemplateError, TemplateLibrary, otsu_foreground, otsu_threshold, place_template
from unidg.runtime.reference_library import (
    ReferenceLibrary,
    ReferenceLibraryError,
    build_reference_library,
    embed_defect,
)
from unidg.runtime.synthesizer import DefectSynthesizer
from unidg.train.mask_library import build_template_library

ROOT = Path(__file__).resolve().parents[1]
NANO_BUNDLE = ROOT / "runtime" / "assets" / "unidg-nano-bundle"


udg = udg_fixture(48, seed=5)


@pytest.fixture(scope="module")
def library(udg: Path, tmp_path_factory) -> TemplateLibrary:
    out = tmp_path_factory.mktemp("templates") / "lib"
    build_template_library(udg, out, clusters=3, seed=0, progress=False)
    return TemplateLibrary.load(out)


def test_otsu_threshold_equals_scikit_image() -> None:
    rng = np.random.default_rng(0)
    for low, high in ((60, 170), (20, 90), (120, 240)):
        gray = np.concatenate([rng.normal(low, 15, 4000), rng.normal(high, 25, 3000)]).clip(0, 255).astype(np.uint8)
        assert otsu_threshold(gray) == threshold_otsu(gray, nbins=256)


def test_the_library_clusters_every_category_within_k(udg: Path, library: TemplateLibrary) -> None:
    quadruplets = read_index(udg)
    assert len(library.templates) == sum(q.load_mask().any() for q in quadruplets)
    for category, clusters in library.clusters.items():
        members = [t for t in library.templates if t.category == category]
        assert 1 <= len(clusters) <= min(3, len(members))
        assert sorted(clusters) == list(range(len(clusters)))  # every label used
    template = library.templates[0]
    mask = library.mask(template)
    assert mask.any() and mask[0].any() and mask[:, 0].any()  # cropped to its bounding box


def test_placement_is_always_inside_the_foreground(udg: Path, library: TemplateLibrary) -> None:
    rng = np.random.default_rng(1)
    normals = [q.load_normal() for q in read_index(udg)[:12]]
    draws = inside = 0
    for index in range(120):
        image = normals[index % len(normals)]
        category = library.categories[index % len(library.categories)]
        mask, template = place_template(library, category, image, rng)
        foreground = otsu_foreground(image)
        draws += 1
        inside += bool(mask.any() and not (mask & ~foreground).any())
        assert template.category == category
    assert inside == draws


def test_placement_on_a_given_foreground_and_its_errors(library: TemplateLibrary) -> None:
    image = np.full((96, 96, 3), 200, np.uint8)
    yy, xx = np.mgrid[:96, :96]
    disc = (yy - 48) ** 2 + (xx - 48) ** 2 < 30**2
    category = library.categories[0]
    for seed in range(10):
        mask, _ = place_template(library, category, image, np.random.default_rng(seed), foreground=disc)
        assert mask.any() and not (mask & ~disc).any()
    with pytest.raises(TemplateError, match="has no templates"):
        place_template(
            library, "glue" if "glue" not in library.clusters else "knife grain", image, np.random.default_rng(0)
        )
    with pytest.raises(TemplateError, match="foreground mask is empty"):
        place_template(library, category, image, np.random.default_rng(0), foreground=np.zeros((96, 96), bool))


def test_a_folder_that_is_not_a_library_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="unidg data templates"):
        TemplateLibrary.load(tmp_path)


def test_data_templates_and_place_commands(udg: Path, tmp_path: Path, capsys) -> None:
    assert (
        main(["data", "templates", "--udg", str(udg), "--out", str(tmp_path / "lib"), "--clusters", "2", "--quiet"])
        == 0
    )
    assert "templates in" in capsys.readouterr().out
    image = read_index(udg)[0].path("normal")
    category = TemplateLibrary.load(tmp_path / "lib").categories[0]
    out = tmp_path / "mask.png"
    argv = ["data", "place", "--templates", str(tmp_path / "lib"), "--image", str(image), "--category", category]
    assert main([*argv, "--out", str(out)]) == 0
    assert out.is_file()
    assert main(["data", "templates", "--udg", str(udg), "--out", str(tmp_path / "lib"), "--quiet"]) == 2
    assert "already holds files" in capsys.readouterr().err


@pytest.fixture(scope="module")
def references(udg: Path, tmp_path_factory) -> ReferenceLibrary:
    out = tmp_path_factory.mktemp("references") / "refs"
    with DefectSynthesizer.from_bundle(NANO_BUNDLE) as synth:
        build_reference_library(udg, synth, out, progress=False)
    return ReferenceLibrary.load(out)


def test_retrieval_returns_the_category_asked_for(references: ReferenceLibrary) -> None:
    rng = np.random.default_rng(0)
    categories = sorted({entry.category for entry in references.entries})
    for category in categories:
        for row in range(len(references.entries)):
            assert references.retrieve(category, references.embeddings[row], rng).category == category
    # A reference's own embedding finds itself within its category.
    for row, entry in enumerate(references.entries):
        assert references.retrieve(entry.category, references.embeddings[row], rng).id == entry.id
    norms = np.linalg.norm(references.embeddings, axis=1)
    assert np.allclose(norms, 1.0, atol=1e-5)


def test_the_embedding_is_the_bundles_encoder_on_the_alg1_crop(udg: Path, references: ReferenceLibrary) -> None:
    quadruplet = read_index(udg)[0]
    with DefectSynthesizer.from_bundle(NANO_BUNDLE) as synth:
        vector = embed_defect(synth, quadruplet.load_abnormal(), quadruplet.load_mask())
        references.check_bundle(synth.bundle.fingerprint)
    row = [entry.id for entry in references.entries].index(quadruplet.id)
    assert np.allclose(vector, references.embeddings[row], atol=1e-6)
    with pytest.raises(ReferenceLibraryError, match="another bundle"):
        references.check_bundle("0" * 64)
    with pytest.raises(ReferenceLibraryError, match="has no reference"):
        missing = next(
            c for c in ("glue", "knife grain", "watermark") if c not in {e.category for e in references.entries}
        )
        references.retrieve(missing, None, np.random.default_rng(0))


def test_generate_zero_shot_retrieves_a_same_category_reference(udg: Path, references: ReferenceLibrary, tmp_path):
    quadruplet = read_index(udg)[3]
    category = references.entries[0].category
    argv = ["generate", "--bundle", str(NANO_BUNDLE), "--source", str(quadruplet.path("normal"))]
    argv += ["--mask", str(quadruplet.path("mask")), "--category", category, "--steps", "2", "--quiet"]
    assert main([*argv, "--zero-shot", str(references.path), "--out", str(tmp_path / "out")]) == 0
    metadata = json.loads((tmp_path / "out" / "metadata.json").read_text())
    retrieved = next(e for e in references.entries if e.id == metadata["inputs"]["reference_id"])
    assert retrieved.category == category
    # Option errors come before any work.
    no_category = [a for a in argv if a != category and a != "--category"]
    assert main([*no_category, "--zero-shot", str(references.path), "--out", str(tmp_path / "o2")]) == 2
    both = [*argv, "--zero-shot", str(references.path), "--reference", "r.png", "--reference-mask", "m.png"]
    assert main([*both, "--out", str(tmp_path / "o3")]) == 2
    assert main([*argv, "--out", str(tmp_path / "o4")]) == 2  # neither a reference nor --zero-shot
    assert not any((tmp_path / name).exists() for name in ("o2", "o3", "o4"))
