"""Policy-gradient math for RL on a few-step student (GRPO and Diffusion-DPO), as pure functions.

Tensor in, tensor out: no module state, no config object. The objectives that run them (`--rl grpo`, `--rl dpo`)
make the predictions; these functions only combine them.

The student's sampler as a policy. Each step of the few-step sampler predicts `x0` from the state `x_t` and moves to
the next student level `t'` with `x_{t'} = a(t') x0 + s(t') (cos(pi eta / 2) eps_hat + sin(pi eta / 2) eps)`, where
`(a, s)` are the scheduler's coefficients (`a = 1 - t'`, `s = t'` for flow models), `eps_hat` is the noise the
prediction implies (`(x_t - a(t) x0) / s(t)`) and `eps` is fresh Gaussian noise. So each transition is a Gaussian
with mean `a(t') x0 + s(t') cos(pi eta / 2) eps_hat` and standard deviation `s(t') sin(pi eta / 2)`, whose
log-probability is tractable:

- `eta = 1` is the `sde` sampler DMD students are trained and exported with (re-noise the prediction with fresh noise:
  mean `a(t') x0`, std `s(t')`): the policy is exactly the sampler users run.
- `eta < 1` is the coefficients-preserving variant for students trained with the deterministic (`ode`) sampler: the
  marginal noise scale stays `s(t')` at every step, so the student sees inputs of the statistics it was trained on,
  while `sin(pi eta / 2)` of it is fresh (explorable) noise. `eta = 0` is DDIM / Euler and has no log-probability.
  This is the "coefficients-preserving sampling" (CPS) of Wang et al. (2025), which Flow-GRPO (Liu et al., 2025,
  arXiv 2505.05470) also ships as its `cps` step with the same `sin(noise_level * pi / 2)` rule; Flow-GRPO's default
  noise level is 0.7, which is the default here for `ode` students.

The last step returns `x0` itself, without noise: it is not a stochastic transition and has no log-probability (its
network call shares the weights the earlier transitions train).

Log-probabilities are averaged over the elements of a sample rather than summed (`reduction="mean"`), as Flow-GRPO
and DanceGRPO (Xue et al., 2025, arXiv 2505.07818) do: a sum over thousands of latent elements turns a tiny change of
the mean into a ratio far from 1. The clip range is set for that scale (Flow-GRPO and DanceGRPO use 1e-4).
"""

import math

import torch
import torch.nn.functional as F


