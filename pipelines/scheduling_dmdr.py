# Copyright 2026 The diffusers-dmdr authors. Licensed under the Apache License, Version 2.0.
"""DMDRScheduler: the few-step sampler of a DMDR student, with the exact training grid in its config.

This file is self-contained (torch, numpy and diffusers only) so that it can be copied verbatim into an exported
Hub folder as `scheduler/scheduling_dmdr.py` and loaded by users who do not have `diffusers_dmdr` installed.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor


logger = logging.get_logger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")


@dataclass
class DMDRSchedulerOutput(BaseOutput):
    """
    Output of [`DMDRScheduler.step`].

    Args:
        prev_sample (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
            The sample at the next student timestep; at the last step it is the clean prediction itself.
        pred_original_sample (`torch.Tensor` of the same shape):
            The student's clean prediction `x0` at the current timestep.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def _betas_for(beta_schedule: str, beta_start: float, beta_end: float, num_train_timesteps: int) -> torch.Tensor:
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":

        def alpha_bar(time: float) -> float:
            return math.cos((time + 0.008) / 1.008 * math.pi / 2) ** 2

        steps = np.arange(num_train_timesteps)
        betas = [
            min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), 0.999)
            for i in steps
        ]
        return torch.tensor(betas, dtype=torch.float64)
    raise ValueError(f"Unsupported beta_schedule {beta_schedule!r}; use linear, scaled_linear or squaredcos_cap_v2.")


