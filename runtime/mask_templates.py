"""The mask-template library (paper App. A.1): real defect masks clustered per category, placed inside the foreground of
a normal image to make target regions for synthesis.

A library folder (``unidg data templates``) holds ``templates.jsonl`` (one template a line: id, category, cluster, the
mask file and its bounding box relative to the image it came from), ``masks/<category>/<id>.png`` (the mask cropped to
its bounding box, L-mode 0/255) and ``manifest.json`` (kind "mask-templates"). Placing (``place_template``): pick a
cluster of the category at random, a template of that cluster at random, scale its box to the image by the relative
size it had, and put it where every mask pixel lies on the foreground; smaller scales, then other templates, are tried
before giving up with an error. Numpy and Pillow only, so batch jobs and stations use it without the training extra.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from unidg.core.errors import UniDGError
from unidg.core.manifest import MANIFEST_FILE, read_library
from unidg.core.udg import CATEGORIES

TEMPLATES_KIND = "mask-templates"
TEMPLATES_FILE = "templates.jsonl"
# Foreground segmenter: RGB uint8 (H, W, 3) -> bool (H, W). The default is Otsu's threshold (no SAM offline).
Segmenter = Callable[[np.ndarray], np.ndarray]
SHRINK_STEPS = (1.0, 0.8, 0.64, 0.5, 0.4, 0.32, 0.25)
POSITIONS_PER_SCALE = 48
MIN_FOREGROUND_FRACTION = 0.02
# Share of border pixels above Otsu's threshold between which an image counts as a texture filling the frame.
TEXTURE_BORDER = (0.2, 0.8)


class TemplateError(UniDGError):
    """A template library or a placement request that cannot be used."""


@dataclass(frozen=True)
class MaskTemplate:
    id: str
    category: str
    cluster: int
    file: str  # relative to the library folder
    height_ratio: float  # bounding-box height / image height where the mask came from
    width_ratio: float
    source: str  # the UDG quadruplet it came from

    def to_json(self) -> dict:
        return dict(self.__dict__)


def category_folder(category: str) -> str:
    """A file-system name for a category ("black spot" -> "black-spot")."""
    return category.replace(" ", "-")


class TemplateLibrary:
    """A checked library folder: templates by category and cluster."""

    def __init__(self, path: Path, templates: list[MaskTemplate], fingerprint: str = "") -> None:
        self.path = path
        self.templates = templates
        self.fingerprint = fingerprint  # the sha256 of its manifest (every file's hash): what a cache keys on
        self.clusters: dict[str, dict[int, list[MaskTemplate]]] = {}
        for template in templates:
            self.clusters.setdefault(template.category, {}).setdefault(template.cluster, []).append(template)

    @classmethod
    def load(cls, folder: str | Path, *, verify: bool = True) -> TemplateLibrary:
        folder = Path(folder)
        read_library(
            folder,
            TEMPLATES_KIND,
            verify=verify,
            option="--templates",
            build="unidg data templates",
            error=TemplateError,
        )
        templates = []
        for number, line in enumerate((folder / TEMPLATES_FILE).read_text(encoding="utf-8").splitlines(), 1):
            try:
                templates.append(MaskTemplate(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as error:
                raise TemplateError(f"{folder / TEMPLATES_FILE} line {number}: {error}; rebuild the library") from error
        if not templates:
            raise TemplateError(f"--templates {folder} holds no templates; build it from a UDG folder with masks")
        return cls(folder, templates, hashlib.sha256((folder / MANIFEST_FILE).read_bytes()).hexdigest())

    @property
    def categories(self) -> list[str]:
        order = {name: i for i, name in enumerate(CATEGORIES)}
        return sorted(self.clusters, key=lambda name: order.get(name, len(order)))

    def mask(self, template: MaskTemplate) -> np.ndarray:
        """The template's mask, cropped to its bounding box (bool)."""
        with Image.open(self.path / template.file) as image:
            return np.asarray(image.convert("L")) > 127