def transition_mean_std(
    x0: torch.Tensor,
    implied_noise: torch.Tensor | None,
    next_signal: torch.Tensor | float,
    next_sigma: torch.Tensor | float,
    eta: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Mean and standard deviation of the Gaussian transition to the next student level.

    Args:
        x0 (`torch.Tensor` of shape `(B, ...)`): the student's clean prediction at the current state (with the graph
            when the log-probability is to be differentiated).
        implied_noise (`torch.Tensor` of the same shape, *optional*): the noise the prediction implies at the current
            state, `(x_t - a(t) x0) / s(t)`; unused (may be `None`) when `eta = 1`.
        next_signal, next_sigma (`torch.Tensor` broadcastable to `x0`, or `float`): the coefficients `a(t')`, `s(t')`
            of the next level, `x_{t'} = a(t') x0 + s(t') noise`.
        eta (`float` in `(0, 1]`, defaults to 1.0): the fraction of fresh noise, as an angle: `1` re-noises with fresh
            noise only (the DMD `sde` sampler), smaller values keep `cos(pi eta / 2)` of the implied noise.

    Returns:
        `(mean, std)`: `mean` of the shape of `x0` in float32, `std` broadcastable to it (no graph).
    """
    if not 0.0 < eta <= 1.0:
        raise ValueError(f"eta must be in (0, 1] (0 is the deterministic sampler, which has no density), got {eta}.")
    next_signal = torch.as_tensor(next_signal, dtype=torch.float32, device=x0.device)
    next_sigma = torch.as_tensor(next_sigma, dtype=torch.float32, device=x0.device)
    mean = next_signal * x0.float()
    if eta < 1.0:
        if implied_noise is None:
            raise ValueError("eta < 1 keeps part of the implied noise: pass `implied_noise`.")
        mean = mean + next_sigma * math.cos(math.pi * eta / 2) * implied_noise.float()
    std = next_sigma * math.sin(math.pi * eta / 2)
    return mean, std


def gaussian_log_prob(
    sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float, reduction: str = "mean"
) -> torch.Tensor:
    r"""Per-sample log-density of `sample` under `N(mean, std^2 I)`.

    Args:
        sample (`torch.Tensor` of shape `(B, ...)`): the state the sampler moved to (treated as data: detached).
        mean (`torch.Tensor` of the same shape): the transition's mean, with the graph to the policy's parameters.
        std (`torch.Tensor` broadcastable to `sample`, or `float`): the transition's standard deviation (> 0).
        reduction (`str`, defaults to `"mean"`): `"mean"` averages the per-element log-densities over each sample
            (Flow-GRPO's and DanceGRPO's scale, see the module docstring); `"sum"` is the exact joint log-density.

    Returns:
        `torch.Tensor` of shape `(B,)` in float32.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")
    std = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    if not bool((std > 0).all()):
        raise ValueError("The transition's standard deviation must be positive (the last student step has none).")
    per_element = (
        -((sample.detach().float() - mean.float()) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    )
    per_element = per_element.expand_as(mean) if per_element.shape != mean.shape else per_element
    dims = tuple(range(1, per_element.ndim))
    return per_element.mean(dim=dims) if reduction == "mean" else per_element.sum(dim=dims)


def gaussian_kl(mean: torch.Tensor, reference_mean: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    r"""Per-sample `KL(N(mean, std^2) || N(reference_mean, std^2))`, averaged over elements like the log-probability.

    For two Gaussians of equal variance the KL is `|mean - reference_mean|^2 / (2 std^2)` per element: Flow-GRPO's
    regulariser towards the reference policy (here the frozen stage-1 student), evaluated on the same state.

    Returns:
        `torch.Tensor` of shape `(B,)` in float32, with the graph through `mean`.
    """
    std = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    per_element = (mean.float() - reference_mean.detach().float()) ** 2 / (2 * std**2)
    per_element = per_element.expand_as(mean) if per_element.shape != mean.shape else per_element
    return per_element.mean(dim=tuple(range(1, per_element.ndim)))


def group_advantages(
    rewards: torch.Tensor, group_size: int, clip: float | None = 5.0, eps: float = 1e-6
) -> torch.Tensor:
    r"""GRPO's group-normalised advantages: each reward minus its group's mean, over its group's standard deviation.

    Args:
        rewards (`torch.Tensor` of shape `(B,)`): one scalar reward per rollout; rows `g * group_size ..` are the
            rollouts of one prompt (a group), so `B` must be a multiple of `group_size`.
        group_size (`int`): rollouts per prompt (`G`, at least 2).
        clip (`float`, *optional*, defaults to 5.0): advantages are clamped to `[-clip, clip]` (Flow-GRPO's and
            DanceGRPO's `adv_clip_max = 5`); `None` keeps them.
        eps (`float`, defaults to 1e-6): added to the standard deviation, so a group of equal rewards (no signal)
            gets zero advantages rather than a division by zero.

    Returns:
        `torch.Tensor` of shape `(B,)` in float32, no graph. Within every group the advantages have mean 0 and (before
        clipping, for groups with spread) standard deviation 1.
    """
    if group_size < 2:
        raise ValueError(f"A group needs at least 2 rollouts to compare, got group_size={group_size}.")
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards must have shape (B,) with B a multiple of {group_size}; got {tuple(rewards.shape)}."
        )
    grouped = rewards.detach().float().view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, unbiased=False, keepdim=True)
    advantages = ((grouped - mean) / (std + eps)).flatten()
    return advantages if clip is None else advantages.clamp(-clip, clip)


