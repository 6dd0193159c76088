"""Shape-prior defect masks after UniADC (App. A.2): rectangle, line, polygon, ellipse, hollow ellipse, random brush,
Perlin noise and the object's foreground.

Every local kind comes in three sizes, as a range of the mask's total area relative to the image (UniADC does not
publish its ranges; these are ours, chosen around the [0.5 %, 1 %] band that Alg. 2 of UniDG scores highest):

    small  [0.3 %, 1.5 %)     medium  [1.5 %, 5 %)     large  [5 %, 15 %]

Local kinds other than Perlin noise have at most two regions (8-connected components). Perlin masks threshold
Perlin noise at the quantile that gives the drawn area, so they hit the range exactly and may have many blobs. The
foreground kind returns the given foreground mask (global defects) and has no size. Masks are deterministic for a
numpy Generator's state. Local shapes are clipped to ``foreground`` when one is given.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

MASK_KINDS: tuple[str, ...] = (
    "rectangle",
    "line",
    "polygon",
    "ellipse",
    "hollow_ellipse",
    "brush",
    "perlin",
    "foreground",
)
LOCAL_KINDS: tuple[str, ...] = MASK_KINDS[:-1]
SIZE_RANGES: dict[str, tuple[float, float]] = {
    "small": (0.003, 0.015),
    "medium": (0.015, 0.05),
    "large": (0.05, 0.15),
}
MAX_REGIONS = 2  # for every kind except Perlin noise and the foreground
_TRIES = 12


# ----------------------------------------------------------------------------------------------------- Perlin noise
def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(
    shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator, octaves: int = 1
) -> np.ndarray:
    """Gradient (Perlin) noise of ``shape`` with ``res`` lattice cells along (y, x) at the first octave; each further
    octave doubles the frequency and halves the amplitude. float32, roughly in [-1, 1]."""
    height, width = shape
    total = np.zeros(shape, dtype=np.float64)
    amplitude = 1.0
    for octave in range(octaves):
        ry, rx = res[0] * 2**octave, res[1] * 2**octave
        angles = rng.uniform(0.0, 2.0 * math.pi, (ry + 1, rx + 1))
        gy, gx = np.sin(angles), np.cos(angles)
        ys = np.arange(height) * (ry / height)
        xs = np.arange(width) * (rx / width)
        yi, xi = ys.astype(np.int64), xs.astype(np.int64)
        yf, xf = (ys - yi)[:, None], (xs - xi)[None, :]

        def corner(dy: int, dx: int, yf=yf, xf=xf, yi=yi, xi=xi, gy=gy, gx=gx) -> np.ndarray:
            rows, cols = (yi + dy)[:, None], (xi + dx)[None, :]
            return gy[rows, cols] * (yf - dy) + gx[rows, cols] * (xf - dx)

        u, v = _fade(yf), _fade(xf)
        top = corner(0, 0) * (1 - v) + corner(0, 1) * v
        bottom = corner(1, 0) * (1 - v) + corner(1, 1) * v
        total += amplitude * math.sqrt(2.0) * (top * (1 - u) + bottom * u)
        amplitude *= 0.5
    return total.astype(np.float32)


# ------------------------------------------------------------------------------------------------------- helpers
def label_regions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """(labels, count) of the 8-connected regions of a bool mask, background excluded. One definition of a "region"
    for the masks' region rule and for the connectivity score of Alg. 2."""
    from scipy import ndimage

    labels, count = ndimage.label(np.asarray(mask, dtype=bool), structure=np.ones((3, 3), dtype=bool))
    return labels, int(count)


def count_regions(mask: np.ndarray) -> int:
    return label_regions(mask)[1]


