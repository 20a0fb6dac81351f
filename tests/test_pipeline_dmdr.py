"""FewStepDMDRPipeline on tiny real teachers: defaults, arguments, families, guidance, callbacks."""

import logging

import numpy as np
import pytest
import torch

from diffusers_dmdr.pipelines import DMDRScheduler, FewStepDMDRPipeline
from diffusers_dmdr.testing import tiny_pipeline


TRAINED_GRID = [999.0, 749.0, 499.0, 249.0]
FLOW_GRID = [1000.0, 937.5, 833.3, 625.0]


def few_step_pipeline(family: str, deterministic: bool = False) -> FewStepDMDRPipeline:
    """A FewStepDMDRPipeline around a tiny stock teacher (the teacher stands in for a student here)."""
    stock = tiny_pipeline(family)
    is_flow = family == "sd3"
    scheduler = DMDRScheduler(
        prediction_type="flow" if is_flow else "epsilon",
        training_timesteps=FLOW_GRID if is_flow else TRAINED_GRID,
        deterministic=deterministic,
    )
    pipeline = FewStepDMDRPipeline.from_pipe(stock, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def pipelines() -> dict[str, FewStepDMDRPipeline]:
    return {family: few_step_pipeline(family) for family in ("sdxl", "sd15", "sd3")}


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


class StepRecorder:
    """A `callback_on_step_end` that keeps what each step saw."""

    def __init__(self):
        self.timesteps, self.shapes, self.denoised = [], [], []

    def __call__(self, pipeline, step, timestep, callback_kwargs):
        self.timesteps.append(float(timestep))
        self.shapes.append(tuple(callback_kwargs["latents"].shape))
        self.denoised.append(callback_kwargs.get("denoised"))
        return {}


@pytest.mark.parametrize("family", ["sdxl", "sd15", "sd3"])
def test_defaults_are_the_trained_grid_without_guidance(family, pipelines):
    pipeline = pipelines[family]
    recorder = StepRecorder()
    images = pipeline(
        ["a red cat", "a blue dog"],
        num_images_per_prompt=2,
        generator=seeded(),
        callback_on_step_end=recorder,
        callback_on_step_end_tensor_inputs=["latents", "denoised"],
    ).images
    # Flow backbones see round(1000 t), as in the released SD3 training code (937.5 rounds half to even).
    grid = [1000.0, 938.0, 833.0, 625.0] if family == "sd3" else TRAINED_GRID
    assert recorder.timesteps == pytest.approx(grid, abs=1e-3)
    assert pipeline.model_family == family
    assert not pipeline.do_classifier_free_guidance
    # No guidance: the backbone sees the 4 images once per step, not a doubled batch.
    assert recorder.shapes == [(4, 4, 8, 8)] * len(grid)
    assert len(images) == 4 and images[0].size == (64, 64)
    # The last step returns the clean prediction itself.
    latents = pipeline(["a red cat"], generator=seeded(), output_type="latent").images
    recorder_one = StepRecorder()
    pipeline(
        ["a red cat"],
        generator=seeded(),
        output_type="latent",
        callback_on_step_end=recorder_one,
        callback_on_step_end_tensor_inputs=["latents", "denoised"],
    )
    torch.testing.assert_close(latents, recorder_one.denoised[-1])


def test_output_types_sizes_and_the_latents_argument(pipelines):
    pipeline = pipelines["sdxl"]
    latents = pipeline("a red cat", generator=seeded(3), output_type="latent").images
    assert latents.dtype == torch.float32 and latents.shape == (1, 4, 8, 8)
    array = pipeline("a red cat", generator=seeded(3), output_type="np").images
    tensor = pipeline("a red cat", generator=seeded(3), output_type="pt").images
    assert array.shape == (1, 64, 64, 3) and tensor.shape == (1, 3, 64, 64)
    np.testing.assert_allclose(array[0], tensor[0].permute(1, 2, 0).numpy(), atol=1e-6)
    wide = pipeline("a red cat", height=64, width=128, generator=seeded(3)).images[0]
    assert wide.size == (128, 64)
    # Given initial noise replaces the first draw; the generator then only feeds the re-noising steps.
    noise = torch.randn(1, 4, 8, 8, generator=seeded(3))
    generator = seeded(3)
    torch.randn(1, 4, 8, 8, generator=generator)
    from_noise = pipeline("a red cat", latents=noise, generator=generator, output_type="latent").images
    torch.testing.assert_close(from_noise, latents, rtol=0, atol=0)
    reused_seed = pipeline("a red cat", latents=noise, generator=seeded(3), output_type="latent").images
    assert not torch.allclose(reused_seed, latents, atol=1e-4)
    # One generator per image works too.
    per_image = pipeline(["a", "b"], generator=[seeded(1), seeded(2)], output_type="latent").images
    assert per_image.shape == (2, 4, 8, 8)


def test_negative_prompt_is_ignored_with_a_warning_without_guidance(pipelines, caplog):
    pipeline = pipelines["sdxl"]
    plain = pipeline("a red cat", generator=seeded(), output_type="latent").images
    with caplog.at_level(logging.WARNING):
        ignored = pipeline("a red cat", negative_prompt="blurry", generator=seeded(), output_type="latent").images
    assert "negative_prompt` is ignored" in caplog.text
    torch.testing.assert_close(ignored, plain, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["sdxl", "sd15", "sd3"])
def test_classifier_free_guidance_above_one_uses_the_negative_prompt(family, pipelines, caplog):
    pipeline = pipelines[family]
    recorder = StepRecorder()
    with caplog.at_level(logging.WARNING):
        guided = pipeline(
            "a red cat",
            negative_prompt="blurry",
            guidance_scale=3.0,
            generator=seeded(),
            output_type="latent",
            callback_on_step_end=recorder,
        ).images
    assert "ignored" not in caplog.text
    assert recorder.shapes[0] == (1, 4, 8, 8)
    plain = pipeline("a red cat", generator=seeded(), output_type="latent").images
    other_negative = pipeline(
        "a red cat", negative_prompt="sharp", guidance_scale=3.0, generator=seeded(), output_type="latent"
    ).images
    assert not torch.allclose(guided, plain, atol=1e-4)
    assert not torch.allclose(guided, other_negative, atol=1e-4)


def test_other_step_counts_and_explicit_timesteps(pipelines, caplog):
    pipeline = pipelines["sdxl"]
    recorder = StepRecorder()
    with caplog.at_level(logging.WARNING):
        pipeline("a red cat", num_inference_steps=2, generator=seeded(), callback_on_step_end=recorder)
    assert "trained for 4 steps" in caplog.text
    # The documented rule: interpolate the trained grid, keeping its first and last timesteps.
    assert recorder.timesteps == [999.0, 249.0]
    recorder = StepRecorder()
    pipeline("a red cat", timesteps=[999, 499], generator=seeded(), callback_on_step_end=recorder)
    assert recorder.timesteps == [999.0, 499.0]
    # The next call is back on the trained grid.
    recorder = StepRecorder()
    pipeline("a red cat", generator=seeded(), callback_on_step_end=recorder)
    assert recorder.timesteps == TRAINED_GRID


def test_callback_can_replace_the_latents(pipelines):
    pipeline = pipelines["sd3"]

    def zero_after_first_step(pipe, step, timestep, callback_kwargs):
        return {"latents": torch.zeros_like(callback_kwargs["latents"])} if step == 0 else {}

    changed = pipeline(
        "a red cat", generator=seeded(), output_type="latent", callback_on_step_end=zero_after_first_step
    )
    plain = pipeline("a red cat", generator=seeded(), output_type="latent")
    assert not torch.allclose(changed.images, plain.images, atol=1e-4)


def test_deterministic_sampler_depends_only_on_the_initial_noise():
    pipeline = few_step_pipeline("sd3", deterministic=True)
    noise = torch.randn(1, 4, 8, 8, generator=seeded(5))
    first = pipeline("a red cat", latents=noise, generator=seeded(1), output_type="latent").images
    second = pipeline("a red cat", latents=noise, generator=seeded(2), output_type="latent").images
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_invalid_arguments_fail_with_clear_messages(pipelines):
    pipeline = pipelines["sdxl"]
    with pytest.raises(ValueError, match="multiples of 8"):
        pipeline("a red cat", height=60)
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipeline("a red cat", callback_on_step_end=lambda *args: {}, callback_on_step_end_tensor_inputs=["noise"])
    with pytest.raises(ValueError, match="exactly one backbone"):
        FewStepDMDRPipeline(
            vae=pipeline.vae,
            text_encoder=pipeline.text_encoder,
            tokenizer=pipeline.tokenizer,
            scheduler=pipeline.scheduler,
        )


def test_loads_a_stock_teacher_folder_with_a_dmdr_scheduler(tiny_teacher_dirs):
    scheduler = DMDRScheduler(prediction_type="flow", training_timesteps=FLOW_GRID)
    pipeline = FewStepDMDRPipeline.from_pretrained(tiny_teacher_dirs["sd3"], scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline.model_family == "sd3" and pipeline.unet is None
    reference = few_step_pipeline("sd3")
    torch.testing.assert_close(
        pipeline("a red cat", generator=seeded(), output_type="latent").images,
        reference("a red cat", generator=seeded(), output_type="latent").images,
        rtol=1e-4,
        atol=1e-4,
    )
