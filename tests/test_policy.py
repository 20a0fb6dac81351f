"""The RL math of `method/policy.py`: transition log-probabilities, group advantages, the PPO surrogate, the KL
regulariser and Diffusion-DPO, against closed forms on toys."""

import math

import pytest
import torch

from diffusers_dmdr.method.policy import (
    best_and_worst,
    diffusion_dpo_loss,
    gaussian_kl,
    gaussian_log_prob,
    group_advantages,
    ppo_clipped_loss,
    transition_mean_std,
)


def test_sde_transition_log_prob_matches_the_1d_gaussian_closed_form():
    # A 1-D flow "student": x0 = w * x_t. The sde sampler moves to x_{t'} = (1 - t') x0 + t' eps.
    w, x_t, next_level, next_sample = 0.8, torch.tensor([[1.5]]), 0.4, torch.tensor([[0.9]])
    x0 = w * x_t
    mean, std = transition_mean_std(x0, None, 1 - next_level, next_level, eta=1.0)
    expected_mean = (1 - next_level) * w * 1.5
    expected = -((0.9 - expected_mean) ** 2) / (2 * next_level**2) - math.log(next_level) - 0.5 * math.log(2 * math.pi)
    assert mean.item() == pytest.approx(expected_mean)
    assert float(std) == pytest.approx(next_level)
    assert gaussian_log_prob(next_sample, mean, std).item() == pytest.approx(expected, rel=1e-6)
    # And it is the density of the distribution the sampler draws from.
    reference = torch.distributions.Normal(torch.tensor(expected_mean), torch.tensor(next_level))
    assert gaussian_log_prob(next_sample, mean, std).item() == pytest.approx(
        reference.log_prob(torch.tensor(0.9)).item()
    )


def test_coefficients_preserving_transition_keeps_the_noise_scale():
    # eta < 1 keeps cos(pi eta / 2) of the implied noise and draws sin(pi eta / 2) fresh: total variance s(t')^2.
    x0, implied, signal, sigma, eta = torch.tensor([[0.3]]), torch.tensor([[-1.2]]), 0.6, 0.4, 0.7
    mean, std = transition_mean_std(x0, implied, signal, sigma, eta)
    assert mean.item() == pytest.approx(signal * 0.3 + sigma * math.cos(math.pi * eta / 2) * -1.2)
    assert float(std) == pytest.approx(sigma * math.sin(math.pi * eta / 2))
    assert (sigma * math.cos(math.pi * eta / 2)) ** 2 + float(std) ** 2 == pytest.approx(sigma**2)
    with pytest.raises(ValueError, match="eta"):
        transition_mean_std(x0, implied, signal, sigma, eta=0.0)
    with pytest.raises(ValueError, match="implied_noise"):
        transition_mean_std(x0, None, signal, sigma, eta=0.5)


def test_log_prob_reductions_and_gradient():
    sample = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(0))
    mean = torch.zeros(3, 2, 4, requires_grad=True)
    summed = gaussian_log_prob(sample, mean, 0.5, reduction="sum")
    averaged = gaussian_log_prob(sample, mean, 0.5, reduction="mean")
    torch.testing.assert_close(summed, averaged * 8)
    (grad,) = torch.autograd.grad(summed.sum(), mean)
    # d/dmu log N(x; mu, s^2) = (x - mu) / s^2.
    torch.testing.assert_close(grad, sample / 0.25)
    with pytest.raises(ValueError, match="positive"):
        gaussian_log_prob(sample, mean, 0.0)


def test_advantages_normalise_within_groups():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 10.0, 10.0, -5.0, 0.0, 5.0, 0.0])
    advantages = group_advantages(rewards, group_size=4, clip=None)
    grouped = advantages.view(3, 4)
    torch.testing.assert_close(grouped.mean(dim=1), torch.zeros(3), atol=1e-6, rtol=0)
    assert grouped[0].std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    assert grouped[2].std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    # A group of equal rewards has no signal: zero advantages, no division by zero.
    assert torch.equal(grouped[1], torch.zeros(4))
    # Shifting one group's rewards changes nothing: only ranks within a group matter, not across groups.
    shifted = rewards.clone()
    shifted[:4] += 100.0
    torch.testing.assert_close(group_advantages(shifted, 4, clip=None), advantages)
    # Clipping bounds an outlier.
    outlier = torch.tensor([0.0] * 7 + [1.0] * 1)
    assert group_advantages(outlier, 8, clip=None).max() > 2.0
    assert group_advantages(outlier, 8, clip=2.0).max() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="multiple"):
        group_advantages(torch.zeros(5), 4)


def _toy_policy_log_probs(weight: torch.Tensor, states: torch.Tensor, next_states: torch.Tensor) -> torch.Tensor:
    """A linear 'student' x0 = weight * x_t on 1-D flow states at t = 0.8, sde transition to t' = 0.5."""
    x0 = weight * states
    mean, std = transition_mean_std(x0, None, 0.5, 0.5)
    return gaussian_log_prob(next_states, mean, std)


