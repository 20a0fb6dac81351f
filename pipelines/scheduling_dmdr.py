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


def _rescale_to_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    r"""Rescale `alpha_bar` so that the last timestep has zero SNR (Lin et al. 2024, "Common Diffusion Noise Schedules
    and Sample Steps are Flawed", Algorithm 1).

    With `a_t = sqrt(alpha_bar_t)`, the rescaled `a'_t = (a_t - a_T) * a_0 / (a_0 - a_T)` keeps `a'_0 = a_0` and gives
    `a'_T = 0` exactly, so the noisiest timestep is pure noise, as the teacher was trained.
    """
    signal = alphas_cumprod.sqrt()
    first, last = signal[0].clone(), signal[-1].clone()
    rescaled = (signal - last) * first / (first - last)
    return rescaled**2


def _is_flow_config(config: dict) -> bool:
    """Whether a scheduler config describes a rectified-flow teacher (a `FlowMatch*` scheduler or a flow DMDR one)."""
    if config.get("prediction_type") == "flow" or str(config.get("_class_name", "")).startswith("FlowMatch"):
        return True
    # `scheduler.config` carries no `_class_name`: a FlowMatch config has a shift and no betas.
    return "use_dynamic_shifting" in config and "shift" in config and "beta_start" not in config


def ddpm_student_grid(num_steps: int, num_train_timesteps: int = 1000) -> list[float]:
    """The default DDPM student grid: evenly spaced, trailing, ending at the last training timestep (4 steps give
    `[999, 749, 499, 249]`)."""
    spacing = num_train_timesteps // num_steps
    return [float(num_train_timesteps - 1 - index * spacing) for index in range(num_steps)]


