"""The S x 2S diptych layout: one owner for its pixel, latent and token shapes.

A diptych is the reference half (left) beside the target half (right), each S x S pixels. The VAE downsamples 8x and
the transformer packs 2x2 latent pixels per token, so one token covers a 16 x 16 pixel patch. Every stage asks this
object for shapes instead of redoing the arithmetic (FLUX's ``prepare()`` plays the same role).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from unidg.core.errors import UniDGError
from unidg.core.latents import VAE_DOWNSAMPLE, image_ids

PATCH = 2 * VAE_DOWNSAMPLE  # pixels per token side: 8x VAE, then 2x2 packing


@dataclass(frozen=True)
class DiptychLayout:
    """Shapes of an S x 2S diptych at resolution ``size`` (S)."""

    size: int

    def __post_init__(self) -> None:
        if self.size <= 0 or self.size % PATCH:
            raise UniDGError(f"resolution must be a positive multiple of {PATCH} (got {self.size})")

    @property
    def pixel_hw(self) -> tuple[int, int]:
        """(height, width) of the whole diptych in pixels: (S, 2S)."""
        return self.size, 2 * self.size

    @property
    def latent_hw(self) -> tuple[int, int]:
        """(height, width) of its VAE latents: (S/8, 2S/8)."""
        return self.size // VAE_DOWNSAMPLE, 2 * self.size // VAE_DOWNSAMPLE

    @property
    def token_hw(self) -> tuple[int, int]:
        """(rows, columns) of its image tokens: (S/16, 2S/16)."""
        return self.size // PATCH, 2 * self.size // PATCH

    @property
    def image_tokens(self) -> int:
        rows, columns = self.token_hw
        return rows * columns

    @property
    def half_token_columns(self) -> int:
        """Token columns of one half; the reference half is columns [0, this), the target half the rest."""
        return self.size // PATCH

    def image_ids(self) -> np.ndarray:
        """float32 (image_tokens, 3) token positions [0, row, column], row-major."""
        return image_ids(*self.token_hw)


class HasLayout:
    """The diptych shapes of an object with a ``resolution`` (S): settings, a bundle, the facts an export records."""

    resolution: int

    @property
    def layout(self) -> DiptychLayout:
        return DiptychLayout(self.resolution)

    @property
    def image_tokens(self) -> int:
        return self.layout.image_tokens

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.layout.latent_hw
