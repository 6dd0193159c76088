"""The rectified-flow sampler as a stochastic policy (Flow-GRPO): an SDE step with the same marginals as the ODE
step ``x <- x + (sigma_next - sigma) * v`` of ``unidg.train.sampler``, and the log-density of each step.

With Delta = sigma - sigma_next > 0 and a noise level ``a``, the step is Gaussian:

    std_t  = a * sqrt(sigma / (1 - sigma))        (sigma = 1 uses the schedule's second sigma in the denominator)
    mean   = x - Delta * v - Delta * std_t**2 / (2 sigma) * (x + (1 - sigma) * v)   (the score-correction term)
    x_next = mean + std_t * sqrt(Delta) * eps,   eps ~ N(0, I)

and its log-density is the Gaussian's, averaged over every non-batch dimension (Flow-GRPO's convention, so the
ratio of two policies does not scale with the image size). With ``a = 0`` the mean is the Euler step exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (B, N, C), sigma (B,)) -> v (B, N, C)
LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass
class SDEStep:
    """One step of the SDE sampler: the sample drawn (or given), its Gaussian's mean and std, the log-density."""

    x_next: torch.Tensor  # (B, N, C)
    mean: torch.Tensor  # (B, N, C)
    std: torch.Tensor  # (B,) the Gaussian's std: std_t * sqrt(Delta)
    log_prob: torch.Tensor | None  # (B,) mean over non-batch dims; None when the step is deterministic (a = 0)


def _rows(value: torch.Tensor | float, batch: int, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float32, device=like.device).reshape(-1).expand(batch)


def noise_std(sigma: torch.Tensor, sigma_cap: torch.Tensor, noise_level: float) -> torch.Tensor:
    """std_t = a * sqrt(sigma / (1 - sigma)); at sigma = 1 the denominator uses ``sigma_cap`` (the schedule's
    second sigma), as Flow-GRPO does, so the first step's noise stays finite."""
    denominator = 1.0 - torch.where(sigma >= 1.0, sigma_cap, sigma)
    return noise_level * torch.sqrt(sigma / denominator)


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(sample; mean, std^2 I) per element, averaged over the non-batch dimensions -> (B,)."""
    std = std.reshape(-1, *([1] * (sample.dim() - 1)))
    elementwise = -((sample - mean) ** 2) / (2.0 * std**2) - torch.log(std) - LOG_SQRT_2PI
    return elementwise.mean(dim=tuple(range(1, sample.dim())))


def sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    noise_level: float,
    sigma_cap: torch.Tensor | float,
    *,
    x_next: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> SDEStep:
    """One SDE step from ``x`` with velocity ``v``. Give ``x_next`` to score a recorded transition (training), or
    ``noise`` (standard normal, like x) to draw one (rollout); with neither, the mean is returned as the sample."""
    if noise_level < 0:
        raise ValueError(f"noise level must be >= 0 (got {noise_level})")
    batch = x.shape[0]
    x, v = x.float(), v.float()
    sigma, sigma_next = _rows(sigma, batch, x), _rows(sigma_next, batch, x)
    sigma_cap = _rows(sigma_cap, batch, x)
    delta = sigma - sigma_next
    if bool((delta <= 0).any()) or bool((sigma > 1).any()) or bool((sigma_next < 0).any()):
        raise ValueError("sigmas must decrease within [0, 1] along the schedule")
    std_t = noise_std(sigma, sigma_cap, noise_level)
    shape = (batch, *([1] * (x.dim() - 1)))
    d, s, sg = delta.reshape(shape), std_t.reshape(shape), sigma.reshape(shape)
    mean = x - d * v - d * s**2 / (2.0 * sg) * (x + (1.0 - sg) * v)
    std = std_t * torch.sqrt(delta)
    if x_next is None:
        x_next = mean if noise is None else mean + std.reshape(shape) * noise.float()
    log_prob = None if noise_level == 0 else gaussian_log_prob(x_next.float().detach(), mean, std)
    return SDEStep(x_next, mean, std, log_prob)


@dataclass
class Trajectory:
    """A rollout of B samples over T steps of one schedule."""

    latents: torch.Tensor  # (B, T + 1, N, C): x_0 (noise) ... x_T (the sample)
    log_probs: torch.Tensor | None  # (B, T) log-density of each step under the sampling policy (None: a = 0)
    sigmas: torch.Tensor  # (T + 1,)

    @property
    def steps(self) -> int:
        return int(self.sigmas.numel() - 1)

    @property
    def final(self) -> torch.Tensor:
        return self.latents[:, -1]


def step_noise(seeds: Sequence[int], step: int, like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise of step ``step`` (B, N, C): row b depends only on (seeds[b], step), not on the batch."""
    rows = [
        np.random.default_rng([int(seed), int(step), 0x5DE]).standard_normal(like.shape[1:], dtype=np.float32)
        for seed in seeds
    ]
    return torch.from_numpy(np.stack(rows)).to(like.device)


@torch.no_grad()
def sde_rollout(
    velocity: VelocityFn,
    x: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    noise_level: float,
    seeds: Sequence[int],
) -> Trajectory:
    """Sample from ``x`` (B, N, C) along ``sigmas`` (T + 1 values, first 1, decreasing), recording every latent and
    every step's log-density. Row b's step noise comes from ``seeds[b]``. With ``noise_level = 0`` this is the Euler
    ODE sampler (``unidg.train.sampler.denoise``) and no log-densities are recorded."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32).reshape(-1).cpu()
    if sigmas.numel() < 2:
        raise ValueError("a rollout needs at least one step (two sigmas)")
    if len(seeds) != x.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for {x.shape[0]} rollouts; pass one seed per row")
    cap = float(sigmas[1])
    x = x.float()
    latents, log_probs = [x], []
    for i in range(sigmas.numel() - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        v = velocity(x, torch.full((x.shape[0],), sigma, device=x.device))
        noise = step_noise(seeds, i, x) if noise_level > 0 else None
        step = sde_step(x, v, sigma, sigma_next, noise_level, cap, noise=noise)
        x = step.x_next
        latents.append(x)
        if step.log_prob is not None:
            log_probs.append(step.log_prob)
    return Trajectory(torch.stack(latents, dim=1), torch.stack(log_probs, dim=1) if log_probs else None, sigmas)
