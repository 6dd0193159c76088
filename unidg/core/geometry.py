"""Adaptive defect crop, diptych construction and paste-back (paper Alg. 1, Sec. B.1) with numpy and Pillow only.

Reference: ``masked = ref * m + 255 * (1 - m)``; bbox of m; area ratio s = |m| / (H * W);
r = beta + (1 - beta) / T * s if s < T else 1; the bbox grows about its centre so its area grows by 1 / r (each side
by sqrt(1 / r)); crop (white beyond the image); pad to a centred square (white); resize to S.
Source: dilate the target mask (7x7 square, 2 iterations); pad to a centred square and resize the source, the masked
source (dilated region set to 0) and the mask. Diptych: D_src = [ref_S | masked_src_S], D_mask = [0 | mask_S].
The generated right half is mapped back by the inverse of the source's square transform and composited with the
dilated mask, so every pixel outside it is bit-identical to the source.

Resampling: images use Lanczos (Pillow, antialiased when shrinking: keeps the high-frequency defect detail the crop
exists to preserve); masks use an exact "any overlap" area rule: a resized mask pixel is set when its footprint in the
original overlaps any set pixel, so a one-pixel scratch survives any downscale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .images import (
    REFERENCE_IMAGE,
    REFERENCE_MASK,
    SOURCE_IMAGE,
    TARGET_MASK,
    InputError,
    validate_image,
    validate_mask,
    validate_request,
)
from .layout import PATCH as TOKEN_PATCH

WHITE = 255
IMAGE_RESAMPLE = Image.Resampling.LANCZOS
_STRIP_PIXELS = 1 << 22  # rows of the padded square resized per Pillow call

Box = tuple[int, int, int, int]  # (y1, y2, x1, x2), end-exclusive; may reach beyond the image


def mask_bbox(mask: np.ndarray) -> Box:
    """Tight bounding box (y1, y2, x1, x2) of the set pixels, end-exclusive."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("mask is empty: it has no bounding box")
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def crop_ratio(area_ratio: float, beta: float = 0.6, threshold: float = 0.1) -> float:
    """Paper Eq. 8: r = beta + (1 - beta) / T * s for s < T, else 1."""
    if area_ratio < threshold:
        return beta + (1.0 - beta) / threshold * area_ratio
    return 1.0


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def expand_box(box: Box, ratio: float) -> Box:
    """Grow ``box`` about its centre so its area grows by 1 / ratio: each side by sqrt(1 / ratio), rounded half up.

    The growth of a side is split floor(g / 2) before and ceil(g / 2) after, so the result always contains ``box``.
    """
    if not 0 < ratio <= 1:
        raise ValueError(f"crop ratio must be in (0, 1], got {ratio}")
    y1, y2, x1, x2 = box
    scale = math.sqrt(1.0 / ratio)
    height = max(y2 - y1, _round_half_up((y2 - y1) * scale))
    width = max(x2 - x1, _round_half_up((x2 - x1) * scale))
    top = y1 - (height - (y2 - y1)) // 2
    left = x1 - (width - (x2 - x1)) // 2
    return top, top + height, left, left + width


def crop_with_fill(array: np.ndarray, box: Box, fill: int | bool) -> np.ndarray:
    """``array[y1:y2, x1:x2]`` where the box may leave the array: pixels beyond its border are ``fill``."""
    y1, y2, x1, x2 = box
    out = np.full((y2 - y1, x2 - x1) + array.shape[2:], fill, dtype=array.dtype)
    height, width = array.shape[:2]
    sy1, sy2, sx1, sx2 = max(y1, 0), min(y2, height), max(x1, 0), min(x2, width)
    if sy1 < sy2 and sx1 < sx2:
        out[sy1 - y1 : sy2 - y1, sx1 - x1 : sx2 - x1] = array[sy1:sy2, sx1:sx2]
    return out


def pad_to_square(array: np.ndarray, fill: int | bool) -> np.ndarray:
    """Centre ``array`` on a square canvas of side max(H, W) filled with ``fill`` (extra pixel after, when odd)."""
    height, width = array.shape[:2]
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    return crop_with_fill(array, (-top, side - top, -left, side - left), fill)


