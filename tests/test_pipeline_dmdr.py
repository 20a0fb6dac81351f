"""FewStepDMDRPipeline on tiny real teachers: a thin class over the stock pipelines (defaults, arguments, families,
guidance, callbacks, saving)."""

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, EulerDiscreteScheduler
from diffusers.callbacks import SDXLCFGCutoffCallback

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
        ["a red cat", "a blue dog"], num_images_per_prompt=2, generator=seeded(), callback_on_step_end=recorder
    ).images
    # Flow backbones see round(1000 t), as in the released SD3 training code (937.5 rounds half to even).
    grid = [1000.0, 938.0, 833.0, 625.0] if family == "sd3" else TRAINED_GRID
    assert recorder.timesteps == pytest.approx(grid, abs=1e-3)
    assert pipeline.model_family == family
    assert pipeline.config.stock_pipeline == type(pipeline.stock_pipeline()).__name__
    # No guidance: the backbone sees the 4 images once per step, not a doubled batch.
    assert recorder.shapes == [(4, 4, 8, 8)] * len(grid)
    assert len(images) == 4 and images[0].size == (64, 64)


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
    assert "negative_prompt is ignored" in caplog.text
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
    with pytest.raises(ValueError, match="divisible by 8"):
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
    # A stock scheduler would sample silently wrong: it is refused, with the way to use one instead.
    with pytest.raises(ValueError, match="DMDRScheduler"):
        FewStepDMDRPipeline(**{**pipeline.components, "scheduler": EulerDiscreteScheduler()})
    with pytest.raises(ValueError, match="Unknown stock_pipeline"):
        FewStepDMDRPipeline(**pipeline.components, stock_pipeline="NoSuchPipeline")


def test_prompt_embeddings_and_cross_attention_kwargs_pass_through(pipelines):
    pipeline = pipelines["sdxl"]
    plain = pipeline("a red cat", generator=seeded(), output_type="latent").images
    prompt_embeds, _, pooled_prompt_embeds, _ = pipeline.encode_prompt(
        "a red cat", device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    from_embeds = pipeline(
        prompt_embeds=prompt_embeds,
        pooled_prompt_embeds=pooled_prompt_embeds,
        generator=seeded(),
        output_type="latent",
        cross_attention_kwargs={"scale": 1.0},
    ).images
    torch.testing.assert_close(from_embeds, plain, rtol=0, atol=0)
    # Negative embeddings act under guidance exactly as the negative prompt they encode.
    guided = pipeline(
        "a red cat", negative_prompt="blurry", guidance_scale=3.0, generator=seeded(), output_type="latent"
    )
    _, negative_embeds, _, negative_pooled = pipeline.encode_prompt(
        "a red cat", device=torch.device("cpu"), do_classifier_free_guidance=True, negative_prompt="blurry"
    )
    guided_from_embeds = pipeline(
        "a red cat",
        negative_prompt_embeds=negative_embeds,
        negative_pooled_prompt_embeds=negative_pooled,
        guidance_scale=3.0,
        generator=seeded(),
        output_type="latent",
    )
    torch.testing.assert_close(guided_from_embeds.images, guided.images, rtol=0, atol=0)


def test_a_callback_that_turns_guidance_off_takes_effect(pipelines):
    pipeline = pipelines["sdxl"]
    common = {"negative_prompt": "blurry", "guidance_scale": 3.0, "output_type": "latent"}
    guided = pipeline("a red cat", generator=seeded(), **common).images
    cutoff = SDXLCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=1)
    cut = pipeline("a red cat", generator=seeded(), callback_on_step_end=cutoff, **common).images
    assert not torch.allclose(cut, guided, atol=1e-4)


def test_stock_flow_pipeline_with_the_scheduler_is_reproducible_from_a_generator(pipelines):
    """`StableDiffusion3Pipeline` calls `step` without its generator; handing it to the scheduler fixes the draws."""
    pipeline = pipelines["sd3"]
    ours = pipeline("a red cat", generator=seeded(7), output_type="latent").images
    stock = pipeline.stock_pipeline()
    generator = seeded(7)
    stock.scheduler.set_noise_generator(generator)
    try:
        theirs = stock(
            "a red cat",
            generator=generator,
            num_inference_steps=4,
            guidance_scale=0.0,
            max_sequence_length=128,
            output_type="latent",
        ).images
    finally:
        stock.scheduler.set_noise_generator(None)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=0)
    assert not torch.allclose(pipeline("a red cat", generator=seeded(8), output_type="latent").images, ours)


