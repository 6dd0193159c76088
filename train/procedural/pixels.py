"""Pixel operations the procedural surfaces and defects share: colours, noise, feathering, blending, mask axes."""

from __future__ import annotations

import colorsys
import math

import numpy as np
from scipy import ndimage

from unidg.train.shape_masks import perlin_noise

Rgb = np.ndarray  # float (3,) in [0, 1]


def random_hsv(rng: np.random.Generator, hue, saturation, value) -> Rgb:
    """A colour drawn from HSV ranges; a hue range may wrap (e.g. (0.9, 1.05))."""
    h = rng.uniform(*hue) % 1.0
    return np.array(colorsys.hsv_to_rgb(h, rng.uniform(*saturation), rng.uniform(*value)), dtype=np.float32)


def luminance_of(image: np.ndarray) -> np.ndarray:
    return image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def unit_noise(shape: tuple[int, int], rng: np.random.Generator, cells: int, octaves: int = 2) -> np.ndarray:
    """Perlin noise rescaled to [0, 1]."""
    cells_y = max(1, round(cells * shape[0] / max(shape)))
    cells_x = max(1, round(cells * shape[1] / max(shape)))
    noise = perlin_noise(shape, (cells_y, cells_x), rng, octaves)
    low, high = float(noise.min()), float(noise.max())
    return (noise - low) / max(high - low, 1e-6)


def feathered(mask: np.ndarray, sigma: float) -> np.ndarray:
    """A soft alpha that is 1 deep inside the mask and falls off towards its edge, 0 outside."""
    if sigma <= 0:
        return mask.astype(np.float32)
    soft = ndimage.gaussian_filter(mask.astype(np.float32), sigma)
    return np.clip(2.0 * soft, 0.0, 1.0) * mask


def mask_depth(mask: np.ndarray) -> np.ndarray:
    """Distance to the mask edge, normalised to [0, 1] per image (1 at the deepest point)."""
    distance = ndimage.distance_transform_edt(mask).astype(np.float32)
    return distance / max(float(distance.max()), 1.0)


def alpha_blend(image: np.ndarray, color: np.ndarray, alpha: np.ndarray | float) -> np.ndarray:
    alpha = np.asarray(alpha, dtype=np.float32)
    if alpha.ndim == 2:
        alpha = alpha[..., None]
    return image * (1.0 - alpha) + color * alpha


def mask_axes(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates along (u) and across (v) the mask's principal axis, in pixels from its centroid."""
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    if ys.size > 2:
        cov = np.cov(np.stack([xs - cx, ys - cy]))
        _, vectors = np.linalg.eigh(cov)
        dx, dy = vectors[:, -1]
    else:
        dx, dy = 1.0, 0.0
    yy, xx = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]].astype(np.float32)
    u = (xx - cx) * dx + (yy - cy) * dy
    v = -(xx - cx) * dy + (yy - cy) * dx
    return u, v


def mask_direction(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    if ys.size < 3:
        return "none"
    values, vectors = np.linalg.eigh(np.cov(np.stack([xs - xs.mean(), ys - ys.mean()])))
    if values[-1] < 2.0 * max(values[0], 1e-6):
        return "none"
    angle = math.degrees(math.atan2(abs(vectors[1, -1]), abs(vectors[0, -1])))
    return "horizontal" if angle < 25 else "vertical" if angle > 65 else "diagonal"


_COLOR_NAMES: dict[str, tuple[float, float, float]] = {
    "black": (0.05, 0.05, 0.05),
    "dark-gray": (0.25, 0.25, 0.25),
    "gray": (0.5, 0.5, 0.5),
    "light-gray": (0.75, 0.75, 0.75),
    "white": (0.95, 0.95, 0.95),
    "red": (0.8, 0.12, 0.1),
    "dark-red": (0.42, 0.06, 0.05),
    "orange": (0.92, 0.5, 0.12),
    "brown": (0.5, 0.3, 0.15),
    "dark-brown": (0.26, 0.15, 0.08),
    "beige": (0.85, 0.77, 0.6),
    "yellow": (0.92, 0.85, 0.2),
    "gold": (0.78, 0.62, 0.25),
    "green": (0.22, 0.62, 0.2),
    "dark-green": (0.1, 0.28, 0.1),
    "olive": (0.45, 0.45, 0.15),
    "teal": (0.1, 0.5, 0.5),
    "blue": (0.15, 0.3, 0.82),
    "dark-blue": (0.08, 0.12, 0.4),
    "light-blue": (0.55, 0.75, 0.95),
    "purple": (0.5, 0.2, 0.6),
    "pink": (0.95, 0.6, 0.7),
}
_COLOR_TABLE = np.array(list(_COLOR_NAMES.values()), dtype=np.float32)


def color_name(rgb: np.ndarray) -> str:
    """Nearest named colour of an RGB triple in [0, 1]."""
    index = int(np.argmin(np.sum((_COLOR_TABLE - np.asarray(rgb, dtype=np.float32)) ** 2, axis=1)))
    return list(_COLOR_NAMES)[index]


def pixel_grid(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return yy.astype(np.float32), xx.astype(np.float32)
