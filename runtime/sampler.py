"""The rectified-flow sampler of the runtime: 28 Euler steps over a backend's step graph.

Noise convention (shared with the torch reference sampler so both start from the same x): request ``b`` with seed
``s`` starts from ``numpy.random.default_rng(s).standard_normal((N, 64), dtype=numpy.float32)``, N = (S/16)*(2S/16)
packed image tokens. The schedule is ``unidg.core.schedule.flux_sigmas(steps, N)`` (N + 1 values ending in 0);
step i maps x at sigma_i to x at sigma_{i+1} inside the step graph: x + (sigma_{i+1} - sigma_i) * v.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from unidg.core.schedule import flux_sigmas
from unidg.runtime.backends.base import Backend, GenerationCancelled, ProgressCallback, StepConditioning, check_finite
from unidg.runtime.step_cache import CacheDecider, StepCache

NOISE_CHANNELS = 64
MAX_SEED = 2**63 - 1


# The seed of a request that gives none, on every surface (CLI, batch jobs, HTTP, C ABI, Triton): a station reproduces
# any output from its inputs alone; different images come from different seeds, asked for explicitly.
DEFAULT_SEED = 0


__all__ = ["GenerationCancelled", "denoise", "denoise_cached", "initial_noise", "sampling_sigmas"]


def initial_noise(seeds: Sequence[int], tokens: int, channels: int = NOISE_CHANNELS) -> np.ndarray:
    """[B, N, 64] float32 standard normal; row b depends only on seeds[b] (deterministic, batch-independent)."""
    return np.stack(
        [np.random.default_rng(int(seed)).standard_normal((tokens, channels), dtype=np.float32) for seed in seeds]
    )


def sampling_sigmas(steps: int, image_tokens: int) -> np.ndarray:
    """The FLUX schedule for ``steps`` steps at this image-token count: float32, steps + 1 values, last 0."""
    if not isinstance(steps, int | np.integer) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer (got {steps!r}); the model was trained for 28")
    return np.asarray(flux_sigmas(int(steps), image_tokens), dtype=np.float32)


def denoise(
    backend: Backend,
    noise: np.ndarray,
    conditioning: StepConditioning,
    sigmas: np.ndarray,
    callback: ProgressCallback | None = None,
) -> np.ndarray:
    """Run the flow from ``noise`` (sigma_0 = 1) to clean latents (sigma = 0); returns packed x [B, N, 64]."""
    total = len(sigmas) - 1
    fused = backend.denoise_all(noise, conditioning, sigmas, callback)  # e.g. one captured CUDA graph
    if fused is not None:
        check_finite(fused, f"step graph ({total} steps)", backend.bundle)
        return fused
    x = noise
    for i in range(total):
        x = backend.step(x, conditioning, float(sigmas[i]), float(sigmas[i + 1]))
        check_finite(x, f"step graph (step {i + 1}/{total})", backend.bundle)
        if callback is not None and callback(i + 1, total) is False:
            raise GenerationCancelled(f"cancelled after step {i + 1}/{total}")
    return x


def denoise_cached(
    backend: Backend,
    noise: np.ndarray,
    conditioning: StepConditioning,
    sigmas: np.ndarray,
    cache: StepCache,
    callback: ProgressCallback | None = None,
) -> tuple[np.ndarray, CacheDecider]:
    """``denoise`` with step caching (unidg.runtime.step_cache): the head graph every step, the tail graph on full
    steps, the cached-step graph otherwise. Returns x and the decisions taken (full evaluations, schedule)."""
    total = len(sigmas) - 1
    decider = CacheDecider(cache, total)
    if cache.mode == "static":  # a fixed schedule: the backend may run the loop without the host in between
        fused = backend.denoise_static_cache(noise, conditioning, sigmas, tuple(cache.schedule), callback)
        if fused is not None:
            for i in range(total):
                decider.full_step(i, None)
            check_finite(fused, f"step-cache graphs ({total} steps)", backend.bundle)
            return fused, decider
    x = noise
    tail_residual = None
    for i in range(total):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        head = backend.step_head(x, conditioning, sigma)
        if decider.full_step(i, head.first_residual):
            x, tail_residual = backend.step_tail(head, x, conditioning, sigma, sigma_next)
        else:
            x = backend.step_cached(head, tail_residual, x, sigma, sigma_next)
        check_finite(x, f"step-cache graphs (step {i + 1}/{total})", backend.bundle)
        if callback is not None and callback(i + 1, total) is False:
            raise GenerationCancelled(f"cancelled after step {i + 1}/{total}")
    return x, decider
