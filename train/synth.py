"""Procedural UDG quadruplets: real and procedural textures as normal images, rule-based defects inside UniADC
shape-prior masks, template captions in the Fig. 7 schema.

No defect dataset is reachable offline, so the demo model and the tests learn from this generator. It is built so
that reference-based transfer has something to learn and the Diversity-SFT pairs agree with it. Samples come in
lots: 2-3 samples of one (object, defect) on one product (the same normal image, flipped at random), like photos from
one production line. Each round of a category puts it on two objects, and those two lots form a defect family with
one look (a colour placed in each defect's own colour ranges, jittered per sample), so intra-object and cross-object
pairs exist from the first few samples on and Alg. 2's colour score finds references that look like the target.
Families differ in look, so a reference still carries information the model must copy: the colour of a defect kind
is not fixed, it has to be read from the reference.

Normal images: scikit-image's bundled photos (brick, grass, gravel, text, coins, camera, astronaut, coffee, rocket),
cropped, flipped and recoloured, plus procedural surfaces (fabric weave, brushed metal, wood rings, paint, tiles,
leather, fruit skin, a bottle cap on a background). The abnormal image equals the normal one outside the mask, pixel
for pixel.
"""

from __future__ import annotations

import colorsys
import dataclasses
import functools
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from unidg.runtime.errors import UniDGError
from unidg.runtime.manifest import atomic_write_text
from unidg.runtime.udg import CATEGORIES, INDEX_FILE, UDGWriter, mask_location, mask_size_word
from unidg.train.shape_masks import keep_largest_regions, perlin_noise, shape_mask

DATASET_FILE = "dataset.json"
GENERATOR_VERSION = 2  # 2: product lots and defect families
MIN_VISIBLE_DIFFERENCE = 6.0  # mean |abnormal - normal| inside the mask, in 8-bit levels

Rgb = np.ndarray  # float (3,) in [0, 1]


# ------------------------------------------------------------------------------------------------------ utilities
def _hsv(rng: np.random.Generator, hue, saturation, value) -> Rgb:
    """A colour drawn from HSV ranges; a hue range may wrap (e.g. (0.9, 1.05))."""
    h = rng.uniform(*hue) % 1.0
    return np.array(colorsys.hsv_to_rgb(h, rng.uniform(*saturation), rng.uniform(*value)), dtype=np.float32)


def _luminance(image: np.ndarray) -> np.ndarray:
    return image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _unit_noise(shape: tuple[int, int], rng: np.random.Generator, cells: int, octaves: int = 2) -> np.ndarray:
    """Perlin noise rescaled to [0, 1]."""
    cells_y = max(1, round(cells * shape[0] / max(shape)))
    cells_x = max(1, round(cells * shape[1] / max(shape)))
    noise = perlin_noise(shape, (cells_y, cells_x), rng, octaves)
    low, high = float(noise.min()), float(noise.max())
    return (noise - low) / max(high - low, 1e-6)


def _feather(mask: np.ndarray, sigma: float) -> np.ndarray:
    """A soft alpha that is 1 deep inside the mask and falls off towards its edge, 0 outside."""
    if sigma <= 0:
        return mask.astype(np.float32)
    soft = ndimage.gaussian_filter(mask.astype(np.float32), sigma)
    return np.clip(2.0 * soft, 0.0, 1.0) * mask


def _depth(mask: np.ndarray) -> np.ndarray:
    """Distance to the mask edge, normalised to [0, 1] per image (1 at the deepest point)."""
    distance = ndimage.distance_transform_edt(mask).astype(np.float32)
    return distance / max(float(distance.max()), 1.0)


def _blend(image: np.ndarray, color: np.ndarray, alpha: np.ndarray | float) -> np.ndarray:
    alpha = np.asarray(alpha, dtype=np.float32)
    if alpha.ndim == 2:
        alpha = alpha[..., None]
    return image * (1.0 - alpha) + color * alpha


