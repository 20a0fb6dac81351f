"""DMDRScheduler speaks the protocol of diffusers' stock pipelines and keeps the teacher's noise schedule.

Each defect found by running diffusers' own scheduler checks against the scheduler has a test here that failed
before the fix (see tests/test_diffusers_mixins.py for the upstream suites themselves).
"""

import logging

import numpy as np
import pytest
import torch
from diffusers import (
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchLCMScheduler,
    LCMScheduler,
)

from diffusers_dmdr.families import get_family
from diffusers_dmdr.families.base import TeacherComponents, student_scheduler_for
from diffusers_dmdr.pipelines.scheduling_dmdr import DMDRScheduler, shifted_flow_grid


SDXL_GRID = [999.0, 749.0, 499.0, 249.0]


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def run(scheduler, model_outputs: list[torch.Tensor], sample: torch.Tensor, generator=None, **set_kwargs):
    """Drive a scheduler as a stock pipeline does: `set_timesteps`, then one `step` per timestep."""
    scheduler.set_timesteps(**set_kwargs)
    for timestep, model_output in zip(scheduler.timesteps, model_outputs, strict=True):
        sample = scheduler.step(model_output, timestep, sample, generator=generator, return_dict=False)[0]
    return sample


# ------------------------------------------------------------------------------------------------------------------
# The teacher's noise schedule is kept
# ------------------------------------------------------------------------------------------------------------------
def test_trained_betas_replace_the_named_schedule():
    betas = np.linspace(1e-4, 0.03, 1000)
    scheduler = DMDRScheduler(trained_betas=betas)
    expected = torch.cumprod(1.0 - torch.tensor(betas, dtype=torch.float64), 0).float()
    torch.testing.assert_close(scheduler.alphas_cumprod, expected)
    assert not torch.allclose(scheduler.alphas_cumprod, DMDRScheduler().alphas_cumprod)
    with pytest.raises(ValueError, match="one beta per training timestep"):
        DMDRScheduler(trained_betas=[0.1, 0.2])


def test_zero_terminal_snr_teacher_keeps_alpha_bar_zero_at_the_last_timestep():
    scheduler = DMDRScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    reference = DDPMScheduler(
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
    )
    assert scheduler.alphas_cumprod[999].item() == 0.0
    torch.testing.assert_close(scheduler.alphas_cumprod, reference.alphas_cumprod.float(), atol=1e-6, rtol=1e-5)
    # Pure noise at 999: the v-prediction x0 is -v there.
    sample, velocity = torch.randn(2, 4, 8, 8, generator=seeded()), torch.randn(2, 4, 8, 8, generator=seeded(1))
    x0 = scheduler.predict_x0(velocity, sample, torch.tensor(0.999))
    torch.testing.assert_close(x0, -velocity)
    with pytest.raises(ValueError, match="v_prediction"):
        DMDRScheduler(prediction_type="epsilon", rescale_betas_zero_snr=True)


@pytest.mark.parametrize(
    "teacher_config",
    [
        {"trained_betas": list(np.linspace(1e-4, 0.03, 1000))},
        {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
    ],
)
def test_the_student_scheduler_carries_the_teachers_schedule(teacher_config):
    teacher_scheduler = DDPMScheduler(beta_schedule="scaled_linear", **teacher_config)

    class Pipeline:
        scheduler = teacher_scheduler

    teacher = TeacherComponents(family=get_family("sdxl"), pipeline=Pipeline(), backbone=None, vae=None, source="x")
    student = student_scheduler_for(teacher, SDXL_GRID, backward_simulation=None, shift=None)
    torch.testing.assert_close(student.alphas_cumprod, teacher_scheduler.alphas_cumprod.float(), atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# set_timesteps and step: the stock protocol, with clear errors
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("timesteps", "message"),
    [([249, 499], "strictly decreasing"), ([1200, 500], r"\[0, 999\]"), ([500, -3], r"\[0, 999\]"), ([], "non-empty")],
)
def test_custom_timesteps_out_of_order_or_range_are_refused(timesteps, message):
    with pytest.raises(ValueError, match=message):
        DMDRScheduler().set_timesteps(timesteps=timesteps)


def test_only_one_way_to_give_the_grid():
    with pytest.raises(ValueError, match="only one of"):
        DMDRScheduler().set_timesteps(num_inference_steps=2, timesteps=[999, 499])
    flow = DMDRScheduler(prediction_type="flow", training_timesteps=[1000.0, 750.0])
    with pytest.raises(ValueError, match="only one of"):
        flow.set_timesteps(timesteps=[1000, 500], sigmas=[1.0, 0.5])
    with pytest.raises(ValueError, match="flow models"):
        DMDRScheduler().set_timesteps(sigmas=[1.0, 0.5])


def test_a_step_off_the_grid_is_an_error_not_index_zero():
    scheduler = DMDRScheduler()
    sample = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="not on this scheduler's grid"):
        scheduler.step(torch.zeros_like(sample), 500, sample)
    # On the grid, the step index follows the timestep (a pipeline may start mid-grid).
    scheduler.set_timesteps()
    scheduler.step(torch.zeros_like(sample), 499, sample)
    assert scheduler.step_index == 3
    scheduler.step(torch.zeros_like(sample), 249, sample)
    with pytest.raises(ValueError, match="call `set_timesteps`"):
        scheduler.step(torch.zeros_like(sample), 249, sample)


