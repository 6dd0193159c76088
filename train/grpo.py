"""The GRPO objective of Consistency-RFT (paper App. D.2, Eqs. 13, 15-17), on per-step Gaussian policies.

    A_i      = (r_i - mean_G) / (std_G + eps)                  Eq. 13 (population std over the group; clipped to
                                                               +-adv_clip as Flow-GRPO does)
    rho_t    = exp(log pi_theta(x_t-1 | x_t) - log pi_old(...))
    L_GRPO   = mean over steps and samples of max(-A rho_t, -A clip(rho_t, 1 - c, 1 + c))     Eq. 15
    L_KL     = mean over steps and samples of ||mu_theta - mu_ref||^2 / (2 s_t^2)             Eq. 16
    L        = L_GRPO + beta * L_KL                                                         Eq. 17

Which variance divides the KL (``kl_scale``): with s_t the transition's std (the noise level times sqrt(Delta t),
the std of Eq. 14's log-density) L_KL is the exact KL divergence of the two steps' Gaussians. Flow-GRPO's official
code divides by the noise level's square without Delta t, i.e. L_KL * Delta t: a KL term 1 / Delta t times weaker
(3-25x over an 8-step schedule) for the same beta. ``kl_scale`` multiplies each row's KL in the loss (Delta t for
Flow-GRPO's scale, 1 or None for the exact KL); the logged ``kl`` is always the exact one.

Eq. 15 sums over the T steps; Flow-GRPO accumulates the gradient of every step and averages it, which is the mean
used here (the sum is T times larger: the same direction with a T-times larger step size). ``s_t`` is the step's
Gaussian std (``sde_sampler.SDEStep.std``) and the squared norm is averaged over the non-batch dimensions, like the
log-densities, so L_KL is the exact per-element KL divergence between the two steps' Gaussians.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def group_advantages(rewards: torch.Tensor, eps: float = 1e-5, clip: float = 0.0) -> torch.Tensor:
    """Eq. 13 for rewards (P, G): P groups of G rollouts of one prompt each -> advantages (P, G).

    std_G is the population standard deviation (1/G). ``clip`` > 0 bounds |A| (Flow-GRPO: 5)."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be (groups, G) with G >= 2 rollouts per group, got {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or infinity; a reward must give a finite score for every rollout")
    rewards = rewards.double()
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, unbiased=False)
    advantages = (rewards - mean) / (std + eps)
    if clip > 0:
        advantages = advantages.clamp(-clip, clip)
    return advantages.float()


def clipped_policy_terms(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row terms of Eq. 15: max(-A rho, -A clip(rho)) and whether the clip was active (rows of one step)."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def gaussian_kl(mean: torch.Tensor, reference_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Eq. 16 per row: ||mu - mu_ref||^2 / (2 std^2), the squared norm averaged over non-batch dimensions."""
    squared = (mean - reference_mean).pow(2).mean(dim=tuple(range(1, mean.dim())))
    return squared / (2.0 * std.pow(2))


class GRPOTerms(NamedTuple):
    loss: torch.Tensor  # Eq. 17 for the rows given (mean over rows)
    policy: torch.Tensor  # Eq. 15 part (mean over rows)
    kl: torch.Tensor  # Eq. 16 part, the exact KL (mean over rows)
    clip_fraction: torch.Tensor  # share of rows whose ratio was clipped
    ratio_deviation: torch.Tensor  # mean |rho - 1|


def grpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    beta: float = 0.0,
    mean: torch.Tensor | None = None,
    reference_mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    kl_scale: torch.Tensor | None = None,
) -> GRPOTerms:
    """Eq. 17 over rows that are (rollout, step) transitions: each row's policy term plus ``beta`` times its KL term
    to the reference policy's mean (times ``kl_scale`` per row, when given), averaged over the rows (the exact KL
    is computed, for the log, whenever the means are given)."""
    policy_rows, clipped = clipped_policy_terms(log_prob, old_log_prob, advantages, clip_range)
    policy = policy_rows.mean()
    given = mean is not None and reference_mean is not None and std is not None
    if beta > 0 and not given:
        raise ValueError("the KL term needs the policy's and the reference policy's means and the step std")
    kl_rows = gaussian_kl(mean, reference_mean, std) if given else policy.new_zeros(log_prob.shape)
    penalty = (kl_rows * kl_scale).mean() if kl_scale is not None else kl_rows.mean()
    ratio = torch.exp((log_prob - old_log_prob).detach())
    return GRPOTerms(policy + beta * penalty, policy, kl_rows.mean(), clipped.mean(), (ratio - 1).abs().mean())
