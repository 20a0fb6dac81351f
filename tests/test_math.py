"""Math of DMDR: loss gradients, schedules, student grids, noise conversions, guidance."""

import math

import numpy as np
import pytest
import torch

from diffusers_dmdr.method import schedules
from diffusers_dmdr.method.denoisers import apply_guidance, guided_x0
from diffusers_dmdr.method.losses import anchor_loss, dmd_loss, fake_score_loss, reward_loss, reward_tilt_weights
from diffusers_dmdr.pipelines.scheduling_dmdr import DMDRScheduler, ddpm_student_grid, shifted_flow_grid


def test_dmd_loss_gradient_is_normalised_direction_over_numel():
    x0_student = torch.randn(3, 4, 8, 8, requires_grad=True)
    x0_real, x0_fake = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    (grad,) = torch.autograd.grad(dmd_loss(x0_student, x0_real, x0_fake), x0_student)
    normaliser = (x0_student.detach() - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True) + 1e-8
    expected = (x0_fake - x0_real) / normaliser / x0_student.numel()
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-10)


def test_dmd_loss_value_and_sample_weights():
    x0_student = torch.randn(2, 4, 4, 4, requires_grad=True)
    x0_real, x0_fake = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    weights = torch.tensor([2.0, 0.0])
    (grad,) = torch.autograd.grad(dmd_loss(x0_student, x0_real, x0_fake, sample_weights=weights), x0_student)
    assert grad[1].abs().max() == 0 and grad[0].abs().max() > 0
    normaliser = (x0_student.detach() - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True) + 1e-8
    direction = (x0_fake - x0_real) / normaliser
    assert dmd_loss(x0_student, x0_real, x0_fake).item() == pytest.approx(
        0.5 * direction.pow(2).mean().item(), rel=1e-5
    )


