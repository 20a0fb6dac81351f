"""`--released_bf16_grid`: the released DMDR runs computed every time value in bf16 (issue 25 item 4)."""

import pytest
import torch
from test_preflight import config_for, prompts  # noqa: F401  (fixture)

from diffusers_dmdr.families import get_family
from diffusers_dmdr.families.base import student_grid_for
from diffusers_dmdr.pipelines.scheduling_dmdr import DMDRScheduler, shifted_flow_grid


# What the released SD3-Medium (shift 3) and SD3.5-Large (shift 5) 4-step runs fed the transformer.
RELEASED_MODEL_TIMESTEPS = {3.0: [1000.0, 900.0, 752.0, 504.0], 5.0: [1000.0, 936.0, 832.0, 628.0]}


@pytest.mark.parametrize("shift", sorted(RELEASED_MODEL_TIMESTEPS))
def test_the_released_bf16_grids_are_reproduced_exactly(shift):
    grid = shifted_flow_grid(4, shift, time_dtype="bfloat16")
    scheduler = DMDRScheduler(prediction_type="flow", training_timesteps=grid, time_dtype="bfloat16")
    assert scheduler.timesteps.tolist() == RELEASED_MODEL_TIMESTEPS[shift]
    # The noise math uses the released bf16 noise levels themselves (0.8984 where the model is told 900).
    expected_levels = {3.0: [1.0, 0.8984375, 0.75, 0.50390625], 5.0: [1.0, 0.9375, 0.83203125, 0.62890625]}[shift]
    assert scheduler.noise_levels.tolist() == expected_levels
    sample, noise = torch.randn(4, 2, 2, 2), torch.randn(4, 2, 2, 2)
    levels = torch.tensor(expected_levels)
    noised = scheduler.add_noise_at(sample, noise, scheduler.noise_levels)
    torch.testing.assert_close(noised, (1 - levels.view(-1, 1, 1, 1)) * sample + levels.view(-1, 1, 1, 1) * noise)
    # Off (the default): the nominal float32 grid, another one.
    nominal = DMDRScheduler(prediction_type="flow", training_timesteps=shifted_flow_grid(4, shift))
    assert nominal.timesteps.tolist() != RELEASED_MODEL_TIMESTEPS[shift]
    assert nominal.timesteps.tolist() == {3.0: [1000, 900, 750, 501], 5.0: [1000, 938, 834, 626]}[shift]


def test_re_noise_levels_are_rounded_as_released():
    scheduler = DMDRScheduler(
        prediction_type="flow",
        training_timesteps=shifted_flow_grid(4, 3.0, time_dtype="bfloat16"),
        time_dtype="bfloat16",
    )
    levels = torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 0.999 + 0.001
    sample, noise = torch.randn(1000, 1, 1, 1), torch.randn(1000, 1, 1, 1)
    rounded = levels.to(torch.bfloat16).float()
    assert 0 < (rounded - levels).abs().max() <= 0.002
    torch.testing.assert_close(
        scheduler.add_noise_at(sample, noise, levels), scheduler.add_noise_at(sample, noise, rounded), rtol=0, atol=0
    )
    assert torch.equal(scheduler.model_timestep(levels), (rounded.to(torch.bfloat16) * 1000).float().round())
    assert scheduler.stock_scheduler_recipe()["class_name"] is None
    # The setting survives save / load (the exported scheduler keeps it).
    assert DMDRScheduler.from_config(scheduler.config).config.time_dtype == "bfloat16"


def test_the_option_builds_the_sd3_run_grid_and_is_refused_elsewhere(tmp_path, prompts):  # noqa: F811
    config = config_for("teacher", prompts, family="sd3", released_bf16_grid=True)
    timesteps, origin = student_grid_for(get_family("sd3"), config, {}, 8)
    assert origin == {"time_dtype": "bfloat16"}
    assert (
        DMDRScheduler(prediction_type="flow", training_timesteps=timesteps, **origin).timesteps.tolist()
        == (RELEASED_MODEL_TIMESTEPS[3.0])
    )
    config = config_for("teacher", prompts, family="sd3", released_bf16_grid=True, shift=5.0)
    timesteps, origin = student_grid_for(get_family("sd3"), config, {}, 8)
    assert (
        DMDRScheduler(prediction_type="flow", training_timesteps=timesteps, **origin).timesteps.tolist()
        == (RELEASED_MODEL_TIMESTEPS[5.0])
    )
    assert student_grid_for(get_family("sd3"), config_for("teacher", prompts, family="sd3"), {}, 8)[1] == {}
    with pytest.raises(ValueError, match="needs the sd3 family"):
        student_grid_for(get_family("sdxl"), config_for("teacher", prompts, released_bf16_grid=True), {}, 8)
    explicit = config_for(
        "teacher", prompts, family="sd3", released_bf16_grid=True, student_timesteps=[1000, 500, 250, 125]
    )
    with pytest.raises(ValueError, match="--student_timesteps"):
        student_grid_for(get_family("sd3"), explicit, {}, 8)
    with pytest.raises(ValueError, match="flow models only"):
        DMDRScheduler(prediction_type="epsilon", time_dtype="bfloat16")


def test_a_run_with_the_option_trains_and_exports_on_the_released_grid(tiny_teacher_dirs, prompt_file, tmp_path):
    from test_trainer import make_trainer

    trainer = make_trainer(tiny_teacher_dirs["sd3"], prompt_file, tmp_path, family="sd3", released_bf16_grid=True)
    assert trainer.scheduler.config.time_dtype == "bfloat16"
    assert trainer.scheduler.timesteps.tolist() == RELEASED_MODEL_TIMESTEPS[3.0]
    history = trainer.train()
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in history)
