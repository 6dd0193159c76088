"""The torch reference sampler on the nano model: inputs, Euler step, determinism, paste-back."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from unidg.core.geometry import build_diptych, defect_token_mask
from unidg.core.schedule import flux_sigmas
from unidg.runtime.sampler import initial_noise
from unidg.runtime.synthesizer import SynthesisRequest
from unidg.train.model import UniDGModel
from unidg.train.sampler import (
    decode,
    denoise,
    generate,
    get_noise,
    prepare_diptych,
    prepare_inputs,
    sample,
    sample_request,
)

S = 64  # a small diptych for the loop tests: 4 x 8 image tokens


@pytest.fixture(scope="module")
def nano() -> UniDGModel:
    return UniDGModel.from_preset("nano", seed=3)


def _request(seed: int = 0, size: int = 48) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    reference = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    reference_mask = np.zeros((size, size), dtype=bool)
    reference_mask[10:20, 12:30] = True
    source = rng.integers(0, 256, (size, size + 16, 3), dtype=np.uint8)
    target_mask = np.zeros((size, size + 16), dtype=bool)
    target_mask[30:36, 50:56] = True
    return reference, reference_mask, source, target_mask


def _diptych(size: int = S):
    return build_diptych(*_request(), size)


def test_prepare_inputs_builds_the_fill_layout_and_key_bias(nano: UniDGModel) -> None:
    diptych = _diptych()
    inputs = prepare_diptych(nano, diptych)
    r, k = nano.reference_tokens, nano.settings.text_tokens
    assert inputs.cond.shape == (1, 32, 320) and inputs.ctx.shape == (1, 1 + r, nano.joint_dim)
    assert inputs.key_bias.shape == (1, 1 + r + 32) and inputs.img_ids.shape == (32, 3)
    assert inputs.txt_ids.shape == (1 + r, 3) and not inputs.txt_ids.any()
    bias = inputs.key_bias[0]
    assert bias[0].item() == pytest.approx(math.log(k)) and not bias[1 : 1 + r].any()
    defect = torch.from_numpy(defect_token_mask(diptych))
    assert defect.any() and not defect.all()
    assert torch.allclose(bias[1 + r :][defect], torch.tensor(math.log(nano.settings.alpha)))
    assert not bias[1 + r :][~defect].any()
    unfolded = prepare_diptych(nano, diptych, fold_text=False, alpha=3.0)
    assert unfolded.ctx.shape[1] == k + r and not unfolded.key_bias[0, : k + r].any()
    assert torch.allclose(unfolded.key_bias[0, k + r :][defect], torch.tensor(math.log(3.0)))
    assert torch.equal(unfolded.cond, inputs.cond)
    plain = prepare_inputs(nano, diptych.image, diptych.mask)
    assert not plain.key_bias[0, 1:].any()


def test_prepare_inputs_rejects_bad_shapes(nano: UniDGModel) -> None:
    diptych = _diptych()
    with pytest.raises(ValueError, match="S x 2S"):
        prepare_inputs(nano, diptych.image[:, :S], diptych.mask[:, :S])
    with pytest.raises(ValueError, match="diptych mask must be bool"):
        prepare_inputs(nano, diptych.image, diptych.mask.astype(np.uint8))
    inputs = prepare_diptych(nano, diptych)
    with pytest.raises(ValueError, match="one seed per diptych"):
        sample(nano, inputs, seeds=[1, 2], steps=1)


def test_one_euler_step_is_x_plus_dsigma_times_v(nano: UniDGModel) -> None:
    inputs = prepare_diptych(nano, _diptych())
    noise = get_noise([11], inputs.image_tokens)
    assert np.array_equal(noise.numpy(), initial_noise([11], inputs.image_tokens))
    with torch.no_grad():
        v = nano.velocity(noise, inputs.cond, inputs.ctx, inputs.key_bias, 1.0, 1.0, inputs.img_ids, inputs.txt_ids)
        half = denoise(nano, noise, inputs, [1.0, 0.25], guidance=1.0)
    assert torch.allclose(half, noise - 0.75 * v, atol=1e-6)
    assert (half - noise).abs().max() > 1e-3


def test_sampling_is_deterministic_and_seeded(nano: UniDGModel) -> None:
    inputs = prepare_diptych(nano, _diptych())
    first = sample(nano, inputs, seeds=[7], steps=4)
    second = sample(nano, inputs, seeds=[7], steps=4)
    other = sample(nano, inputs, seeds=[8], steps=4)
    assert first.shape == (1, S, 2 * S, 3) and first.dtype == np.uint8
    assert np.array_equal(first, second)
    assert not np.array_equal(first, other)
    # Folding the K zero text tokens changes nothing beyond float rounding, through the whole loop.
    unfolded = prepare_diptych(nano, _diptych(), fold_text=False)
    sigmas = flux_sigmas(4, inputs.image_tokens).tolist()
    noise = get_noise([7], inputs.image_tokens)
    x_folded = denoise(nano, noise, inputs, sigmas, 1.0)
    x_unfolded = denoise(nano, noise, unfolded, sigmas, 1.0)
    assert (x_folded - x_unfolded).abs().max() <= 1e-4
    assert np.array_equal(decode(nano, x_folded, inputs), first)


def test_batch_rows_match_single_runs(nano: UniDGModel) -> None:
    one, two = _diptych(), build_diptych(*_request(seed=1), S)
    batch = prepare_inputs(
        nano,
        np.stack([one.image, two.image]),
        np.stack([one.mask, two.mask]),
        np.stack([defect_token_mask(one), defect_token_mask(two)]),
    )
    sigmas = flux_sigmas(3, batch.image_tokens).tolist()
    x_batch = denoise(nano, get_noise([1, 2], batch.image_tokens), batch, sigmas, 1.0)
    x_two = denoise(nano, get_noise([2], batch.image_tokens), prepare_diptych(nano, two), sigmas, 1.0)
    assert (x_batch[1] - x_two[0]).abs().max() <= 1e-5


def test_generate_end_to_end_at_nano_resolution_keeps_the_source_outside_the_mask(nano: UniDGModel) -> None:
    reference, reference_mask, source, target_mask = _request(size=96)
    result = generate(nano, reference, reference_mask, source, target_mask, seed=5, steps=2)
    assert result.shape == source.shape and result.dtype == np.uint8
    diptych = build_diptych(
        reference, reference_mask, source, target_mask, nano.settings.resolution, dilate_kernel=7, dilate_iterations=2
    )
    outside = ~diptych.dilated_mask
    assert np.array_equal(result[outside], source[outside])
    assert not np.array_equal(result[diptych.dilated_mask], source[diptych.dilated_mask])


def test_sample_request_is_generate_with_the_runtime_result_fields(nano: UniDGModel) -> None:
    reference, reference_mask, source, target_mask = _request()
    settings = nano.settings
    nano.settings = dataclasses.replace(settings, resolution=S)
    try:
        request = SynthesisRequest(reference, reference_mask, source, target_mask, seed=5, steps=2, guidance=2.0)
        result = sample_request(nano, request)
        image = generate(nano, reference, reference_mask, source, target_mask, seed=5, steps=2, guidance=2.0)
        other_guidance = generate(nano, reference, reference_mask, source, target_mask, seed=5, steps=2)
    finally:
        nano.settings = settings
    diptych = build_diptych(reference, reference_mask, source, target_mask, S)
    assert np.array_equal(result.image, image)  # deterministic
    assert not np.array_equal(image, other_guidance)
    assert np.array_equal(result.mask, diptych.dilated_mask)
    assert result.diptych.shape == (S, 2 * S, 3)
    assert np.array_equal(result.image[~result.mask], source[~result.mask])
