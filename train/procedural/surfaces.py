"""Normal images: scikit-image's bundled photos recoloured, and procedural surfaces, each a ``Surface``."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from unidg.train.procedural.pixels import Rgb, pixel_grid, random_hsv, unit_noise


@functools.cache
def _skimage_photo(name: str) -> np.ndarray:
    import skimage.data

    image = getattr(skimage.data, name)()
    if image.ndim == 3:
        image = image[..., :3]
    return image


def _crop(name: str, rng: np.random.Generator, shape: tuple[int, int], min_scale: float = 0.35) -> np.ndarray:
    """A random crop of a scikit-image photo with the target aspect, resized to ``shape``, randomly flipped: float."""
    photo = _skimage_photo(name)
    height, width = shape
    full_h, full_w = photo.shape[:2]
    fit = min(full_h / height, full_w / width)
    scale = fit * rng.uniform(min_scale, 1.0)
    crop_h, crop_w = max(8, int(height * scale)), max(8, int(width * scale))
    y = int(rng.integers(0, full_h - crop_h + 1))
    x = int(rng.integers(0, full_w - crop_w + 1))
    crop = Image.fromarray(photo[y : y + crop_h, x : x + crop_w]).resize((width, height), Image.Resampling.BILINEAR)
    array = np.asarray(crop, dtype=np.float32) / 255.0
    if rng.random() < 0.5:
        array = array[:, ::-1]
    if rng.random() < 0.5:
        array = array[::-1]
    return np.ascontiguousarray(array)


def _stretch(gray: np.ndarray) -> np.ndarray:
    low, high = np.percentile(gray, [1, 99])
    return np.clip((gray - low) / max(high - low, 1e-3), 0.0, 1.0)


def _recolor(gray: np.ndarray, dark: Rgb, light: Rgb) -> np.ndarray:
    return dark + (light - dark) * gray[..., None]


def _photo_texture(name: str, hue, saturation, dark_value, light_value) -> Callable:
    def make(rng: np.random.Generator, shape: tuple[int, int]):
        gray = _stretch(_crop(name, rng, shape))
        h = rng.uniform(*hue)
        s = rng.uniform(*saturation)
        dark = random_hsv(rng, (h, h), (s, s), dark_value)
        light = random_hsv(rng, (h, h), (0.6 * s, 0.6 * s), light_value)
        return _recolor(gray, dark, light), None

    return make


def _label(rng, shape):
    gray = _stretch(_crop("text", rng, shape, min_scale=0.5))
    paper = random_hsv(rng, (0.08, 0.16), (0.0, 0.15), (0.85, 1.0))
    ink = random_hsv(rng, (0.0, 1.0), (0.2, 0.8), (0.05, 0.35))
    return _recolor(gray, ink, paper), None


def _coins(rng, shape):
    gray = _stretch(_crop("coins", rng, shape, min_scale=0.5))
    metal = random_hsv(rng, (0.08, 0.14), (0.0, 0.6), (0.75, 0.95))
    return _recolor(gray, metal * 0.15, metal), None


def _photo_print(rng, shape):
    name = ("astronaut", "coffee", "rocket", "camera")[int(rng.integers(4))]
    image = _crop(name, rng, shape)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    grade = random_hsv(rng, (0.0, 1.0), (0.0, 0.2), (0.9, 1.0))  # a faded print tint
    return image * grade, None


def _fabric(rng, shape):
    yy, xx = pixel_grid(shape)
    period = rng.uniform(4.0, 10.0)
    warp = 0.5 + 0.5 * np.sin(2 * math.pi * xx / period)
    weft = 0.5 + 0.5 * np.sin(2 * math.pi * yy / period)
    over = ((xx // period + yy // period) % 2).astype(bool)
    gray = 0.55 + 0.3 * np.where(over, warp, weft) + 0.15 * unit_noise(shape, rng, 24, 1)
    color = random_hsv(rng, (0.0, 1.0), (0.2, 0.75), (0.45, 0.9))
    return np.clip(gray[..., None] * color / 0.9, 0, 1), None


def _brushed_metal(rng, shape):
    height, width = shape
    streaks = ndimage.gaussian_filter(rng.normal(size=(height, width)).astype(np.float32), (0.6, 24.0))
    streaks /= max(float(np.abs(streaks).max()), 1e-6)
    if rng.random() < 0.5 and height == width:
        streaks = streaks.T
    yy, xx = pixel_grid(shape)
    light = 0.08 * np.cos(2 * math.pi * (xx / width * rng.uniform(0.3, 1.0) + rng.uniform()))
    gray = 0.68 + 0.12 * streaks + light
    tint = random_hsv(rng, (0.5, 0.65), (0.0, 0.15), (0.85, 1.0))
    return np.clip(gray[..., None] * tint, 0, 1), None


def _wood(rng, shape):
    height, width = shape
    yy, xx = pixel_grid(shape)
    cx, cy = rng.uniform(-1.5, 2.5) * width, rng.uniform(-1.5, 2.5) * height
    stretch = rng.uniform(0.05, 0.35)
    radius = np.sqrt(((xx - cx) * stretch) ** 2 + (yy - cy) ** 2)
    radius += 6.0 * unit_noise(shape, rng, 4, 2)
    rings = (radius / rng.uniform(6.0, 14.0)) % 1.0
    gray = 0.55 + 0.45 * rings**2.5
    light = random_hsv(rng, (0.06, 0.11), (0.35, 0.6), (0.7, 0.92))
    dark = light * rng.uniform(0.45, 0.65)
    return _recolor(1.0 - gray + 0.45, dark, light).clip(0, 1), None


def _painted_panel(rng, shape):
    yy, xx = pixel_grid(shape)
    color = random_hsv(rng, (0.0, 1.0), (0.25, 0.85), (0.45, 0.9))
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (xx * math.cos(angle) + yy * math.sin(angle)) / max(shape)
    gray = 0.92 + 0.1 * ramp + 0.03 * unit_noise(shape, rng, 16, 2)
    return np.clip(gray[..., None] * color, 0, 1), None


def _ceramic_tile(rng, shape):
    yy, xx = pixel_grid(shape)
    size = rng.uniform(0.25, 0.5) * min(shape)
    grout = rng.uniform(1.5, 3.5)
    tiles = (xx % size < grout) | (yy % size < grout)
    base = random_hsv(rng, (0.0, 1.0), (0.0, 0.4), (0.75, 0.97))
    grout_color = random_hsv(rng, (0.0, 1.0), (0.0, 0.1), (0.3, 0.6))
    cell = ((xx // size) * 7 + (yy // size) * 13) % 5 / 5.0
    gloss = 0.04 * np.cos((xx + yy) / size * math.pi)
    surface = base * (0.95 + 0.05 * cell + gloss)[..., None]
    return np.where(tiles[..., None], grout_color, surface).clip(0, 1), None


def _leather(rng, shape):
    bumps = unit_noise(shape, rng, max(8, min(shape) // 10), 2)
    fine = unit_noise(shape, rng, max(16, min(shape) // 4), 1)
    color = random_hsv(rng, (0.0, 0.1), (0.35, 0.8), (0.2, 0.6))
    gray = 0.75 + 0.2 * bumps + 0.1 * fine
    return np.clip(gray[..., None] * color, 0, 1), None


def _fruit_skin(rng, shape):
    blend = unit_noise(shape, rng, 3, 2)[..., None]
    red = random_hsv(rng, (0.97, 1.02), (0.6, 0.9), (0.55, 0.85))
    yellow = random_hsv(rng, (0.1, 0.25), (0.5, 0.9), (0.7, 0.95))
    image = red * (1 - blend) + yellow * blend
    speckles = unit_noise(shape, rng, max(12, min(shape) // 6), 1) > 0.82
    return np.where(speckles[..., None], image * 0.85 + 0.15, image).clip(0, 1), None


def _bottle_cap(rng, shape):
    height, width = shape
    yy, xx = pixel_grid(shape)
    cy = height / 2 + rng.uniform(-0.08, 0.08) * height
    cx = width / 2 + rng.uniform(-0.08, 0.08) * width
    radius = rng.uniform(0.34, 0.44) * min(shape)
    distance = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / radius
    foreground = distance <= 1.0
    background = random_hsv(rng, (0.0, 1.0), (0.0, 0.1), (0.1, 0.3) if rng.random() < 0.5 else (0.8, 0.95))
    cap = random_hsv(rng, (0.0, 1.0), (0.4, 0.9), (0.5, 0.9))
    shade = 1.0 - 0.25 * distance**2 + 0.15 * np.exp(-(((distance - 0.85) / 0.05) ** 2))
    image = np.where(foreground[..., None], cap * shade[..., None], background)
    return image.clip(0, 1), foreground


@dataclass(frozen=True)
class Surface:
    """A kind of normal image: its object_name, caption words, generator and the defect types seen on it."""

    name: str
    material: str
    texture: str
    structure: str
    shape: str
    background: str
    make: Callable[[np.random.Generator, tuple[int, int]], tuple[np.ndarray, np.ndarray | None]]
    defects: tuple[str, ...]


SURFACES: tuple[Surface, ...] = (
    Surface(
        "brick wall", "brick", "rough", "masonry", "flat", "none, the surface fills the frame",
        _photo_texture("brick", (0.0, 0.06), (0.35, 0.7), (0.15, 0.3), (0.65, 0.85)),
        ("crack", "hole", "stain", "dirt", "missing", "watermark", "abrasion", "foreign matter", "graze"),
    ),
    Surface(
        "grass", "plant", "fibrous", "dense blades", "flat", "none, the surface fills the frame",
        _photo_texture("grass", (0.2, 0.32), (0.45, 0.8), (0.08, 0.2), (0.55, 0.8)),
        ("stain", "dirt", "foreign matter", "missing", "hole", "black spot", "anomaly"),
    ),
    Surface(
        "gravel", "stone", "granular", "loose pebbles", "flat", "none, the surface fills the frame",
        _photo_texture("gravel", (0.05, 0.12), (0.05, 0.25), (0.1, 0.25), (0.7, 0.9)),
        ("stain", "foreign matter", "hole", "dirt", "black spot", "anomaly", "bright line"),
    ),
    Surface(
        "printed label", "paper", "smooth", "printed text", "rectangular", "none, the label fills the frame",
        _label,
        ("misprint", "scratch", "fold", "wrinkle", "stain", "watermark", "blur", "dirt"),
    ),
    Surface(
        "coins", "metal", "embossed", "round coins", "circular", "dark tray",
        _coins,
        ("scratch", "rust", "dent", "black spot", "graze", "bright line", "stain"),
    ),
    Surface(
        "fabric", "textile", "woven", "plain weave", "flat", "none, the fabric fills the frame",
        _fabric,
        ("hole", "stain", "dirt", "fold", "wrinkle", "seam opening", "foreign matter", "glue", "bubble"),
    ),
    Surface(
        "metal plate", "metal", "brushed", "flat sheet", "rectangular", "none, the plate fills the frame",
        _brushed_metal,
        ("scratch", "rust", "dent", "bump", "knife mark", "scrape", "bright line", "graze", "abrasion", "bubble",
         "black spot", "combined"),
    ),
    Surface(
        "wood board", "wood", "grained", "planed board", "rectangular", "none, the board fills the frame",
        _wood,
        ("crack", "hole", "knife mark", "stain", "scrape", "glue", "dirt", "warp", "combined"),
    ),
    Surface(
        "painted panel", "painted metal", "smooth", "coated panel", "rectangular", "none, the panel fills the frame",
        _painted_panel,
        ("scratch", "bubble", "scrape", "dent", "bump", "stain", "glue", "watermark", "abrasion", "blur",
         "combined"),
    ),
    Surface(
        "ceramic tile", "ceramic", "glazed", "tiles with grout", "square", "none, the tiles fill the frame",
        _ceramic_tile,
        ("crack", "black spot", "glue", "stain", "bump", "bubble", "missing", "anomaly"),
    ),
    Surface(
        "leather", "leather", "grainy", "hide", "flat", "none, the leather fills the frame",
        _leather,
        ("scratch", "fold", "wrinkle", "hole", "bruise", "stain", "glue", "seam opening", "abrasion"),
    ),
    Surface(
        "fruit skin", "organic", "smooth speckled", "peel", "curved", "none, the skin fills the frame",
        _fruit_skin,
        ("bruise", "black spot", "hole", "dirt", "scratch", "bump", "wrinkle"),
    ),
    Surface(
        "photo print", "photo paper", "glossy", "printed photo", "rectangular", "none, the print fills the frame",
        _photo_print,
        ("misprint", "scratch", "fold", "blur", "watermark", "warp", "wrinkle", "bright line"),
    ),
    Surface(
        "bottle cap", "plastic", "smooth", "round cap", "circular", "plain",
        _bottle_cap,
        ("dent", "scratch", "rust", "discoloration", "dirt", "warp", "misprint", "combined"),
    ),
)  # fmt: skip
