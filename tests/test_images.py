"""Input loading and checks: every refusal names the input (and its file) and says what to do."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unidg.core.images import (
    InputError,
    load_image,
    load_mask,
    load_request,
    validate_request,
)


def write_png16(path: Path, values: np.ndarray, color_type: int) -> Path:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit colour): color_type 0 grey, 2 RGB, 6 RGBA."""
    height, width = values.shape[:2]
    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )
    return path


def rgb(height: int = 6, width: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    (Image.fromarray(array).convert(mode) if mode else Image.fromarray(array)).save(path)
    return path


def square_mask(height: int = 6, width: int = 8) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[1:3, 2:5] = 255
    return mask


# ------------------------------------------------------------------------------------------------------ accepted
def test_rgb_png_round_trips(tmp_path):
    image = rgb()
    np.testing.assert_array_equal(load_image(save(tmp_path / "a.png", image), "source image"), image)


def test_greyscale_and_palette_become_rgb(tmp_path):
    grey = rgb()[..., 0]
    loaded = load_image(save(tmp_path / "g.png", grey), "source image")
    assert loaded.shape == (6, 8, 3) and loaded.dtype == np.uint8
    np.testing.assert_array_equal(loaded, np.repeat(grey[..., None], 3, axis=2))
    image = rgb()
    Image.fromarray(image).quantize(256).save(tmp_path / "p.png")
    palette = load_image(tmp_path / "p.png", "reference image")
    assert palette.shape == (6, 8, 3)
    np.testing.assert_array_equal(palette, np.asarray(Image.open(tmp_path / "p.png").convert("RGB")))


def test_opaque_alpha_is_dropped(tmp_path):
    image = rgb()
    rgba = np.concatenate([image, np.full((6, 8, 1), 255, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "opaque.png")
    np.testing.assert_array_equal(load_image(tmp_path / "opaque.png", "reference image"), image)


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 4096, 32768, 65535]], np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    loaded = load_image(tmp_path / "g16.png", "source image")
    # round(v * 255 / 65535): Pillow's own convert("L") would clip 4096 and 32768 to 255
    np.testing.assert_array_equal(loaded[0, :, 0], [0, 1, 16, 128, 255])


def test_16_bit_colour_is_read_as_8_bit(tmp_path):
    values = np.zeros((2, 3, 3), np.uint16)
    values[0, 0] = [65535, 257 * 10, 300]
    values[1, 2] = [32768, 128, 257 * 200]
    loaded = load_image(write_png16(tmp_path / "c16.png", values, 2), "reference image")
    assert loaded.dtype == np.uint8 and loaded.shape == (2, 3, 3)
    np.testing.assert_array_equal(loaded[0, 0], [255, 10, 1])
    np.testing.assert_array_equal(loaded[1, 2], [128, 0, 200])


def test_masks_threshold_at_127_from_any_mode(tmp_path):
    levels = np.array([[0, 127, 128, 255]], np.uint8)
    np.testing.assert_array_equal(load_mask(save(tmp_path / "m.png", levels), "target mask"), [[0, 0, 1, 1]])
    red = np.zeros((1, 4, 3), np.uint8)
    red[0, 2:, 0] = 255  # a red annotation on black
    np.testing.assert_array_equal(load_mask(save(tmp_path / "r.png", red), "target mask"), [[0, 0, 1, 1]])
    Image.fromarray(levels > 127).save(tmp_path / "b.png")  # mode "1"
    np.testing.assert_array_equal(load_mask(tmp_path / "b.png", "target mask"), [[0, 0, 1, 1]])
    values16 = np.array([[0, 32767, 32768, 65535]], np.uint16)
    Image.fromarray(values16).save(tmp_path / "m16.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "m16.png", "reference mask"), [[0, 0, 1, 1]])


def test_load_request_reads_all_four(tmp_path):
    arrays = load_request(
        save(tmp_path / "ref.png", rgb(seed=1)),
        save(tmp_path / "ref_mask.png", square_mask()),
        save(tmp_path / "src.png", rgb(10, 12, seed=2)),
        save(tmp_path / "tgt.png", square_mask(10, 12)),
    )
    assert [a.shape for a in arrays] == [(6, 8, 3), (6, 8), (10, 12, 3), (10, 12)]
    assert [a.dtype for a in arrays] == [np.uint8, bool, np.uint8, bool]


# ------------------------------------------------------------------------------------------------------ refused
def test_missing_file_names_the_input(tmp_path):
    with pytest.raises(InputError, match=r"^reference image \(.*nope\.png\): file not found") as caught:
        load_image(tmp_path / "nope.png", "reference image")
    assert caught.value.name == "reference image" and caught.value.path.endswith("nope.png")
    with pytest.raises(InputError, match="target mask .*not a file"):
        load_mask(tmp_path, "target mask")


def test_corrupt_png_names_the_input(tmp_path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image " * 3)
    with pytest.raises(InputError, match=r"source image \(.*x\.png\): is not a readable image.*re-export"):
        load_image(tmp_path / "x.png", "source image")
    (tmp_path / "y.png").write_bytes(np.random.default_rng(0).bytes(300))
    with pytest.raises(InputError, match="reference mask .*not a readable image"):
        load_mask(tmp_path / "y.png", "reference mask")


def test_truncated_png_names_the_input(tmp_path):
    save(tmp_path / "full.png", rgb(64, 64))
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="source image .*cut.png.*not a readable image"):
        load_image(tmp_path / "cut.png", "source image")


def test_transparent_rgba_is_refused(tmp_path):
    rgba = np.concatenate([rgb(), np.full((6, 8, 1), 255, np.uint8)], axis=2)
    rgba[0, 0, 3] = 10
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    with pytest.raises(InputError, match=r"reference image \(.*t\.png\): has 1 transparent pixel.*flatten"):
        load_image(tmp_path / "t.png", "reference image")
    with pytest.raises(InputError, match="target mask .*transparent.*greyscale PNG"):
        load_mask(tmp_path / "t.png", "target mask")


def test_empty_mask_is_refused(tmp_path):
    save(tmp_path / "empty.png", np.full((6, 8), 100, np.uint8))  # all dark grey: nothing > 127
    with pytest.raises(InputError, match=r"reference mask \(.*empty\.png\): is empty"):
        load_mask(tmp_path / "empty.png", "reference mask")


def test_full_target_mask_is_refused(tmp_path):
    path = save(tmp_path / "full.png", np.full((6, 8), 255, np.uint8))
    assert load_mask(path, "reference mask").all()  # a reference defect may fill its picture
    with pytest.raises(InputError, match="target mask .*covers the whole image"):
        load_mask(path, "target mask", allow_full=False)
    with pytest.raises(InputError, match="^target mask: covers the whole image"):
        validate_request(rgb(), square_mask() > 0, rgb(), np.ones((6, 8), bool))


def test_mask_size_mismatch_is_refused(tmp_path):
    with pytest.raises(InputError, match=r"target mask \(.*tgt\.png\): is 6x8 .* source image is 10x12"):
        load_request(
            save(tmp_path / "ref.png", rgb()),
            save(tmp_path / "ref_mask.png", square_mask()),
            save(tmp_path / "src.png", rgb(10, 12)),
            save(tmp_path / "tgt.png", square_mask()),
        )
    with pytest.raises(InputError, match="reference mask: is 6x7 .* reference image is 6x8"):
        validate_request(rgb(), np.ones((6, 7), bool), rgb(), square_mask() > 0)


def test_float_image_file_is_refused(tmp_path):
    Image.fromarray(np.ones((4, 4), np.float32)).save(tmp_path / "f.tiff")
    with pytest.raises(InputError, match="source image .*floating-point"):
        load_image(tmp_path / "f.tiff", "source image")


@pytest.mark.parametrize(
    ("arrays", "pattern"),
    [
        ((rgb().astype(np.float32), square_mask() > 0, rgb(), square_mask() > 0), "reference image: must have dtype"),
        ((rgb(), square_mask(), rgb(), square_mask() > 0), "reference mask: must have dtype bool.*mask > 127"),
        ((rgb(), square_mask() > 0, rgb()[..., 0], square_mask() > 0), "source image: .*greyscale"),
        ((rgb(), square_mask() > 0, np.zeros((6, 8, 4), np.uint8), square_mask() > 0), "source image: .*alpha"),
        ((rgb(), square_mask() > 0, rgb(), np.zeros((6, 8), bool)), "target mask: is empty"),
        (([[1]], square_mask() > 0, rgb(), square_mask() > 0), "reference image: must be a numpy array"),
    ],
)
def test_validate_request_names_the_input(arrays, pattern):
    with pytest.raises(InputError, match=pattern):
        validate_request(*arrays)