def _axes(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def _direction(mask: np.ndarray) -> str:
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


# ------------------------------------------------------------------------------------------------------- surfaces
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
        dark = _hsv(rng, (h, h), (s, s), dark_value)
        light = _hsv(rng, (h, h), (0.6 * s, 0.6 * s), light_value)
        return _recolor(gray, dark, light), None

    return make


def _label(rng, shape):
    gray = _stretch(_crop("text", rng, shape, min_scale=0.5))
    paper = _hsv(rng, (0.08, 0.16), (0.0, 0.15), (0.85, 1.0))
    ink = _hsv(rng, (0.0, 1.0), (0.2, 0.8), (0.05, 0.35))
    return _recolor(gray, ink, paper), None


def _coins(rng, shape):
    gray = _stretch(_crop("coins", rng, shape, min_scale=0.5))
    metal = _hsv(rng, (0.08, 0.14), (0.0, 0.6), (0.75, 0.95))
    return _recolor(gray, metal * 0.15, metal), None


def _photo_print(rng, shape):
    name = ("astronaut", "coffee", "rocket", "camera")[int(rng.integers(4))]
    image = _crop(name, rng, shape)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    grade = _hsv(rng, (0.0, 1.0), (0.0, 0.2), (0.9, 1.0))  # a faded print tint
    return image * grade, None


def _grid(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return yy.astype(np.float32), xx.astype(np.float32)


def _fabric(rng, shape):
    yy, xx = _grid(shape)
    period = rng.uniform(4.0, 10.0)
    warp = 0.5 + 0.5 * np.sin(2 * math.pi * xx / period)
    weft = 0.5 + 0.5 * np.sin(2 * math.pi * yy / period)
    over = ((xx // period + yy // period) % 2).astype(bool)
    gray = 0.55 + 0.3 * np.where(over, warp, weft) + 0.15 * _unit_noise(shape, rng, 24, 1)
    color = _hsv(rng, (0.0, 1.0), (0.2, 0.75), (0.45, 0.9))
    return np.clip(gray[..., None] * color / 0.9, 0, 1), None


def _brushed_metal(rng, shape):
    height, width = shape
    streaks = ndimage.gaussian_filter(rng.normal(size=(height, width)).astype(np.float32), (0.6, 24.0))
    streaks /= max(float(np.abs(streaks).max()), 1e-6)
    if rng.random() < 0.5 and height == width:
        streaks = streaks.T
    yy, xx = _grid(shape)
    light = 0.08 * np.cos(2 * math.pi * (xx / width * rng.uniform(0.3, 1.0) + rng.uniform()))
    gray = 0.68 + 0.12 * streaks + light
    tint = _hsv(rng, (0.5, 0.65), (0.0, 0.15), (0.85, 1.0))
    return np.clip(gray[..., None] * tint, 0, 1), None


def _wood(rng, shape):
    height, width = shape
    yy, xx = _grid(shape)
    cx, cy = rng.uniform(-1.5, 2.5) * width, rng.uniform(-1.5, 2.5) * height
    stretch = rng.uniform(0.05, 0.35)
    radius = np.sqrt(((xx - cx) * stretch) ** 2 + (yy - cy) ** 2)
    radius += 6.0 * _unit_noise(shape, rng, 4, 2)
    rings = (radius / rng.uniform(6.0, 14.0)) % 1.0
    gray = 0.55 + 0.45 * rings**2.5
    light = _hsv(rng, (0.06, 0.11), (0.35, 0.6), (0.7, 0.92))
    dark = light * rng.uniform(0.45, 0.65)
    return _recolor(1.0 - gray + 0.45, dark, light).clip(0, 1), None


def _painted_panel(rng, shape):
    yy, xx = _grid(shape)
    color = _hsv(rng, (0.0, 1.0), (0.25, 0.85), (0.45, 0.9))
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (xx * math.cos(angle) + yy * math.sin(angle)) / max(shape)
    gray = 0.92 + 0.1 * ramp + 0.03 * _unit_noise(shape, rng, 16, 2)
    return np.clip(gray[..., None] * color, 0, 1), None


def _ceramic_tile(rng, shape):
    yy, xx = _grid(shape)
    size = rng.uniform(0.25, 0.5) * min(shape)
    grout = rng.uniform(1.5, 3.5)
    tiles = (xx % size < grout) | (yy % size < grout)
    base = _hsv(rng, (0.0, 1.0), (0.0, 0.4), (0.75, 0.97))
    grout_color = _hsv(rng, (0.0, 1.0), (0.0, 0.1), (0.3, 0.6))
    cell = ((xx // size) * 7 + (yy // size) * 13) % 5 / 5.0
    gloss = 0.04 * np.cos((xx + yy) / size * math.pi)
    surface = base * (0.95 + 0.05 * cell + gloss)[..., None]
    return np.where(tiles[..., None], grout_color, surface).clip(0, 1), None


def _leather(rng, shape):
    bumps = _unit_noise(shape, rng, max(8, min(shape) // 10), 2)
    fine = _unit_noise(shape, rng, max(16, min(shape) // 4), 1)
    color = _hsv(rng, (0.0, 0.1), (0.35, 0.8), (0.2, 0.6))
    gray = 0.75 + 0.2 * bumps + 0.1 * fine
    return np.clip(gray[..., None] * color, 0, 1), None


def _fruit_skin(rng, shape):
    blend = _unit_noise(shape, rng, 3, 2)[..., None]
    red = _hsv(rng, (0.97, 1.02), (0.6, 0.9), (0.55, 0.85))
    yellow = _hsv(rng, (0.1, 0.25), (0.5, 0.9), (0.7, 0.95))
    image = red * (1 - blend) + yellow * blend
    speckles = _unit_noise(shape, rng, max(12, min(shape) // 6), 1) > 0.82
    return np.where(speckles[..., None], image * 0.85 + 0.15, image).clip(0, 1), None


def _bottle_cap(rng, shape):
    height, width = shape
    yy, xx = _grid(shape)
    cy = height / 2 + rng.uniform(-0.08, 0.08) * height
    cx = width / 2 + rng.uniform(-0.08, 0.08) * width
    radius = rng.uniform(0.34, 0.44) * min(shape)
    distance = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / radius
    foreground = distance <= 1.0
    background = _hsv(rng, (0.0, 1.0), (0.0, 0.1), (0.1, 0.3) if rng.random() < 0.5 else (0.8, 0.95))
    cap = _hsv(rng, (0.0, 1.0), (0.4, 0.9), (0.5, 0.9))
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


# -------------------------------------------------------------------------------------------------------- defects
# Every renderer takes (normal float (H, W, 3), mask, rng, colour) and returns an image; only masked pixels are used.
def _render_scratch(image, mask, rng, color):
    alpha = (0.75 + 0.25 * _unit_noise(mask.shape, rng, 32, 1)) * _feather(mask, 0.5)
    return _blend(image, color, alpha)


def _render_crack(image, mask, rng, color):
    jagged = 0.55 + 0.45 * _unit_noise(mask.shape, rng, 48, 1)
    return _blend(image * 0.6, color * jagged[..., None], 0.9 * _feather(mask, 0.5))


def _render_hole(image, mask, rng, color):
    depth = _depth(mask)
    interior = color * (1.0 - 0.5 * depth)[..., None]
    rim = np.clip(depth / 0.25, 0.0, 1.0)
    return _blend(image * 0.55, interior, rim)


def _render_spot(image, mask, rng, color):
    return _blend(image, color, np.clip(1.4 * np.sqrt(_depth(mask)), 0, 1) * mask)


def _render_stain(image, mask, rng, color):
    tinted = np.clip(_luminance(image)[..., None] * color * 1.6, 0, 1)
    alpha = rng.uniform(0.6, 0.9) * _feather(mask, 2.0) * (0.75 + 0.25 * _unit_noise(mask.shape, rng, 6, 2))
    return _blend(image, tinted, alpha)


def _render_dirt(image, mask, rng, color):
    blotches = _unit_noise(mask.shape, rng, 20, 2)
    alpha = _feather(mask, 1.5) * np.clip(1.5 * blotches, 0.3, 1.0)
    return _blend(image, color * (0.7 + 0.6 * blotches)[..., None], alpha)


def _render_rust(image, mask, rng, color):
    grain = _unit_noise(mask.shape, rng, 40, 2)
    texture = np.clip(color * (0.55 + 0.8 * grain)[..., None], 0, 1)
    return _blend(image, texture, _feather(mask, 1.0) * (0.75 + 0.25 * grain))


def _render_bubble(image, mask, rng, color):
    depth = _depth(mask)
    rim = np.exp(-(((depth - 0.12) / 0.12) ** 2))
    u, v = _axes(mask)
    extent = max(float(np.abs(u[mask]).max()), 1.0)
    highlight = np.exp(-((u + 0.35 * extent) ** 2 + (v + 0.35 * extent) ** 2) / (0.08 * extent**2))
    body = _blend(image, color, 0.35)
    return np.clip(body + (0.45 * rim + 0.5 * highlight)[..., None] * (0.5 + 0.5 * color), 0, 1)


def _render_glue(image, mask, rng, color):
    blurred = ndimage.gaussian_filter(image, (2.0, 2.0, 0))
    u, _ = _axes(mask)
    band = 0.3 * np.exp(-(((u - rng.uniform(-5, 5)) / 4.0) ** 2))
    glossy = np.clip(_blend(blurred, color, 0.4) + band[..., None], 0, 1)
    return _blend(image, glossy, _feather(mask, 1.0))


def _render_fold(image, mask, rng, color):
    _, v = _axes(mask)
    across = max(float(np.abs(v[mask]).max()), 1.0)
    shade = 1.0 + 0.55 * np.tanh(2.5 * v / across)
    return np.clip(_blend(image * shade[..., None], color, 0.25), 0, 1)


def _render_wrinkle(image, mask, rng, color):
    _, v = _axes(mask)
    shade = 1.0 + 0.4 * np.sin(2 * math.pi * v / rng.uniform(4.0, 9.0))
    return np.clip(_blend(image * shade[..., None], color, 0.3), 0, 1)


def _render_misprint(image, mask, rng, color):
    side = min(mask.shape)
    shift = (int(rng.integers(2, max(3, side // 20))), int(rng.integers(2, max(3, side // 20))))
    ghost = _luminance(np.roll(image, shift, axis=(0, 1)))
    ink = np.clip(0.35 + 0.85 * (1.0 - ghost), 0, 1)
    return _blend(image, color, ink * _feather(mask, 0.5))


def _render_bright_line(image, mask, rng, color):
    glow = np.clip(_feather(mask, 1.0) * 1.2, 0, 1)
    return np.clip(_blend(image, color, glow) + 0.15 * glow[..., None], 0, 1)


def _render_abrasion(image, mask, rng, color):
    worn = 0.4 * image + 0.6 * _luminance(image)[..., None]
    height, width = mask.shape
    streaks = perlin_noise((height, width), (1, max(4, width // 8)), rng)
    streaks = (streaks - streaks.min()) / max(float(np.ptp(streaks)), 1e-6)
    if rng.random() < 0.5 and height == width:
        streaks = streaks.T
    return _blend(worn, color, _feather(mask, 1.5) * (0.35 + 0.55 * streaks))


def _relief(mask: np.ndarray, rng: np.random.Generator, sign: float) -> np.ndarray:
    """Lambert-like shading of a smooth dome (sign +1) or dish (sign -1) under a random light direction."""
    height = sign * ndimage.gaussian_filter(np.sqrt(_depth(mask)), 1.5)
    gy, gx = np.gradient(height)
    angle = rng.uniform(0, 2 * math.pi)
    slope = gx * math.cos(angle) + gy * math.sin(angle)
    return 1.0 + 0.6 * slope / max(float(np.abs(slope).max()), 1e-6)


def _render_dent(image, mask, rng, color):
    shaded = image * (0.85 * _relief(mask, rng, -1.0))[..., None]
    return np.clip(_blend(shaded, color, 0.3), 0, 1)


def _render_bump(image, mask, rng, color):
    shaded = image * _relief(mask, rng, 1.0)[..., None] + 0.12 * _depth(mask)[..., None]
    return np.clip(_blend(shaded, color, 0.3), 0, 1)


def _render_foreign_matter(image, mask, rng, color):
    height, width = mask.shape
    fibres = perlin_noise((height, width), (max(2, height // 6), max(1, width // 32)), rng)
    fibres = (fibres - fibres.min()) / max(float(np.ptp(fibres)), 1e-6)
    return _blend(image, np.clip(color * (0.55 + 0.7 * fibres)[..., None], 0, 1), 0.95 * _feather(mask, 0.7))


def _render_missing(image, mask, rng, color):
    depth = _depth(mask)
    flat = color * (0.8 + 0.2 * np.clip(depth / 0.2, 0, 1))[..., None]
    return _blend(image, flat, mask.astype(np.float32))


def _render_watermark(image, mask, rng, color):
    ring = np.exp(-((_depth(mask) / 0.12) ** 2))
    return _blend(image, color, (0.3 + 0.55 * ring) * _feather(mask, 1.0))


def _render_knife_mark(image, mask, rng, color):
    u, v = _axes(mask)
    lines = ((v / rng.uniform(3.0, 6.0)) % 1.0) < 0.35
    alpha = np.where(lines, 0.85, 0.2) * _feather(mask, 0.5)
    return _blend(image, color, alpha)


def _render_graze(image, mask, rng, color):
    u, v = _axes(mask)
    wobble = 3.0 * _unit_noise(mask.shape, rng, 3, 1)
    stripes = np.sin((v + wobble) * rng.uniform(1.2, 2.2)) > 0.55
    dashes = _unit_noise(mask.shape, rng, 10, 1) > 0.35
    alpha = np.where(stripes & dashes, 0.9, 0.15) * mask
    return _blend(image, color, alpha)


def _render_scrape(image, mask, rng, color):
    grain = _unit_noise(mask.shape, rng, 36, 2)
    exposed = np.clip(color * (0.8 + 0.4 * grain)[..., None], 0, 1)
    edge = np.clip(_depth(mask) / 0.15, 0.0, 1.0)
    return _blend(image * 0.5, exposed, edge)


def _render_warp(image, mask, rng, color):
    depth = ndimage.gaussian_filter(_depth(mask), 1.0)
    amplitude = rng.uniform(0.04, 0.1) * min(mask.shape)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = _grid(mask.shape)
    coords = [yy + amplitude * depth * math.sin(angle), xx + amplitude * depth * math.cos(angle)]
    warped = np.stack([ndimage.map_coordinates(image[..., c], coords, order=1, mode="reflect") for c in range(3)], -1)
    return np.clip(_blend(warped * (1.0 - 0.25 * depth)[..., None], color, 0.2), 0, 1)


def _render_bruise(image, mask, rng, color):
    mottled = 0.6 + 0.4 * _unit_noise(mask.shape, rng, 10, 2)
    return _blend(image, color, 0.8 * _feather(mask, 3.0) * mottled)


def _render_seam_opening(image, mask, rng, color):
    depth = _depth(mask)
    gap = depth > 0.45
    return np.where(gap[..., None], color, np.clip(image * 1.25 + 0.05, 0, 1))


def _render_blur(image, mask, rng, color):
    blurred = ndimage.gaussian_filter(image, (3.0, 3.0, 0))
    return _blend(blurred, color, 0.3 * _feather(mask, 2.0))


def _render_anomaly(image, mask, rng, color):
    noise = np.stack([_unit_noise(mask.shape, rng, 24, 1) for _ in range(3)], -1)
    return _blend(image, np.clip(color * (0.4 + 1.2 * noise), 0, 1), 0.75 * _feather(mask, 1.0))


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
_SHAPE_WORDS = {
    "rectangle": "rectangular",
    "line": "linear",
    "polygon": "irregular-polygonal",
    "ellipse": "elliptical",
    "hollow_ellipse": "ring-shaped",
    "brush": "irregular-curved",
    "perlin": "irregular-blotchy",
    "foreground": "whole-object",
}
_SEVERITY = {"small": "minor", "medium": "moderate", "large": "major"}


def defect_category(defect_name: str) -> str:
    return COMBINED if defect_name == COMBINED else DEFECTS[defect_name].category


# --------------------------------------------------------------------------------------------------------- samples
@dataclass
class Sample:
    normal: np.ndarray  # uint8 (H, W, 3)
    abnormal: np.ndarray
    mask: np.ndarray  # bool (H, W)
    caption: dict
    object_name: str
    category: str
    defect_type: str


def _draw_mask(defect: Defect, surface_foreground, shape, rng) -> tuple[np.ndarray, str]:
    kinds = tuple(k for k in defect.kinds if k != "foreground" or surface_foreground is not None)
    kind = kinds[int(rng.integers(len(kinds)))]
    size = defect.sizes[int(rng.integers(len(defect.sizes)))]
    return shape_mask(kind, size, shape, rng, surface_foreground), kind


def look_color(defect: Defect, look: np.ndarray, rng: np.random.Generator) -> Rgb:
    """The colour of a defect family's ``look`` (3 numbers in [0, 1]) placed inside ``defect``'s HSV ranges, with a
    small per-sample jitter: samples of one family differ a little, as real defects of one kind do."""

    def place(bounds: tuple[float, float], u: float, spread: float) -> float:
        low, high = bounds
        return float(np.clip(low + (high - low) * u + rng.normal(0.0, spread), low, high))

    hue = (defect.hue[0] + (defect.hue[1] - defect.hue[0]) * look[0] + rng.normal(0.0, 0.015)) % 1.0
    saturation = place(defect.saturation, look[1], 0.04)
    value = place(defect.value, look[2], 0.04)
    return np.array(colorsys.hsv_to_rgb(hue, saturation, value), dtype=np.float32)


def _render(
    defect: Defect, normal: np.ndarray, mask: np.ndarray, rng, look: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Render until visible (a few colours are tried): the uint8 abnormal image, equal to ``normal`` off the mask.
    ``look``: the defect family's look (``look_color``); None draws a fresh colour from the defect's ranges."""
    base = normal.astype(np.float32) / 255.0
    for _ in range(4):
        if look is None:
            color = _hsv(rng, defect.hue, defect.saturation, defect.value)
        else:
            color = look_color(defect, look, rng)
        rendered = defect.render(base, mask, rng, color)
        rendered = np.round(np.clip(rendered, 0.0, 1.0) * 255.0).astype(np.uint8)
        abnormal = np.where(mask[..., None], rendered, normal)
        difference = np.abs(abnormal.astype(np.int16) - normal)[mask].mean()
        if difference >= MIN_VISIBLE_DIFFERENCE:
            break
        # An invisible defect (e.g. a tint equal to the surface colour) teaches nothing: push the colour away.
        defect = dataclasses.replace(defect, value=(0.0, 0.15) if base[mask].mean() > 0.5 else (0.85, 1.0))
    return abnormal, color


def _width_word(mask: np.ndarray) -> str:
    """Stroke width ~ 2 * area / perimeter, relative to the image side."""
    perimeter = np.count_nonzero(mask & ~ndimage.binary_erosion(mask))
    width = 2.0 * np.count_nonzero(mask) / max(perimeter, 1) / min(mask.shape)
    return "thin" if width < 0.02 else "medium" if width < 0.06 else "thick"


def _defect_entry(defect: Defect, kind: str, mask, normal, abnormal, surface: Surface) -> dict:
    difference = float(np.abs(abnormal.astype(np.int16) - normal)[mask].mean()) / 255.0
    contrast = "low" if difference < 0.08 else "medium" if difference < 0.2 else "high"
    color = color_name(abnormal[mask].mean(axis=0) / 255.0)
    size = mask_size_word(mask)
    location = mask_location(mask)
    shape = _SHAPE_WORDS[kind]
    return {
        "type": defect.name,
        "shape": shape,
        "direction": _direction(mask),
        "contrast": contrast,
        "color": color,
        "material": surface.material,
        "size": size,
        "width": _width_word(mask),
        "depth": defect.depth,
        "edge": defect.edge,
        "severity": _SEVERITY[size],
        "location": location,
        "summary": (
            f"A {size} {color} {defect.name} with a {shape} shape at the {location} of the {surface.name}, "
            f"{contrast} contrast, {defect.depth} depth and {defect.edge} edges."
        ),
    }


def make_caption(surface: Surface, normal: np.ndarray, entries: list[dict]) -> dict:
    """A Fig. 7 caption from the generator's ground truth (so Confidence is 1.0)."""
    object_color = color_name(normal.reshape(-1, 3).mean(axis=0) / 255.0)
    defects = " and ".join(f"a {e['size']} {e['color']} {e['type']} at the {e['location']}" for e in entries)
    return {
        "image-level": [{"foreground-object": surface.name, "background": surface.background}],
        "foreground-object-level": [
            {
                "viewpoint": "top-view",
                "material": surface.material,
                "texture": surface.texture,
                "structure": surface.structure,
                "color": object_color,
                "shape": surface.shape,
                "summary": f"A top view of a {object_color} {surface.name} with a {surface.texture} texture.",
            }
        ],
        "defect-level": entries,
        "summary": f"The image shows a {object_color} {surface.name} ({surface.material}) with {defects}.",
        "Confidence": 1.0,
    }


def make_sample(
    surface: Surface,
    defect_name: str,
    shape: tuple[int, int],
    rng: np.random.Generator,
    product_rng: np.random.Generator | None = None,
    look: np.ndarray | None = None,
) -> Sample:
    """One quadruplet of ``defect_name`` (a key of DEFECTS, or "combined") on ``surface``.

    ``product_rng``: makes the normal image (a product lot: equal generators give the same product, which this
    sample then flips at random); None uses ``rng``. ``look``: the defect family's look (``look_color``)."""
    if product_rng is None:
        image, foreground = surface.make(rng, shape)
    else:
        image, foreground = surface.make(product_rng, shape)
        flips = rng.random(2) < 0.5
        for axis, flip in enumerate(flips):
            if flip:
                image = np.flip(image, axis)
                foreground = None if foreground is None else np.flip(foreground, axis)
        image = np.ascontiguousarray(image)
        foreground = None if foreground is None else np.ascontiguousarray(foreground)
    normal = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    if defect_name == COMBINED:
        local = [name for name in surface.defects if name != COMBINED and "foreground" not in DEFECTS[name].kinds]
        parts = [DEFECTS[name] for name in rng.choice(local, size=2, replace=False)]
    else:
        parts = [DEFECTS[defect_name]]
    abnormal, mask, entries = normal, np.zeros(shape, dtype=bool), []
    for defect in parts:
        part_mask, kind = _draw_mask(defect, foreground, shape, rng)
        if len(parts) > 1:  # each part stays one region so the union has at most two
            part_mask = keep_largest_regions(part_mask & ~mask, 1)
            if not part_mask.any():
                continue
        before = abnormal
        abnormal, _ = _render(defect, abnormal, part_mask, rng, look)
        entries.append(_defect_entry(defect, kind, part_mask, before, abnormal, surface))
        mask |= part_mask
    # A combined sample whose second region vanished (swallowed by the first) is a plain sample of its first defect.
    combined = len(entries) == 2
    return Sample(
        normal=normal,
        abnormal=abnormal,
        mask=mask,
        caption=make_caption(surface, normal, entries),
        object_name=surface.name,
        category=COMBINED if combined else parts[0].category,
        defect_type=COMBINED if combined else parts[0].name,
    )


# ------------------------------------------------------------------------------------------------------ the plan
def sample_shapes(size: int) -> tuple[tuple[int, int], ...]:
    """Image sizes (H, W): mostly square, some 4:5 and 5:4 to exercise pad-to-square."""
    long_side = max(8, int(round(size * 1.25 / 8)) * 8)
    return (size, size), (size, long_side), (long_side, size)


@dataclass(frozen=True)
class PlannedSample:
    """One sample of the plan: what it shows, and the lot and defect family it belongs to."""

    object_name: str
    defect_name: str
    lot: int  # samples of one lot are one product (the same normal image, flipped at random)
    family: int  # lots of one family share a defect look (colour), across objects


def plan(count: int, seed: int) -> list[PlannedSample]:
    """The samples to make, in order: categories in shuffled rounds; in each round a category goes on two objects
    (two lots of 2-3 samples) that share one defect look, so small datasets already hold intra-object and
    cross-object pairs whose defects look alike, as one defect kind on one production line does."""
    rng = np.random.default_rng([seed, 0])
    by_category: dict[str, list[tuple[str, str]]] = {}
    for surface in SURFACES:
        for defect_name in surface.defects:
            by_category.setdefault(defect_category(defect_name), []).append((surface.name, defect_name))
    categories = sorted(by_category)
    jobs: list[PlannedSample] = []
    lot = family = 0
    while len(jobs) < count:
        for c in rng.permutation(len(categories)):
            combos = by_category[categories[c]]
            for i in rng.choice(len(combos), size=min(2, len(combos)), replace=False):
                jobs.extend([PlannedSample(*combos[i], lot=lot, family=family)] * int(rng.integers(2, 4)))
                lot += 1
            family += 1
            if len(jobs) >= count:
                break
    return jobs[:count]


def synthesize(
    out: str | Path,
    count: int,
    seed: int = 0,
    size: int = 256,
    progress: bool = True,
    overwrite: bool = False,
    non_square_fraction: float = 0.2,
) -> dict:
    """Write ``count`` quadruplets to the UDG folder ``out`` (+ ``dataset.json``); returns the summary written.

    Deterministic for (count, seed, size): sample i uses its own Generator seeded with (seed, i + 1).
    """
    from tqdm import tqdm

    if count < 1:
        raise UniDGError(f"count must be >= 1 (got {count})")
    if size < 32:
        raise UniDGError(f"size must be >= 32 pixels (got {size})")
    if not 0.0 <= non_square_fraction <= 1.0:
        raise UniDGError(f"the non-square fraction must be in [0, 1] (got {non_square_fraction})")
    out = Path(out)
    if (out / INDEX_FILE).exists():
        if not overwrite:
            raise UniDGError(f"{out} already holds a UDG index; choose a new folder or pass --force to replace it")
        for name in (INDEX_FILE, DATASET_FILE):
            (out / name).unlink(missing_ok=True)
        for name in ("normal", "abnormal", "mask"):
            shutil.rmtree(out / name, ignore_errors=True)
    surfaces = {surface.name: surface for surface in SURFACES}
    shapes = sample_shapes(size)
    summary: dict = {"categories": {}, "objects": {}, "object_categories": {}, "defect_types": {}, "image_sizes": {}}
    with UDGWriter(out, compress_level=1) as writer:  # PNG level 1: ~10 % larger files, faster writes
        for i, job in enumerate(tqdm(plan(count, seed), desc="synth", disable=not progress)):
            rng = np.random.default_rng([seed, i + 1])
            shape = shapes[0] if rng.random() >= non_square_fraction else shapes[1 + int(rng.integers(2))]
            product_rng = np.random.default_rng([seed, 1, job.lot])
            look = np.random.default_rng([seed, 2, job.family]).random(3)
            sample = make_sample(surfaces[job.object_name], job.defect_name, shape, rng, product_rng, look)
            writer.add(
                sample.normal,
                sample.abnormal,
                sample.mask,
                sample.caption,
                sample.object_name,
                sample.category,
                sample_id=f"{i:06d}",
                extra={"defect_type": sample.defect_type, "lot": job.lot, "family": job.family},
            )
            for key, value in (
                ("categories", sample.category),
                ("objects", sample.object_name),
                ("defect_types", sample.defect_type),
                ("image_sizes", f"{shape[0]}x{shape[1]}"),
            ):
                summary[key][value] = summary[key].get(value, 0) + 1
            per_object = summary["object_categories"].setdefault(sample.object_name, {})
            per_object[sample.category] = per_object.get(sample.category, 0) + 1
    document = {
        "generator": "unidg.train.synth",
        "version": GENERATOR_VERSION,
        "count": count,
        "seed": seed,
        "size": size,
        **{key: dict(sorted(value.items())) for key, value in summary.items()},
    }
    atomic_write_text(out / DATASET_FILE, json.dumps(document, indent=2) + "\n")
    return document


def check_tables() -> None:
    """Every defect maps to a standardized category and every object's defects exist (run by the tests)."""
    for defect in DEFECTS.values():
        if defect.category not in CATEGORIES:
            raise ValueError(f"defect {defect.name!r} maps to unknown category {defect.category!r}")
    for surface in SURFACES:
        for name in surface.defects:
            if name != COMBINED and name not in DEFECTS:
                raise ValueError(f"surface {surface.name!r} lists unknown defect {name!r}")