def ppo_clipped_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""The PPO-clipped surrogate GRPO minimises: `mean(max(-A r, -A clip(r, 1 - c, 1 + c)))`, `r = exp(lp - lp_old)`.

    Args:
        log_prob (`torch.Tensor` of shape `(B,)`): log-probability of each rollout's transition under the current
            student, with the graph.
        old_log_prob (`torch.Tensor` of shape `(B,)`): the same under the student that sampled it (no graph).
        advantages (`torch.Tensor` of shape `(B,)`): from [`group_advantages`].
        clip_range (`float`): `c`; the ratio's gradient stops once it leaves `[1 - c, 1 + c]` in the advantage's
            direction.

    Returns:
        `(loss, stats)`: the scalar float32 loss with the graph, and detached `ratio_mean`, `clip_fraction` (share of
        rollouts whose ratio left the range) and `approx_kl` (`mean((lp - lp_old)^2) / 2`, the usual estimate).
    """
    log_ratio = log_prob.float() - old_log_prob.detach().float()
    ratio = torch.exp(log_ratio)
    advantages = advantages.detach().float()
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {
            "ratio_mean": ratio.mean(),
            "clip_fraction": ((ratio - 1.0).abs() > clip_range).float().mean(),
            "approx_kl": 0.5 * (log_ratio**2).mean(),
        }
    return loss, stats


def best_and_worst(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""On-policy preference pairs: the best and the worst rollout of every group, ranked by reward.

    Args:
        rewards (`torch.Tensor` of shape `(B,)`): rows `g * group_size ..` are one group (one prompt's K samples).
        group_size (`int`): samples per prompt (`K`, at least 2).

    Returns:
        `(winners, losers, informative)`: row indices into `rewards` of shape `(B / K,)`, and a boolean mask of the
        groups whose best reward is strictly above their worst (a group of equal rewards states no preference). Ties
        go to the lowest row, so the pairs are a function of the rewards alone.
    """
    if group_size < 2:
        raise ValueError(f"A preference pair needs at least 2 samples per prompt, got group_size={group_size}.")
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards must have shape (B,) with B a multiple of {group_size}; got {tuple(rewards.shape)}."
        )
    grouped = rewards.detach().float().view(-1, group_size)
    offsets = torch.arange(grouped.shape[0], device=rewards.device) * group_size
    best, worst = grouped.argmax(dim=1), grouped.argmin(dim=1)
    informative = grouped.max(dim=1).values > grouped.min(dim=1).values
    return offsets + best, offsets + worst, informative


def diffusion_dpo_loss(
    error_winner: torch.Tensor,
    error_loser: torch.Tensor,
    reference_error_winner: torch.Tensor,
    reference_error_loser: torch.Tensor,
    beta: float,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Diffusion-DPO (Wallace et al., 2023, arXiv 2311.12908): `-log sigmoid(-beta ((e_w - e_w^ref) - (e_l - e_l^ref)))`.

    `e` are per-sample denoising errors of the policy and of the frozen reference on the same noisy inputs (winner and
    loser of a pair, noised at the same level with the same noise). Lowering the winner's error relative to the
    reference more than the loser's raises the implicit reward; `beta` trades that against staying near the reference
    (it absorbs the paper's `T * omega(lambda_t)` factor).

    Args:
        error_winner, error_loser (`torch.Tensor` of shape `(P,)`): the policy's errors, with the graph.
        reference_error_winner, reference_error_loser (`torch.Tensor` of shape `(P,)`): the reference's (no graph).
        beta (`float`): the inverse temperature (> 0).
        weights (`torch.Tensor` of shape `(P,)`, *optional*): per-pair weights, e.g. 0 for a pair without preference;
            the loss is their weighted mean (0 when every weight is 0).

    Returns:
        `(loss, stats)`: the scalar float32 loss with the graph, and detached `implicit_accuracy` (share of pairs the
        policy already ranks right, `logit > 0`) and `logit_mean`.
    """
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}.")
    policy_margin = error_winner.float() - error_loser.float()
    reference_margin = reference_error_winner.detach().float() - reference_error_loser.detach().float()
    logit = -beta * (policy_margin - reference_margin)
    per_pair = -F.logsigmoid(logit)
    if weights is None:
        weights = torch.ones_like(per_pair)
    weights = weights.detach().float()
    loss = (weights * per_pair).sum() / weights.sum().clamp_min(torch.finfo(torch.float32).tiny)
    with torch.no_grad():
        counted = weights > 0
        stats = {
            "implicit_accuracy": (logit[counted] > 0).float().mean() if counted.any() else logit.new_zeros(()),
            "logit_mean": logit[counted].mean() if counted.any() else logit.new_zeros(()),
        }
    return loss, stats
