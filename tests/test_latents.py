"""numpy latent layout equals diffusers' FLUX pipelines' torch code."""

from __future__ import annotations

import numpy as np
import pytest

from unidg.core.latents import (
    denormalize_latents,
    fill_condition,
    image_ids,
    model_to_pixels,
    normalize_latents,
    pack_latents,
    pack_mask,
    pixels_to_model,
    text_ids,
    unpack_latents,
)

torch = pytest.importorskip("torch", reason="torch not installed")
pytest.importorskip("diffusers", reason="diffusers not installed")
from diffusers import FluxPipeline  # noqa: E402


def randn(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize(("batch", "channels", "height", "width"), [(1, 16, 4, 8), (2, 16, 6, 12), (1, 3, 2, 2)])
def test_pack_and_unpack_equal_diffusers(batch, channels, height, width):
    latents = randn(batch, channels, height, width)
    expected = FluxPipeline._pack_latents(torch.from_numpy(latents), batch, channels, height, width).numpy()
    packed = pack_latents(latents)
    np.testing.assert_array_equal(packed, expected)
    unpacked = FluxPipeline._unpack_latents(torch.from_numpy(packed), height * 8, width * 8, 8).numpy()
    np.testing.assert_array_equal(unpack_latents(packed, height, width), unpacked)
    np.testing.assert_array_equal(unpack_latents(packed, height, width), latents)


def test_pack_channel_order():
    latents = np.arange(2 * 2 * 2, dtype=np.float32).reshape(1, 2, 2, 2)  # c, dy, dx
    np.testing.assert_array_equal(pack_latents(latents)[0, 0], np.arange(8))  # channel c * 4 + dy * 2 + dx


def prepare_mask_latents_torch(mask: torch.Tensor) -> torch.Tensor:
    """Steps 5-6 of diffusers FluxFillPipeline.prepare_mask_latents (vae_scale_factor 8)."""
    batch_size, _, pixel_height, pixel_width = mask.shape
    height, width = 2 * (pixel_height // 16), 2 * (pixel_width // 16)
    mask = mask[:, 0, :, :]
    mask = mask.view(batch_size, height, 8, width, 8)
    mask = mask.permute(0, 2, 4, 1, 3)
    mask = mask.reshape(batch_size, 64, height, width)
    return FluxPipeline._pack_latents(mask, batch_size, 64, height, width)


@pytest.mark.parametrize(("batch", "height", "width"), [(1, 32, 64), (2, 48, 96)])
def test_pack_mask_equals_fill_pipeline(batch, height, width):
    mask = np.random.default_rng(1).random((batch, 1, height, width)) < 0.3
    expected = prepare_mask_latents_torch(torch.from_numpy(mask.astype(np.float32))).numpy()
    packed = pack_mask(mask)
    assert packed.dtype == np.float32 and packed.shape == (batch, (height // 16) * (width // 16), 256)
    np.testing.assert_array_equal(packed, expected)
    np.testing.assert_array_equal(pack_mask(mask[0, 0]), expected[:1])


def test_fill_condition_is_latents_then_mask():
    latents = randn(1, 16, 4, 8)
    mask = np.zeros((1, 1, 32, 64), bool)
    mask[..., 32:] = True
    condition = fill_condition(latents, mask)
    assert condition.shape == (1, 8, 320)
    np.testing.assert_array_equal(condition[..., :64], pack_latents(latents))
    np.testing.assert_array_equal(condition[..., 64:].mean(axis=2), [[0, 0, 1, 1, 0, 0, 1, 1]])
    with pytest.raises(ValueError, match="tokens"):
        fill_condition(latents, np.zeros((1, 1, 32, 32), bool))


@pytest.mark.parametrize(("h_tokens", "w_tokens"), [(2, 4), (48, 96)])
def test_image_ids_equal_diffusers(h_tokens, w_tokens):
    expected = FluxPipeline._prepare_latent_image_ids(1, h_tokens, w_tokens, "cpu", torch.float32).numpy()
    ids = image_ids(h_tokens, w_tokens)
    assert ids.dtype == np.float32
    np.testing.assert_array_equal(ids, expected)
    # token index = row * w_tokens + col
    np.testing.assert_array_equal(ids[w_tokens + 1], [0, 1, 1])
    np.testing.assert_array_equal(text_ids(3), np.zeros((3, 3), np.float32))


def test_pixels_round_trip_and_range():
    pixels = np.random.default_rng(2).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    values = pixels_to_model(pixels)
    assert values.shape == (2, 3, 5, 7) and values.dtype == np.float32
    assert values.min() >= -1 and values.max() <= 1
    np.testing.assert_allclose(values[1, 2, 3, 4], pixels[1, 3, 4, 2] / 127.5 - 1, atol=1e-7)
    np.testing.assert_array_equal(model_to_pixels(values), pixels)
    np.testing.assert_array_equal(model_to_pixels(pixels_to_model(pixels[0]))[0], pixels[0])
    np.testing.assert_array_equal(model_to_pixels(values[0]), pixels[0])
    # out-of-range model output is clipped; halfway values rounded
    clipped = model_to_pixels(np.array([-3.0, -1.0, 0.0, 1.0, 7.0], np.float32).reshape(1, 1, 1, 5))
    np.testing.assert_array_equal(clipped[0, 0, :, 0], [0, 0, 128, 255, 255])


def test_model_to_pixels_equals_diffusers_postprocess():
    from diffusers.image_processor import VaeImageProcessor

    values = np.random.default_rng(3).uniform(-1.2, 1.2, (1, 3, 4, 6)).astype(np.float32)
    expected = VaeImageProcessor().postprocess(torch.from_numpy(values), output_type="np")
    np.testing.assert_array_equal(model_to_pixels(values), np.rint(expected * 255).astype(np.uint8))


def test_latent_normalization_inverts():
    z = randn(1, 16, 2, 2)
    np.testing.assert_allclose(normalize_latents(z), (z - 0.1159) * 0.3611, rtol=1e-6)
    np.testing.assert_allclose(denormalize_latents(normalize_latents(z)), z, atol=1e-5)


def test_bad_shapes():
    with pytest.raises(ValueError, match="even"):
        pack_latents(randn(1, 16, 3, 4))
    with pytest.raises(ValueError, match="multiples of 16"):
        pack_mask(np.zeros((1, 1, 24, 32), bool))
    with pytest.raises(ValueError, match="tokens"):
        unpack_latents(randn(1, 8, 64), 4, 6)
