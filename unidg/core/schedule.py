"""FLUX sigma schedule: what diffusers' FlowMatchEulerDiscreteScheduler (FLUX.1-Fill-dev config: dynamic shifting,
exponential time shift) gives when driven as FluxFillPipeline drives it, in numpy.

sigma_i = e^mu / (e^mu + (1 / t_i - 1)) for t = linspace(1, 1/N, N), with mu linear in the image-token count
(256 -> 0.5, 4096 -> 1.15, extrapolated beyond), then a terminal 0. The sampler steps x <- x + (sigma_{i+1} - sigma_i) v
and feeds sigma_i (in [0, 1]) to the transformer as its timestep.
"""

from __future__ import annotations

import math

import numpy as np

BASE_SEQ_LEN = 256
MAX_SEQ_LEN = 4096
BASE_SHIFT = 0.5
MAX_SHIFT = 1.15


def flux_mu(
    image_seq_len: int,
    base_seq_len: int = BASE_SEQ_LEN,
    max_seq_len: int = MAX_SEQ_LEN,
    base_shift: float = BASE_SHIFT,
    max_shift: float = MAX_SHIFT,
) -> float:
    """The time-shift parameter for ``image_seq_len`` image tokens (diffusers' ``calculate_shift``)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    intercept = base_shift - slope * base_seq_len
    return image_seq_len * slope + intercept


def flux_sigmas(
    num_steps: int,
    image_seq_len: int,
    base_seq_len: int = BASE_SEQ_LEN,
    max_seq_len: int = MAX_SEQ_LEN,
    base_shift: float = BASE_SHIFT,
    max_shift: float = MAX_SHIFT,
) -> np.ndarray:
    """float32 (num_steps + 1,): the shifted sigmas from 1 down, then 0."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if image_seq_len < 1:
        raise ValueError(f"image_seq_len must be >= 1, got {image_seq_len}")
    mu = flux_mu(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift)
    # float32 before the shift, as the scheduler does, so the values agree bit for bit where possible.
    t = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    shifted = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    return np.concatenate([shifted.astype(np.float32), np.zeros(1, dtype=np.float32)])
