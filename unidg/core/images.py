"""Loading and checking the four inputs of a request: reference image + mask, source image + target mask.

In memory an image is numpy uint8 (H, W, 3) RGB and a mask is numpy bool (H, W). Every problem raises ``InputError``
naming the input ("reference mask", ...), the file when there is one, and what to do about it. The rules (alpha,
16-bit, greyscale, palette, mask thresholds) are documented in docs/inputs.md.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from unidg.core.errors import UniDGError

REFERENCE_IMAGE = "reference image"
REFERENCE_MASK = "reference mask"
SOURCE_IMAGE = "source image"
TARGET_MASK = "target mask"

MASK_THRESHOLD = 127  # an 8-bit mask pixel is set when its value is > 127
_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


class InputError(UniDGError):
    """A request input is missing, unreadable or unusable. ``name`` is the input, ``path`` its file (if any)."""

    def __init__(self, name: str, problem: str, path: str | Path | None = None) -> None:
        self.name = name
        self.problem = problem
        self.path = None if path is None else str(path)
        where = f"{name} ({self.path})" if self.path is not None else name
        super().__init__(f"{where}: {problem}")


def _open(path: str | Path, name: str) -> Image.Image:
    path = Path(path)
    if not path.exists():
        raise InputError(name, "file not found; check the path", path)
    if not path.is_file():
        raise InputError(name, "is not a file; pass the path of a PNG or JPEG image", path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as error:
        raise InputError(name, f"is not a readable image ({error}); re-export it as PNG or JPEG", path) from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InputError(name, f"is too large to decode safely ({error}); downscale it first", path) from error
    # Cameras store rotation as an EXIF tag; masks are drawn on the displayed (rotated) picture.
    return ImageOps.exif_transpose(image)


def _sixteen_to_eight(values: np.ndarray, name: str, path: str | Path | None) -> np.ndarray:
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise InputError(name, "has integer pixel values outside 0..65535; save it as an 8- or 16-bit PNG", path)
    # v * 255 / 65535 rounded: 0 -> 0, 65535 -> 255, and 257 * k -> k exactly.
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _drop_opaque_alpha(image: Image.Image, name: str, path: str | Path | None, what: str) -> Image.Image:
    rgba = image.convert("RGBA")
    alpha = np.asarray(rgba)[..., 3]
    transparent = int(np.count_nonzero(alpha < 255))
    if transparent:
        raise InputError(
            name,
            f"has {transparent} transparent pixel(s) (alpha < 255); {what}",
            path,
        )
    return rgba.convert("RGB")


def _grey_levels(image: Image.Image, name: str, path: str | Path | None) -> np.ndarray | None:
    """8-bit greyscale values for 16/32-bit integer greyscale modes (Pillow's own conversion clips them)."""
    if image.mode in _SIXTEEN_BIT_MODES:
        return _sixteen_to_eight(np.asarray(image), name, path)
    if image.mode == "F":
        raise InputError(name, "is a floating-point image; save it as an 8- or 16-bit PNG", path)
    return None


STRIPE_BYTES = 1 << 20


def pixels_of(image: Image.Image) -> np.ndarray:
    """An 8-bit RGB or L picture as a uint8 array, copied out in stripes of about 1 MiB: ``np.asarray`` goes through
    ``tobytes``, which holds two more full copies at its peak (96 MiB for a 16.7 MP RGB picture)."""
    width, height = image.size
    channels = len(image.getbands())
    pixels = np.empty((height, width, channels) if channels > 1 else (height, width), dtype=np.uint8)
    rows = max(1, STRIPE_BYTES // (width * channels))
    for top in range(0, height, rows):
        pixels[top : top + rows] = np.asarray(image.crop((0, top, width, min(top + rows, height))))
    return pixels


def image_from_pil(image: Image.Image, name: str = "image", path: str | Path | None = None) -> np.ndarray:
    """A decoded Pillow image as uint8 (H, W, 3) RGB, following the rules of docs/inputs.md."""
    grey = _grey_levels(image, name, path)
    if grey is not None:
        rgb = np.repeat(grey[..., None], 3, axis=2)
    else:
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        if image.mode in _ALPHA_MODES:
            image = _drop_opaque_alpha(
                image, name, path, "flatten it onto a background (e.g. white) and save it without transparency"
            )
        rgb = pixels_of(image if image.mode == "RGB" else image.convert("RGB"))  # no copy of an RGB picture
    return np.ascontiguousarray(rgb, dtype=np.uint8)


def mask_from_pil(image: Image.Image, name: str = "mask", path: str | Path | None = None) -> np.ndarray:
    """A decoded Pillow image as a bool (H, W) mask: set where the (brightest channel's) 8-bit value is > 127."""
    if image.mode == "1":
        return np.asarray(image, dtype=bool).copy()
    levels = _grey_levels(image, name, path)
    if levels is None:
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        if image.mode in _ALPHA_MODES:
            image = _drop_opaque_alpha(
                image, name, path, "a mask must be opaque: save it as a greyscale PNG, white (255) = region"
            )
        if image.mode == "L":
            levels = pixels_of(image)
        else:
            # A coloured annotation (e.g. red on black) counts where any channel is bright.
            levels = np.asarray(image.convert("RGB")).max(axis=2)
    return np.ascontiguousarray(levels > MASK_THRESHOLD)


def load_image(path: str | Path, name: str = "image") -> np.ndarray:
    """Read an image file as uint8 (H, W, 3) RGB. ``name`` ("source image", ...) appears in every error."""
    image = _open(path, name)
    rgb = image_from_pil(image, name, path)
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise InputError(name, "has no pixels", path)
    return rgb


def load_mask(path: str | Path, name: str = "mask", *, allow_full: bool = True) -> np.ndarray:
    """Read a mask file as bool (H, W) (value > 127 is set). Refuses an empty mask, and a full one unless allowed."""
    mask = mask_from_pil(_open(path, name), name, path)
    check_mask_coverage(mask, name, allow_full=allow_full, path=path)
    return mask


def check_mask_coverage(
    mask: np.ndarray, name: str, *, allow_full: bool = True, path: str | Path | None = None
) -> None:
    if not mask.any():
        raise InputError(
            name,
            f"is empty (no pixel brighter than {MASK_THRESHOLD}); mark the region in white (255) on black (0)",
            path,
        )
    if not allow_full and mask.all():
        raise InputError(
            name,
            "covers the whole image, so nothing of the source would be kept; mark only the region where the defect "
            "goes",
            path,
        )


def validate_image(image: object, name: str = "image") -> None:
    """Check an in-memory image: numpy uint8 (H, W, 3) RGB with at least one pixel."""
    if not isinstance(image, np.ndarray):
        raise InputError(name, f"must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise InputError(name, f"must have dtype uint8 (0..255), got {image.dtype}; convert it to 8-bit RGB")
    if image.ndim != 3 or image.shape[2] != 3:
        hint = " (greyscale: repeat it to 3 channels)" if image.ndim == 2 else ""
        hint = " (drop the alpha channel)" if image.ndim == 3 and image.shape[2] == 4 else hint
        raise InputError(name, f"must have shape (H, W, 3) RGB, got {image.shape}{hint}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise InputError(name, f"has no pixels (shape {image.shape})")


def validate_mask(
    mask: object,
    name: str = "mask",
    *,
    image_shape: tuple[int, ...] | None = None,
    image_name: str = "image",
    allow_full: bool = True,
) -> None:
    """Check an in-memory mask: numpy bool (H, W), the size of its image, not empty (and not full unless allowed)."""
    if not isinstance(mask, np.ndarray):
        raise InputError(name, f"must be a numpy array, got {type(mask).__name__}")
    if mask.dtype != np.bool_:
        raise InputError(name, f"must have dtype bool, got {mask.dtype}; convert an 8-bit mask with `mask > 127`")
    if mask.ndim != 2:
        raise InputError(name, f"must have shape (H, W), got {mask.shape}")
    if image_shape is not None and tuple(mask.shape) != tuple(image_shape[:2]):
        raise InputError(
            name,
            f"is {mask.shape[0]}x{mask.shape[1]} (H x W) but the {image_name} is {image_shape[0]}x{image_shape[1]}; "
            "a mask must match its image pixel for pixel",
        )
    check_mask_coverage(mask, name, allow_full=allow_full)


def validate_request(reference: object, reference_mask: object, source: object, target_mask: object) -> None:
    """Check the in-memory inputs of a request (called by the runtime, service and C ABI). Reference and reference
    mask come together, or neither (UniDG-Text's form without a reference)."""
    if (reference is None) != (reference_mask is None):
        given, missing = (REFERENCE_MASK, REFERENCE_IMAGE) if reference is None else (REFERENCE_IMAGE, REFERENCE_MASK)
        raise InputError(missing, f"is missing while the {given} is given; pass both, or neither (instruction only)")
    if reference is not None:
        validate_image(reference, REFERENCE_IMAGE)
        validate_mask(reference_mask, REFERENCE_MASK, image_shape=reference.shape, image_name=REFERENCE_IMAGE)
    validate_image(source, SOURCE_IMAGE)
    validate_mask(target_mask, TARGET_MASK, image_shape=source.shape, image_name=SOURCE_IMAGE, allow_full=False)


def load_request(
    reference: str | Path | None, reference_mask: str | Path | None, source: str | Path, target_mask: str | Path
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray, np.ndarray]:
    """Read and check the files of a request: (reference, reference_mask, source, target_mask) arrays; the reference
    pair may be None (both)."""
    arrays = (
        None if reference is None else load_image(reference, REFERENCE_IMAGE),
        None if reference_mask is None else load_mask(reference_mask, REFERENCE_MASK),
        load_image(source, SOURCE_IMAGE),
        load_mask(target_mask, TARGET_MASK, allow_full=False),
    )
    try:
        validate_request(*arrays)
    except InputError as error:
        paths = {REFERENCE_MASK: reference_mask, TARGET_MASK: target_mask}
        raise InputError(error.name, error.problem, paths.get(error.name)) from error
    return arrays


# Uploads (the HTTP service): only these formats are decoded; other Pillow plugins (EPS runs Ghostscript, TIFF/WebP/BMP/
# GIF bring their own decoders) are never reached.
UPLOAD_FORMATS = ("PNG", "JPEG")


class ImageTooLarge(InputError):
    """An image declares more pixels than the caller accepts (found from its header, before decoding)."""


def open_upload(data: bytes, name: str, *, max_pixels: int) -> Image.Image:
    """Open uploaded bytes as a PNG or JPEG without decoding them: Pillow reads only the header (PNG IHDR, JPEG SOF),
    so the declared size is checked against ``max_pixels`` before any pixel memory is allocated."""
    if not data:
        raise InputError(name, "is an empty file; send a PNG or JPEG image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
    except UnidentifiedImageError as error:
        raise InputError(name, "is not a PNG or JPEG image; only PNG and JPEG are accepted") from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageTooLarge(name, f"is too large to decode safely ({error}); downscale it first") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise InputError(name, f"is not a readable PNG or JPEG image ({error})") from error
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(
            name,
            f"is {width}x{height} = {width * height} pixels; at most {max_pixels} are accepted; downscale it first",
        )
    if width < 1 or height < 1:
        raise InputError(name, "has no pixels")
    return image


def decode_upload(data: bytes, name: str, *, max_pixels: int, as_mask: bool) -> np.ndarray:
    """Uploaded PNG/JPEG bytes as a uint8 RGB image or a bool mask, following the rules of docs/inputs.md; the size is
    checked from the header first (``open_upload``)."""
    image = open_upload(data, name, max_pixels=max_pixels)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise InputError(name, f"is not a readable PNG or JPEG image ({error})") from error
    ImageOps.exif_transpose(image, in_place=True)  # not a copy of an upright picture
    return mask_from_pil(image, name) if as_mask else image_from_pil(image, name)
