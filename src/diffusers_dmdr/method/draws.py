"""Every random number of one training iteration, as a pure function of `(seed, iteration, sample)`.

Nothing else in a run draws at random, which is why a resumed run needs no RNG state. Each sample of the iteration's
global batch has its own generators, seeded with `(seed, iteration, global sample index)`, and the one per-iteration
draw (the CFG scale) is seeded with `(seed, iteration)`. So the run does not depend on how the global batch is split:
N accumulated micro-batches of B equal one batch of N x B, and P processes of B equal one process of P x B.
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

    def rows(self, rows: slice) -> "IterationDraws":
        """The draws of the samples `rows` (a micro-batch); the iteration's CFG scale is shared."""
        return IterationDraws(
            self.generators[rows],
            self.step_index[rows],
            self.fake_noise_levels[rows],
            self.dmd_noise_levels[rows],
            self.monitor_noise_levels[rows],
            self.guidance_scale,
        )


def draw_iteration(
    seed: int,
    iteration: int,
    first_row: int,
    rows: int,
    num_student_steps: int,
    renoise_beta: tuple[float, float],
    guidance_scale: float,
    guidance_scale_jitter: float,
) -> IterationDraws:
    """The draws of `iteration` for the samples `first_row .. first_row + rows - 1` of its global batch (a process
    holds the rows `rank x rows ..`). Each sample draws from `numpy.random.default_rng([seed, iteration, row])` in a
    fixed order, so a new kind of draw must be appended, never inserted."""
    per_sample = [np.random.default_rng([seed, iteration, row]) for row in range(first_row, first_row + rows)]
    sample_seeds = [int(rng.integers(2**62)) for rng in per_sample]
    step_index = np.array([rng.integers(0, num_student_steps) for rng in per_sample])
    alpha, beta = renoise_beta
    fake_levels = torch.cat([schedules.sample_renoise_levels(1, alpha, beta, rng) for rng in per_sample])
    dmd_levels = torch.cat([schedules.sample_renoise_levels(1, alpha, beta, rng) for rng in per_sample])
    monitor_levels = torch.tensor([rng.uniform(0.02, 0.98) for rng in per_sample], dtype=torch.float32)
    # One CFG scale per iteration, the same on every process.
    scale = schedules.sample_guidance_scale(
        guidance_scale, guidance_scale_jitter, np.random.default_rng([seed, iteration])
    )
    return IterationDraws(
        generators=[torch.Generator("cpu").manual_seed(sample_seed) for sample_seed in sample_seeds],
        step_index=step_index,
        fake_noise_levels=fake_levels,
        dmd_noise_levels=dmd_levels,
        monitor_noise_levels=monitor_levels,
        guidance_scale=scale,
    )
