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