def shifted_flow_grid(num_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> list[float]:
    r"""The default flow student grid (the released SD3 scripts' rule), in model units.

    `s = linspace(1, 0.001, N + 1)[:N]` warped as `shift s / (1 + (shift - 1) s)`: SD3-Medium (shift 3) 4 steps give
    noise levels `[1.0, 0.9001, 0.7504, 0.5010]`, SD3.5-Large (shift 5) `[1.0, 0.9376, 0.8336, 0.6259]`. The trainer's
    default grid and the one a `FlowMatch*` config gives in [`DMDRScheduler.from_config`] are this function's.
    """
    unshifted = np.linspace(1.0, 0.001, num_steps + 1)[:num_steps]
    warped = shift * unshifted / (1.0 + (shift - 1.0) * unshifted)
    return [float(level * num_train_timesteps) for level in warped]


class DMDRScheduler(SchedulerMixin, ConfigMixin):
    r"""
    Few-step sampler of a DMD/DMDR student: at each student timestep the model output is turned into a clean
    prediction `x0`, which is re-noised to the next student timestep with fresh Gaussian noise; the last step returns
    `x0`. This is the sampler the student was trained with (its backward simulation), so inference reproduces
    training exactly when the grid is the trained one.

    It speaks the protocol of diffusers' stock pipelines (`set_timesteps` with `num_inference_steps`, `timesteps`,
    `sigmas`, `mu` and `device`; `step` with `generator`; `timesteps` in model units; `init_noise_sigma`, `order`,
    `scale_model_input`), so `StableDiffusionXLPipeline`, `StableDiffusion3Pipeline` and the other stock pipelines,
    given this scheduler and no classifier-free guidance, run exactly the trained sampler.

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
            What the backbone predicts: `epsilon`, `v_prediction` (DDPM families) or `flow` (rectified flow).
        beta_start (`float`, defaults to 0.00085), beta_end (`float`, defaults to 0.012),
        beta_schedule (`str`, defaults to `"scaled_linear"`):
            The teacher's noise schedule (DDPM families only; ignored for `flow`).
        trained_betas (`list[float]` or `np.ndarray`, *optional*):
            The teacher's explicit betas, one per training timestep; they replace `beta_start`/`beta_end`/
            `beta_schedule`, as in diffusers' DDPM schedulers.
        rescale_betas_zero_snr (`bool`, defaults to `False`):
            Rescale the schedule to zero terminal SNR (`alpha_bar` of the last training timestep is exactly 0), as the
            teacher's own scheduler does when it sets this flag. Needs `v_prediction`: an epsilon prediction carries no
            information about `x0` at zero SNR.
        training_timesteps (`list[float]`, defaults to `[999, 749, 499, 249]`):
            The student's timesteps in model units, first (noisiest) first. The first step always starts from pure
            noise, whatever its timestep (the 1-step SDXL student is conditioned on 399 with a pure-noise input).
        grid_shift (`float`, *optional*):
            The shift that built a flow grid; a record only, the grid itself is `training_timesteps`. (Named so that a
            `FlowMatchEulerDiscreteScheduler` loaded from this config does not shift explicit sigmas again.)
        grid_mu (`float`, *optional*):
            For teachers with resolution-dependent shift: the `mu` (log shift from the image sequence length) the grid
            was built at. A pipeline that passes another `mu` gets the trained grid unchanged, with a warning.
        deterministic (`bool`, defaults to `False`):
            Re-noise with the noise implied by the model output instead of fresh noise (the "ode" sampler: Euler for
            flow models, DDIM eta=0 for DDPM models). The trained DMDR sampler is stochastic.
        x0_noise_level (`float`, defaults to 0.0):
            Flow models only: the clean estimate stops at this noise level, `x0 = x_t + (x0_noise_level - t) v`
            (the released DMDR T2I code uses 0.001); 0 gives the exact `x0 = x_t - t v`.
        use_flow_sigmas (`bool`, defaults to `True`):
            Tells the stock flow pipelines that check this flag (`FluxPipeline`, `Flux2KleinPipeline`) that the
            scheduler sets its own sigmas, so they do not pass their default `linspace` sigmas over the trained grid.
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
        trained_betas: np.ndarray | list[float] | None = None,
        rescale_betas_zero_snr: bool = False,
        training_timesteps: list[float] | None = None,
        grid_shift: float | None = None,
        grid_mu: float | None = None,
        deterministic: bool = False,
        x0_noise_level: float = 0.0,
        use_flow_sigmas: bool = True,
    ):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}.")
        if rescale_betas_zero_snr and prediction_type == "epsilon":
            raise ValueError(
                "rescale_betas_zero_snr=True needs prediction_type='v_prediction': at zero SNR an epsilon prediction "
                "does not determine x0."
            )
        if training_timesteps is None:
            training_timesteps = [999.0, 749.0, 499.0, 249.0]
        training_timesteps = [float(timestep) for timestep in training_timesteps]
        self.is_flow = prediction_type == "flow"
        self._check_grid(training_timesteps, "training_timesteps")
        # Store the resolved grid, not the `None` default, so that a saved config always holds the exact timesteps.
        self.register_to_config(training_timesteps=training_timesteps)
        if self.is_flow:
            self.alphas_cumprod = None
        else:
            if trained_betas is not None:
                betas = torch.tensor(np.asarray(trained_betas), dtype=torch.float64)
                if betas.ndim != 1 or len(betas) != num_train_timesteps:
                    raise ValueError(
                        f"trained_betas must hold one beta per training timestep ({num_train_timesteps}), got shape "
                        f"{tuple(betas.shape)}."
                    )
            else:
                betas = _betas_for(beta_schedule, beta_start, beta_end, num_train_timesteps)
            alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
            if rescale_betas_zero_snr:
                alphas_cumprod = _rescale_to_zero_terminal_snr(alphas_cumprod)
            self.alphas_cumprod = alphas_cumprod.float()
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = None
        self.noise_levels = None
        self._step_index = None
        self._begin_index = None
        self._noise_generator = None
        self._warned_mu = None
        self.set_timesteps()

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """Build from a config dict, including another scheduler's.

        A `FlowMatch*` config (the teacher's scheduler of a flow family) gives a flow scheduler whose default grid is
        the 4-step [`shifted_flow_grid`] at that config's `shift` (the grid the trainer trains on); DDPM configs carry their betas, `trained_betas` and
        `rescale_betas_zero_snr` over.
        """
        if config is not None and not isinstance(config, dict) and hasattr(config, "config"):
            config = config.config  # a scheduler instance, as `SchedulerMixin.from_config` also accepts
        config = dict(config or {})
        if _is_flow_config(config) and config.get("prediction_type") != "flow" and "prediction_type" not in kwargs:
            kwargs["prediction_type"] = "flow"
            if "training_timesteps" not in config and "training_timesteps" not in kwargs:
                shift = float(config.get("shift", 1.0))
                kwargs["training_timesteps"] = shifted_flow_grid(4, shift, config.get("num_train_timesteps", 1000))
                kwargs.setdefault("grid_shift", shift)
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    # ----------------------------------------------------------------------------------------------------------
    # Time conversions
    # ----------------------------------------------------------------------------------------------------------
    def _check_grid(self, grid: list[float], name: str) -> None:
        """One clear error for a grid the sampler cannot run: empty, out of range, or not strictly decreasing."""
        num_train_timesteps = self.config.num_train_timesteps
        if self.is_flow:
            in_range, bounds = (lambda ts: 0 < ts <= num_train_timesteps), f"(0, {num_train_timesteps}]"
        else:
            in_range, bounds = (lambda ts: 0 <= ts <= num_train_timesteps - 1), f"[0, {num_train_timesteps - 1}]"
        if not grid or any(not (math.isfinite(ts) and in_range(ts)) for ts in grid):
            raise ValueError(f"{name} must be a non-empty list of model timesteps in {bounds}, got {grid}.")
        if any(a <= b for a, b in zip(grid[:-1], grid[1:], strict=True)):
            raise ValueError(f"{name} must be strictly decreasing (noisiest first), got {grid}.")

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
        noise_level = self.noise_level(timesteps).to(original_samples.device)
        return self.add_noise_at(original_samples, noise, noise_level)

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

    @property
    def sigmas(self) -> torch.Tensor | None:
        """Flow families: the noise levels of the current grid followed by a terminal 0 (diffusers' FlowMatch form)."""
        if not self.is_flow or self.noise_levels is None:
            return None
        return torch.cat([self.noise_levels, self.noise_levels.new_zeros(1)])

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[float] | None = None,
        sigmas: list[float] | np.ndarray | None = None,
        mu: float | None = None,
    ):
        """
        Set the sampling grid: the trained one by default.

        Args:
            num_inference_steps (`int`, *optional*):
                Number of steps; the trained count (or `None`) gives the trained grid, another count re-spaces it with a
                warning (see [`~DMDRScheduler.grid_for`]).
            device (`str` or `torch.device`, *optional*):
                Where `timesteps` and the noise levels go.
            timesteps (`list[float]`, *optional*):
                Explicit model timesteps, noisiest first (DDPM: in `[0, num_train_timesteps - 1]`; flow: in
                `(0, num_train_timesteps]`).
            sigmas (`list[float]`, *optional*):
                Flow families: explicit noise levels in `(0, 1]`, noisiest first, without the terminal 0.
            mu (`float`, *optional*):
                The resolution-dependent shift a stock flow pipeline computes. The grid is the trained one whatever
                `mu` is: a `mu` other than the trained `grid_mu` is reported once and otherwise ignored.
        """
        given = [name for name, value in (("timesteps", timesteps), ("sigmas", sigmas)) if value is not None]
        if len(given) > 1 or (given and num_inference_steps is not None):
            given = (["num_inference_steps"] if num_inference_steps is not None else []) + given
            raise ValueError(f"Pass only one of `num_inference_steps`, `timesteps` or `sigmas`, got {given}.")
        if sigmas is not None:
            if not self.is_flow:
                raise ValueError(
                    "`sigmas` are noise levels of flow models; pass `timesteps` for a DDPM-family student."
                )
            noise_levels = torch.tensor(np.asarray(sigmas, dtype=np.float64).tolist(), dtype=torch.float32)
            grid = (noise_levels.double() * self.config.num_train_timesteps).tolist()
            self._check_grid(grid, "sigmas (times num_train_timesteps)")
        else:
            if timesteps is not None:
                grid = [float(timestep) for timestep in timesteps]
                self._check_grid(grid, "timesteps")
            else:
                grid = self.grid_for(num_inference_steps)
            noise_levels = torch.tensor(grid, dtype=torch.float32) / self.config.num_train_timesteps
        if given and grid != [float(ts) for ts in self.config.training_timesteps]:
            logger.info(f"Sampling on the grid {grid}; this student was trained on {self.config.training_timesteps}.")
        self._note_mu(mu)
        self.noise_levels = noise_levels.to(device)
        self.timesteps = self.model_timestep(self.noise_levels)
        self.num_inference_steps = len(grid)
        self._step_index = None
        self._begin_index = None

    def _note_mu(self, mu: float | None) -> None:
        trained_mu = self.config.grid_mu
        if mu is None or trained_mu is None or abs(float(mu) - trained_mu) < 1e-6 or self._warned_mu == mu:
            return
        self._warned_mu = mu
        logger.warning(
            f"The pipeline asks for mu={float(mu):.4f} (another resolution); this student's grid was built at "
            f"mu={trained_mu:.4f} and is used unchanged: {self.config.training_timesteps}."
        )

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start sampling at this index of the grid (diffusers' protocol; used by image-to-image pipelines)."""
        self._begin_index = begin_index

    def set_noise_generator(self, generator: torch.Generator | list[torch.Generator] | None) -> None:
        """The generator that `step` draws its re-noising noise from when it is called without one.

        The stock flow pipelines (`StableDiffusion3Pipeline`, `FluxPipeline`, ...) call `step` without their
        generator; hand it here (the same object that draws the initial latents) to make their stochastic sampling
        reproducible. `FewStepDMDRPipeline` does this for you.
        """
        self._noise_generator = generator

    def index_for_timestep(self, timestep: torch.Tensor | float) -> int:
        """Position of a model timestep in the grid; a timestep off the grid is an error, not index 0."""
        timestep = torch.as_tensor(timestep, device=self.timesteps.device).to(self.timesteps.dtype).flatten()[0]
        matches = (self.timesteps == timestep).nonzero()
        if not len(matches):
            raise ValueError(f"Timestep {timestep.item()} is not on this scheduler's grid {self.timesteps.tolist()}.")
        return int(matches[0])

    def scale_model_input(self, sample: torch.Tensor, timestep: torch.Tensor | None = None) -> torch.Tensor:
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep: torch.Tensor | float,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DMDRSchedulerOutput | tuple:
        """
        Predict `x0` from `model_output` and move to the next student timestep.

        Args:
            model_output (`torch.Tensor`): the backbone's output (no guidance: the student samples without CFG).
            timestep (`torch.Tensor` or `float`): the current model timestep, one of `self.timesteps`.
            sample (`torch.Tensor`): the current sample.
            generator (`torch.Generator`, *optional*): draws the fresh re-noising noise; defaults to the one given
                to [`~DMDRScheduler.set_noise_generator`].
            noise (`torch.Tensor`, *optional*): the re-noising noise itself, overriding `generator` (parity tests).
            return_dict (`bool`, defaults to `True`): return a [`DMDRSchedulerOutput`] rather than a tuple.
        """
        if self.timesteps is None:
            raise ValueError("Call `set_timesteps` before `step`.")
        if self._step_index is None:
            self._step_index = (
                self._begin_index if self._begin_index is not None else self.index_for_timestep(timestep)
            )
        elif self._step_index >= len(self.timesteps):
            raise ValueError(
                f"`step` was called {self._step_index + 1} times on a {len(self.timesteps)}-step grid; call "
                "`set_timesteps` to start a new sample."
            )
        noise_level = self.noise_levels[self._step_index].to(sample.device)
        x0 = self.predict_x0(model_output, sample, noise_level)
        if self._step_index + 1 >= len(self.noise_levels):
            prev_sample = x0
        else:
            next_noise_level = self.noise_levels[self._step_index + 1].to(sample.device)
            if self.config.deterministic:
                noise = self.implied_noise(sample, x0, noise_level)
            elif noise is None:
                generator = generator if generator is not None else self._noise_generator
                noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            prev_sample = self.add_noise_at(x0, noise, next_noise_level)
        self._step_index += 1
        if not return_dict:
            return (prev_sample, x0)
        return DMDRSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    # ----------------------------------------------------------------------------------------------------------
    # The same sampler with a stock diffusers scheduler (no repository code)
    # ----------------------------------------------------------------------------------------------------------
    def stock_scheduler_recipe(self) -> dict:
        """How to run this student's sampler with a stock diffusers scheduler, for users who load no remote code.

        Returns a dict with `class_name` (a diffusers scheduler class, or `None` when none reproduces this sampler),
        `from_config_kwargs` (overrides for `<class>.from_config(this config, **kwargs)`), `call_kwargs` (what the
        stock pipeline call needs: the grid), `exact` (whether the stock scheduler reproduces the trained sampler up to
        float rounding) and `note` (what differs, or why there is no stock route).

        - DDPM families, stochastic sampler: `LCMScheduler` with `timestep_scaling` so large that its boundary
          condition is the identity (`c_skip` below 1e-16, `c_out` rounds to 1) and `original_inference_steps` equal to
          `num_train_timesteps` (every integer timestep is on its schedule), called with `timesteps=`.
        - Flow families: `FlowMatchLCMScheduler` (stochastic) or `FlowMatchEulerDiscreteScheduler` (deterministic) with
          `shift=1`, no dynamic shifting and no terminal stretch, called with `sigmas=`. They feed the model `1000 t` where training fed
          `round(1000 t)`: exact only when every grid point is an integer in model units.
        """
        trained = [float(ts) for ts in self.config.training_timesteps]
        if self.is_flow:
            if self.config.x0_noise_level:
                return self._no_stock_route(f"the student's x0 stops at noise level {self.config.x0_noise_level}")
            levels = [float(level) for level in torch.tensor(trained, dtype=torch.float32) / len(self)]
            integer_grid = all(float(ts).is_integer() for ts in trained)
            notes = []
            if not integer_grid:
                notes.append(
                    f"the stock scheduler feeds the model 1000 t ({trained}) where training fed round(1000 t)"
                )
            if not self.config.deterministic:
                notes.append(
                    "stock flow pipelines do not pass `generator` to `step`: the re-noising draws are not "
                    "reproducible from a generator"
                )
            class_name = "FlowMatchEulerDiscreteScheduler" if self.config.deterministic else "FlowMatchLCMScheduler"
            return {
                "class_name": class_name,
                # The sigmas are the trained grid already: no shift, no dynamic shift, no terminal stretch (Qwen-Image's
                # scheduler config has `shift_terminal`) may move them again.
                "from_config_kwargs": {"shift": 1.0, "use_dynamic_shifting": False, "shift_terminal": None},
                "call_kwargs": {"sigmas": levels},
                "exact": integer_grid,
                "note": "; ".join(notes),
            }
        if self.config.deterministic:
            return self._no_stock_route(
                "no stock scheduler runs the deterministic (DDIM) sampler on a custom grid and returns x0 at the last step"
            )
        return {
            "class_name": "LCMScheduler",
            "from_config_kwargs": {"timestep_scaling": 1.0e6, "original_inference_steps": len(self)},
            "call_kwargs": {"timesteps": [int(ts) for ts in trained]},
            "exact": all(float(ts).is_integer() for ts in trained),
            "note": "",
        }

    @staticmethod
    def _no_stock_route(reason: str) -> dict:
        return {"class_name": None, "from_config_kwargs": {}, "call_kwargs": {}, "exact": False, "note": reason}

    def __len__(self) -> int:
        return self.config.num_train_timesteps