def test_sigmas_give_the_exact_flow_grid_and_the_generator_can_be_handed_over():
    grid = [1000.0, 937.5, 833.3333, 625.0]
    scheduler = DMDRScheduler(prediction_type="flow", training_timesteps=grid)
    trained_levels = scheduler.noise_levels.clone()
    scheduler.set_timesteps(sigmas=trained_levels.tolist())
    assert torch.equal(scheduler.noise_levels, trained_levels)
    assert torch.equal(scheduler.sigmas, torch.cat([trained_levels, torch.zeros(1)]))
    outputs = [torch.randn(1, 4, 8, 8, generator=seeded(i)) for i in range(4)]
    sample = torch.randn(1, 4, 8, 8, generator=seeded(9))
    passed = run(scheduler, outputs, sample, generator=seeded(3))
    scheduler.set_noise_generator(seeded(3))
    handed = run(scheduler, outputs, sample)  # as a stock flow pipeline calls it: no generator
    other = run(DMDRScheduler(prediction_type="flow", training_timesteps=grid), outputs, sample, generator=seeded(4))
    torch.testing.assert_close(handed, passed, rtol=0, atol=0)
    assert not torch.allclose(handed, other)


def test_another_mu_keeps_the_trained_grid_and_says_so(caplog):
    scheduler = DMDRScheduler(prediction_type="flow", training_timesteps=[1000.0, 900.0], grid_mu=1.15)
    with caplog.at_level(logging.WARNING):
        scheduler.set_timesteps(num_inference_steps=2, mu=1.15)
        assert caplog.text == ""
        scheduler.set_timesteps(num_inference_steps=2, mu=0.5)
        scheduler.set_timesteps(num_inference_steps=2, mu=0.5)
    assert caplog.text.count("mu=0.5000") == 1
    assert scheduler.timesteps.tolist() == [1000.0, 900.0]


# ------------------------------------------------------------------------------------------------------------------
# Configs shared with the stock flow schedulers
# ------------------------------------------------------------------------------------------------------------------
def test_from_a_flow_match_config_builds_a_flow_scheduler_on_the_grid_the_trainer_trains_on():
    teacher = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler = DMDRScheduler.from_config(teacher.config)
    assert scheduler.config.prediction_type == "flow" and scheduler.alphas_cumprod is None
    # One rule: the SD3 family's default 4-step grid at shift 3 (the released scripts' `linspace(1, 0.001)` warp).
    sd3_grid = get_family("sd3").default_student_timesteps(4, 3.0)
    assert scheduler.config.training_timesteps == sd3_grid == shifted_flow_grid(4, 3.0)
    assert scheduler.config.training_timesteps == pytest.approx([1000.0, 900.1, 750.4, 501.0], abs=0.05)
    assert scheduler.config.grid_shift == 3.0
    # A DDPM config stays a DDPM scheduler and keeps its betas.
    ddpm = DMDRScheduler.from_config(DDPMScheduler(beta_schedule="linear").config)
    assert ddpm.config.prediction_type == "epsilon" and ddpm.config.beta_schedule == "linear"


def test_a_flow_match_scheduler_loaded_from_the_exported_config_does_not_shift_twice():
    scheduler = DMDRScheduler(prediction_type="flow", training_timesteps=[1000.0, 900.0, 750.0, 500.0], grid_shift=3.0)
    stock = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    stock.set_timesteps(sigmas=scheduler.noise_levels.tolist())
    torch.testing.assert_close(stock.sigmas[:-1], scheduler.noise_levels)


