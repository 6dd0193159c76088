"""Alg. 1 geometry: hand-worked crop boxes, square transforms, dilation, diptych layout, tokens and paste-back."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
from scipy import ndimage

from unidg.core import geometry
from unidg.core.geometry import (
    SquareTransform,
    adaptive_reference_crop,
    build_diptych,
    crop_ratio,
    crop_with_fill,
    defect_token_mask,
    dilate_mask,
    expand_box,
    mask_bbox,
    pad_to_square,
    paste_back,
    resize_image,
    resize_mask,
    result_diptych,
    right_half,
)
from unidg.core.images import InputError


def noise(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def smooth(height: int, width: int) -> np.ndarray:
    """A low-frequency RGB picture: resampling round trips nearly reproduce it."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = [
        128 + 90 * np.sin(y / height * 2.1 + x / width * 1.3),
        128 + 90 * np.cos(x / width * 2.7),
        60 + 120 * y / height,
    ]
    return np.clip(np.stack(channels, axis=2), 0, 255).round().astype(np.uint8)


def box_mask(height: int, width: int, *boxes: tuple[int, int, int, int]) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    for y1, y2, x1, x2 in boxes:
        mask[y1:y2, x1:x2] = True
    return mask


# ------------------------------------------------------------------------------------------------ reference crop
def test_small_defect_expands_by_hand_worked_numbers():
    # 20 x 10 defect in a 100 x 100 reference: s = 200 / 10000 = 0.02 < T = 0.1
    # r = 0.6 + 0.4 / 0.1 * 0.02 = 0.68; sqrt(1 / 0.68) = 1.21268
    # height 20 * 1.21268 = 24.25 -> 24 (grow 4: 2 above, 2 below); width 10 * 1.21268 = 12.13 -> 12 (grow 2: 1 + 1)
    reference = noise((100, 100, 3))
    mask = box_mask(100, 100, (40, 60, 30, 40))
    crop = adaptive_reference_crop(reference, mask, size=24)
    assert crop.bbox == (40, 60, 30, 40)
    assert crop.area_ratio == pytest.approx(0.02)
    assert crop.crop_ratio == pytest.approx(0.68)
    assert crop.box == (38, 62, 29, 41)
    # 24 x 12 box, padded to a 24 x 24 square with 6 white columns each side; S = 24 -> no resampling
    assert crop.transform.side == 24 and crop.transform.pad_left == 6 and crop.transform.pad_top == 0
    expected = np.full((24, 24, 3), 255, np.uint8)
    expected[2:22, 7:17] = reference[40:60, 30:40]  # defect pixels; its context is white (masked reference)
    np.testing.assert_array_equal(crop.image, expected)
    np.testing.assert_array_equal(crop.mask, (expected != 255).any(axis=2) | box_mask(24, 24, (2, 22, 7, 17)))
    assert crop.mask.sum() == 200


def test_large_defect_is_not_expanded():
    # 40 x 30 defect in 100 x 100: s = 0.12 >= T -> r = 1, box = bbox
    reference = noise((100, 100, 3), 1)
    mask = box_mask(100, 100, (10, 50, 20, 50))
    crop = adaptive_reference_crop(reference, mask, size=40)
    assert crop.area_ratio == pytest.approx(0.12)
    assert crop.crop_ratio == 1.0
    assert crop.box == crop.bbox == (10, 50, 20, 50)
    np.testing.assert_array_equal(crop.image[:, 5:35], reference[10:50, 20:50])
    assert (crop.image[:, :5] == 255).all() and (crop.image[:, 35:] == 255).all()


def test_threshold_boundary_and_beta():
    assert crop_ratio(0.0) == pytest.approx(0.6)
    assert crop_ratio(0.05) == pytest.approx(0.8)
    assert crop_ratio(0.1) == 1.0
    assert crop_ratio(0.5, beta=0.3, threshold=0.6) == pytest.approx(0.3 + 0.7 / 0.6 * 0.5)


def test_expanded_area_grows_by_one_over_r():
    for ratio in (0.6, 0.7, 0.85):
        y1, y2, x1, x2 = expand_box((100, 300, 100, 260), ratio)
        assert (y2 - y1) * (x2 - x1) == pytest.approx(200 * 160 / ratio, rel=0.01)
        assert (y1 + y2) / 2 == pytest.approx(200, abs=0.5) and (x1 + x2) / 2 == pytest.approx(180, abs=0.5)


