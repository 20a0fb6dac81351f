"""Backbone + noise parameterisation -> clean prediction `x0`, and classifier-free guidance.

One time convention everywhere in the trainer: a noise level `t` in `[0, 1]` with `t = 1` pure noise. The
conversions to the backbone's own timestep and prediction type (epsilon, v, flow velocity) live in the
[`DMDRScheduler`], the same object that samples at inference.
"""

from collections.abc import Callable

import torch

from ..pipelines.scheduling_dmdr import DMDRScheduler


class Denoiser:
    """A backbone seen through the scheduler: `denoiser(x_t, t, condition) -> x0`.

    Holds the model by composition: `model(sample, timestep, condition)` returns the backbone's raw output at model
    timesteps (in the trainer, one role of the accelerator-prepared training module, so the engine's hooks run through
    its `forward`).
    """

    def __init__(self, model: Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor], scheduler: DMDRScheduler):
        self.model = model
        self.scheduler = scheduler

    def predict(self, sample: torch.Tensor, noise_level: torch.Tensor, condition: dict) -> torch.Tensor:
        """The backbone's raw output (its training target space) at noise levels `noise_level` of shape `(B,)`."""
        timestep = self.scheduler.model_timestep(noise_level.to(sample.device))
        return self.model(sample, timestep, condition)

    def __call__(self, sample: torch.Tensor, noise_level: torch.Tensor, condition: dict) -> torch.Tensor:
        model_output = self.predict(sample, noise_level, condition)
        return self.scheduler.predict_x0(model_output, sample, noise_level.to(sample.device))


def concat_conditions(first: dict, second: dict) -> dict:
    """Batch-concatenate two conditioning dicts of the same structure (conditional + unconditional for CFG)."""
    merged = {}
    for key, value in first.items():
        if isinstance(value, dict):
            merged[key] = concat_conditions(value, second[key])
        else:
            merged[key] = torch.cat([value, second[key]])
    return merged


def repeat_condition(condition: dict, batch_size: int) -> dict:
    """Expand a batch-1 conditioning dict (the empty prompt) to `batch_size`."""
    repeated = {}
    for key, value in condition.items():
        if isinstance(value, dict):
            repeated[key] = repeat_condition(value, batch_size)
        else:
            repeated[key] = value.expand(batch_size, *value.shape[1:])
    return repeated


def apply_guidance(x0_cond: torch.Tensor, x0_uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance `x0_uncond + w (x0_cond - x0_uncond)`; equal to guidance on eps or v, because x0 is
    affine in the model output at a fixed `(x_t, t)`."""
    return x0_uncond + guidance_scale * (x0_cond - x0_uncond)


def guided_x0(
    denoiser: Denoiser,
    sample: torch.Tensor,
    noise_level: torch.Tensor,
    condition: dict,
    uncondition: dict,
    guidance_scale: float,
    combine_predictions: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] | None = None,
) -> torch.Tensor:
    """`x0` with classifier-free guidance, conditional and unconditional branches in one batched call.

    `combine_predictions(cond_output, uncond_output, scale)`, when given, combines the raw backbone outputs the way the
    family's stock pipeline does (Qwen-Image rescales the guided velocity per token) and `x0` is taken from the result;
    without it, guidance is the plain [`apply_guidance`] on `x0`.
    """
    # A scale <= 1 is "no CFG" (DMDR's convention), not an extrapolation towards the unconditional branch.
    if guidance_scale <= 1.0:
        return denoiser(sample, noise_level, condition)
    batched = (
        torch.cat([sample, sample]),
        torch.cat([noise_level, noise_level]),
        concat_conditions(condition, uncondition),
    )
    if combine_predictions is not None:
        cond_output, uncond_output = denoiser.predict(*batched).chunk(2)
        guided_output = combine_predictions(cond_output, uncond_output, guidance_scale)
        return denoiser.scheduler.predict_x0(guided_output, sample, noise_level.to(sample.device))
    x0_cond, x0_uncond = denoiser(*batched).chunk(2)
    return apply_guidance(x0_cond, x0_uncond, guidance_scale)
