"""The GRPO objective (Eqs. 13, 15-17), checked against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from unidg.train.grpo import clipped_policy_terms, gaussian_kl, group_advantages, grpo_loss


def test_group_advantages_by_hand() -> None:
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5]])
    advantages = group_advantages(rewards, eps=1e-5)
    std = math.sqrt(1.25)  # population std of 1..4 (1/G, as Eq. 13 defines sigma_G)
    expected = [(r - 2.5) / (std + 1e-5) for r in (1, 2, 3, 4)]
    assert advantages[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert advantages[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # a group with equal rewards teaches nothing
    # Groups are independent: shifting one group's rewards changes nothing.
    assert torch.equal(group_advantages(rewards + torch.tensor([[10.0], [0.0]])), advantages)
    clipped = group_advantages(torch.tensor([[0.0] * 99 + [1.0]]), clip=5.0)
    assert float(clipped.max()) == 5.0 and float(group_advantages(torch.tensor([[0.0] * 99 + [1.0]])).max()) > 9.9


def test_group_advantages_refuse_bad_rewards() -> None:
    with pytest.raises(ValueError, match="finite"):
        group_advantages(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.tensor([[1.0], [2.0]]))


def test_clipped_terms_by_hand() -> None:
    advantages = torch.tensor([2.0, -1.0, 1.0, -1.0])
    ratio = torch.tensor([1.5, 0.5, 0.5, 1.5])
    terms, clipped = clipped_policy_terms(ratio.log(), torch.zeros(4), advantages, 0.2)
    # A=2, rho=1.5: max(-3, -2.4) = -2.4 (clipped);  A=-1, rho=0.5: max(0.5, 0.8) = 0.8 (clipped)
    # A=1, rho=0.5: max(-0.5, -0.8) = -0.5;          A=-1, rho=1.5: max(1.5, 1.2) = 1.5
    assert terms.tolist() == pytest.approx([-2.4, 0.8, -0.5, 1.5], abs=1e-6)
    assert clipped.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_gradient_at_the_sampling_policy_is_minus_the_advantage() -> None:
    log_prob = torch.tensor([0.3, -0.2, 0.1], requires_grad=True)
    advantages = torch.tensor([1.0, -2.0, 0.5])
    terms = grpo_loss(log_prob, log_prob.detach(), advantages, clip_range=1e-4)
    terms.loss.backward()
    assert log_prob.grad.tolist() == pytest.approx((-advantages / 3).tolist(), abs=1e-6)
    assert float(terms.clip_fraction) == 0.0 and float(terms.ratio_deviation) == 0.0


def test_kl_by_hand_and_in_the_total() -> None:
    mean = torch.full((2, 3, 4), 0.1)
    reference = torch.zeros(2, 3, 4)
    reference[1] = 0.3  # row 1 differs by 0.2
    std = torch.tensor([0.5, 0.5])
    assert gaussian_kl(mean, reference, std).tolist() == pytest.approx([0.01 / 0.5, 0.04 / 0.5], abs=1e-6)
    log_prob = torch.zeros(2)
    advantages = torch.tensor([1.0, -1.0])
    terms = grpo_loss(log_prob, log_prob, advantages, 0.2, beta=0.5, mean=mean, reference_mean=reference, std=std)
    assert float(terms.policy) == pytest.approx(0.0)  # (-1 + 1) / 2
    assert float(terms.kl) == pytest.approx(0.05, abs=1e-6)  # (0.02 + 0.08) / 2
    assert float(terms.loss) == pytest.approx(0.025, abs=1e-6)
    # The KL of two Gaussians with one std, per element, is what torch.distributions gives.
    p = torch.distributions.Normal(mean, 0.5)
    q = torch.distributions.Normal(reference, 0.5)
    assert gaussian_kl(mean, reference, std).tolist() == pytest.approx(
        torch.distributions.kl_divergence(p, q).mean(dim=(1, 2)).tolist(), abs=1e-6
    )
    with pytest.raises(ValueError, match="KL term"):
        grpo_loss(log_prob, log_prob, advantages, 0.2, beta=0.5)


def test_kl_scale_gives_flow_grpo_official_penalty_and_logs_the_exact_kl() -> None:
    """Flow-GRPO's code divides ||mu - mu_ref||^2 by 2 * std_dev_t^2 (the noise level, no Delta t); the exact KL of
    the steps' Gaussians divides by the transition variance std_dev_t^2 * Delta t. kl_scale = Delta t turns one into
    the other; the logged KL stays the exact one."""
    torch.manual_seed(0)
    mean, reference = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    noise_level = torch.tensor([0.9, 0.6, 0.4])  # std_dev_t of Flow-GRPO's sde_step_with_logprob
    delta = torch.tensor([0.25, 0.1, 0.04])  # sigma_t - sigma_t+1
    step_std = noise_level * delta.sqrt()
    zeros = torch.zeros(3)
    beta = 0.5
    official = ((mean - reference) ** 2).mean(dim=(1, 2)) / (2 * noise_level**2)
    exact = ((mean - reference) ** 2).mean(dim=(1, 2)) / (2 * step_std**2)
    flow = grpo_loss(zeros, zeros, zeros, 1e-5, beta, mean, reference, step_std, kl_scale=delta)
    step = grpo_loss(zeros, zeros, zeros, 1e-5, beta, mean, reference, step_std)
    assert float(flow.loss) == pytest.approx(beta * float(official.mean()), rel=1e-6)
    assert float(step.loss) == pytest.approx(beta * float(exact.mean()), rel=1e-6)
    assert float(flow.kl) == float(step.kl) == pytest.approx(float(exact.mean()), rel=1e-6)
    # The exact KL's penalty is 1 / Delta t stronger row by row: 4x to 25x here.
    assert (exact / official).tolist() == pytest.approx((1 / delta).tolist(), rel=1e-5)


@pytest.mark.parametrize(("clip_range", "binds"), [(1e-5, True), (1e-4, False)])
def test_clip_range_binds_on_a_ratio_between_the_papers_and_flow_grpos(clip_range: float, binds: bool) -> None:
    """A ratio of 1 + 5e-5 (a policy moved by an earlier update on the same rollouts): the paper's 1e-5 clips it
    and stops its gradient, Flow-GRPO's 1e-4 does not."""
    old = torch.zeros(2)
    log_prob = torch.full((2,), math.log1p(5e-5), requires_grad=True)
    advantages = torch.tensor([1.0, -1.0])
    terms = grpo_loss(log_prob, old, advantages, clip_range)
    terms.loss.backward()
    assert float(terms.clip_fraction) == (0.5 if binds else 0.0)  # only A > 0 is clipped when rho > 1
    expected_first = 0.0 if binds else -(1 + 5e-5) / 2
    assert float(log_prob.grad[0]) == pytest.approx(expected_first, abs=1e-7)
    assert float(log_prob.grad[1]) == pytest.approx((1 + 5e-5) / 2, abs=1e-7)  # A < 0, rho > 1: never clipped
