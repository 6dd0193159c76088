"""Bundles and inputs for the tests of the product surfaces (HTTP service, C ABI, Triton repository).

``nano_bundle``: a real bundle, exported by the export stage from a random-weights UniDG-nano model at S = 64 (about
45 s on two cores; cached between runs, keyed by the sources it depends on, and shared by the surface tests).
``toy_bundle``: the runtime's toy bundle (Bundle format v1, four tiny formula graphs; tests/runtime_fixtures.py) --
loads in milliseconds, for the mechanics of the surfaces (queue, timeouts, readiness, repository layout), which do not
depend on what the graphs compute.
``text_bundle``: the shipped UniDG-nano-text bundle (format 3: CLIP/T5 graphs and tokenizers, S = 128, K = 48 T5
tokens, static batch 1), for the instruction (``prompt``) of each surface; ``TEXT_SAMPLE`` names its sample files.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from runtime_fixtures import make_toy_bundle

SURFACE_RESOLUTION = 64
REPO = Path(__file__).resolve().parent.parent
TEXT_BUNDLE = REPO / "runtime" / "assets" / "unidg-nano-text-bundle"
SAMPLES = REPO / "runtime" / "assets" / "samples"
TEXT_SAMPLE = "hole-on-leather"  # one of the shipped samples
PROMPT = "Add the hole defect to the image."
OTHER_PROMPT = "Add the long crack defect to the image."
LONG_PROMPT = "crack " * 60  # beyond the text bundle's 48 T5 tokens
_SESSION: dict[str, Path] = {}


def _export_source_key() -> str:
    """A digest of the code and tool versions an exported bundle depends on (the cache key)."""
    import hashlib

    import onnx
    import torch

    repo = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256(f"{torch.__version__} {onnx.__version__} {SURFACE_RESOLUTION}".encode())
    sources = [*sorted((repo / "export").rglob("*.py")), *sorted((repo / "train").rglob("*.py"))]
    sources += [*sorted((repo / "unidg" / "core").rglob("*.py")), repo / "runtime" / "bundle.py"]
    for path in sources:
        digest.update(path.relative_to(repo).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def nano_bundle(pytestconfig) -> Path:
    """An exported nano bundle (S = 64, static batch 1, 4 default steps), cached in pytest's cache folder under a
    digest of the export/train/runtime sources: rebuilt (about 45 s) whenever that code changes."""
    if "nano" in _SESSION:  # one bundle per test session, even if the sources change meanwhile
        return _SESSION["nano"]
    cache = getattr(pytestconfig, "cache", None)  # absent with -p no:cacheprovider
    folder = cache.mkdir("unidg-surface-nano") if cache is not None else Path(tempfile.mkdtemp(prefix="unidg-nano-"))
    root = folder / _export_source_key()
    bundle = root / "bundle"
    if not (bundle / "manifest.json").is_file():
        _export_nano(root, bundle)
        for stale in folder.iterdir():  # bundles of older sources
            if stale != root:
                shutil.rmtree(stale, ignore_errors=True)
    _SESSION["nano"] = bundle
    return bundle


def _export_nano(root: Path, bundle: Path) -> None:
    from unidg.export.bundle import export_bundle
    from unidg.train.loading import save_model
    from unidg.train.model import UniDGModel
    from unidg.train.presets import get_preset

    settings = dataclasses.replace(get_preset("nano").settings, resolution=SURFACE_RESOLUTION, steps=4)
    save_model(UniDGModel.from_preset("nano", settings=settings, seed=0), root / "weights", overwrite=True)
    export_bundle(root / "weights", bundle, resolution=SURFACE_RESOLUTION, batch=1, overwrite=True, progress=None)


def toy_bundle(folder: Path) -> Path:
    return make_toy_bundle(folder, resolution=SURFACE_RESOLUTION, steps=4)


def masked_equal_outside(result: np.ndarray, source: np.ndarray, mask: np.ndarray) -> bool:
    """Every pixel outside ``mask`` is bit-identical to the source."""
    return result.shape == source.shape and bool(np.array_equal(result[~mask], source[~mask]))


def text_bundle() -> Path:
    """The shipped UniDG-nano-text bundle; the test is skipped where the checkout lacks it."""
    if not (TEXT_BUNDLE / "manifest.json").is_file():
        pytest.skip("the UniDG-nano-text bundle is not in this checkout")
    pytest.importorskip("tokenizers", reason="tokenizers not installed (the [text] extra a text bundle needs)")
    return TEXT_BUNDLE


def sample_path(kind: str, case: str = TEXT_SAMPLE) -> Path:
    """A shipped sample file: kind is reference, reference_mask, source or mask."""
    return SAMPLES / f"{case}_{kind}.png"


def sample_arrays(case: str = TEXT_SAMPLE) -> dict[str, np.ndarray]:
    """A shipped sample as uint8 arrays (RGB images, 0/255 masks), keyed reference, reference_mask, source, mask."""
    arrays = {}
    for kind in ("reference", "reference_mask", "source", "mask"):
        image = Image.open(sample_path(kind, case))
        arrays[kind] = np.asarray(image.convert("L" if kind.endswith("mask") else "RGB"), dtype=np.uint8)
    return arrays