def keep_largest_regions(mask: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` largest 8-connected regions of ``mask``."""
    labels, found = label_regions(mask)
    if found <= count:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.argsort(-sizes, kind="stable")[:count] + 1
    return np.isin(labels, keep)


def _rotated(points: np.ndarray, angle: float, center: tuple[float, float]) -> list[tuple[float, float]]:
    """Rotate (x, y) points about the origin and move them to ``center`` (x, y)."""
    c, s = math.cos(angle), math.sin(angle)
    x = points[:, 0] * c - points[:, 1] * s + center[0]
    y = points[:, 0] * s + points[:, 1] * c + center[1]
    return list(zip(x.tolist(), y.tolist()))


def _ellipse_points(a: float, b: float, count: int = 48) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * math.pi, count, endpoint=False)
    return np.stack([a * np.cos(t), b * np.sin(t)], axis=1)


def _center(
    rng: np.random.Generator, shape: tuple[int, int], radius: float, allowed: np.ndarray | None
) -> tuple[float, float]:
    """A region centre (x, y) that keeps a shape of bounding ``radius`` inside the image where possible."""
    height, width = shape
    if allowed is not None:
        ys, xs = np.nonzero(allowed)
        i = int(rng.integers(ys.size))
        return float(xs[i]), float(ys[i])
    x_lo, x_hi = min(radius, width / 2), max(width - radius, width / 2)
    y_lo, y_hi = min(radius, height / 2), max(height - radius, height / 2)
    return float(rng.uniform(x_lo, x_hi)), float(rng.uniform(y_lo, y_hi))


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def _stroke_width(rng: np.random.Generator, shape: tuple[int, int], area: float) -> int:
    """Width of line and brush strokes: thin relative to the image, wider for larger areas."""
    side = min(shape)
    return max(1, round(min(_log_uniform(rng, 0.006, 0.03) * side, math.sqrt(area) / 3)))


# ---------------------------------------------------------------------------------------------------- region shapes
def _draw_rectangle(draw, rng, shape, area, allowed) -> None:
    aspect = _log_uniform(rng, 1 / 4, 4)
    w, h = math.sqrt(area * aspect), math.sqrt(area / aspect)
    corners = np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]])
    center = _center(rng, shape, 0.5 * math.hypot(w, h), allowed)
    draw.polygon(_rotated(corners, rng.uniform(0, math.pi), center), fill=255)


def _draw_ellipse(draw, rng, shape, area, allowed) -> None:
    aspect = _log_uniform(rng, 1 / 3, 3)
    a = math.sqrt(area * aspect / math.pi)
    b = area / (math.pi * a)
    center = _center(rng, shape, max(a, b), allowed)
    draw.polygon(_rotated(_ellipse_points(a, b), rng.uniform(0, math.pi), center), fill=255)


def _draw_hollow_ellipse(draw, rng, shape, area, allowed) -> None:
    aspect = _log_uniform(rng, 1 / 2, 2)
    inner = rng.uniform(0.55, 0.8)  # inner/outer axis ratio
    a = math.sqrt(area * aspect / (math.pi * (1 - inner**2)))
    b = area / (math.pi * a * (1 - inner**2))
    inner = min(inner, 1 - 2.0 / min(a, b)) if min(a, b) > 4 else 0.0  # ring at least 2 px thick
    angle = rng.uniform(0, math.pi)
    center = _center(rng, shape, max(a, b), allowed)
    draw.polygon(_rotated(_ellipse_points(a, b, 64), angle, center), fill=255)
    if inner > 0:
        draw.polygon(_rotated(_ellipse_points(a * inner, b * inner, 64), angle, center), fill=0)


def _draw_line(draw, rng, shape, area, allowed) -> None:
    width = _stroke_width(rng, shape, area)
    length = min(area / width, 0.9 * math.hypot(*shape))
    width = max(width, round(area / length))
    half = np.array([[-length / 2, 0.0], [length / 2, 0.0]])
    center = _center(rng, shape, length / 2, allowed)
    draw.line(_rotated(half, rng.uniform(0, math.pi), center), fill=255, width=width)


def _draw_polygon(draw, rng, shape, area, allowed) -> None:
    count = int(rng.integers(3, 9))
    angles = np.sort(rng.uniform(0, 2 * math.pi, count))
    radii = rng.uniform(0.45, 1.0, count)
    points = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    x, y = points[:, 0], points[:, 1]
    unit_area = 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))
    scale = math.sqrt(area / max(unit_area, 1e-3))
    center = _center(rng, shape, scale, allowed)
    draw.polygon(_rotated(points * scale, 0.0, center), fill=255)


def _draw_brush(draw, rng, shape, area, allowed) -> None:
    """A free-form stroke (as in DeepFill v2's masks): a random walk of thick segments with round joints."""
    width = max(2, round(math.sqrt(area) * rng.uniform(0.15, 0.35)))
    vertices = int(rng.integers(3, 8))
    length = area / width / (vertices - 1)
    x, y = _center(rng, shape, length, allowed)
    angle = rng.uniform(0, 2 * math.pi)
    height, full_width = shape
    points = [(x, y)]
    for _ in range(vertices - 1):
        angle += rng.uniform(-2 * math.pi / 5, 2 * math.pi / 5)
        x = float(np.clip(x + length * math.cos(angle), 0, full_width - 1))
        y = float(np.clip(y + length * math.sin(angle), 0, height - 1))
        points.append((x, y))
    draw.line(points, fill=255, width=width)
    radius = width / 2
    for px, py in points:
        draw.ellipse((px - radius, py - radius, px + radius, py + radius), fill=255)


_DRAW = {
    "rectangle": _draw_rectangle,
    "line": _draw_line,
    "polygon": _draw_polygon,
    "ellipse": _draw_ellipse,
    "hollow_ellipse": _draw_hollow_ellipse,
    "brush": _draw_brush,
}


def _perlin_mask(rng: np.random.Generator, shape: tuple[int, int], area: float, allowed: np.ndarray | None):
    cells = int(rng.integers(2, 7))
    noise = perlin_noise(shape, (cells, cells), rng, octaves=int(rng.integers(1, 3)))
    values = noise[allowed] if allowed is not None else noise.ravel()
    fraction = min(area / values.size, 1.0)
    threshold = np.quantile(values, 1.0 - fraction)
    mask = noise >= threshold
    return mask & allowed if allowed is not None else mask


# ------------------------------------------------------------------------------------------------------ public API
def shape_mask(
    kind: str,
    size: str,
    shape: tuple[int, int],
    rng: np.random.Generator,
    foreground: np.ndarray | None = None,
) -> np.ndarray:
    """A bool (H, W) mask of ``kind`` whose area ratio lies in ``SIZE_RANGES[size]``.

    ``foreground``: for kind "foreground" the mask to return (required); for local kinds the region the mask is
    clipped to (e.g. an object on a background). When clipping makes the range unreachable the closest mask of
    several tries is returned; the result is never empty.
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; use one of {', '.join(MASK_KINDS)}")
    height, width = int(shape[0]), int(shape[1])
    if height < 8 or width < 8:
        raise ValueError(f"mask shape must be at least 8x8 (got {height}x{width})")
    allowed = None
    if foreground is not None:
        allowed = np.asarray(foreground, dtype=bool)
        if allowed.shape != (height, width):
            raise ValueError(f"foreground {allowed.shape} must have the mask's shape {(height, width)}")
        if not allowed.any():
            raise ValueError("foreground is empty: pass the object's mask (some pixels True) or None")
    if kind == "foreground":
        if allowed is None:
            raise ValueError('kind "foreground" needs the object foreground mask: pass foreground=...')
        return allowed.copy()
    if size not in SIZE_RANGES:
        raise ValueError(f"unknown mask size {size!r}; use one of {', '.join(SIZE_RANGES)}")
    low, high = SIZE_RANGES[size]
    total = height * width
    best, best_error = None, math.inf
    for _ in range(_TRIES):
        area = _log_uniform(rng, low, high) * total
        if kind == "perlin":
            mask = _perlin_mask(rng, (height, width), area, allowed)
        else:
            regions = 1 if rng.random() < 0.75 else 2
            canvas = Image.new("L", (width, height), 0)
            draw = ImageDraw.Draw(canvas)
            for _region in range(regions):
                _DRAW[kind](draw, rng, (height, width), area / regions, allowed)
            mask = np.asarray(canvas) > 127
            if allowed is not None:
                mask &= allowed
            mask = keep_largest_regions(mask, MAX_REGIONS)
        ratio = np.count_nonzero(mask) / total
        if low <= ratio <= high:
            return mask
        if ratio > 0:
            error = abs(math.log(ratio / low)) if ratio < low else abs(math.log(ratio / high))
            if error < best_error:
                best, best_error = mask, error
    if best is None:
        raise ValueError(f"could not draw a non-empty {kind} mask of size {size} in {height}x{width}")
    return best


def random_shape_mask(
    shape: tuple[int, int],
    rng: np.random.Generator,
    kinds: tuple[str, ...] = LOCAL_KINDS,
    sizes: tuple[str, ...] = tuple(SIZE_RANGES),
    foreground: np.ndarray | None = None,
) -> tuple[np.ndarray, str, str]:
    """A mask of a kind and size drawn uniformly from ``kinds`` and ``sizes``: (mask, kind, size)."""
    kind = kinds[int(rng.integers(len(kinds)))]
    size = sizes[int(rng.integers(len(sizes)))]
    return shape_mask(kind, size, shape, rng, foreground), kind, size
