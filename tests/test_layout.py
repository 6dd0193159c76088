"""DiptychLayout: the one owner of the S x 2S diptych's pixel, latent and token shapes."""

from __future__ import annotations

import numpy as np
import pytest

from unidg.core.errors import UniDGError
from unidg.core.latents import pack_latents
from unidg.core.layout import DiptychLayout
from unidg.core.settings import UniDGSettings


def test_shapes_at_the_production_resolution() -> None:
    layout = DiptychLayout(768)
    assert layout.pixel_hw == (768, 1536)
    assert layout.latent_hw == (96, 192)
    assert layout.token_hw == (48, 96)
    assert layout.image_tokens == 4608  # DESIGN §2: (S/16) * (2S/16) at S = 768
    assert layout.half_token_columns == 48


@pytest.mark.parametrize("size", [32, 128, 256])
def test_token_grid_is_what_packing_the_latents_makes(size: int) -> None:
    layout = DiptychLayout(size)
    packed = pack_latents(np.zeros((1, 16, *layout.latent_hw), np.float32))
    assert packed.shape[1] == layout.image_tokens
    ids = layout.image_ids()
    assert ids.shape == (layout.image_tokens, 3)
    rows, columns = layout.token_hw
    assert ids[-1].tolist() == [0.0, rows - 1, columns - 1]
    assert ids[columns].tolist() == [0.0, 1.0, 0.0]  # row-major


@pytest.mark.parametrize("size", [0, -16, 100, 8])
def test_a_size_off_the_token_grid_is_refused(size: int) -> None:
    with pytest.raises(UniDGError, match="multiple of 16"):
        DiptychLayout(size)


def test_settings_ask_the_layout() -> None:
    settings = UniDGSettings(resolution=256)
    assert settings.layout == DiptychLayout(256)
    assert settings.image_tokens == DiptychLayout(256).image_tokens == 512
