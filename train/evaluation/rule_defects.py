"""Rule-based synthetic defects, stage 1 of the two-stage recipe: cheap, plentiful, low fidelity.

- ``cut_paste`` (CutPaste, Li et al. 2021): a rectangle cut from the image, colour-jittered, pasted elsewhere.
- ``perlin_anomaly`` (DRAEM, Zavrtanik et al. 2021): a thresholded Perlin-noise mask filled with a foreign texture,
  ``I' = (1 - M) I + (1 - b) M T + b M I`` with opacity b in [0.1, 1).

Both return (uint8 image, bool mask) with a non-empty mask and are deterministic for a given Generator.
"""

from __future__ import annotations

import numpy as np

from unidg.train.shape_masks import perlin_noise


def _jitter(patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    gain = rng.uniform(0.7, 1.3, 3)
    shift = rng.uniform(-30, 30, 3)
    return np.clip(patch.astype(np.float32) * gain + shift, 0, 255).astype(np.uint8)


def cut_paste(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A patch of 2-15 % of the area (aspect 0.3-3.3) cut, jittered and pasted at another place."""
    height, width = image.shape[:2]
    area = rng.uniform(0.02, 0.15) * height * width
    aspect = np.exp(rng.uniform(np.log(0.3), np.log(1 / 0.3)))
    ph = int(np.clip(round(np.sqrt(area * aspect)), 2, height - 1))
    pw = int(np.clip(round(np.sqrt(area / aspect)), 2, width - 1))
    y0, x0 = int(rng.integers(0, height - ph + 1)), int(rng.integers(0, width - pw + 1))
    y1, x1 = int(rng.integers(0, height - ph + 1)), int(rng.integers(0, width - pw + 1))
    out = image.copy()
    out[y1 : y1 + ph, x1 : x1 + pw] = _jitter(image[y0 : y0 + ph, x0 : x0 + pw], rng)
    mask = np.zeros((height, width), dtype=bool)
    mask[y1 : y1 + ph, x1 : x1 + pw] = True
    return out, mask


def perlin_mask(shape: tuple[int, int], rng: np.random.Generator, threshold: float = 0.5) -> np.ndarray:
    """Perlin noise at a random scale (2-16 cells a side), thresholded; redrawn until non-empty."""
    for _ in range(32):
        res = (int(2 ** rng.integers(1, 5)), int(2 ** rng.integers(1, 5)))
        mask = perlin_noise(shape, res, rng) > threshold
        if mask.any():
            return mask
    raise ValueError(f"could not draw a non-empty Perlin mask of shape {shape}")


def perlin_anomaly(image: np.ndarray, texture: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``texture`` (any uint8 RGB image, resized by tiling/cropping to the image) blended into a Perlin mask."""
    height, width = image.shape[:2]
    reps = (-(-height // texture.shape[0]), -(-width // texture.shape[1]), 1)
    texture = _jitter(np.tile(texture, reps)[:height, :width], rng)
    mask = perlin_mask((height, width), rng)
    opacity = rng.uniform(0.1, 1.0)
    blended = (1 - opacity) * texture.astype(np.float32) + opacity * image.astype(np.float32)
    out = np.where(mask[..., None], np.clip(blended, 0, 255), image).astype(np.uint8)
    return out, mask


def rule_defect(
    image: np.ndarray, textures: list[np.ndarray], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, str]:
    """Cut-paste or Perlin anomaly with equal chance: (image, mask, "cut-paste" | "perlin")."""
    if rng.random() < 0.5 or not textures:
        return (*cut_paste(image, rng), "cut-paste")
    return (*perlin_anomaly(image, textures[int(rng.integers(len(textures)))], rng), "perlin")