def test_dmd_loss_zeroes_nan_directions():
    x0_student = torch.zeros(1, 2, 2, 2, requires_grad=True)
    x0_real = torch.zeros(1, 2, 2, 2)
    x0_fake = torch.full((1, 2, 2, 2), float("nan"))
    (grad,) = torch.autograd.grad(dmd_loss(x0_student, x0_real, x0_fake), x0_student)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_fake_and_reward_losses():
    assert fake_score_loss(torch.ones(2, 3), torch.zeros(2, 3)).item() == 1.0
    student = torch.zeros(2, 3, requires_grad=True)
    (grad,) = torch.autograd.grad(anchor_loss(student, torch.ones(2, 3)), student)
    torch.testing.assert_close(grad, torch.full((2, 3), -2.0 / 6))
    scores = torch.tensor([0.2, 0.9, 0.5])
    assert reward_loss(scores, hinge=0.7).item() == pytest.approx((0.5 + 0.0 + 0.2) / 3)
    assert reward_loss(scores, hinge=None).item() == pytest.approx(-scores.mean().item())
    weights = reward_tilt_weights(torch.tensor([1.0, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(weights, torch.ones(4))
    tilted = reward_tilt_weights(torch.tensor([0.0, 1.0]))
    assert tilted.sum().item() == pytest.approx(2.0) and tilted[1] > tilted[0]


@pytest.mark.parametrize("total", [100, 2000])
def test_dynars_and_dynadg_at_key_steps(total):
    assert schedules.renoise_beta_params(0, total, 4.0, 1.5) == (4.0, 1.5)
    a_mid, b_mid = schedules.renoise_beta_params(total // 2, total, 4.0, 1.5)
    assert a_mid == pytest.approx(2.5) and b_mid == pytest.approx(1.25)
    assert schedules.renoise_beta_params(total, total, 4.0, 1.5) == (1.0, 1.0)
    assert schedules.renoise_beta_params(3 * total, total, 4.0, 1.5) == (1.0, 1.0)
    assert schedules.real_score_lora_scale(0, total, 0.5) == 0.5
    assert schedules.real_score_lora_scale(total // 2, total, 0.5) == pytest.approx(0.25)
    assert schedules.real_score_lora_scale(total, total, 0.5) == 0.0
    assert schedules.real_score_lora_scale(total + 7, total, 0.5) == 0.0


def test_disabled_dynamic_schedules_are_uniform_and_teacher():
    assert schedules.renoise_beta_params(0, 0, 4.0, 1.5) == (1.0, 1.0)
    assert schedules.real_score_lora_scale(0, 0, 0.5) == 0.0


def test_renoise_sampler_mean_and_range():
    rng = np.random.default_rng(0)
    levels = schedules.sample_renoise_levels(20000, 4.0, 1.5, rng)
    assert levels.min() >= schedules.MIN_NOISE_LEVEL and levels.max() <= 1.0
    assert levels.mean().item() == pytest.approx(4.0 / 5.5, abs=0.01)
    scales = [schedules.sample_guidance_scale(7.0, 0.5, rng) for _ in range(2000)]
    assert 6.5 <= min(scales) < 6.6 and 7.4 < max(scales) <= 7.5


def test_real_scale_at_most_one_means_no_cfg_and_no_jitter():
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    assert schedules.sample_guidance_scale(0.0, 0.5, rng) == 1.0
    assert schedules.sample_guidance_scale(1.0, 0.5, rng) == 1.0
    assert rng.bit_generator.state == state  # no draw: the rest of the run's random stream is unchanged

    calls = []

    def denoiser(sample, level, condition):
        calls.append(sample.shape[0])
        return sample * condition["scale"]

    sample, level = torch.randn(2, 3), torch.rand(2)
    out = guided_x0(denoiser, sample, level, {"scale": 2.0}, {"scale": 0.0}, 0.0)
    assert calls == [2] and torch.equal(out, sample * 2.0)


def test_student_grids_match_released_recipes():
    assert ddpm_student_grid(4) == [999, 749, 499, 249]
    sd3_medium = [t / 1000 for t in shifted_flow_grid(4, shift=3.0)]
    np.testing.assert_allclose(sd3_medium, [1.0, 0.9001, 0.7504, 0.5010], atol=1e-4)
    sd35_large = [t / 1000 for t in shifted_flow_grid(4, shift=5.0)]
    np.testing.assert_allclose(sd35_large, [1.0, 0.9376, 0.8336, 0.6259], atol=1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "flow"])
def test_noise_conversions_round_trip(prediction_type):
    timesteps = [1000.0, 750.0] if prediction_type == "flow" else None
    scheduler = DMDRScheduler(prediction_type=prediction_type, training_timesteps=timesteps)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    noise_level = torch.tensor([0.05, 0.5, 0.95])
    noisy = scheduler.add_noise_at(x0, noise, noise_level)
    target = scheduler.training_target(x0, noise, noise_level)
    torch.testing.assert_close(scheduler.predict_x0(target, noisy, noise_level), x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scheduler.implied_noise(noisy, x0, noise_level), noise, atol=1e-4, rtol=1e-4)


def test_ddpm_noise_matches_diffusers_ddpm_add_noise():
    from diffusers import DDPMScheduler

    reference = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    scheduler = DMDRScheduler(prediction_type="epsilon")
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([999, 249])
    torch.testing.assert_close(
        scheduler.add_noise(x0, noise, timesteps), reference.add_noise(x0, noise, timesteps), atol=1e-5, rtol=1e-5
    )


def test_flow_model_timestep_is_round_of_sigma_times_1000():
    """The released SD3 code feeds the transformer round(1000 t); the noise math keeps the exact t."""
    scheduler = DMDRScheduler(prediction_type="flow", training_timesteps=[1000.0, 900.1])
    torch.testing.assert_close(scheduler.timesteps, torch.tensor([1000.0, 900.0]))
    torch.testing.assert_close(scheduler.noise_levels, torch.tensor([1.0, 0.9001]))
    # SD3.5-Large's shift-5 grid reaches the transformer as 1000, 938, 834, 626 (paper-digest §1.3).
    grid = shifted_flow_grid(4, shift=5.0)
    sd35 = DMDRScheduler(prediction_type="flow", training_timesteps=grid)
    assert sd35.timesteps.tolist() == [1000.0, 938.0, 834.0, 626.0]
    x0, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    level = sd35.noise_levels[1:2]
    torch.testing.assert_close(sd35.add_noise_at(x0, noise, level), (1 - level) * x0 + level * noise)


def test_flow_x0_noise_level_is_the_released_floor():
    """x0 = x_t + (0.001 - t) v with the floor; x_t - t v without it."""
    sample, velocity, level = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([0.9, 0.4])
    exact = DMDRScheduler(prediction_type="flow", training_timesteps=[1000.0])
    floored = DMDRScheduler(prediction_type="flow", training_timesteps=[1000.0], x0_noise_level=0.001)
    t = level.view(-1, 1, 1, 1)
    torch.testing.assert_close(exact.predict_x0(velocity, sample, level), sample - t * velocity)
    torch.testing.assert_close(floored.predict_x0(velocity, sample, level), sample + (0.001 - t) * velocity)


def test_other_step_counts_follow_the_interpolation_rule(caplog):
    scheduler = DMDRScheduler(training_timesteps=[999.0, 749.0, 499.0, 249.0])
    assert scheduler.grid_for(4) == [999.0, 749.0, 499.0, 249.0]
    assert scheduler.grid_for(1) == [999.0]
    assert scheduler.grid_for(2) == [999.0, 249.0]
    assert scheduler.grid_for(7)[0] == 999.0 and scheduler.grid_for(7)[-1] == 249.0


def test_scheduler_rejects_bad_grids():
    with pytest.raises(ValueError, match="strictly decreasing"):
        DMDRScheduler(training_timesteps=[249.0, 999.0])
    with pytest.raises(ValueError, match="non-empty"):
        DMDRScheduler(training_timesteps=[1500.0])
    with pytest.raises(ValueError, match="prediction_type"):
        DMDRScheduler(prediction_type="sample")


def test_classifier_free_guidance_helper():
    cond, uncond = torch.full((1, 2), 3.0), torch.full((1, 2), 1.0)
    torch.testing.assert_close(apply_guidance(cond, uncond, 1.0), cond)
    torch.testing.assert_close(apply_guidance(cond, uncond, 0.0), uncond)
    torch.testing.assert_close(apply_guidance(cond, uncond, 7.0), torch.full((1, 2), 15.0))


def test_cfg_in_x0_space_equals_cfg_in_eps_space():
    scheduler = DMDRScheduler(prediction_type="epsilon")
    sample, level = torch.randn(2, 4, 4, 4), torch.tensor([0.6, 0.6])
    eps_cond, eps_uncond = torch.randn_like(sample), torch.randn_like(sample)
    guided_eps = eps_uncond + 5.0 * (eps_cond - eps_uncond)
    x0_via_eps = scheduler.predict_x0(guided_eps, sample, level)
    x0_via_x0 = apply_guidance(
        scheduler.predict_x0(eps_cond, sample, level), scheduler.predict_x0(eps_uncond, sample, level), 5.0
    )
    torch.testing.assert_close(x0_via_x0, x0_via_eps, atol=1e-4, rtol=1e-4)
    assert math.isfinite(x0_via_x0.sum().item())