def test_save_pretrained_and_push_to_hub_keep_the_repository_code_form(pipelines, tmp_path, monkeypatch):
    pipeline = pipelines["sdxl"]
    folder = tmp_path / "saved"
    pipeline.save_pretrained(folder)
    model_index = json.loads((folder / "model_index.json").read_text())
    assert model_index["_class_name"] == ["pipeline_dmdr", "FewStepDMDRPipeline"]
    assert model_index["scheduler"] == ["scheduling_dmdr", "DMDRScheduler"]
    assert model_index["stock_pipeline"] == "StableDiffusionXLPipeline"
    assert (folder / "pipeline_dmdr.py").is_file() and (folder / "scheduler" / "scheduling_dmdr.py").is_file()
    remote = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert type(remote).__name__ == "FewStepDMDRPipeline" and type(remote.scheduler).__name__ == "DMDRScheduler"
    remote.set_progress_bar_config(disable=True)
    torch.testing.assert_close(
        remote("a red cat", generator=seeded(), output_type="latent").images,
        pipeline("a red cat", generator=seeded(), output_type="latent").images,
    )
    # Saved again from the remote-code copy, the folder keeps the same form.
    remote.save_pretrained(tmp_path / "saved_again")
    again = json.loads((tmp_path / "saved_again" / "model_index.json").read_text())
    assert again["_class_name"] == model_index["_class_name"] and again["scheduler"] == model_index["scheduler"]

    uploaded = {}

    def fake_upload_folder(*args, folder_path, **kwargs):
        uploaded["model_index"] = json.loads((Path(folder_path) / "model_index.json").read_text())
        uploaded["files"] = sorted(p.name for p in Path(folder_path).iterdir())

    monkeypatch.setattr(
        "diffusers.utils.hub_utils.create_repo", lambda repo_id, **kwargs: SimpleNamespace(repo_id=repo_id)
    )
    monkeypatch.setattr("diffusers.utils.hub_utils.upload_folder", fake_upload_folder)
    monkeypatch.setattr(
        "diffusers.utils.hub_utils.load_or_create_model_card",
        lambda *a, **k: SimpleNamespace(save=lambda path: None, data=SimpleNamespace(tags=None)),
    )
    monkeypatch.setattr("diffusers.utils.hub_utils.populate_model_card", lambda card, tags=None: card)
    pipeline.push_to_hub("org/dmdr-tiny")
    assert uploaded["model_index"]["_class_name"] == ["pipeline_dmdr", "FewStepDMDRPipeline"]
    assert "pipeline_dmdr.py" in uploaded["files"]


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


def test_modular_pipeline_with_the_scheduler_runs_the_trained_sampler(tiny_teacher_dirs):
    """The fourth loading route: diffusers' modular SDXL pipeline of the teacher, the DMDRScheduler swapped in and
    guidance off, samples exactly what FewStepDMDRPipeline samples."""
    from diffusers.guiders import ClassifierFreeGuidance
    from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks

    modular = StableDiffusionXLAutoBlocks().init_pipeline(tiny_teacher_dirs["sdxl"])
    modular.load_components(dtype=torch.float32)
    modular.update_components(
        scheduler=DMDRScheduler(training_timesteps=TRAINED_GRID), guider=ClassifierFreeGuidance(guidance_scale=1.0)
    )
    modular.set_progress_bar_config(disable=True)
    latents = modular(prompt="a red cat", num_inference_steps=4, generator=seeded(), output="latents")
    reference = FewStepDMDRPipeline.from_pretrained(
        tiny_teacher_dirs["sdxl"], scheduler=DMDRScheduler(training_timesteps=TRAINED_GRID)
    )
    reference.set_progress_bar_config(disable=True)
    expected = reference("a red cat", generator=seeded(), output_type="latent").images
    torch.testing.assert_close(latents, expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_a_pipeline_of_text_encoders_alone_encodes_prompts_as_the_full_one(family, pipelines):
    """Issue 27 item 10 (diffusers' `test_encode_prompt_works_in_isolation` pattern): built with only the text
    encoders and tokenizers, the pipeline finds its family from them and encodes exactly as the full pipeline."""
    full = pipelines[family]
    encoders = {
        name: (module if name.startswith(("text_encoder", "tokenizer")) else None)
        for name, module in full.components.items()
    }
    encode_only = FewStepDMDRPipeline(**encoders)
    assert encode_only.config.stock_pipeline == full.config.stock_pipeline
    kwargs = {"device": torch.device("cpu"), "num_images_per_prompt": 1, "do_classifier_free_guidance": False}
    if family == "sd3":
        kwargs.update(prompt_2=None, prompt_3=None)
    expected = full.encode_prompt("a red cat", **kwargs)
    for got, want in zip(encode_only.encode_prompt("a red cat", **kwargs), expected, strict=True):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="holds only text encoders"):
        encode_only("a red cat")