def test_ppo_ratio_is_one_on_the_first_inner_step():
    generator = torch.Generator().manual_seed(1)
    weight = torch.tensor(0.7, requires_grad=True)
    states = torch.randn(8, 1, generator=generator)
    with torch.no_grad():
        mean, std = transition_mean_std(weight * states, None, 0.5, 0.5)
        next_states = mean + std * torch.randn(8, 1, generator=generator)
        old_log_prob = _toy_policy_log_probs(weight, states, next_states)
    advantages = group_advantages(torch.randn(8, generator=generator), group_size=4)
    log_prob = _toy_policy_log_probs(weight, states, next_states)
    loss, stats = ppo_clipped_loss(log_prob, old_log_prob, advantages, clip_range=1e-4)
    assert stats["ratio_mean"].item() == 1.0
    assert stats["clip_fraction"].item() == 0.0
    assert stats["approx_kl"].item() == 0.0
    # On-policy, the surrogate's gradient is the plain policy gradient -mean(A * grad log p).
    (grad,) = torch.autograd.grad(loss, weight)
    (expected,) = torch.autograd.grad(
        -(advantages * _toy_policy_log_probs(weight, states, next_states)).mean(), weight
    )
    torch.testing.assert_close(grad, expected)


def test_ppo_clip_stops_the_gradient_outside_the_range():
    old_log_prob = torch.zeros(4)
    log_prob = torch.tensor([0.5, -0.5, 0.5, -0.5], requires_grad=True)
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, stats = ppo_clipped_loss(log_prob, old_log_prob, advantages, clip_range=0.2)
    (grad,) = torch.autograd.grad(loss, log_prob)
    # Ratio e^0.5 > 1.2 with A > 0 and e^-0.5 < 0.8 with A < 0: clipped, no gradient. The other two keep theirs.
    assert grad[0].item() == 0.0 and grad[3].item() == 0.0
    assert grad[1].item() == pytest.approx(-math.exp(-0.5) / 4)
    assert grad[2].item() == pytest.approx(math.exp(0.5) / 4)
    assert stats["clip_fraction"].item() == 1.0


def test_a_reward_that_ignores_the_image_gives_zero_grpo_gradient():
    generator = torch.Generator().manual_seed(2)
    weight = torch.tensor(1.3, requires_grad=True)
    states = torch.randn(12, 1, generator=generator)
    next_states = torch.randn(12, 1, generator=generator)
    # The reward depends on the prompt (one value per group of 4) but not on the image.
    prompt_reward = torch.tensor([0.2, 5.0, -3.0]).repeat_interleave(4)
    advantages = group_advantages(prompt_reward, group_size=4)
    with torch.no_grad():
        old_log_prob = _toy_policy_log_probs(weight, states, next_states)
    loss, _ = ppo_clipped_loss(_toy_policy_log_probs(weight, states, next_states), old_log_prob, advantages, 1e-4)
    (grad,) = torch.autograd.grad(loss, weight)
    assert grad.item() == 0.0
    # Whereas a reward that reads the sample does move the policy.
    image_reward = next_states.flatten()
    loss, _ = ppo_clipped_loss(
        _toy_policy_log_probs(weight, states, next_states), old_log_prob, group_advantages(image_reward, 4), 1e-4
    )
    (grad,) = torch.autograd.grad(loss, weight)
    assert grad.abs().item() > 0


def test_kl_is_the_equal_variance_gaussian_kl():
    mean = torch.tensor([[0.3, -0.1]], requires_grad=True)
    reference = torch.tensor([[0.1, 0.2]])
    kl = gaussian_kl(mean, reference, 0.5)
    p = torch.distributions.Normal(mean.detach(), 0.5)
    q = torch.distributions.Normal(reference, 0.5)
    torch.testing.assert_close(kl, torch.distributions.kl_divergence(p, q).mean(dim=1))
    assert gaussian_kl(reference, reference, 0.5).item() == 0.0


def test_best_and_worst_pairs():
    rewards = torch.tensor([0.1, 0.9, 0.5, 0.4, 0.4, 0.4, 2.0, -1.0, 0.0])
    winners, losers, informative = best_and_worst(rewards, group_size=3)
    assert winners.tolist() == [1, 3, 6]
    assert losers.tolist() == [0, 3, 7]
    assert informative.tolist() == [True, False, True]


def test_diffusion_dpo_loss():
    error_w = torch.tensor([0.2, 0.5], requires_grad=True)
    error_l = torch.tensor([0.4, 0.3], requires_grad=True)
    reference_w, reference_l = torch.tensor([0.3, 0.4]), torch.tensor([0.3, 0.4])
    loss, stats = diffusion_dpo_loss(error_w, error_l, reference_w, reference_l, beta=10.0)
    logits = -10.0 * torch.tensor([(0.2 - 0.4) - 0.0, (0.5 - 0.3) - 0.0])
    assert loss.item() == pytest.approx(-torch.nn.functional.logsigmoid(logits).mean().item(), rel=1e-6)
    assert stats["implicit_accuracy"].item() == 0.5
    (grad_w,) = torch.autograd.grad(loss, error_w)
    assert (grad_w > 0).all()  # minimising the loss lowers the winner's error
    # Equal to the reference everywhere: loss log 2, whatever beta.
    loss, _ = diffusion_dpo_loss(reference_w, reference_l, reference_w, reference_l, beta=123.0)
    assert loss.item() == pytest.approx(math.log(2))
    # A pair without preference weighs nothing.
    loss, _ = diffusion_dpo_loss(error_w, error_l, reference_w, reference_l, 10.0, weights=torch.tensor([1.0, 0.0]))
    assert loss.item() == pytest.approx(-torch.nn.functional.logsigmoid(logits[:1]).item(), rel=1e-6)
    loss, _ = diffusion_dpo_loss(error_w, error_l, reference_w, reference_l, 10.0, weights=torch.zeros(2))
    assert loss.item() == 0.0