def test_defect_at_the_border_is_filled_white_beyond_the_image():
    # 16 x 16 defect at the top-left corner of a 160 x 320 reference: s = 256 / 51200 = 0.005
    # r = 0.6 + 4 * 0.005 = 0.62; 16 / sqrt(0.62) = 20.32 -> 20: grow 4 -> box (-2, 18, -2, 18)
    reference = noise((160, 320, 3), 2)
    mask = box_mask(160, 320, (0, 16, 0, 16))
    crop = adaptive_reference_crop(reference, mask, size=20)
    assert crop.crop_ratio == pytest.approx(0.62)
    assert crop.box == (-2, 18, -2, 18)
    assert (crop.image[:2] == 255).all() and (crop.image[:, :2] == 255).all()  # beyond the image
    assert (crop.image[18:] == 255).all() and (crop.image[:, 18:] == 255).all()  # inside, outside the mask
    np.testing.assert_array_equal(crop.image[2:18, 2:18], reference[:16, :16])
    np.testing.assert_array_equal(crop.mask, box_mask(20, 20, (2, 18, 2, 18)))


def test_multi_component_mask_uses_the_union():
    # two 5 x 5 blobs: bbox (10, 35, 10, 55), 25 x 45; s = 50 / 10000 = 0.005 -> r = 0.62, scale 1.27000
    # height 31.75 -> 32 (grow 7: 3 above), width 57.15 -> 57 (grow 12: 6 left) -> box (7, 39, 4, 61)
    reference = noise((100, 100, 3), 3)
    mask = box_mask(100, 100, (10, 15, 10, 15), (30, 35, 50, 55))
    crop = adaptive_reference_crop(reference, mask, size=57)
    assert crop.bbox == (10, 35, 10, 55)
    assert crop.box == (7, 39, 4, 61)
    # 32 x 57 box on a 57 x 57 square: 12 white rows on top
    assert crop.transform.pad_top == 12 and crop.transform.pad_left == 0
    np.testing.assert_array_equal(crop.image[12 + 3 : 12 + 8, 6:11], reference[10:15, 10:15])
    np.testing.assert_array_equal(crop.image[12 + 23 : 12 + 28, 46:51], reference[30:35, 50:55])
    assert (crop.image[12 + 10 : 12 + 20, 6:51] == 255).all()  # between the blobs: masked out -> white
    assert crop.mask.sum() == 50


def test_reference_crop_resized_keeps_thin_defects():
    reference = noise((400, 400, 3), 4)
    mask = np.zeros((400, 400), bool)
    mask[100, 50:350] = True  # a one-pixel scratch
    crop = adaptive_reference_crop(reference, mask, size=32)
    assert crop.mask.any(axis=1).sum() >= 1 and crop.mask.any(axis=0).sum() >= 20


def test_crop_pad_and_bbox_helpers():
    image = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(crop_with_fill(image, (-1, 2, 2, 5), 99), [[99, 99, 99], [2, 3, 99], [6, 7, 99]])
    np.testing.assert_array_equal(pad_to_square(image, 0)[:, :], np.vstack([image, np.zeros((1, 4), np.uint8)]))
    assert pad_to_square(np.ones((2, 5), bool), False).sum(axis=1).tolist() == [0, 5, 5, 0, 0]
    assert mask_bbox(box_mask(9, 9, (2, 3, 4, 8))) == (2, 3, 4, 8)
    with pytest.raises(ValueError):
        mask_bbox(np.zeros((3, 3), bool))