@pytest.mark.parametrize("family", ["sdxl", "sd15", "sd3"])
def test_embeddings_encoded_in_isolation_sample_as_the_full_pipeline(family, pipelines):
    """diffusers' `test_encode_prompt_works_in_isolation`, whole: `encode_prompt` of a pipeline of the text encoders
    alone (with its defaults: SD3's trained 128 T5 tokens, not the stock 256), then a pipeline without text encoders
    (its family found from the backbone: SDXL's UNet from SD1.5's) sampling from those embeddings, gives the full
    pipeline's images (to float rounding)."""
    full = pipelines[family]
    encoders = {name: module for name, module in full.components.items() if name.startswith(("text_encoder", "token"))}
    rest = {name: module for name, module in full.components.items() if name not in encoders}
    encode_only = FewStepDMDRPipeline(**encoders, **dict.fromkeys(rest))
    kwargs = {"device": torch.device("cpu"), "num_images_per_prompt": 1, "do_classifier_free_guidance": False}
    if family == "sd3":
        kwargs.update(prompt_2=None, prompt_3=None)  # required by the stock SD3 `encode_prompt`
    outputs = encode_only.encode_prompt("a red cat", **kwargs)
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    embeddings = {name: value for name, value in zip(names[: len(outputs)], outputs, strict=True) if value is not None}
    sampler = FewStepDMDRPipeline(**rest, **dict.fromkeys(encoders))
    assert sampler.config.stock_pipeline == full.config.stock_pipeline
    images = sampler(generator=seeded(), output_type="np", **embeddings).images
    expected = full("a red cat", generator=seeded(), output_type="np").images
    # Float rounding of the SD3 joint attention differs by ~1e-6 between the two calls; before the trained token
    # count applied to `encode_prompt` they differed by 1e-2 (diffusers' own check: 1e-4).
    np.testing.assert_allclose(images, expected, rtol=0, atol=1e-5)


def test_call_signature_names_the_stock_parameters():
    """`inspect.signature` (IDEs, `help(pipe)`) sees the parameters of the SDXL and SD3 calls, and every named one is
    a parameter of some stock pipeline it drives."""
    import inspect

    import diffusers

    from diffusers_dmdr.pipelines.pipeline_dmdr import STOCK_ROUTES

    ours = inspect.signature(FewStepDMDRPipeline.__call__).parameters
    named = {name for name, parameter in ours.items() if parameter.kind is not parameter.VAR_KEYWORD} - {"self"}
    stock = {name: set(inspect.signature(getattr(diffusers, name).__call__).parameters) for name in STOCK_ROUTES}
    assert all(any(name in parameters for parameters in stock.values()) for name in named), named
    common = stock["StableDiffusionXLPipeline"] & stock["StableDiffusion3Pipeline"]
    missing = common - named - {"self", "kwargs", "ip_adapter_image", "ip_adapter_image_embeds", "clip_skip"}
    assert not missing, missing
    # diffusers' text-to-image parameters (`pipeline_params.TEXT_TO_IMAGE_PARAMS`) are all named.
    text_to_image = {"prompt", "height", "width", "guidance_scale", "negative_prompt", "prompt_embeds"}
    assert text_to_image | {"negative_prompt_embeds", "cross_attention_kwargs"} <= named
