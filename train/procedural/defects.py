"""Rule-based defects: one renderer per defect type, each a ``Defect`` with its colour ranges and category."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from unidg.train.procedural.pixels import (
    alpha_blend,
    feathered,
    luminance_of,
    mask_axes,
    mask_depth,
    pixel_grid,
    unit_noise,
)
from unidg.train.shape_masks import perlin_noise


# Every renderer takes (normal float (H, W, 3), mask, rng, colour) and returns an image; only masked pixels are used.
def _render_scratch(image, mask, rng, color):
    alpha = (0.75 + 0.25 * unit_noise(mask.shape, rng, 32, 1)) * feathered(mask, 0.5)
    return alpha_blend(image, color, alpha)


def _render_crack(image, mask, rng, color):
    jagged = 0.55 + 0.45 * unit_noise(mask.shape, rng, 48, 1)
    return alpha_blend(image * 0.6, color * jagged[..., None], 0.9 * feathered(mask, 0.5))


def _render_hole(image, mask, rng, color):
    depth = mask_depth(mask)
    interior = color * (1.0 - 0.5 * depth)[..., None]
    rim = np.clip(depth / 0.25, 0.0, 1.0)
    return alpha_blend(image * 0.55, interior, rim)


def _render_spot(image, mask, rng, color):
    return alpha_blend(image, color, np.clip(1.4 * np.sqrt(mask_depth(mask)), 0, 1) * mask)


def _render_stain(image, mask, rng, color):
    tinted = np.clip(luminance_of(image)[..., None] * color * 1.6, 0, 1)
    alpha = rng.uniform(0.6, 0.9) * feathered(mask, 2.0) * (0.75 + 0.25 * unit_noise(mask.shape, rng, 6, 2))
    return alpha_blend(image, tinted, alpha)


def _render_dirt(image, mask, rng, color):
    blotches = unit_noise(mask.shape, rng, 20, 2)
    alpha = feathered(mask, 1.5) * np.clip(1.5 * blotches, 0.3, 1.0)
    return alpha_blend(image, color * (0.7 + 0.6 * blotches)[..., None], alpha)


def _render_rust(image, mask, rng, color):
    grain = unit_noise(mask.shape, rng, 40, 2)
    texture = np.clip(color * (0.55 + 0.8 * grain)[..., None], 0, 1)
    return alpha_blend(image, texture, feathered(mask, 1.0) * (0.75 + 0.25 * grain))


def _render_bubble(image, mask, rng, color):
    depth = mask_depth(mask)
    rim = np.exp(-(((depth - 0.12) / 0.12) ** 2))
    u, v = mask_axes(mask)
    extent = max(float(np.abs(u[mask]).max()), 1.0)
    highlight = np.exp(-((u + 0.35 * extent) ** 2 + (v + 0.35 * extent) ** 2) / (0.08 * extent**2))
    body = alpha_blend(image, color, 0.35)
    return np.clip(body + (0.45 * rim + 0.5 * highlight)[..., None] * (0.5 + 0.5 * color), 0, 1)


def _render_glue(image, mask, rng, color):
    blurred = ndimage.gaussian_filter(image, (2.0, 2.0, 0))
    u, _ = mask_axes(mask)
    band = 0.3 * np.exp(-(((u - rng.uniform(-5, 5)) / 4.0) ** 2))
    glossy = np.clip(alpha_blend(blurred, color, 0.4) + band[..., None], 0, 1)
    return alpha_blend(image, glossy, feathered(mask, 1.0))


def _render_fold(image, mask, rng, color):
    _, v = mask_axes(mask)
    across = max(float(np.abs(v[mask]).max()), 1.0)
    shade = 1.0 + 0.55 * np.tanh(2.5 * v / across)
    return np.clip(alpha_blend(image * shade[..., None], color, 0.25), 0, 1)


def _render_wrinkle(image, mask, rng, color):
    _, v = mask_axes(mask)
    shade = 1.0 + 0.4 * np.sin(2 * math.pi * v / rng.uniform(4.0, 9.0))
    return np.clip(alpha_blend(image * shade[..., None], color, 0.3), 0, 1)


def _render_misprint(image, mask, rng, color):
    side = min(mask.shape)
    shift = (int(rng.integers(2, max(3, side // 20))), int(rng.integers(2, max(3, side // 20))))
    ghost = luminance_of(np.roll(image, shift, axis=(0, 1)))
    ink = np.clip(0.35 + 0.85 * (1.0 - ghost), 0, 1)
    return alpha_blend(image, color, ink * feathered(mask, 0.5))


def _render_bright_line(image, mask, rng, color):
    glow = np.clip(feathered(mask, 1.0) * 1.2, 0, 1)
    return np.clip(alpha_blend(image, color, glow) + 0.15 * glow[..., None], 0, 1)


def _render_abrasion(image, mask, rng, color):
    worn = 0.4 * image + 0.6 * luminance_of(image)[..., None]
    height, width = mask.shape
    streaks = perlin_noise((height, width), (1, max(4, width // 8)), rng)
    streaks = (streaks - streaks.min()) / max(float(np.ptp(streaks)), 1e-6)
    if rng.random() < 0.5 and height == width:
        streaks = streaks.T
    return alpha_blend(worn, color, feathered(mask, 1.5) * (0.35 + 0.55 * streaks))


def _relief(mask: np.ndarray, rng: np.random.Generator, sign: float) -> np.ndarray:
    """Lambert-like shading of a smooth dome (sign +1) or dish (sign -1) under a random light direction."""
    height = sign * ndimage.gaussian_filter(np.sqrt(mask_depth(mask)), 1.5)
    gy, gx = np.gradient(height)
    angle = rng.uniform(0, 2 * math.pi)
    slope = gx * math.cos(angle) + gy * math.sin(angle)
    return 1.0 + 0.6 * slope / max(float(np.abs(slope).max()), 1e-6)


def _render_dent(image, mask, rng, color):
    shaded = image * (0.85 * _relief(mask, rng, -1.0))[..., None]
    return np.clip(alpha_blend(shaded, color, 0.3), 0, 1)


def _render_bump(image, mask, rng, color):
    shaded = image * _relief(mask, rng, 1.0)[..., None] + 0.12 * mask_depth(mask)[..., None]
    return np.clip(alpha_blend(shaded, color, 0.3), 0, 1)


def _render_foreign_matter(image, mask, rng, color):
    height, width = mask.shape
    fibres = perlin_noise((height, width), (max(2, height // 6), max(1, width // 32)), rng)
    fibres = (fibres - fibres.min()) / max(float(np.ptp(fibres)), 1e-6)
    return alpha_blend(image, np.clip(color * (0.55 + 0.7 * fibres)[..., None], 0, 1), 0.95 * feathered(mask, 0.7))


def _render_missing(image, mask, rng, color):
    depth = mask_depth(mask)
    flat = color * (0.8 + 0.2 * np.clip(depth / 0.2, 0, 1))[..., None]
    return alpha_blend(image, flat, mask.astype(np.float32))


def _render_watermark(image, mask, rng, color):
    ring = np.exp(-((mask_depth(mask) / 0.12) ** 2))
    return alpha_blend(image, color, (0.3 + 0.55 * ring) * feathered(mask, 1.0))


def _render_knife_mark(image, mask, rng, color):
    u, v = mask_axes(mask)
    lines = ((v / rng.uniform(3.0, 6.0)) % 1.0) < 0.35
    alpha = np.where(lines, 0.85, 0.2) * feathered(mask, 0.5)
    return alpha_blend(image, color, alpha)


def _render_graze(image, mask, rng, color):
    u, v = mask_axes(mask)
    wobble = 3.0 * unit_noise(mask.shape, rng, 3, 1)
    stripes = np.sin((v + wobble) * rng.uniform(1.2, 2.2)) > 0.55
    dashes = unit_noise(mask.shape, rng, 10, 1) > 0.35
    alpha = np.where(stripes & dashes, 0.9, 0.15) * mask
    return alpha_blend(image, color, alpha)


def _render_scrape(image, mask, rng, color):
    grain = unit_noise(mask.shape, rng, 36, 2)
    exposed = np.clip(color * (0.8 + 0.4 * grain)[..., None], 0, 1)
    edge = np.clip(mask_depth(mask) / 0.15, 0.0, 1.0)
    return alpha_blend(image * 0.5, exposed, edge)


def _render_warp(image, mask, rng, color):
    depth = ndimage.gaussian_filter(mask_depth(mask), 1.0)
    amplitude = rng.uniform(0.04, 0.1) * min(mask.shape)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = pixel_grid(mask.shape)
    coords = [yy + amplitude * depth * math.sin(angle), xx + amplitude * depth * math.cos(angle)]
    warped = np.stack([ndimage.map_coordinates(image[..., c], coords, order=1, mode="reflect") for c in range(3)], -1)
    return np.clip(alpha_blend(warped * (1.0 - 0.25 * depth)[..., None], color, 0.2), 0, 1)


def _render_bruise(image, mask, rng, color):
    mottled = 0.6 + 0.4 * unit_noise(mask.shape, rng, 10, 2)
    return alpha_blend(image, color, 0.8 * feathered(mask, 3.0) * mottled)


def _render_seam_opening(image, mask, rng, color):
    depth = mask_depth(mask)
    gap = depth > 0.45
    return np.where(gap[..., None], color, np.clip(image * 1.25 + 0.05, 0, 1))


def _render_blur(image, mask, rng, color):
    blurred = ndimage.gaussian_filter(image, (3.0, 3.0, 0))
    return alpha_blend(blurred, color, 0.3 * feathered(mask, 2.0))


def _render_anomaly(image, mask, rng, color):
    noise = np.stack([unit_noise(mask.shape, rng, 24, 1) for _ in range(3)], -1)
    return alpha_blend(image, np.clip(color * (0.4 + 1.2 * noise), 0, 1), 0.75 * feathered(mask, 1.0))


@dataclass(frozen=True)
class Defect:
    """A rule-based defect: its raw name, mapped category, mask priors, colour prior and caption words."""

    name: str
    category: str
    kinds: tuple[str, ...]
    sizes: tuple[str, ...]
    render: Callable
    hue: tuple[float, float]
    saturation: tuple[float, float]
    value: tuple[float, float]
    depth: str
    edge: str


_ANY = (0.0, 1.0)
DEFECTS: dict[str, Defect] = {
    d.name: d
    for d in (
        Defect("scratch", "scratch", ("line", "brush"), ("small", "medium"), _render_scratch,
               _ANY, (0.0, 0.35), (0.0, 1.0), "slightly-concave", "clear"),
        Defect("crack", "breakage", ("brush", "line"), ("small", "medium"), _render_crack,
               _ANY, (0.0, 0.5), (0.0, 0.3), "concave", "clear"),
        Defect("hole", "hole", ("ellipse",), ("small", "medium"), _render_hole,
               _ANY, (0.1, 0.6), (0.02, 0.25), "deeply-concave", "clear"),
        Defect("black spot", "black spot", ("ellipse", "polygon"), ("small",), _render_spot,
               _ANY, (0.0, 0.5), (0.0, 0.18), "flat", "blurry"),
        Defect("stain", "discoloration", ("perlin", "polygon", "ellipse"), ("medium", "large"), _render_stain,
               _ANY, (0.45, 0.95), (0.5, 1.0), "flat", "blurry"),
        Defect("discoloration", "discoloration", ("foreground", "perlin"), ("large",), _render_stain,
               _ANY, (0.5, 1.0), (0.5, 1.0), "flat", "clear"),
        Defect("dirt", "dirt", ("perlin", "brush"), ("medium", "large"), _render_dirt,
               (0.04, 0.13), (0.35, 0.8), (0.12, 0.45), "flat", "blurry"),
        Defect("rust", "rust", ("perlin", "polygon"), ("medium", "large"), _render_rust,
               (0.01, 0.09), (0.6, 0.95), (0.35, 0.8), "slightly-convex", "blurry"),
        Defect("bubble", "bubble", ("ellipse", "hollow_ellipse"), ("small", "medium"), _render_bubble,
               _ANY, (0.1, 0.6), (0.6, 1.0), "convex", "clear"),
        Defect("glue", "glue", ("polygon", "ellipse", "brush"), ("medium",), _render_glue,
               (0.08, 0.18), (0.2, 0.7), (0.6, 1.0), "slightly-convex", "blurry"),
        Defect("fold", "fold", ("line",), ("medium", "large"), _render_fold,
               _ANY, (0.0, 0.4), (0.2, 0.9), "flat", "clear"),
        Defect("wrinkle", "wrinkle", ("brush", "polygon", "ellipse"), ("medium",), _render_wrinkle,
               _ANY, (0.0, 0.4), (0.2, 0.9), "slightly-convex", "blurry"),
        Defect("misprint", "misprint", ("rectangle", "polygon"), ("small", "medium"), _render_misprint,
               _ANY, (0.6, 1.0), (0.3, 0.9), "flat", "clear"),
        Defect("bright line", "bright line", ("line",), ("small", "medium"), _render_bright_line,
               _ANY, (0.2, 1.0), (0.85, 1.0), "flat", "clear"),
        Defect("abrasion", "abrasion", ("perlin", "rectangle"), ("medium", "large"), _render_abrasion,
               _ANY, (0.0, 0.3), (0.75, 1.0), "slightly-concave", "blurry"),
        Defect("dent", "indentation", ("ellipse", "polygon"), ("medium",), _render_dent,
               _ANY, (0.0, 0.6), (0.1, 0.6), "concave", "blurry"),
        Defect("bump", "raised", ("ellipse",), ("small", "medium"), _render_bump,
               _ANY, (0.0, 0.6), (0.6, 1.0), "convex", "blurry"),
        Defect("foreign matter", "foreign matter", ("polygon", "brush"), ("small", "medium"), _render_foreign_matter,
               _ANY, (0.5, 1.0), (0.3, 1.0), "convex", "clear"),
        Defect("missing", "missing", ("rectangle", "polygon"), ("medium",), _render_missing,
               _ANY, (0.0, 0.5), (0.0, 1.0), "deeply-concave", "clear"),
        Defect("watermark", "watermark", ("ellipse", "perlin"), ("medium",), _render_watermark,
               _ANY, (0.05, 0.4), (0.55, 1.0), "flat", "clear"),
        Defect("knife mark", "knife grain", ("rectangle",), ("medium",), _render_knife_mark,
               _ANY, (0.0, 0.4), (0.0, 0.5), "slightly-concave", "clear"),
        Defect("graze", "graze", ("rectangle", "ellipse"), ("small", "medium"), _render_graze,
               _ANY, (0.0, 0.3), (0.75, 1.0), "slightly-concave", "clear"),
        Defect("scrape", "scraped", ("rectangle", "polygon"), ("medium",), _render_scrape,
               _ANY, (0.0, 0.4), (0.4, 0.9), "concave", "clear"),
        Defect("warp", "deformation", ("polygon", "ellipse"), ("medium", "large"), _render_warp,
               _ANY, (0.3, 0.9), (0.2, 0.9), "concave", "blurry"),
        Defect("bruise", "bruise", ("ellipse", "perlin"), ("medium",), _render_bruise,
               (0.72, 1.08), (0.35, 0.75), (0.15, 0.45), "slightly-concave", "blurry"),
        Defect("seam opening", "dehiscence", ("line",), ("medium", "large"), _render_seam_opening,
               _ANY, (0.0, 0.5), (0.0, 0.3), "deeply-concave", "clear"),
        Defect("blur", "unclear", ("rectangle", "ellipse"), ("medium", "large"), _render_blur,
               _ANY, (0.0, 0.3), (0.6, 1.0), "flat", "blurry"),
        Defect("anomaly", "unknown", ("perlin", "polygon"), ("small", "medium"), _render_anomaly,
               _ANY, (0.4, 1.0), (0.3, 1.0), "flat", "clear"),
    )
}  # fmt: skip
COMBINED = "combined"  # two different defects of the object in two regions, category "combined"
SHAPE_WORDS = {
    "rectangle": "rectangular",
    "line": "linear",
    "polygon": "irregular-polygonal",
    "ellipse": "elliptical",
    "hollow_ellipse": "ring-shaped",
    "brush": "irregular-curved",
    "perlin": "irregular-blotchy",
    "foreground": "whole-object",
}
SEVERITY = {"small": "minor", "medium": "moderate", "large": "major"}


def defect_category(defect_name: str) -> str:
    return COMBINED if defect_name == COMBINED else DEFECTS[defect_name].category