def otsu_threshold(gray: np.ndarray) -> int:
    """Otsu's threshold of a uint8 image: the level maximising the between-class variance."""
    histogram = np.bincount(gray.ravel(), minlength=256).astype(np.float64)
    levels = np.arange(256, dtype=np.float64)
    weight = np.cumsum(histogram)
    mean = np.cumsum(histogram * levels)
    total, total_mean = weight[-1], mean[-1]
    background = weight[:-1]
    foreground = total - background
    valid = (background > 0) & (foreground > 0)
    between = np.zeros(255)
    between[valid] = (total_mean * background[valid] - total * mean[:-1][valid]) ** 2 / (
        background[valid] * foreground[valid]
    )
    return int(np.argmax(between))


def otsu_foreground(image: np.ndarray) -> np.ndarray:
    """The object of a product photo without a segmentation model: Otsu's threshold on luminance, and the class that
    covers less of the image border is the object. Where both classes share the border (a texture filling the frame)
    or the object is almost nothing or everything, the whole image is foreground."""
    gray = np.asarray(Image.fromarray(image).convert("L"))
    above = gray > otsu_threshold(gray)
    border = np.concatenate([above[0], above[-1], above[:, 0], above[:, -1]]).mean()
    if TEXTURE_BORDER[0] < border < TEXTURE_BORDER[1]:  # both classes along the border: a texture, not an object
        return np.ones_like(above)
    foreground = ~above if border > 0.5 else above
    fraction = foreground.mean()
    if fraction < MIN_FOREGROUND_FRACTION or fraction > 1 - MIN_FOREGROUND_FRACTION:
        return np.ones_like(foreground)
    return foreground


def _scaled(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    if mask.shape == (height, width):
        return mask
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(resized) > 127


def _fit(mask: np.ndarray, foreground: np.ndarray, rng: np.random.Generator) -> tuple[int, int] | None:
    """A top-left corner where every pixel of ``mask`` lies on ``foreground`` (random candidates), or None."""
    height, width = mask.shape
    rows, columns = foreground.shape[0] - height + 1, foreground.shape[1] - width + 1
    if rows < 1 or columns < 1:
        return None
    ys, xs = np.nonzero(foreground[:rows, :columns])  # corners on the foreground: cheap candidates first
    if ys.size == 0:
        return None
    for index in rng.choice(ys.size, size=min(POSITIONS_PER_SCALE, ys.size), replace=False):
        y, x = int(ys[index]), int(xs[index])
        if not (mask & ~foreground[y : y + height, x : x + width]).any():
            return y, x
    return None


def place_template(
    library: TemplateLibrary,
    category: str,
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    foreground: np.ndarray | None = None,
    segmenter: Segmenter = otsu_foreground,
    attempts: int = 20,
) -> tuple[np.ndarray, MaskTemplate]:
    """A bool (H, W) target mask for ``image`` from a template of ``category``, entirely on the foreground."""
    if category not in library.clusters:
        raise TemplateError(
            f"--category {category!r} has no templates in {library.path}; it has: {', '.join(library.categories)}"
        )
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise TemplateError(f"the image must be RGB uint8 (H, W, 3), got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    foreground = segmenter(image) if foreground is None else foreground
    if foreground.shape != (height, width) or not foreground.any():
        raise TemplateError("the foreground mask is empty or not the image's size; pass another segmenter")
    clusters = library.clusters[category]
    labels = sorted(clusters)
    for _ in range(attempts):
        members = clusters[labels[int(rng.integers(len(labels)))]]
        template = members[int(rng.integers(len(members)))]
        mask = library.mask(template)
        box_height = max(1, round(template.height_ratio * height))
        box_width = max(1, round(template.width_ratio * width))
        for shrink in SHRINK_STEPS:
            scaled = _scaled(mask, max(1, round(box_height * shrink)), max(1, round(box_width * shrink)))
            if not scaled.any():
                break
            corner = _fit(scaled, foreground, rng)
            if corner is not None:
                placed = np.zeros((height, width), dtype=bool)
                y, x = corner
                placed[y : y + scaled.shape[0], x : x + scaled.shape[1]] = scaled
                return placed, template
    raise TemplateError(
        f"no template of {category!r} fits inside the foreground of this {width}x{height} image after {attempts} "
        "tries; check the foreground (segmenter) or use a larger image"
    )
