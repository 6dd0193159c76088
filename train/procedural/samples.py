"""One UDG quadruplet: a defect drawn in a shape-prior mask on a surface, and its Fig. 7 caption."""

from __future__ import annotations

import colorsys
import dataclasses
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from unidg.core.udg import mask_location, mask_size_word
from unidg.train.procedural.defects import COMBINED, DEFECTS, SEVERITY, SHAPE_WORDS, Defect
from unidg.train.procedural.pixels import Rgb, color_name, mask_direction, random_hsv
from unidg.train.procedural.surfaces import Surface
from unidg.train.shape_masks import keep_largest_regions, shape_mask

MIN_VISIBLE_DIFFERENCE = 6.0  # mean |abnormal - normal| inside the mask, in 8-bit levels


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
            color = random_hsv(rng, defect.hue, defect.saturation, defect.value)
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
    shape = SHAPE_WORDS[kind]
    return {
        "type": defect.name,
        "shape": shape,
        "direction": mask_direction(mask),
        "contrast": contrast,
        "color": color,
        "material": surface.material,
        "size": size,
        "width": _width_word(mask),
        "depth": defect.depth,
        "edge": defect.edge,
        "severity": SEVERITY[size],
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
