"""FLUX latent layout in numpy: 2x2 packing, Fill mask channels, token positions, pixel <-> model space.

Every function reproduces the diffusers FLUX pipelines' tensor layout exactly (FluxPipeline._pack_latents /
_unpack_latents / _prepare_latent_image_ids, FluxFillPipeline.prepare_mask_latents), so bundles and the torch model
see the same token order.
"""

from __future__ import annotations

import numpy as np

VAE_SHIFT = 0.1159
VAE_SCALE = 0.3611
VAE_DOWNSAMPLE = 8
LATENT_CHANNELS = 16
PACKED_CHANNELS = 4 * LATENT_CHANNELS  # 2x2 patch of latent pixels per token
MASK_CHANNELS = 4 * VAE_DOWNSAMPLE**2  # 8x8 pixel block per latent pixel x 2x2 patch
COND_CHANNELS = PACKED_CHANNELS + MASK_CHANNELS  # the Fill condition: masked-diptych latents, then the mask


def normalize_latents(latents: np.ndarray) -> np.ndarray:
    """Raw VAE latents z -> model latents (z - shift) * scale."""
    return ((latents - VAE_SHIFT) * VAE_SCALE).astype(np.float32)


def denormalize_latents(latents: np.ndarray) -> np.ndarray:
    """Model latents -> raw VAE latents z' / scale + shift (what the VAE decoder takes)."""
    return (latents / VAE_SCALE + VAE_SHIFT).astype(np.float32)


def pack_latents(latents: np.ndarray) -> np.ndarray:
    """(B, C, h, w) -> (B, (h/2)(w/2), 4C): 2x2 patches row-major, channel c * 4 + dy * 2 + dx."""
    batch, channels, height, width = latents.shape
    if height % 2 or width % 2:
        raise ValueError(f"latent height and width must be even to pack 2x2, got {height}x{width}")
    patches = latents.reshape(batch, channels, height // 2, 2, width // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return np.ascontiguousarray(patches.reshape(batch, (height // 2) * (width // 2), channels * 4))


def unpack_latents(packed: np.ndarray, latent_height: int, latent_width: int) -> np.ndarray:
    """(B, (h/2)(w/2), 4C) -> (B, C, h, w); ``latent_height``/``latent_width`` are h, w (pixels / 8)."""
    batch, tokens, packed_channels = packed.shape
    if latent_height % 2 or latent_width % 2 or packed_channels % 4:
        raise ValueError(f"cannot unpack {packed.shape} to latent size {latent_height}x{latent_width}")
    if tokens != (latent_height // 2) * (latent_width // 2):
        raise ValueError(f"{tokens} tokens do not make a {latent_height}x{latent_width} latent (2x2 packing)")
    grid = packed.reshape(batch, latent_height // 2, latent_width // 2, packed_channels // 4, 2, 2)
    return np.ascontiguousarray(
        grid.transpose(0, 3, 1, 4, 2, 5).reshape(batch, packed_channels // 4, latent_height, latent_width)
    )


def pack_mask(mask: np.ndarray, vae_downsample: int = VAE_DOWNSAMPLE) -> np.ndarray:
    """Pixel mask (B, 1, H, W) or (H, W) -> float32 (B, N, 4 * vae_downsample^2) = (B, N, 256) for FLUX:
    each 8x8 pixel block becomes 64 channels (channel dy * 8 + dx) of one latent pixel, then 2x2 packing."""
    if mask.ndim == 2:
        mask = mask[None, None]
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"expected a pixel mask of shape (B, 1, H, W) or (H, W), got {mask.shape}")
    batch, _, height, width = mask.shape
    block = 2 * vae_downsample
    if height % block or width % block:
        raise ValueError(f"mask height and width must be multiples of {block}, got {height}x{width}")
    h, w, f = height // vae_downsample, width // vae_downsample, vae_downsample
    blocks = mask[:, 0].astype(np.float32).reshape(batch, h, f, w, f).transpose(0, 2, 4, 1, 3)
    return pack_latents(blocks.reshape(batch, f * f, h, w))


def fill_condition(masked_latents: np.ndarray, pixel_mask: np.ndarray) -> np.ndarray:
    """The Fill condition (B, N, 64 + 256): packed normalized masked-diptych latents (B, 16, h, w), then the
    packed pixel mask (B, 1, 8h, 8w)."""
    packed = pack_latents(masked_latents.astype(np.float32))
    mask = pack_mask(pixel_mask)
    if mask.shape[:2] != packed.shape[:2]:
        raise ValueError(f"mask packs to {mask.shape[:2]} tokens but the latents to {packed.shape[:2]}")
    return np.concatenate([packed, mask], axis=2)


def image_ids(h_tokens: int, w_tokens: int) -> np.ndarray:
    """float32 (h_tokens * w_tokens, 3) positions [0, row, col], row-major."""
    ids = np.zeros((h_tokens, w_tokens, 3), dtype=np.float32)
    ids[..., 1] = np.arange(h_tokens, dtype=np.float32)[:, None]
    ids[..., 2] = np.arange(w_tokens, dtype=np.float32)[None, :]
    return ids.reshape(h_tokens * w_tokens, 3)


def text_ids(num_tokens: int) -> np.ndarray:
    """float32 (num_tokens, 3) zeros: context tokens carry no position."""
    return np.zeros((num_tokens, 3), dtype=np.float32)


def pixels_to_model(pixels: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) or (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1] (v / 127.5 - 1)."""
    if pixels.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {pixels.dtype}")
    if pixels.ndim == 3:
        pixels = pixels[None]
    if pixels.ndim != 4:
        raise ValueError(f"expected (H, W, C) or (B, H, W, C) pixels, got {pixels.shape}")
    return np.ascontiguousarray((pixels.astype(np.float32) / np.float32(127.5) - 1).transpose(0, 3, 1, 2))


def model_to_pixels(values: np.ndarray) -> np.ndarray:
    """float (B, 3, H, W) or (3, H, W) in [-1, 1] -> uint8 (B, H, W, 3) or (H, W, 3), rounded and clipped
    (as diffusers' image processor: clip(x / 2 + 0.5, 0, 1) * 255, rounded)."""
    if values.ndim not in (3, 4):
        raise ValueError(f"expected (C, H, W) or (B, C, H, W) values, got {values.shape}")
    unit = np.clip(values.astype(np.float32) / 2 + 0.5, 0.0, 1.0)
    pixels = np.rint(unit * 255).astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(pixels, -3, -1))
