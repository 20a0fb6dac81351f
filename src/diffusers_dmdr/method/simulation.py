"""Backward simulation: the student's own few-step sampler, run without gradients to make its training inputs."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..pipelines.scheduling_dmdr import DMDRScheduler


@dataclass
class SimulationOutput:
    """
    Args:
        clean_sample (`torch.Tensor`): the no-grad clean sample `c` the fake score trains on (final output in `ode`
            mode, the prediction at the chosen step in `sde` mode, as in the released DMDR code).
        student_input (`torch.Tensor`): `c` re-noised to the chosen student timestep (pure noise at step 0): the
            generator's training input.
        noise_level (`torch.Tensor` of shape `(B,)`): the chosen student noise level per sample.
        step_index (`torch.Tensor` of shape `(B,)`): the chosen student step per sample.
        final_sample (`torch.Tensor`): the sampler's final output (what a user of the student would get).
    """

    clean_sample: torch.Tensor
    student_input: torch.Tensor
    noise_level: torch.Tensor
    step_index: torch.Tensor
    final_sample: torch.Tensor


@torch.no_grad()
def sample_student(
    x0_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    initial_noise: torch.Tensor,
    scheduler: DMDRScheduler,
    deterministic: bool,
    generator: torch.Generator | None = None,
    noise_fn: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Run the N-step student sampler from `initial_noise`; returns the clean prediction of every step.

    Each step predicts `x0` and re-noises it to the next student level with fresh noise drawn from `generator`
    (`deterministic=False`, the DMD sampler) or with the noise its own prediction implies (`deterministic=True`: Euler
    for flow models, DDIM for DDPM models). Noise is drawn exactly as [`DMDRScheduler.step`] draws it, so the exported
    pipeline given the same generator reproduces these samples; `noise_fn(sample, generator)` replaces that draw for
    families whose stock pipeline steps on packed latents (the noise is drawn in the packed layout, then unpacked).
    """
    noise_levels = scheduler.noise_levels.to(initial_noise.device)
    batch_size = initial_noise.shape[0]
    sample, predictions = initial_noise, []
    for index, noise_level in enumerate(noise_levels):
        level = noise_level.expand(batch_size)
        x0 = x0_fn(sample, level)
        predictions.append(x0)
        if index + 1 < len(noise_levels):
            if deterministic:
                noise = scheduler.implied_noise(sample, x0, level)
            elif noise_fn is not None:
                noise = noise_fn(sample, generator)
            else:
                noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            sample = scheduler.add_noise_at(x0, noise, noise_levels[index + 1].expand(batch_size))
    return predictions


@torch.no_grad()
def backward_simulation(
    x0_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    initial_noise: torch.Tensor,
    scheduler: DMDRScheduler,
    mode: str,
    generator: torch.Generator | None,
    step_index: torch.Tensor,
) -> SimulationOutput:
    """Make the generator's training input: simulate the student, pick step `i` per sample, re-noise to `t_i`.

    Args:
        x0_fn: the student as `(x_t, t) -> x0` (conditioning bound).
        initial_noise: pure Gaussian noise of the latent shape.
        scheduler: holds the student grid and the noise math.
        mode: `ode` (deterministic sampler, `c` = final output) or `sde` (fresh noise, `c` = prediction at step `i`).
        generator: source of every fresh noise tensor.
        step_index: the student step chosen per sample, shape `(B,)`, drawn by the caller.
    """
    predictions = sample_student(x0_fn, initial_noise, scheduler, deterministic=mode == "ode", generator=generator)
    if mode == "ode":
        clean_sample = predictions[-1]
    else:
        stacked = torch.stack(predictions)  # (N, B, C, H, W)
        clean_sample = stacked[step_index.to(stacked.device), torch.arange(stacked.shape[1], device=stacked.device)]
    noise_levels = scheduler.noise_levels.to(initial_noise.device)[step_index.to(initial_noise.device)]
    fresh_noise = randn_tensor(
        clean_sample.shape, generator=generator, device=clean_sample.device, dtype=clean_sample.dtype
    )
    renoised = scheduler.add_noise_at(clean_sample, fresh_noise, noise_levels)
    # The first student step always sees pure noise (t = 1 for flow; DMD2's convention at 999 or 399 for DDPM).
    first_step = (step_index.to(initial_noise.device) == 0).view(-1, *([1] * (initial_noise.ndim - 1)))
    student_input = torch.where(first_step, fresh_noise, renoised)
    return SimulationOutput(clean_sample, student_input, noise_levels, step_index, predictions[-1])
