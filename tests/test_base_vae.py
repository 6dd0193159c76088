"""The base model's autoencoder stage: the colour-path start, defect-centred crops, the latent-moment term, and a
short stage run whose folded latents come out normalized."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unidg.train.base import (
    VaePool,
    latent_moments,
    random_crops,
    start_with_color_path,
    train_vae,
    vae_loss,
)
from unidg.train.config import BaseConfig, VAEStageConfig
from unidg.train.flow import step_generator
from unidg.train.model import UniDGModel
from unidg.train.presets import NANO


@pytest.fixture(scope="module")
def vae():
    return UniDGModel.from_preset("nano", seed=0).vae


def test_color_path_start_reconstructs_the_8x8_average_colours(vae) -> None:
    vae = copy.deepcopy(vae)
    pixels = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0)) * 2 - 1
    average = F.interpolate(F.avg_pool2d(pixels, 8), scale_factor=8)
    with torch.no_grad():
        before = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
        start_with_color_path(vae)
        after = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
    assert (after - average).abs().mean() < 0.03
    assert (before - average).abs().mean() > 0.2  # a random start knows nothing of colour


def test_color_path_needs_four_channels_per_group() -> None:
    preset = dataclasses.replace(NANO, vae=dataclasses.replace(NANO.vae, norm_num_groups=32))
    vae = UniDGModel.from_preset(preset, seed=0).vae
    with pytest.raises(ValueError, match="4 channels per GroupNorm group"):
        start_with_color_path(vae)


def test_defect_centred_crops_contain_a_defect_pixel() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 64, 128, 3), dtype=np.uint8)
    defects = np.zeros((3, 64, 128), dtype=bool)
    defects[0, 50:54, 5:9] = True
    defects[1, 2:4, 120:126] = True
    defects[2, 30, 64] = True
    images[defects] = 255
    pool = VaePool(images, defects)
    crops, crop_defects = random_crops(pool, step_generator(0, 1), 16, 32, defect_fraction=1.0)
    assert crops.shape == (16, 3, 32, 32) and crop_defects.shape == (16, 1, 32, 32)
    assert bool((crops == 1.0).all(dim=1).flatten(1).any(dim=1).all())
    # The defect crops follow the image crops, flips included.
    assert torch.equal(crop_defects, (crops == 1.0).all(dim=1, keepdim=True))
    plain, _ = random_crops(pool, step_generator(0, 1), 16, 32, defect_fraction=0.0)
    assert plain.shape == (16, 3, 32, 32)


def test_latent_moments_vanish_for_normalized_latents_only() -> None:
    shift, scale = 0.1159, 0.3611
    normalized = torch.randn(64, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    raw = normalized / scale + shift
    assert latent_moments(raw, shift, scale) < 1e-3
    assert latent_moments(raw * 3.0, shift, scale) > 0.5
    assert latent_moments(raw + 2.0, shift, scale) > 0.3


def test_vae_loss_parts_and_gradients(vae) -> None:
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    total, parts = vae_loss(vae, pixels, kl_weight=1e-6, color_weight=2.0, sample=False, moment_weight=0.1)
    assert set(parts) == {"loss", "l1", "mse", "color", "kl", "moments", "defect"}
    expected = parts["l1"] + parts["mse"] + 2.0 * parts["color"] + 1e-6 * parts["kl"] + 0.1 * parts["moments"]
    assert parts["loss"] == pytest.approx(expected, rel=1e-5)
    assert parts["defect"] == 0.0
    total.backward()
    assert vae.decoder.conv_out.weight.grad is not None
    vae.zero_grad(set_to_none=True)


def test_defect_term_is_the_l1_over_defect_pixels_only(vae) -> None:
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    defects = torch.zeros(2, 1, 32, 32, dtype=torch.bool)
    defects[0, 0, 4:9, 10:20] = True
    with torch.no_grad():
        reconstruction = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
        _, parts = vae_loss(vae, pixels, kl_weight=0.0, sample=False, defects=defects, defect_weight=3.0)
        _, plain = vae_loss(vae, pixels, kl_weight=0.0, sample=False)
    inside = (reconstruction - pixels).abs().permute(0, 2, 3, 1)[defects[:, 0]].mean()
    assert parts["defect"] == pytest.approx(float(inside), rel=1e-5)
    assert parts["loss"] == pytest.approx(plain["loss"] + 3.0 * parts["defect"], rel=1e-5)
    _, none = vae_loss(vae, pixels, kl_weight=0.0, sample=False, defects=torch.zeros_like(defects), defect_weight=3.0)
    assert none["defect"] == 0.0 and none["loss"] == pytest.approx(plain["loss"], rel=1e-6)


def test_a_short_stage_learns_and_folds_to_normalized_latents(tmp_path) -> None:
    model = UniDGModel.from_preset("nano", seed=0)
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (6, 4, 8, 3), dtype=np.uint8)  # coloured 16 px blocks: something to learn
    images = np.repeat(np.repeat(blocks, 16, axis=1), 16, axis=2)
    pool = VaePool(images, np.zeros(images.shape[:3], dtype=bool))
    stage = VAEStageConfig(
        steps=24,
        batch_size=4,
        crop=32,
        lr=1e-3,
        color_weight=2.0,
        color_path=True,
        initial_log_variance=-8.0,
        moment_weight=0.1,
        decoder_finetune_steps=2,
        scale_fit_batches=1,
    )
    config = BaseConfig(preset="nano", output=str(tmp_path), vae=stage)
    summary = train_vae(model, pool, config, tmp_path, progress=False)
    assert summary["steps"] == 24 and summary["decoder_finetune_steps"] == 2
    assert (tmp_path / "vae" / "vae.safetensors").is_file()
    log = [line for line in (tmp_path / "vae" / "log.jsonl").read_text().splitlines() if line]
    assert len(log) == 26
    with torch.no_grad():
        pixels = torch.from_numpy(images[:6]).permute(0, 3, 1, 2).float() / 127.5 - 1
        latents = model.encode_images(pixels)
    per_channel = latents.transpose(0, 1).flatten(1)
    assert per_channel.mean(dim=1).abs().max() < 0.05
    assert (per_channel.std(dim=1) - 1).abs().max() < 0.05
