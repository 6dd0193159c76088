"""Bundles and inputs for the tests of the product surfaces (HTTP service, C ABI, Triton repository).

``toy_bundle``: the runtime's toy bundle (Bundle format v1, four tiny formula graphs; tests/runtime_fixtures.py) --
fast, for the mechanics of the surfaces (queue, limits, validation, ABI errors), which do not depend on what the graphs
compute.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from runtime_fixtures import make_toy_bundle

SURFACE_RESOLUTION = 64


def toy_bundle(folder: Path) -> Path:
    return make_toy_bundle(folder, resolution=SURFACE_RESOLUTION, steps=4)


def masked_equal_outside(result: np.ndarray, source: np.ndarray, mask: np.ndarray) -> bool:
    """Every pixel outside ``mask`` is bit-identical to the source."""
    return result.shape == source.shape and bool(np.array_equal(result[~mask], source[~mask]))
