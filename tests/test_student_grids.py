"""Each family's default student grid, pinned to its rule (`ModelFamily.grid_rule`) at the released teachers' scheduler
configs, and Qwen-Image's few-step grids in particular (issue 25)."""

import math

import numpy as np
import pytest

from diffusers_dmdr.families import FAMILIES, get_family
from diffusers_dmdr.pipelines.scheduling_dmdr import (
    DMDRScheduler,
    ddpm_student_grid,
    shifted_flow_grid,
    shifted_linear_flow_grid,
)
from diffusers_dmdr.testing_flux import FLUX_SCHEDULER_CONFIG


# The released teachers' scheduler configs, as far as the grids read them.
QWENIMAGE_RELEASED_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
}
RELEASED_SCHEDULERS = {
    "sdxl": {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000},
    "sd15": {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000},
    "sd3": {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "num_train_timesteps": 1000},
    "flux": {"_class_name": "FlowMatchEulerDiscreteScheduler", **FLUX_SCHEDULER_CONFIG},
    "flux2": {"_class_name": "FlowMatchEulerDiscreteScheduler", **FLUX_SCHEDULER_CONFIG},
    "zimage": {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "num_train_timesteps": 1000},
    "qwenimage": QWENIMAGE_RELEASED_SCHEDULER,
    # Wan 2.1 T2V 1.3B's scheduler: UniPC on flow sigmas at the 480p shift.
    "wan": {
        "_class_name": "UniPCMultistepScheduler",
        "flow_shift": 3.0,
        "prediction_type": "flow_prediction",
        "use_flow_sigmas": True,
        "num_train_timesteps": 1000,
    },
}


def teacher_scheduler_rule(name: str, num_steps: int, resolution: int = 1024) -> list[float]:
    """The teacher scheduler's own `num_steps`-step timesteps at `resolution`, set as the stock pipeline sets them."""
    import diffusers

    config = RELEASED_SCHEDULERS[name]
    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    tokens = (resolution // 16) ** 2
    if name == "flux":
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    elif name == "flux2":
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        mu, sigmas = compute_empirical_mu(tokens, num_steps), np.linspace(1.0, 1 / num_steps, num_steps)
    else:  # zimage: a static shift, no mu
        from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas

        mu, sigmas = None, get_default_z_image_sigmas(num_steps)
    scheduler.set_timesteps(sigmas=list(sigmas), mu=mu)
    return [float(timestep) for timestep in scheduler.timesteps]


def rule_grid(name: str, num_steps: int) -> list[float]:
    """Each family's rule, written out independently of the family classes."""
    rule = get_family(name).grid_rule
    if rule == "ddpm-trailing":
        return [399.0] if (name == "sdxl" and num_steps == 1) else ddpm_student_grid(num_steps)
    if rule == "shifted-flow":
        return shifted_flow_grid(num_steps, 3.0)
    if rule == "shifted-linear":
        return shifted_linear_flow_grid(num_steps, 3.0)
    if name == "wan":  # the SD3 shift rule at the teacher scheduler's own static `flow_shift`
        return shifted_flow_grid(num_steps, RELEASED_SCHEDULERS["wan"]["flow_shift"])
    return teacher_scheduler_rule(name, num_steps)


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("num_steps", [1, 2, 4, 8])
def test_every_family_default_grid_follows_its_rule(name, num_steps):
    family = get_family(name)
    timesteps, _ = family.student_grid(num_steps, None, dict(RELEASED_SCHEDULERS[name]), 1024, 8)
    assert timesteps == pytest.approx(rule_grid(name, num_steps), abs=1e-4)
    # Every default grid is one the sampler runs: finite, in range, strictly decreasing, noisiest first.
    DMDRScheduler(prediction_type="flow" if family.is_flow else "epsilon", training_timesteps=timesteps)


def test_the_default_grids_at_1024_px_four_steps():
    """The values each recipe and card states (released rules and the stock schedulers, 1024 px, 4 steps)."""
    expected = {
        "sdxl": [999, 749, 499, 249],
        "sd15": [999, 749, 499, 249],
        "sd3": [1000, 900.1, 750.4, 501.0],
        "flux": [1000, 904.53, 759.51, 512.84],
        "flux2": [1000, 967.38, 908.14, 767.20],
        "zimage": [1000, 900, 750, 500],
        "qwenimage": [1000, 900, 750, 500],
    }
    for name, values in expected.items():
        timesteps, _ = get_family(name).student_grid(4, None, dict(RELEASED_SCHEDULERS[name]), 1024, 8)
        assert timesteps == pytest.approx(values, abs=0.06), name


@pytest.mark.parametrize("num_steps, expected", [(1, [1000.0]), (2, [1000.0, 750.0]), (4, [1000, 900, 750, 500])])
def test_qwenimage_few_step_grids_have_no_terminal_stretch(num_steps, expected):
    """The released scheduler's `shift_terminal = 0.02` made 4 steps `[1000, 767, 456, 20]`, 2 steps `[1000, 20]`
    and 1 step NaN; the student grid is the stock sigmas at shift 3 without the stretch."""
    family = get_family("qwenimage")
    timesteps, origin = family.student_grid(num_steps, None, dict(QWENIMAGE_RELEASED_SCHEDULER), 1024, 8)
    assert timesteps == expected and origin == {"grid_shift": 3.0}
    assert all(math.isfinite(t) for t in timesteps) and timesteps[0] == 1000.0
    assert all(a > b for a, b in zip(timesteps[:-1], timesteps[1:], strict=True))
    # No terminal-stretch step: the last step sits at the shifted last stock sigma 1/N, far from 0.02.
    last_sigma = 1.0 / num_steps
    assert timesteps[-1] == pytest.approx(1000 * 3 * last_sigma / (1 + 2 * last_sigma))
    assert timesteps[-1] >= 500.0
    # The resolution does not move it (no dynamic shift).
    assert family.student_grid(num_steps, None, dict(QWENIMAGE_RELEASED_SCHEDULER), 512, 8)[0] == timesteps


def test_qwenimage_honours_shift():
    family = get_family("qwenimage")
    for shift in (1.0, 2.0, 5.0):
        timesteps, origin = family.student_grid(4, shift, dict(QWENIMAGE_RELEASED_SCHEDULER), 1024, 8)
        warped = [shift * s / (1 + (shift - 1) * s) for s in (1.0, 0.75, 0.5, 0.25)]
        assert timesteps == pytest.approx([1000 * w for w in warped], abs=1e-6) and origin == {"grid_shift": shift}
    assert family.student_grid(4, 1.0, {}, 1024, 8)[0] == [1000.0, 750.0, 500.0, 250.0]
