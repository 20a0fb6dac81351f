"""Pure loss functions of DMDR (https://huggingface.co/papers/2511.13649).

Tensor in, tensor out: no module state, no I/O, no config object. The trainer computes the predictions and these
functions only combine them.
"""

import torch
import torch.nn.functional as F


def dmd_loss(
    x0_student: torch.Tensor,
    x0_real: torch.Tensor,
    x0_fake: torch.Tensor,
    sample_weights: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    r"""Surrogate loss whose gradient is the normalised distribution-matching direction.

    With the per-sample normaliser `n_b = mean_{C,H,W} |x0_student - x0_real| + eps`, the direction is
    `g = (x0_fake - x0_real) / n_b` (NaNs set to 0), and the loss is `0.5 * mse(x0_student, stopgrad(x0_student - g))`
    with mean reduction. Its gradient with respect to `x0_student` is therefore exactly `g / x0_student.numel()`:
    the student moves away from the fake score and towards the real score (DMD, DMD2 and DMDR Eq. 1).

    Args:
        x0_student (`torch.Tensor` of shape `(B, C, H, W)`):
            The student's clean prediction, carrying the generator's graph.
        x0_real (`torch.Tensor` of the same shape):
            Clean prediction of the real score (teacher with CFG) at the re-noised student sample; no graph.
        x0_fake (`torch.Tensor` of the same shape):
            Clean prediction of the fake score at the same input; no graph.
        sample_weights (`torch.Tensor` of shape `(B,)`, *optional*):
            Per-sample weights on the direction (reward-tilted distribution matching); `None` means all ones.
        eps (`float`, defaults to 1e-8):
            Added to the normaliser so that a perfect real-score match does not divide by zero.

    Returns:
        `torch.Tensor`: the scalar surrogate loss, in float32.
    """
    x0_student_f32 = x0_student.float()
    with torch.no_grad():
        x0_real_f32, x0_fake_f32 = x0_real.float(), x0_fake.float()
        reduce_dims = tuple(range(1, x0_student.ndim))
        normaliser = (x0_student_f32 - x0_real_f32).abs().mean(dim=reduce_dims, keepdim=True) + eps
        direction = torch.nan_to_num((x0_fake_f32 - x0_real_f32) / normaliser, nan=0.0)
        if sample_weights is not None:
            direction = direction * sample_weights.float().view(-1, *([1] * (x0_student.ndim - 1)))
        target = x0_student_f32 - direction
    return 0.5 * F.mse_loss(x0_student_f32, target, reduction="mean")


def fake_score_loss(model_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Denoising loss of the fake score: plain MSE to the backbone's own target (eps, v or flow velocity).

    Mean over every element, no per-timestep weighting, as in the released DMDR code.
    """
    return F.mse_loss(model_output.float(), target.float(), reduction="mean")


def anchor_loss(x0_student: torch.Tensor, x0_reference: torch.Tensor) -> torch.Tensor:
    """L2 anchor `mse(x0_student, x0_reference)` to a frozen reference student on the same input: the usual
    KL-style regulariser of reward fine-tuning (for Gaussian policies with equal variance the KL is this MSE up to a
    scale), used as the baseline DMDR's DMD regulariser is compared against."""
    return F.mse_loss(x0_student.float(), x0_reference.float().detach(), reduction="mean")


def reward_loss(scores: torch.Tensor, hinge: float | None = 0.7) -> torch.Tensor:
    r"""Loss of one reward on a batch: `mean(relu(hinge - scores))`, or `-mean(scores)` when `hinge` is `None`.

    The paper uses a hinge at 0.7 on cosine-type scores that sit near 0.3, so in practice the loss is linear reward
    maximisation; the hinge stops pushing a sample once its score passes the threshold.

    Args:
        scores (`torch.Tensor` of shape `(B,)`): reward per sample, carrying the graph back to the images.
        hinge (`float`, *optional*, defaults to 0.7): threshold of the hinge; `None` gives the linear loss.
    """
    scores = scores.float()
    if hinge is None:
        return -scores.mean()
    return F.relu(hinge - scores).mean()


def reward_tilt_weights(rewards: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    r"""Static per-sample weights of reward-tilted distribution matching (RT-DM, stage 1 of the paper's v4).

    The paper weights each sample's DMD direction by its reward divided by "a norm" of the batch's rewards without
    saying which; rewards here may be negative (log-probabilities), so the weights are a batch softmax of
    `rewards / temperature` rescaled to mean 1: `B * softmax(r / T)`. Equal rewards give plain DMD.

    Args:
        rewards (`torch.Tensor` of shape `(B,)`): rewards of the full few-step outputs; no graph is kept.
        temperature (`float`, defaults to 1.0): larger values flatten the tilt towards plain DMD.
    """
    if temperature <= 0:
        raise ValueError(f"reward tilt temperature must be positive, got {temperature}.")
    rewards = rewards.detach().float()
    return rewards.numel() * torch.softmax(rewards / temperature, dim=0)
