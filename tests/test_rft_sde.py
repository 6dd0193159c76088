"""The SDE sampler of Consistency-RFT: step log-densities, the deterministic limit, rollouts on the nano model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unidg.core.geometry import build_diptych
from unidg.runtime.sampler import sampling_sigmas
from unidg.train.model import UniDGModel
from unidg.train.sampler import denoise, get_noise, prepare_diptych
from unidg.train.sde_sampler import gaussian_log_prob, noise_std, sde_rollout, sde_step

S = 32  # 2 x 4 image tokens


def _independent_log_prob(x, v, x_next, sigma, sigma_next, a, cap) -> np.ndarray:
    """Float64 numpy: the step's Gaussian written out from its definition, log-pdf per element, averaged."""
    x, v, x_next = (t.double().numpy() for t in (x, v, x_next))
    out = []
    for b in range(x.shape[0]):
        s, s_next = float(sigma[b]), float(sigma_next[b])
        dt = s_next - s
        std_t = a * math.sqrt(s / (1 - (cap if s == 1.0 else s)))
        drift = v[b] + std_t**2 / (2 * s) * (x[b] + (1 - s) * v[b])
        mean = x[b] + drift * dt
        var = std_t**2 * (-dt)
        logpdf = -((x_next[b] - mean) ** 2) / (2 * var) - 0.5 * math.log(2 * math.pi * var)
        out.append(logpdf.mean())
    return np.array(out)


def test_step_log_prob_equals_an_independent_gaussian_log_density() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 64, generator=generator)
    v = torch.randn(3, 8, 64, generator=generator)
    sigma = torch.tensor([1.0, 0.62, 0.21])
    sigma_next = torch.tensor([0.83, 0.40, 0.0])
    noise = torch.randn(3, 8, 64, generator=generator)
    step = sde_step(x, v, sigma, sigma_next, 0.7, 0.83, noise=noise)
    expected = _independent_log_prob(x, v, step.x_next, sigma, sigma_next, 0.7, 0.83)
    assert np.abs(step.log_prob.double().numpy() - expected).max() <= 1e-5
    # Scoring the recorded transition again gives the same number (what training recomputes).
    again = sde_step(x, v, sigma, sigma_next, 0.7, 0.83, x_next=step.x_next)
    assert torch.allclose(again.log_prob, step.log_prob, atol=1e-6)
    # A different transition scores lower than the mean itself.
    at_mean = sde_step(x, v, sigma, sigma_next, 0.7, 0.83, x_next=step.mean)
    assert (at_mean.log_prob > step.log_prob).all()


def test_gaussian_log_prob_matches_torch_distributions() -> None:
    generator = torch.Generator().manual_seed(1)
    sample, mean = torch.randn(2, 5, 4, generator=generator), torch.randn(2, 5, 4, generator=generator)
    std = torch.tensor([0.3, 1.7])
    reference = torch.distributions.Normal(mean, std[:, None, None]).log_prob(sample).mean(dim=(1, 2))
    assert torch.allclose(gaussian_log_prob(sample, mean, std), reference, atol=1e-6)


def test_noise_std_is_finite_at_sigma_one_and_grows_with_sigma() -> None:
    sigma = torch.tensor([1.0, 0.9, 0.5, 0.1])
    std = noise_std(sigma, torch.full((4,), 0.9), 0.7)
    assert torch.isfinite(std).all()
    assert std[0] == pytest.approx(0.7 * math.sqrt(1.0 / 0.1), rel=1e-6)
    assert (std[1:-1] > std[2:]).all()