def resize_image(
    image: np.ndarray, height: int, width: int, box: tuple[float, float, float, float] | None = None
) -> np.ndarray:
    """Lanczos resize of a uint8 (H, W, 3) image; ``box`` = (x0, y0, x1, y1) source region in pixels (Pillow's)."""
    if box is None and image.shape[:2] == (height, width):
        return image.copy()
    resized = Image.fromarray(image).resize((width, height), IMAGE_RESAMPLE, box=box)
    return np.asarray(resized, dtype=np.uint8).copy()


def _window_any(mask: np.ndarray, axis: int, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """out[i] = any(mask[start[i]:end[i]]) along ``axis`` (prefix sums: exact and O(n))."""
    counts = np.cumsum(mask, axis=axis, dtype=np.int64)
    counts = np.concatenate([np.zeros_like(np.take(counts, [0], axis=axis)), counts], axis=axis)
    return (np.take(counts, end, axis=axis) - np.take(counts, start, axis=axis)) > 0


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Area resize of a bool mask: an output pixel is set when its footprint overlaps any set input pixel."""
    out = mask
    for axis, n_out in ((0, height), (1, width)):
        n_in = mask.shape[axis]
        if n_in == n_out:
            continue
        index = np.arange(n_out, dtype=np.int64)
        start = (index * n_in) // n_out
        end = -((-(index + 1) * n_in) // n_out)  # ceil((i + 1) * n_in / n_out)
        out = _window_any(out, axis, start, end)
    return np.ascontiguousarray(out, dtype=bool)


def dilate_mask(mask: np.ndarray, kernel: int = 7, iterations: int = 2) -> np.ndarray:
    """Binary dilation by a kernel x kernel square, ``iterations`` times; the same as ``cv2.dilate`` (anchor at
    kernel // 2, nothing set beyond the border) and, for odd kernels, ``scipy.ndimage.binary_dilation``."""
    if kernel < 1 or iterations < 0:
        raise ValueError(f"dilation needs kernel >= 1 and iterations >= 0, got {kernel} and {iterations}")
    before, after = kernel // 2, kernel - 1 - kernel // 2
    out = np.asarray(mask, dtype=bool)
    for _ in range(iterations):
        for axis in (0, 1):
            n = out.shape[axis]
            index = np.arange(n, dtype=np.int64)
            out = _window_any(out, axis, np.clip(index - before, 0, n), np.clip(index + after + 1, 0, n))
    return np.ascontiguousarray(out)


def dilated_target_mask(target_mask: np.ndarray, kernel: int = 7, iterations: int = 2) -> np.ndarray:
    """The dilated target mask (the pixels a result may change); refuses one that leaves no source pixel."""
    dilated = dilate_mask(target_mask, kernel, iterations)
    if dilated.all():
        reach = iterations * (kernel // 2)
        raise InputError(
            TARGET_MASK,
            f"covers the whole image once dilated ({kernel}x{kernel}, {iterations} iterations: {reach} px around "
            "every marked pixel), so nothing of the source would be kept; mark a smaller region, leaving part of the "
            f"image more than {reach} px away from it",
        )
    return dilated


@dataclass(frozen=True)
class SquareTransform:
    """Crop ``box`` out of an (height x width) image (fill beyond its border), centre it on a square of side
    max(box height, box width) (fill again), resize that square to ``size`` x ``size``; and the inverse."""

    height: int
    width: int
    box: Box
    size: int

    @classmethod
    def whole(cls, height: int, width: int, size: int) -> SquareTransform:
        return cls(height, width, (0, height, 0, width), size)

    @property
    def box_height(self) -> int:
        return self.box[1] - self.box[0]

    @property
    def box_width(self) -> int:
        return self.box[3] - self.box[2]

    @property
    def side(self) -> int:
        return max(self.box_height, self.box_width)

    @property
    def pad_top(self) -> int:
        return (self.side - self.box_height) // 2

    @property
    def pad_left(self) -> int:
        return (self.side - self.box_width) // 2

    @property
    def content_box(self) -> tuple[float, float, float, float]:
        """Where the box lands in the size x size square, as Pillow's (x0, y0, x1, y1), in (fractional) pixels."""
        scale = self.size / self.side
        return (
            self.pad_left * scale,
            self.pad_top * scale,
            (self.pad_left + self.box_width) * scale,
            (self.pad_top + self.box_height) * scale,
        )

    def _square(self, array: np.ndarray, fill: int | bool) -> np.ndarray:
        self._check_shape(array)
        return pad_to_square(crop_with_fill(array, self.box, fill), fill)

    def _check_shape(self, array: np.ndarray) -> None:
        if array.shape[:2] != (self.height, self.width):
            raise ValueError(f"expected a {self.height}x{self.width} array, got {array.shape[0]}x{array.shape[1]}")

    def _content(self) -> tuple[Box, int, int]:
        """The part of the image inside the box (y1, y2, x1, x2), and the row and column where its top-left corner
        lands in the side x side square. Everything else in the square is fill."""
        y1, _, x1, _ = self.box
        inside = (max(y1, 0), min(self.box[1], self.height), max(x1, 0), min(self.box[3], self.width))
        return inside, self.pad_top + inside[0] - y1, self.pad_left + inside[2] - x1

    def forward_image(self, image: np.ndarray, fill: int = WHITE) -> np.ndarray:
        """``resize_image(square, size, size)`` of the padded square, computed without building the square.

        Pillow resamples horizontally, then vertically: rows are resized one strip at a time (a fill row once), and
        the side x size result is resized vertically, so memory grows with side x size, not side x side.
        """
        if self.side == self.size:  # no resampling: the square is only size x size
            return resize_image(self._square(image, fill), self.size, self.size)
        self._check_shape(image)
        (iy1, iy2, ix1, ix2), top, left = self._content()
        fill_row = resize_image(np.full((1, self.side, 3), fill, np.uint8), 1, self.size)
        rows = np.empty((self.side, self.size, 3), np.uint8)
        rows[:] = fill_row
        step = max(1, _STRIP_PIXELS // self.side)
        for start in range(iy1, iy2, step):
            stop = min(start + step, iy2)
            strip = np.full((stop - start, self.side, 3), fill, np.uint8)
            strip[:, left : left + ix2 - ix1] = image[start:stop, ix1:ix2]
            rows[top + start - iy1 : top + stop - iy1] = resize_image(strip, stop - start, self.size)
        return resize_image(rows, self.size, self.size)

    def forward_mask(self, mask: np.ndarray) -> np.ndarray:
        """``resize_mask(square, size, size)`` of the padded square, from the windows' overlap with the image part."""
        self._check_shape(mask)
        (iy1, iy2, ix1, ix2), top, left = self._content()
        out = np.asarray(mask[iy1:iy2, ix1:ix2], dtype=bool)
        # Shrink the longer axis first: the intermediate then stays small.
        axes = ((0, top), (1, left)) if out.shape[0] >= out.shape[1] else ((1, left), (0, top))
        for axis, offset in axes:
            n = out.shape[axis]
            index = np.arange(self.size, dtype=np.int64)
            start = (index * self.side) // self.size
            end = -((-(index + 1) * self.side) // self.size)  # ceil((i + 1) * side / size)
            out = _window_any(out, axis, np.clip(start - offset, 0, n), np.clip(end - offset, 0, n))
        return np.ascontiguousarray(out, dtype=bool)

    def inverse_image(self, square: np.ndarray) -> np.ndarray:
        """The size x size image back at the box's own size (box height x box width): pad cut off, resized back."""
        if square.shape[:2] != (self.size, self.size):
            raise ValueError(f"expected a {self.size}x{self.size} image, got {square.shape[0]}x{square.shape[1]}")
        if self.side == self.size:  # no resampling happened: cut the pad off exactly
            return square[
                self.pad_top : self.pad_top + self.box_height, self.pad_left : self.pad_left + self.box_width
            ].copy()
        return resize_image(square, self.box_height, self.box_width, box=self.content_box)


@dataclass(frozen=True, eq=False)
class ReferenceCrop:
    image: np.ndarray  # (S, S, 3) uint8: masked reference, cropped, padded, resized (I_ref^final)
    mask: np.ndarray  # (S, S) bool: the reference mask through the same geometry
    bbox: Box  # tight bbox of the reference mask in the reference
    area_ratio: float  # s = |m| / (H * W)
    crop_ratio: float  # r (Eq. 8)
    box: Box  # the expanded crop box in the reference (may reach beyond it)
    transform: SquareTransform


def adaptive_reference_crop(
    reference: np.ndarray,
    reference_mask: np.ndarray,
    size: int,
    beta: float = 0.6,
    threshold: float = 0.1,
    *,
    validated: bool = False,
) -> ReferenceCrop:
    """Alg. 1 lines 1-12: the defect of ``reference`` (marked by ``reference_mask``) with adaptive context, S x S.
    ``validated``: the caller checked the two arrays already."""
    if not validated:
        validate_image(reference, REFERENCE_IMAGE)
        validate_mask(reference_mask, REFERENCE_MASK, image_shape=reference.shape, image_name=REFERENCE_IMAGE)
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    height, width = reference_mask.shape
    bbox = mask_bbox(reference_mask)
    area_ratio = float(np.count_nonzero(reference_mask)) / float(height * width)
    ratio = crop_ratio(area_ratio, beta, threshold)
    box = expand_box(bbox, ratio)
    transform = SquareTransform(height, width, box, size)
    masked = np.where(reference_mask[..., None], reference, np.uint8(WHITE))
    return ReferenceCrop(
        image=transform.forward_image(masked, WHITE),
        mask=transform.forward_mask(reference_mask),
        bbox=bbox,
        area_ratio=area_ratio,
        crop_ratio=ratio,
        box=box,
        transform=transform,
    )


@dataclass(frozen=True, eq=False)
class Diptych:
    image: np.ndarray  # (S, 2S, 3) uint8 D_src = [ref_S | masked_src_S]
    mask: np.ndarray  # (S, 2S) bool D_mask = [0 | mask_S]
    reference: ReferenceCrop
    source_square: np.ndarray  # (S, S, 3) uint8 I_src^final (unmasked)
    target_mask_square: np.ndarray  # (S, S) bool M_src^final (dilated, resized)
    dilated_mask: np.ndarray  # (H, W) bool, source size: the only pixels paste_back may change
    transform: SquareTransform  # source (H, W) <-> right half (S, S)

    @property
    def size(self) -> int:
        return self.transform.size

    @property
    def masked_source_square(self) -> np.ndarray:
        return self.image[:, self.size :]


def build_diptych(
    reference: np.ndarray,
    reference_mask: np.ndarray,
    source: np.ndarray,
    target_mask: np.ndarray,
    size: int,
    beta: float = 0.6,
    threshold: float = 0.1,
    dilate_kernel: int = 7,
    dilate_iterations: int = 2,
    masked_value: int = 0,
    *,
    validated: bool = False,
) -> Diptych:
    """Alg. 1: the S x 2S diptych of a request. ``masked_value`` fills the dilated region of the masked source
    (0 as in Alg. 1 line 16, ``I_src * not(M_src)``). ``validated``: the caller checked the four arrays already."""
    if not validated:
        validate_request(reference, reference_mask, source, target_mask)
    _check_diptych_size(size)
    crop = adaptive_reference_crop(reference, reference_mask, size, beta, threshold, validated=True)
    return _diptych_with(crop, source, target_mask, size, dilate_kernel, dilate_iterations, masked_value)


def blank_reference(size: int) -> ReferenceCrop:
    """The left half of a diptych without a reference (UniDG-Text's second form, paper B.3): pure black, no defect."""
    return ReferenceCrop(
        image=np.zeros((size, size, 3), np.uint8),
        mask=np.zeros((size, size), bool),
        bbox=(0, 0, 0, 0),
        area_ratio=0.0,
        crop_ratio=1.0,
        box=(0, 0, 0, 0),
        transform=SquareTransform.whole(size, size, size),
    )


def build_text_diptych(
    source: np.ndarray,
    target_mask: np.ndarray,
    size: int,
    dilate_kernel: int = 7,
    dilate_iterations: int = 2,
    masked_value: int = 0,
) -> Diptych:
    """The diptych of an instruction without a reference: a black left half beside the masked source (paper B.3)."""
    validate_image(source, SOURCE_IMAGE)
    validate_mask(target_mask, TARGET_MASK, image_shape=source.shape, image_name=SOURCE_IMAGE)
    _check_diptych_size(size)
    return _diptych_with(
        blank_reference(size), source, target_mask, size, dilate_kernel, dilate_iterations, masked_value
    )


def _check_diptych_size(size: int) -> None:
    if size < TOKEN_PATCH or size % TOKEN_PATCH:
        raise ValueError(f"diptych size S must be a positive multiple of {TOKEN_PATCH}, got {size}")


def _diptych_with(
    crop: ReferenceCrop,
    source: np.ndarray,
    target_mask: np.ndarray,
    size: int,
    dilate_kernel: int,
    dilate_iterations: int,
    masked_value: int,
) -> Diptych:
    """[left half | masked source square] with the source half's geometry (Alg. 1 lines 13-18)."""
    dilated = dilated_target_mask(target_mask, dilate_kernel, dilate_iterations)
    transform = SquareTransform.whole(source.shape[0], source.shape[1], size)
    masked_source = np.where(dilated[..., None], np.uint8(masked_value), source)
    target_square = transform.forward_mask(dilated)
    return Diptych(
        image=np.concatenate([crop.image, transform.forward_image(masked_source, WHITE)], axis=1),
        mask=np.concatenate([np.zeros_like(target_square), target_square], axis=1),
        reference=crop,
        source_square=transform.forward_image(source, WHITE),
        target_mask_square=target_square,
        dilated_mask=dilated,
        transform=transform,
    )


def _check_source_sized(array: np.ndarray, diptych: Diptych, name: str) -> None:
    validate_image(array, name)
    expected = (diptych.transform.height, diptych.transform.width)
    if array.shape[:2] != expected:
        raise InputError(
            name, f"is {array.shape[0]}x{array.shape[1]} but the diptych's source is {expected[0]}x{expected[1]}"
        )


def result_diptych(diptych: Diptych, abnormal: np.ndarray) -> np.ndarray:
    """Training target D_res = [ref_S | Resize(PadToSquare(abnormal))]; ``abnormal`` has the source's size."""
    _check_source_sized(abnormal, diptych, "abnormal image")
    return np.concatenate([diptych.reference.image, diptych.transform.forward_image(abnormal, WHITE)], axis=1)


def right_half(diptych_image: np.ndarray) -> np.ndarray:
    """The generated (target) half of an S x 2S diptych image."""
    size = diptych_image.shape[0]
    if diptych_image.shape[1] != 2 * size:
        raise ValueError(f"expected an S x 2S diptych image, got {diptych_image.shape[0]}x{diptych_image.shape[1]}")
    return diptych_image[:, size:]


def defect_token_mask(diptych: Diptych, patch: int = TOKEN_PATCH) -> np.ndarray:
    """(S/patch * 2S/patch,) bool, row-major over the diptych's token grid: a token is in the defect region when any
    pixel of its patch is set in the mapped reference mask (left half) or the resized target mask (right half)."""
    size = diptych.size
    if size % patch:
        raise ValueError(f"diptych size {size} is not a multiple of the token patch {patch}")
    regions = np.concatenate([diptych.reference.mask, diptych.target_mask_square], axis=1)
    rows, columns = size // patch, 2 * size // patch  # patch may differ from a token (e.g. latent pixels)
    grid = regions.reshape(rows, patch, columns, patch).any(axis=(1, 3))
    return grid.reshape(-1)


def paste_back(diptych: Diptych, generated_right: np.ndarray, source: np.ndarray) -> np.ndarray:
    """The generated right half (S x S) back at the source's size and place; source pixels outside the dilated mask
    are kept bit for bit."""
    _check_source_sized(source, diptych, "source image")
    validate_image(generated_right, "generated image")
    if generated_right.shape[:2] != (diptych.size, diptych.size):
        raise InputError(
            "generated image",
            f"must be the {diptych.size}x{diptych.size} right half of the diptych, got "
            f"{generated_right.shape[0]}x{generated_right.shape[1]} (use right_half() on a full diptych)",
        )
    restored = diptych.transform.inverse_image(generated_right)
    return np.where(diptych.dilated_mask[..., None], restored, source)