class DMDRScheduler(SchedulerMixin, ConfigMixin):
    r"""
    Few-step sampler of a DMD/DMDR student: at each student timestep the model output is turned into a clean
    prediction `x0`, which is re-noised to the next student timestep with fresh Gaussian noise; the last step returns
    `x0`. This is the sampler the student was trained with (its backward simulation), so inference reproduces
    training exactly when the grid is the trained one.

    Time convention: a noise level `t` in `[0, 1]`, `t = 1` being pure noise; the model receives
    `timestep = round(t * num_train_timesteps)`: an integer index in `[0, num_train_timesteps - 1]` for DDPM families,
    a float holding an integer for flow models (the released SD3 code feeds `round(1000 t)`); the noise math itself
    uses the exact `t`.
    For `prediction_type="flow"`, `x_t = (1 - t) x0 + t noise` and the model predicts the velocity `noise - x0`. For
    `epsilon` and `v_prediction`, `x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) noise` with the teacher's betas.

    Args:
        num_train_timesteps (`int`, defaults to 1000):
            Number of the teacher's training timesteps.
        prediction_type (`str`, defaults to `"epsilon"`):
            What the backbone predicts: `epsilon`, `v_prediction` (DDPM families) or `flow` (rectified flow, SD3).
        beta_start (`float`, defaults to 0.00085), beta_end (`float`, defaults to 0.012),
        beta_schedule (`str`, defaults to `"scaled_linear"`):
            The teacher's noise schedule (DDPM families only; ignored for `flow`).
        training_timesteps (`list[float]`, defaults to `[999, 749, 499, 249]`):
            The student's timesteps in model units, first (noisiest) first. The first step always starts from pure
            noise, whatever its timestep (the 1-step SDXL student is conditioned on 399 with a pure-noise input).
        shift (`float`, *optional*):
            The shift used to build a flow grid; informative only, the grid itself is `training_timesteps`.
        deterministic (`bool`, defaults to `False`):
            Re-noise with the noise implied by the model output instead of fresh noise (the "ode" sampler: Euler for
            flow models, DDIM eta=0 for DDPM models). The trained DMDR sampler is stochastic.
        x0_noise_level (`float`, defaults to 0.0):
            Flow models only: the clean estimate stops at this noise level, `x0 = x_t + (x0_noise_level - t) v`
            (the released DMDR T2I code uses 0.001); 0 gives the exact `x0 = x_t - t v`.
    """

    order = 1
    _compatibles = []

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        prediction_type: str = "epsilon",
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        training_timesteps: list[float] | None = None,
        shift: float | None = None,
        deterministic: bool = False,
        x0_noise_level: float = 0.0,
    ):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}.")
        if training_timesteps is None:
            training_timesteps = [999.0, 749.0, 499.0, 249.0]
        training_timesteps = [float(timestep) for timestep in training_timesteps]
        if not training_timesteps or any(not 0 < ts <= num_train_timesteps for ts in training_timesteps):
            raise ValueError(
                f"training_timesteps must be a non-empty list in (0, {num_train_timesteps}], got {training_timesteps}."
            )
        if any(a <= b for a, b in zip(training_timesteps[:-1], training_timesteps[1:], strict=True)):
            raise ValueError(f"training_timesteps must be strictly decreasing, got {training_timesteps}.")
        # Store the resolved grid, not the `None` default, so that a saved config always holds the exact timesteps.
        self.register_to_config(training_timesteps=training_timesteps)
        if prediction_type == "flow":
            self.alphas_cumprod = None
        else:
            betas = _betas_for(beta_schedule, beta_start, beta_end, num_train_timesteps)
            self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).float()
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = None
        self.noise_levels = None
        self._step_index = None
        self.set_timesteps()

    # ----------------------------------------------------------------------------------------------------------
    # Time conversions
    # ----------------------------------------------------------------------------------------------------------
    @property
    def is_flow(self) -> bool:
        return self.config.prediction_type == "flow"

    def model_timestep(self, noise_level: torch.Tensor) -> torch.Tensor:
        """The timestep the backbone receives at noise level `t` (integer index for DDPM families)."""
        timestep = (noise_level * self.config.num_train_timesteps).round()
        if self.is_flow:
            return timestep
        return timestep.clamp(0, self.config.num_train_timesteps - 1).long()

    def noise_level(self, timestep: torch.Tensor | float) -> torch.Tensor:
        """Inverse of [`~DMDRScheduler.model_timestep`]: the noise level `t` of a model timestep."""
        timestep = torch.as_tensor(timestep, dtype=torch.float32)
        return timestep / self.config.num_train_timesteps

    def _coefficients(self, noise_level: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`(a, s)` with `x_t = a * x0 + s * noise` at noise level `t`, shaped to broadcast over a sample."""
        noise_level = noise_level.float()
        if self.is_flow:
            signal, sigma = 1.0 - noise_level, noise_level
        else:
            alphas_cumprod = self.alphas_cumprod.to(noise_level.device)
            alpha_bar = alphas_cumprod[self.model_timestep(noise_level)]
            signal, sigma = alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()
        shape = (-1,) + (1,) * (ndim - 1)
        return signal.reshape(shape), sigma.reshape(shape)

    # ----------------------------------------------------------------------------------------------------------
    # Noise math: one place for every conversion (computed in float32, returned in the input dtype)
    # ----------------------------------------------------------------------------------------------------------
    def add_noise_at(self, x0: torch.Tensor, noise: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        """Forward process at noise level `t` (a tensor of shape `(B,)` or a scalar tensor)."""
        noise_level = noise_level.to(x0.device).expand(x0.shape[0]) if noise_level.ndim == 0 else noise_level
        signal, sigma = self._coefficients(noise_level.to(x0.device), x0.ndim)
        return (signal * x0.float() + sigma * noise.float()).to(x0.dtype)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """diffusers-style forward process with `timesteps` in model units."""
        return self.add_noise_at(original_samples, noise, self.noise_level(timesteps).to(original_samples.device))

    def predict_x0(self, model_output: torch.Tensor, sample: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        """Clean prediction from the backbone's output at noise level `t`."""
        noise_level = noise_level.to(sample.device).expand(sample.shape[0]) if noise_level.ndim == 0 else noise_level
        model_output_f32, sample_f32 = model_output.float(), sample.float()
        signal, sigma = self._coefficients(noise_level.to(sample.device), sample.ndim)
        if self.config.prediction_type == "flow":
            x0 = sample_f32 - (sigma - self.config.x0_noise_level) * model_output_f32
        elif self.config.prediction_type == "epsilon":
            x0 = (sample_f32 - sigma * model_output_f32) / signal
        else:  # v_prediction
            x0 = signal * sample_f32 - sigma * model_output_f32
        return x0.to(sample.dtype)

    def implied_noise(self, sample: torch.Tensor, x0: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        """The noise that, added to `x0` at level `t`, gives `sample`: the deterministic (ODE / DDIM) direction."""
        noise_level = noise_level.to(sample.device).expand(sample.shape[0]) if noise_level.ndim == 0 else noise_level
        signal, sigma = self._coefficients(noise_level.to(sample.device), sample.ndim)
        return ((sample.float() - signal * x0.float()) / sigma).to(sample.dtype)

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        """What the backbone is trained to predict at level `t`: noise, velocity `v`, or flow velocity `noise - x0`."""
        if self.config.prediction_type == "flow":
            return (noise.float() - x0.float()).to(x0.dtype)
        if self.config.prediction_type == "epsilon":
            return noise
        signal, sigma = self._coefficients(noise_level.to(x0.device), x0.ndim)
        return (signal * noise.float() - sigma * x0.float()).to(x0.dtype)

    # ----------------------------------------------------------------------------------------------------------
    # Sampling
    # ----------------------------------------------------------------------------------------------------------
    def grid_for(self, num_inference_steps: int | None = None) -> list[float]:
        """Student timesteps (model units) for `num_inference_steps`.

        The trained count returns the training grid exactly. Another count is allowed with a warning and follows one
        rule: the new grid interpolates the trained grid linearly at evenly spaced positions, so it keeps the trained
        first (noisiest) and last timesteps; 1 step uses the first trained timestep.
        """
        trained = list(self.config.training_timesteps)
        if num_inference_steps is None or num_inference_steps == len(trained):
            return trained
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}.")
        logger.warning(
            f"This student was trained for {len(trained)} steps at timesteps {trained}; sampling with "
            f"{num_inference_steps} steps interpolates that grid and is outside what was trained."
        )
        positions = np.linspace(0, len(trained) - 1, num_inference_steps)
        grid = np.interp(positions, np.arange(len(trained)), np.asarray(trained))
        if not self.is_flow:
            grid = np.round(grid)
        return [float(timestep) for timestep in grid]

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[float] | None = None,
    ):
        """Set the sampling grid: the trained one by default, an explicit `timesteps` list, or a re-spaced one."""
        grid = [float(ts) for ts in timesteps] if timesteps is not None else self.grid_for(num_inference_steps)
        self.noise_levels = torch.tensor(grid, dtype=torch.float32, device=device) / self.config.num_train_timesteps
        self.timesteps = self.model_timestep(self.noise_levels)
        self.num_inference_steps = len(grid)
        self._step_index = None

    @property
    def step_index(self) -> int | None:
        return self._step_index

    def _init_step_index(self, timestep: torch.Tensor | float) -> None:
        matches = (self.timesteps == torch.as_tensor(timestep, device=self.timesteps.device)).nonzero()
        self._step_index = int(matches[0]) if len(matches) else 0

    def scale_model_input(self, sample: torch.Tensor, timestep: torch.Tensor | None = None) -> torch.Tensor:
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep: torch.Tensor | float,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DMDRSchedulerOutput | tuple:
        """
        Predict `x0` from `model_output` and move to the next student timestep.

        Args:
            model_output (`torch.Tensor`): the backbone's output (no guidance: the student samples without CFG).
            timestep (`torch.Tensor` or `float`): the current model timestep, one of `self.timesteps`.
            sample (`torch.Tensor`): the current sample.
            generator (`torch.Generator`, *optional*): draws the fresh re-noising noise.
            noise (`torch.Tensor`, *optional*): the re-noising noise itself, overriding `generator` (parity tests).
            return_dict (`bool`, defaults to `True`): return a [`DMDRSchedulerOutput`] rather than a tuple.
        """
        if self.timesteps is None:
            raise ValueError("Call `set_timesteps` before `step`.")
        if self._step_index is None:
            self._init_step_index(timestep)
        noise_level = self.noise_levels[self._step_index].to(sample.device)
        x0 = self.predict_x0(model_output, sample, noise_level)
        if self._step_index + 1 >= len(self.noise_levels):
            prev_sample = x0
        else:
            next_noise_level = self.noise_levels[self._step_index + 1].to(sample.device)
            if self.config.deterministic:
                noise = self.implied_noise(sample, x0, noise_level)
            elif noise is None:
                noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            prev_sample = self.add_noise_at(x0, noise, next_noise_level)
        self._step_index += 1
        if not return_dict:
            return (prev_sample, x0)
        return DMDRSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
