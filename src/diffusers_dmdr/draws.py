"""Every random number of one training iteration, as a pure function of `(seed, iteration, rank)`.

Nothing else in a run draws at random, which is why a resumed run needs no RNG state. Draws are made per sample: numpy
vectors over the iteration's effective batch (micro-batches x batch) and one torch generator per sample, so that a
micro-batch sees exactly the numbers its samples would see in one large batch (gradient accumulation over N
micro-batches of B equals one batch of N x B).
"""

from dataclasses import dataclass

import numpy as np
import torch

from . import schedules


@dataclass
class IterationDraws:
    """
    Args:
        generators (`list[torch.Generator]`): one per sample; every noise tensor of a sample comes from its own.
        step_index (`np.ndarray` of shape `(rows,)`): the student step of each sample's backward simulation.
        fake_noise_levels, dmd_noise_levels (`torch.Tensor` of shape `(rows,)`): DynaRS levels `t ~ Beta(a_k, b_k)`
            of the fake-score loss and of the DMD re-noising.
        monitor_noise_levels (`torch.Tensor` of shape `(rows,)`): `t ~ U[0.02, 0.98]` of the teacher-loss monitor.
        guidance_scale (`float`): the real-score CFG scale of the iteration, `U[cfg - jitter, cfg + jitter]`.
    """

    generators: list[torch.Generator]
    step_index: np.ndarray
    fake_noise_levels: torch.Tensor
    dmd_noise_levels: torch.Tensor
    monitor_noise_levels: torch.Tensor
    guidance_scale: float


def draw_iteration(
    seed: int,
    iteration: int,
    rank: int,
    rows: int,
    num_student_steps: int,
    renoise_beta: tuple[float, float],
    guidance_scale: float,
    guidance_scale_jitter: float,
) -> IterationDraws:
    """The draws of `iteration` on process `rank` for `rows` samples, from `numpy.random.default_rng([seed,
    iteration, rank])` in a fixed order (so a new kind of draw must be appended, never inserted)."""
    rng = np.random.default_rng([seed, iteration, rank])
    sample_seeds = rng.integers(2**62, size=rows)
    step_index = rng.integers(0, num_student_steps, size=rows)
    alpha, beta = renoise_beta
    fake_levels = schedules.sample_renoise_levels(rows, alpha, beta, rng)
    dmd_levels = schedules.sample_renoise_levels(rows, alpha, beta, rng)
    monitor_levels = torch.from_numpy(rng.uniform(0.02, 0.98, size=rows)).float()
    scale = schedules.sample_guidance_scale(guidance_scale, guidance_scale_jitter, rng)
    return IterationDraws(
        generators=[torch.Generator("cpu").manual_seed(int(sample_seed)) for sample_seed in sample_seeds],
        step_index=step_index,
        fake_noise_levels=fake_levels,
        dmd_noise_levels=dmd_levels,
        monitor_noise_levels=monitor_levels,
        guidance_scale=scale,
    )
