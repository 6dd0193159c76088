"""The numpy FLUX schedule equals diffusers' FlowMatchEulerDiscreteScheduler driven as FluxFillPipeline drives it."""

from __future__ import annotations

import numpy as np
import pytest

from unidg.core.schedule import flux_mu, flux_sigmas
from unidg.export.bench_runtime import FILL_SCHEDULER_CONFIG

diffusers = pytest.importorskip("diffusers", reason="diffusers not installed")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux_fill import calculate_shift, retrieve_timesteps  # noqa: E402


def diffusers_sigmas(num_steps: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """What FluxFillPipeline.__call__ does for an S x 2S diptych (height S, width 2S)."""
    scheduler = FlowMatchEulerDiscreteScheduler(**FILL_SCHEDULER_CONFIG)
    image_seq_len = (size // 8 // 2) * (2 * size // 8 // 2)
    mu = calculate_shift(image_seq_len, 256, 4096, 0.5, 1.15)
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    timesteps, _ = retrieve_timesteps(scheduler, num_steps, "cpu", sigmas=sigmas, mu=mu)
    return scheduler.sigmas.numpy(), timesteps.numpy()


@pytest.mark.parametrize("size", [256, 512, 768])
@pytest.mark.parametrize("num_steps", [1, 8, 28, 50])
def test_sigmas_equal_diffusers(num_steps, size):
    expected, timesteps = diffusers_sigmas(num_steps, size)
    image_seq_len = (size // 16) * (2 * size // 16)
    sigmas = flux_sigmas(num_steps, image_seq_len)
    assert sigmas.dtype == np.float32 and sigmas.shape == (num_steps + 1,)
    np.testing.assert_allclose(sigmas, expected, rtol=0, atol=1e-6)
    # the pipeline feeds timestep / 1000 to the transformer: that is sigma
    np.testing.assert_allclose(sigmas[:-1], timesteps / 1000, rtol=0, atol=1e-6)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and (np.diff(sigmas) < 0).all()


def test_mu_is_linear_and_extrapolated():
    assert flux_mu(256) == pytest.approx(0.5)
    assert flux_mu(4096) == pytest.approx(1.15)
    assert flux_mu(4608) == pytest.approx(calculate_shift(4608))  # S = 768: beyond 4096
    assert flux_mu(4608) > 1.15


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_steps"):
        flux_sigmas(0, 256)
    with pytest.raises(ValueError, match="image_seq_len"):
        flux_sigmas(4, 0)