# ------------------------------------------------------------------------------------------------------ masks
@pytest.mark.parametrize("seed", range(4))
def test_dilation_equals_scipy_binary_dilation(seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((37, 53)) < 0.01
    mask[0, rng.integers(53)] = True  # a pixel on the border
    expected = ndimage.binary_dilation(mask, structure=np.ones((7, 7), bool), iterations=2)
    np.testing.assert_array_equal(dilate_mask(mask, 7, 2), expected)
    np.testing.assert_array_equal(
        dilate_mask(mask, 3, 1), ndimage.binary_dilation(mask, structure=np.ones((3, 3), bool))
    )


def test_dilation_of_one_pixel_is_a_13_square():
    mask = box_mask(40, 40, (20, 21, 20, 21))
    np.testing.assert_array_equal(dilate_mask(mask), box_mask(40, 40, (14, 27, 14, 27)))
    np.testing.assert_array_equal(dilate_mask(mask, 7, 0), mask)


def test_resize_mask_any_overlap():
    mask = np.zeros((8, 8), bool)
    mask[3, 3] = True
    # 8 -> 4: footprint 2x2, pixel (3, 3) lies in output (1, 1)
    np.testing.assert_array_equal(resize_mask(mask, 4, 4), box_mask(4, 4, (1, 2, 1, 2)))
    # 8 -> 3: footprints [0, 8/3), [8/3, 16/3), [16/3, 8): pixel 3 overlaps only the middle one
    np.testing.assert_array_equal(resize_mask(mask, 3, 3), box_mask(3, 3, (1, 2, 1, 2)))
    # 8 -> 16: nearest (2x)
    np.testing.assert_array_equal(resize_mask(mask, 16, 16), box_mask(16, 16, (6, 8, 6, 8)))


# --------------------------------------------------------------------------------------------------- diptych
def request(height: int, width: int, target: tuple[int, int, int, int], seed: int = 0):
    reference = noise((90, 120, 3), seed)
    reference_mask = box_mask(90, 120, (30, 50, 40, 70))
    source = smooth(height, width)
    return reference, reference_mask, source, box_mask(height, width, target)


@pytest.mark.parametrize(("height", "width"), [(48, 64), (64, 48)])
def test_diptych_layout_for_landscape_and_portrait_sources(height, width):
    reference, reference_mask, source, target = request(height, width, (20, 24, 20, 24))
    diptych = build_diptych(reference, reference_mask, source, target, size=64)
    assert diptych.image.shape == (64, 128, 3) and diptych.mask.shape == (64, 128)
    assert diptych.image.dtype == np.uint8 and diptych.mask.dtype == bool
    assert not diptych.mask[:, :64].any()
    np.testing.assert_array_equal(diptych.image[:, :64], diptych.reference.image)
    dilated = box_mask(height, width, (14, 30, 14, 30))
    np.testing.assert_array_equal(diptych.dilated_mask, dilated)
    # side 64 = S: the right half is the padded source itself (white pad centred), the dilated region black
    top, left = (64 - height) // 2, (64 - width) // 2
    assert (top, left) in ((8, 0), (0, 8))
    expected = np.full((64, 64, 3), 255, np.uint8)
    expected[top : top + height, left : left + width] = np.where(dilated[..., None], 0, source)
    np.testing.assert_array_equal(right_half(diptych.image), expected)
    expected_mask = np.zeros((64, 64), bool)
    expected_mask[top : top + height, left : left + width] = dilated
    np.testing.assert_array_equal(diptych.mask[:, 64:], expected_mask)
    np.testing.assert_array_equal(diptych.target_mask_square, expected_mask)


@pytest.mark.parametrize(("height", "width"), [(75, 120), (120, 75)])
def test_resized_diptych_maps_the_target_region(height, width):
    reference, reference_mask, source, target = request(height, width, (30, 40, 30, 40))
    diptych = build_diptych(reference, reference_mask, source, target, size=48)  # 120 -> 48: scale 0.4
    rows = np.flatnonzero(diptych.target_mask_square.any(axis=1))
    cols = np.flatnonzero(diptych.target_mask_square.any(axis=0))
    top, left = (120 - height) // 2, (120 - width) // 2  # 22 or 0
    # dilated region (24, 46, 24, 46) in the source -> (top + 24) * 0.4 ... (top + 46) * 0.4, any overlap
    assert (rows[0], rows[-1] + 1) == (math.floor((top + 24) * 0.4), math.ceil((top + 46) * 0.4))
    assert (cols[0], cols[-1] + 1) == (math.floor((left + 24) * 0.4), math.ceil((left + 46) * 0.4))
    # pad (22 px -> 8.8 rows or columns) is white in the source square, beyond Lanczos' reach (3 rows), and never
    # in the mask
    pad = (slice(0, 5), slice(None)) if top else (slice(None), slice(0, 5))
    assert (diptych.source_square[pad] == 255).all() and not diptych.target_mask_square[pad].any()
    content = (slice(10, 38), slice(None)) if top else (slice(None), slice(10, 38))
    assert (diptych.source_square[content] != 255).any(axis=-1).mean() > 0.9


def test_result_diptych_is_reference_beside_the_resized_abnormal():
    reference, reference_mask, source, target = request(48, 64, (10, 20, 10, 20))
    diptych = build_diptych(reference, reference_mask, source, target, size=32)
    abnormal = noise((48, 64, 3), 9)
    result = result_diptych(diptych, abnormal)
    assert result.shape == (32, 64, 3)
    np.testing.assert_array_equal(result[:, :32], diptych.reference.image)
    np.testing.assert_array_equal(result[:, 32:], SquareTransform.whole(48, 64, 32).forward_image(abnormal))
    with pytest.raises(InputError, match="abnormal image"):
        result_diptych(diptych, abnormal[:40])


def test_defect_token_mask_hand_worked():
    # reference 32 x 32, defect = rows 0..15 (s = 0.5 -> r = 1): box 16 x 32, centred on 32 x 32 -> rows 8..23
    # -> token rows 0 and 1, columns 0 and 1 (left half). Target: one pixel (20, 5) -> dilated rows 14..26,
    # cols 0..11 -> token rows 0, 1 and column 0 of the right half (grid column 2). Grid 2 x 4.
    reference = noise((32, 32, 3))
    reference_mask = box_mask(32, 32, (0, 16, 0, 32))
    source = smooth(32, 32)
    target = box_mask(32, 32, (20, 21, 5, 6))
    diptych = build_diptych(reference, reference_mask, source, target, size=32)
    tokens = defect_token_mask(diptych)
    assert tokens.shape == (8,) and tokens.dtype == bool
    assert np.flatnonzero(tokens).tolist() == [0, 1, 2, 4, 5, 6]


def test_defect_token_mask_matches_a_patch_loop():
    reference, reference_mask, source, target = request(70, 90, (50, 60, 3, 30), seed=5)
    diptych = build_diptych(reference, reference_mask, source, target, size=64)
    tokens = defect_token_mask(diptych).reshape(4, 8)
    regions = np.concatenate([diptych.reference.mask, diptych.target_mask_square], axis=1)
    for row in range(4):
        for col in range(8):
            assert tokens[row, col] == regions[row * 16 : row * 16 + 16, col * 16 : col * 16 + 16].any()


# ------------------------------------------------------------------------------------------------ paste-back
@pytest.mark.parametrize(("height", "width", "size"), [(48, 64, 64), (75, 120, 48), (130, 90, 96)])
def test_identity_round_trip(height, width, size):
    reference, reference_mask, source, target = request(height, width, (30, 40, 30, 45))
    diptych = build_diptych(reference, reference_mask, source, target, size=size)
    restored = paste_back(diptych, diptych.source_square, source)
    outside = ~diptych.dilated_mask
    np.testing.assert_array_equal(restored[outside], source[outside])
    error = np.abs(restored.astype(int) - source.astype(int))[diptych.dilated_mask]
    if max(height, width) == size:
        assert error.max() == 0  # no resampling: exact everywhere
    else:
        assert error.mean() < 1.5 and error.max() <= 8


def test_random_generator_changes_only_the_dilated_region():
    reference, reference_mask, source, target = request(75, 120, (0, 10, 100, 120))  # touches the border
    diptych = build_diptych(reference, reference_mask, source, target, size=48)
    generated = noise((48, 48, 3), 11)
    restored = paste_back(diptych, generated, source)
    assert restored.shape == source.shape and restored.dtype == np.uint8
    outside = ~diptych.dilated_mask
    np.testing.assert_array_equal(restored[outside], source[outside])
    assert (restored[diptych.dilated_mask] != source[diptych.dilated_mask]).mean() > 0.5
    with pytest.raises(InputError, match="generated image"):
        paste_back(diptych, np.zeros((48, 96, 3), np.uint8), source)
    with pytest.raises(InputError, match="source image"):
        paste_back(diptych, generated, source[:, :100])


@pytest.mark.parametrize(("height", "width", "size"), [(75, 120, 48), (120, 75, 48), (40, 30, 64)])
def test_inverse_transform_puts_pixels_back_in_place(height, width, size):
    # a dark block on white: its centroid must come back to the same place (an off-by-pad error moves it pixels)
    source = np.full((height, width, 3), 255, np.uint8)
    source[20:30, 15:25] = 0
    transform = SquareTransform.whole(height, width, size)
    back = transform.inverse_image(transform.forward_image(source))
    assert back.shape == source.shape

    def centroid(image: np.ndarray) -> np.ndarray:
        weight = 255.0 - image[..., 0]
        y, x = np.mgrid[0:height, 0:width]
        return np.array([(weight * y).sum(), (weight * x).sum()]) / weight.sum()

    np.testing.assert_allclose(centroid(back), [24.5, 19.5], atol=0.25)
    # and forward alone: the block lands at (pad + 20 .. pad + 30) * S / side
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    square = transform.forward_image(source)
    weight = 255.0 - square[..., 0]
    y, x = np.mgrid[0:size, 0:size]
    expected = [(top + 25) * size / side - 0.5, (left + 20) * size / side - 0.5]
    np.testing.assert_allclose(
        [(weight * y).sum() / weight.sum(), (weight * x).sum() / weight.sum()], expected, atol=0.25
    )


def test_bad_geometry_requests():
    reference, reference_mask, source, target = request(48, 64, (10, 20, 10, 20))
    with pytest.raises(ValueError, match="multiple of 16"):
        build_diptych(reference, reference_mask, source, target, size=40)
    with pytest.raises(InputError, match="target mask"):
        build_diptych(reference, reference_mask, source, np.ones((48, 64), bool), size=32)
    with pytest.raises(InputError, match="reference mask"):
        build_diptych(reference, np.zeros((90, 120), bool), source, target, size=32)


def test_a_target_mask_that_covers_the_image_once_dilated_is_refused():
    reference, reference_mask, source, _ = request(48, 64, (10, 20, 10, 20))
    # 7x7 twice reaches 6 px: a mask 6 px from every border leaves no source pixel; 7 px leaves a one-pixel rim.
    with pytest.raises(InputError, match=r"target mask: covers the whole image once dilated .*6 px"):
        build_diptych(reference, reference_mask, source, box_mask(48, 64, (6, 42, 6, 58)), size=32)
    kept = build_diptych(reference, reference_mask, source, box_mask(48, 64, (7, 41, 7, 57)), size=32)
    assert (~kept.dilated_mask).sum() == 2 * 64 + 2 * 46


def square_definition(transform: SquareTransform, image: np.ndarray, mask: np.ndarray, fill: int):
    """forward_image / forward_mask as defined: crop (fill), pad to a square (fill), resize."""
    square_image = pad_to_square(crop_with_fill(image, transform.box, fill), fill)
    square_mask = pad_to_square(crop_with_fill(mask, transform.box, False), False)
    return (
        resize_image(square_image, transform.size, transform.size),
        resize_mask(square_mask, transform.size, transform.size),
    )


def test_square_transforms_equal_their_definition_bit_for_bit(monkeypatch):
    """The forward transforms never build the padded square; they must still give exactly its resize."""
    monkeypatch.setattr(geometry, "_STRIP_PIXELS", 4999)  # several row strips per image
    rng = np.random.default_rng(5)
    cases = [
        ((40, 1200), (0, 40, 0, 1200), 64),  # long and thin, both orientations
        ((1200, 40), (0, 1200, 0, 40), 48),
        ((7, 900), (-30, 60, -5, 950), 32),  # a crop box reaching beyond every border
        ((50, 50), (0, 50, 0, 50), 50),  # side == size: no resampling
        ((30, 20), (0, 30, 0, 20), 64),  # upscaling
    ]
    for _ in range(25):
        height, width = (int(v) for v in rng.integers(1, 200, 2))
        y1, x1 = int(rng.integers(-height // 2, height)), int(rng.integers(-width // 2, width))
        box = (y1, int(rng.integers(y1 + 1, 2 * height)), x1, int(rng.integers(x1 + 1, 2 * width)))
        if box[1] > 0 and box[3] > 0:
            cases.append(((height, width), box, int(rng.choice([16, 48, 96]))))
    for (height, width), box, size in cases:
        transform = SquareTransform(height, width, box, size)
        image = noise((height, width, 3), seed=height * width)
        mask = rng.random((height, width)) < 0.02
        for fill in (255, 0):
            expected_image, expected_mask = square_definition(transform, image, mask, fill)
            assert np.array_equal(transform.forward_image(image, fill), expected_image), (height, width, box, size)
            assert np.array_equal(transform.forward_mask(mask), expected_mask), (height, width, box, size)


def test_a_long_thin_source_does_not_build_its_padded_square():
    height, width, size = 8, 6000, 64
    source = smooth(height, width)
    target = box_mask(height, width, (2, 5, 3000, 3040))
    reference, reference_mask, _, _ = request(48, 64, (10, 20, 10, 20))
    tracemalloc.start()
    try:
        diptych = build_diptych(reference, reference_mask, source, target, size=size)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The 6000 x 6000 square would take 36 MB as a bool mask alone (288 MB for its int64 prefix sums).
    assert peak < width * width // 8, f"peak {peak / 2**20:.1f} MiB"
    assert diptych.target_mask_square.any() and diptych.image.shape == (size, 2 * size, 3)
    square = pad_to_square(source, 255)
    assert np.array_equal(diptych.source_square, resize_image(square, size, size))