def test_step_draws_with_the_stated_mean_and_std() -> None:
    x = torch.zeros(1, 20000, 4)
    v = torch.ones(1, 20000, 4)
    noise = torch.randn(1, 20000, 4, generator=torch.Generator().manual_seed(2))
    step = sde_step(x, v, 0.5, 0.25, 1.0, 0.9, noise=noise)
    # std_t = sqrt(0.5 / 0.5) = 1, Delta = 0.25: mean = -0.25 v - 0.25 / (2 * 0.5) * 0.5 v = -0.375, std = 0.5.
    assert float(step.mean[0, 0, 0]) == pytest.approx(-0.375)
    assert float(step.std[0]) == pytest.approx(0.5)
    assert float(step.x_next.mean()) == pytest.approx(-0.375, abs=0.01)
    assert float(step.x_next.std()) == pytest.approx(0.5, abs=0.01)


def test_bad_schedule_and_noise_level_are_refused() -> None:
    x = torch.zeros(1, 2, 4)
    with pytest.raises(ValueError, match="decrease"):
        sde_step(x, x, 0.3, 0.5, 0.7, 0.9)
    with pytest.raises(ValueError, match="noise level"):
        sde_step(x, x, 0.5, 0.3, -0.1, 0.9)


@pytest.fixture(scope="module")
def nano_inputs():
    model = UniDGModel.from_preset("nano", seed=3)
    rng = np.random.default_rng(0)
    reference = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    reference_mask = np.zeros((40, 40), dtype=bool)
    reference_mask[10:20, 12:30] = True
    source = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    target_mask = np.zeros((40, 48), dtype=bool)
    target_mask[20:30, 30:40] = True
    diptych = build_diptych(reference, reference_mask, source, target_mask, S)
    return model, prepare_diptych(model, diptych)


def _velocity(model, inputs, guidance):
    def velocity(x, sigma):
        return model.velocity(
            x, inputs.cond, inputs.ctx, inputs.key_bias, sigma, guidance, inputs.img_ids, inputs.txt_ids
        )

    return velocity


def test_noise_level_zero_reproduces_the_ode_sampler_trajectory(nano_inputs) -> None:
    model, inputs = nano_inputs
    sigmas = sampling_sigmas(3, inputs.image_tokens).tolist()
    noise = get_noise([5], inputs.image_tokens)
    trajectory = sde_rollout(_velocity(model, inputs, 1.0), noise, sigmas, 0.0, [5])
    assert trajectory.log_probs is None and trajectory.latents.shape == (1, 4, inputs.image_tokens, 64)
    for i in range(1, 4):  # every intermediate latent is the ODE sampler's after i steps
        ode = denoise(model, noise, inputs, sigmas[: i + 1], 1.0)
        assert torch.allclose(trajectory.latents[:, i], ode, atol=1e-6, rtol=0)
    noisy = sde_rollout(_velocity(model, inputs, 1.0), noise, sigmas, 0.7, [5])
    assert noisy.log_probs.shape == (1, 3) and torch.isfinite(noisy.log_probs).all()
    assert not torch.allclose(noisy.final, trajectory.final, atol=1e-3)


def test_rollout_rows_depend_only_on_their_seed(nano_inputs) -> None:
    model, inputs = nano_inputs
    sigmas = sampling_sigmas(2, inputs.image_tokens).tolist()
    batch = type(inputs)(
        cond=inputs.cond.expand(2, -1, -1),
        ctx=inputs.ctx.expand(2, -1, -1),
        key_bias=inputs.key_bias.expand(2, -1),
        img_ids=inputs.img_ids,
        txt_ids=inputs.txt_ids,
        height_tokens=inputs.height_tokens,
        width_tokens=inputs.width_tokens,
    )
    noise = get_noise([1, 2], inputs.image_tokens)
    pair = sde_rollout(_velocity(model, batch, 1.0), noise, sigmas, 0.7, [11, 12])
    alone = sde_rollout(_velocity(model, inputs, 1.0), noise[1:], sigmas, 0.7, [12])
    assert torch.allclose(pair.latents[1:], alone.latents, atol=1e-5)
    assert torch.allclose(pair.log_probs[1:], alone.log_probs, atol=1e-5)
    assert not torch.allclose(pair.latents[0], pair.latents[1])