def test_flux_style_pipelines_see_that_the_scheduler_sets_its_own_sigmas():
    # FluxPipeline and Flux2KleinPipeline replace their default linspace sigmas by None when this flag is set.
    assert DMDRScheduler(prediction_type="flow", training_timesteps=[1000.0]).config.use_flow_sigmas is True


# ------------------------------------------------------------------------------------------------------------------
# The stock-scheduler recipe reproduces the trained sampler
# ------------------------------------------------------------------------------------------------------------------
def stock_from_recipe(scheduler: DMDRScheduler, teacher_config):
    """The stock scheduler of the no-remote-code route, built as the card builds it: from the teacher's config."""
    recipe = scheduler.stock_scheduler_recipe()
    classes = {
        "LCMScheduler": LCMScheduler,
        "FlowMatchLCMScheduler": FlowMatchLCMScheduler,
        "FlowMatchEulerDiscreteScheduler": FlowMatchEulerDiscreteScheduler,
    }
    stock = classes[recipe["class_name"]].from_config(teacher_config, **recipe["from_config_kwargs"])
    return stock, recipe


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_lcm_recipe_reproduces_the_ddpm_sampler_without_warnings(prediction_type, caplog):
    teacher = EulerDiscreteScheduler(
        prediction_type=prediction_type, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    scheduler = DMDRScheduler.from_config(teacher.config, training_timesteps=SDXL_GRID)
    stock, recipe = stock_from_recipe(scheduler, teacher.config)
    assert recipe["exact"] and recipe["call_kwargs"] == {"timesteps": [999, 749, 499, 249]}
    outputs = [torch.randn(2, 4, 8, 8, generator=seeded(i)) for i in range(4)]
    sample = torch.randn(2, 4, 8, 8, generator=seeded(9))
    with caplog.at_level(logging.WARNING):
        expected = run(scheduler, outputs, sample, generator=seeded(5))
        got = run(stock, outputs, sample, generator=seeded(5), **recipe["call_kwargs"])
    assert caplog.text == ""
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("deterministic", [False, True])
def test_flow_recipes_reproduce_the_flow_sampler(deterministic):
    teacher = FlowMatchEulerDiscreteScheduler(shift=3.0)
    # An integer grid (model units): the stock schedulers feed the model `1000 t` unrounded, exact only there.
    integer_grid = [1000.0, 900.0, 750.0, 500.0]
    scheduler = DMDRScheduler.from_config(teacher.config, deterministic=deterministic, training_timesteps=integer_grid)
    stock, recipe = stock_from_recipe(scheduler, teacher.config)
    assert recipe["exact"] and "generator" in recipe["note"] if not deterministic else recipe["note"] == ""
    outputs = [torch.randn(1, 4, 8, 8, generator=seeded(i)) for i in range(4)]
    sample = torch.randn(1, 4, 8, 8, generator=seeded(9))
    expected = run(scheduler, outputs, sample, generator=seeded(5))
    got = run(stock, outputs, sample, generator=seeded(5), **recipe["call_kwargs"])
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(stock.timesteps, scheduler.timesteps)


def test_recipes_say_when_no_stock_scheduler_is_exact():
    assert DMDRScheduler(deterministic=True).stock_scheduler_recipe()["class_name"] is None
    floored = DMDRScheduler(prediction_type="flow", training_timesteps=[1000.0], x0_noise_level=0.001)
    assert floored.stock_scheduler_recipe()["class_name"] is None
    non_integer = DMDRScheduler(prediction_type="flow", training_timesteps=[1000.0, 937.5])
    recipe = non_integer.stock_scheduler_recipe()
    assert not recipe["exact"] and "round(1000 t)" in recipe["note"]


def test_the_flow_recipe_keeps_the_trained_sigmas_under_a_teacher_with_a_terminal_stretch():
    """Qwen-Image's scheduler config stretches sigmas to `shift_terminal`; the recipe's scheduler must not stretch the
    trained grid a second time."""
    teacher = FlowMatchEulerDiscreteScheduler(shift=3.0, shift_terminal=0.02)
    scheduler = DMDRScheduler(prediction_type="flow", training_timesteps=[1000.0, 750.0, 500.0], deterministic=True)
    stock, recipe = stock_from_recipe(scheduler, teacher.config)
    stock.set_timesteps(**recipe["call_kwargs"])
    torch.testing.assert_close(stock.sigmas[:-1], scheduler.noise_levels)
