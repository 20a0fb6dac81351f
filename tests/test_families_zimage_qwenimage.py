"""Z-Image and Qwen-Image: the families reproduce their stock pipelines (conditioning, timestep convention, output
sign, packing, negative prompt, CFG rule, default grid), and build-tiny writes teachers diffusers loads."""

import pytest
import torch
from conftest import tiny_config

from diffusers_dmdr import testing
from diffusers_dmdr.families import detect_family, get_family, read_teacher_config
from diffusers_dmdr.families.base import student_grid_for, student_scheduler_for
from diffusers_dmdr.families.qwenimage import pack_latents, unpack_latents
from diffusers_dmdr.method.denoisers import Denoiser
from diffusers_dmdr.pipelines.scheduling_dmdr import DMDRScheduler


NEW_FAMILIES = ["zimage", "qwenimage"]
PROMPTS = ["a red cat", "a blue dog in the snow"]


def stock_guidance_kwargs(family: str, scale: float) -> dict:
    """The stock call's CFG arguments for DMDR's guidance scale `scale` (`uncond + scale (cond - uncond)`)."""
    if family == "zimage":
        # Z-Image's CFG is `cond + g (cond - uncond)`: g = scale - 1 (0 is off), empty negative prompt by default.
        return {"guidance_scale": max(scale - 1.0, 0.0)}
    # Qwen-Image runs CFG only with a negative prompt and `true_cfg_scale > 1`.
    return {"true_cfg_scale": scale, "negative_prompt": " "} if scale > 1 else {"true_cfg_scale": 1.0}


def stock_latents(family: str, latents: torch.Tensor) -> torch.Tensor:
    return pack_latents(latents) if family == "qwenimage" else latents


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_build_tiny_cli_writes_a_teacher_that_diffusers_loads(family, tmp_path, capsys):
    from diffusers import DiffusionPipeline

    output = tmp_path / family
    testing.main(["build-tiny", "--family", family, "--output", str(output)])
    assert "wrote a tiny" in capsys.readouterr().out
    pipeline = DiffusionPipeline.from_pretrained(output)
    assert type(pipeline).__name__ == get_family(family).pipeline_class_name
    # `family: auto` detects it from model_index.json.
    assert detect_family(read_teacher_config(str(output)), str(output)) == family
    with pytest.raises(SystemExit):
        testing.main(
            ["build-tiny", "--family", family, "--output", str(tmp_path / "x"), "--prediction_type", "epsilon"]
        )


@pytest.mark.parametrize("family", NEW_FAMILIES)
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_two_stock_sampling_steps_equal_the_family_through_the_trainers_denoiser(
    family, guidance_scale, tiny_teacher_dirs
):
    """The stock pipeline's own loop (Euler, CFG by its rule and negative prompt) against the family's encode,
    backbone call and `real_score_x0` (what the trainer's real score calls), on the grid [1000, 500]."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    family_object = get_family(family)
    teacher = family_object.load_teacher(tiny_teacher_dirs[family])
    pipeline, backbone = teacher.pipeline, teacher.backbone.eval()
    # A plain flow scheduler, so that the stock loop runs exactly at the integer timesteps [1000, 500].
    pipeline.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    size = 32
    latent_size = size // pipeline.vae_scale_factor
    channels = family_object.latent_channels(backbone)
    noise = torch.randn(len(PROMPTS), channels, latent_size, latent_size, generator=torch.Generator().manual_seed(3))
    extra = stock_guidance_kwargs(family, guidance_scale)
    # A copy: the stock Z-Image encoder writes the chat-templated text into the list it is given.
    stock = pipeline(
        list(PROMPTS),
        height=size,
        width=size,
        sigmas=[1.0, 0.5],
        latents=stock_latents(family, noise.clone()),
        output_type="latent",
        max_sequence_length=512,
        **extra,
    ).images
    if family == "qwenimage":
        stock = unpack_latents(stock, latent_size, latent_size)

    scheduler = DMDRScheduler(prediction_type="flow", training_timesteps=[1000.0, 500.0])
    denoiser = Denoiser(lambda s, t, c: family_object.call_backbone(backbone, s, t, c), scheduler)
    condition = family_object.encode_prompts(pipeline, PROMPTS, size, torch.device("cpu"))
    uncondition = family_object.encode_prompts(
        pipeline, [family_object.negative_prompt] * len(PROMPTS), size, torch.device("cpu")
    )
    sample = noise
    levels = [1.0, 0.5, 0.0]
    with torch.no_grad():
        for level, next_level in zip(levels[:-1], levels[1:], strict=True):
            batch_level = torch.full((len(PROMPTS),), level)
            x0 = family_object.real_score_x0(denoiser, sample, batch_level, condition, uncondition, guidance_scale)
            velocity = (sample - x0) / level
            sample = sample + (next_level - level) * velocity
    torch.testing.assert_close(sample, stock, atol=1e-4, rtol=1e-4)
    # The family hands the stock encoder a copy: the trainer's prompts are not rewritten.
    assert PROMPTS == ["a red cat", "a blue dog in the snow"]


def test_qwenimage_packing_is_the_stock_pipelines():
    """`pack_latents` goes through `QwenImagePipeline._pack_latents` (private): packing the trainer's noise gives the
    stock `prepare_latents` tokens for the same generator, and unpacking inverts it."""
    from diffusers import QwenImagePipeline

    generator = torch.Generator().manual_seed(0)
    # The stock pipeline draws (B, 1, C, H, W) noise and packs it; the trainer draws (B, C, H, W).
    stock_noise = torch.randn(2, 1, 4, 8, 6, generator=generator)
    stock_packed = QwenImagePipeline._pack_latents(stock_noise, 2, 4, 8, 6)
    noise = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pack_latents(noise), stock_packed)
    assert pack_latents(noise).shape == (2, 4 * 3, 16)
    assert torch.equal(unpack_latents(pack_latents(noise), 8, 6), noise)


@pytest.mark.parametrize("family", NEW_FAMILIES)
@pytest.mark.parametrize("resolution", [32, 64])
def test_default_grid_is_the_teacher_schedulers_schedule_at_the_resolution(
    family, resolution, tiny_teacher_dirs, prompt_file, tmp_path
):
    """Dynamic shift: the stored grid equals the timesteps the stock pipeline's scheduler uses for that resolution
    and step count (its own `mu`), and the `mu` is recorded in the saved scheduler config (the resolution is in the
    run's saved config)."""
    from diffusers_dmdr.preflight import check_run_inputs

    config = tiny_config(tiny_teacher_dirs[family], prompt_file, tmp_path, resolution=resolution)
    teacher = get_family(family).load_teacher(tiny_teacher_dirs[family])
    pipeline = teacher.pipeline
    pipeline(
        "a red cat",
        height=resolution,
        width=resolution,
        num_inference_steps=4,
        output_type="latent",
        **({"guidance_scale": 0.0} if family == "zimage" else {}),
    )
    expected = pipeline.scheduler.timesteps.tolist()
    timesteps, origin = student_grid_for(
        teacher.family, config, teacher.pipeline.scheduler.config, pipeline.vae_scale_factor
    )
    scheduler = student_scheduler_for(teacher, timesteps, None, None, grid_origin=origin)
    assert scheduler.config.training_timesteps == expected
    torch.testing.assert_close(scheduler.noise_levels, pipeline.scheduler.sigmas[:-1], atol=1e-6, rtol=0)
    assert check_run_inputs(config).student_timesteps == expected
    scheduler.save_pretrained(tmp_path / "scheduler")
    reloaded = DMDRScheduler.from_pretrained(tmp_path / "scheduler")
    assert reloaded.config.training_timesteps == expected
    if family == "qwenimage":
        # The tiny Qwen-Image scheduler uses dynamic shifting (as the released one): mu follows the resolution.
        image_seq_len = (resolution // pipeline.vae_scale_factor // 2) ** 2
        base, top = pipeline.scheduler.config.base_image_seq_len, pipeline.scheduler.config.max_image_seq_len
        slope = (pipeline.scheduler.config.max_shift - pipeline.scheduler.config.base_shift) / (top - base)
        mu = image_seq_len * slope + pipeline.scheduler.config.base_shift - slope * base
        assert origin == {"grid_mu": pytest.approx(mu)}
        assert reloaded.config.grid_mu == pytest.approx(mu)
    else:
        # Z-Image's scheduler has a static shift: the grid does not depend on the resolution and records no mu.
        assert origin == {} and expected == [1000.0, 900.0, 750.0, 500.0]


def test_an_explicit_shift_replaces_the_teachers_dynamic_shift(tiny_teacher_dirs, prompt_file, tmp_path):
    teacher = get_family("qwenimage").load_teacher(tiny_teacher_dirs["qwenimage"])
    config = tiny_config(tiny_teacher_dirs["qwenimage"], prompt_file, tmp_path, shift=3.0)
    timesteps, origin = student_grid_for(
        teacher.family, config, teacher.pipeline.scheduler.config, teacher.pipeline.vae_scale_factor
    )
    # linspace(1, 1/4, 4) warped by 3 s / (1 + 2 s), then Qwen-Image's stretch of the last sigma to 0.02.
    warped = [3 * s / (1 + 2 * s) for s in (1.0, 0.75, 0.5, 0.25)]
    scale = (1 - warped[-1]) / (1 - 0.02)
    expected = [1000 * (1 - (1 - s) / scale) for s in warped]
    assert timesteps == pytest.approx(expected, abs=1e-3) and origin == {}


# Values the Z-Image / Qwen-Image recipes take from the released SD3.5-Large script (their headers say which).
RELEASED_SD35_KEYS = (
    "mixed_precision",
    "use_8bit_adam",
    "training_mode",
    "backward_simulation",
    "flow_x0_noise_level",
    "lora_rank",
    "lora_alpha",
    "fake_lora_rank",
    "fake_lora_alpha",
    "fake_score_lora_scale",
    "real_score_lora_scale",
    "dynamic_steps",
    "update_ratio",
    "guidance_scale_jitter",
    "cold_start_steps",
    "max_train_steps",
    "learning_rate",
    "learning_rate_fake",
    "train_batch_size",
    "resolution",
)
NEW_RECIPES = {"zimage_4step": ("zimage", 4), "zimage_8step": ("zimage", 8), "qwenimage_4step": ("qwenimage", 4)}


@pytest.mark.parametrize("name", sorted(NEW_RECIPES))
def test_new_family_recipes_take_the_released_sd35_values_they_name(name):
    from pathlib import Path

    import yaml

    from diffusers_dmdr import DMDRConfig
    from diffusers_dmdr.rewards import parse_reward_spec

    root = Path(__file__).resolve().parents[1]
    released = yaml.safe_load((root / "tests" / "data" / "released_recipes.yaml").read_text())["sd35_large_4step"]
    recipe = root / "examples" / "train_dmdr" / "configs" / f"{name}.yaml"
    config = DMDRConfig.parse_args(["--config", str(recipe), "--train_prompts", "prompts.txt"])
    family, steps = NEW_RECIPES[name]
    assert (config.family, config.num_student_steps, config.student_timesteps) == (family, steps, None)
    assert {key: getattr(config, key) for key in RELEASED_SD35_KEYS} == {
        key: released[key] for key in RELEASED_SD35_KEYS
    }
    assert {key: getattr(config, f"stage2_{key}") for key in released["stage2"]} == released["stage2"]
    specs = {spec.name: (spec.weight, spec.hinge) for spec in map(parse_reward_spec, config.reward)}
    assert specs == {reward: (value["weight"], value["hinge"]) for reward, value in released["rewards"].items()}
    # The LoRA targets are the family's (diffusers' own LoRA example), and the header says what is extrapolated.
    assert config.lora_target_modules is None and config.fake_lora_target_modules is None
    header = recipe.read_text(encoding="utf-8")
    assert (
        "EXTRAPOLATED" in header
        and "GPU:" in header
        and f"train_dreambooth_lora_{family.replace('image', '_image')}" in header
    )


class Brightness(torch.nn.Module):
    def forward(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


@pytest.mark.slow
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_cached_prompts_checkpointing_reward_tilt_and_exact_resume(family, tiny_teacher_dirs, prompt_file, tmp_path):
    """The options beyond plain DMD on each new family in one go: the prompt cache (holding the family's negative
    prompt, so the real score never encodes live), gradient checkpointing through the backbone call, RT-DM weights
    and a reward in stage 2, TTUR, and a resume that continues bit for bit.

    Slow (6-8 s per family: three trainers and four checkpoints, beyond this stream's `make test` budget); `make test`
    keeps the family-specific part (`test_the_prompt_cache_holds_the_family_negative_prompt`) and SDXL's exact resume.
    """
    from diffusers_dmdr.prompt_cache import read_cache
    from diffusers_dmdr.rewards import LoadedReward
    from diffusers_dmdr.trainer import DMDRTrainer

    def trainer_for(output_dir, **overrides):
        config = tiny_config(
            tiny_teacher_dirs[family],
            prompt_file,
            output_dir,
            resolution=32,
            cache_prompt_embeds=True,
            prompt_embeds_cache_dir=str(tmp_path / "cache"),
            gradient_checkpointing=True,
            reward_tilt=True,
            real_guidance_scale=3.0,
            **overrides,
        )
        teacher = get_family(family).load_teacher(config.pretrained_model_name_or_path)
        rewards = [LoadedReward(name="brightness", fn=Brightness(), weight=1.0, hinge=None)]
        return DMDRTrainer(config, teacher, PROMPTS, rewards=rewards)

    common = dict(max_train_steps=2, cold_start_steps=1, dynamic_steps=2, checkpointing_steps=1)
    uninterrupted = trainer_for(tmp_path / "a", **common)
    history_a = uninterrupted.train()
    (cache_file,) = (tmp_path / "cache").glob("*.safetensors")
    assert get_family(family).negative_prompt in read_cache(cache_file)[0]
    assert uninterrupted.prompt_encoder.live_encodes == 0
    assert "loss_rl" in history_a[1] and "loss_rl" not in history_a[0]

    trainer_for(tmp_path / "b", **{**common, "max_train_steps": 1}).train()
    resumed = trainer_for(tmp_path / "b", **common, resume_from_checkpoint="latest")
    history_b = resumed.train()
    assert history_b[0]["step"] == 2
    for key in ("loss_dmd", "loss_fake", "loss_rl", "loss"):
        assert history_b[0][key] == history_a[1][key], key
    for name, value in resumed.training_module.state_dict().items():
        assert torch.equal(value, uninterrupted.training_module.state_dict()[name]), name


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_resolution_must_fit_the_2x2_latent_patches_before_any_weight_loads(family, tiny_teacher_dirs, prompt_file):
    from diffusers_dmdr.preflight import check_run_inputs

    factor = get_family(family).vae_scale_factor(tiny_teacher_dirs[family])
    config = tiny_config(tiny_teacher_dirs[family], prompt_file, "unused", resolution=5 * factor)
    message = f"not divisible by {2 * factor} \\(the VAE's factor {factor} x the backbone's 2x2 latent patches\\)"
    with pytest.raises(ValueError, match=message):
        check_run_inputs(config)


def test_qwenimage_sde_sampler_draws_in_the_stock_packed_layout(tiny_teacher_dirs, prompt_file, tmp_path):
    """The stock QwenImagePipeline steps the scheduler on packed tokens, so fresh re-noising noise comes out in that
    layout: with `step_noise` the exported pipeline reproduces the trainer's stochastic sampler for a generator."""
    from diffusers_dmdr.pipelines.pipeline_dmdr import FewStepDMDRPipeline
    from diffusers_dmdr.trainer import DMDRTrainer

    family = get_family("qwenimage")
    config = tiny_config(tiny_teacher_dirs["qwenimage"], prompt_file, tmp_path, backward_simulation="sde")
    teacher = family.load_teacher(config.pretrained_model_name_or_path)
    trainer = DMDRTrainer(config, teacher, PROMPTS)
    assert not trainer.scheduler.config.deterministic
    expected = trainer.sample_latents(PROMPTS, generator=torch.Generator().manual_seed(7))
    pipeline = teacher.pipeline
    student = FewStepDMDRPipeline(
        vae=pipeline.vae,
        text_encoder=pipeline.text_encoder,
        tokenizer=pipeline.tokenizer,
        scheduler=trainer.scheduler,
        transformer=teacher.backbone,
    )
    student.set_progress_bar_config(disable=True)
    packed = student(
        list(PROMPTS), height=64, width=64, generator=torch.Generator().manual_seed(7), output_type="latent"
    ).images
    torch.testing.assert_close(unpack_latents(packed, 16, 16), expected, atol=1e-4, rtol=1e-4)
    # The packed draw is not the plain one: without the hook the samples would differ.
    sample = torch.zeros(2, 4, 16, 16)
    plain = torch.randn(sample.shape, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(family.step_noise(sample, torch.Generator().manual_seed(1)), plain)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_the_prompt_cache_holds_the_family_negative_prompt(family, tiny_teacher_dirs, prompt_file, tmp_path):
    """The real score's unconditional branch (Qwen-Image: `" "`) is encoded into the cache with the prompts, so a
    cached run never moves the text encoder back for it, and it equals the live encoding."""
    from accelerate import Accelerator

    from diffusers_dmdr.prompt_cache import PromptEncoder, read_cache

    config = tiny_config(
        tiny_teacher_dirs[family],
        prompt_file,
        tmp_path,
        cache_prompt_embeds=True,
        prompt_embeds_cache_dir=str(tmp_path / "cache"),
    )
    teacher = get_family(family).load_teacher(config.pretrained_model_name_or_path)
    encoder = PromptEncoder.from_config(config, teacher, Accelerator(cpu=True), PROMPTS)
    (cache_file,) = (tmp_path / "cache").glob("*.safetensors")
    negative = teacher.family.negative_prompt
    assert negative == {"zimage": "", "qwenimage": " "}[family] and negative in read_cache(cache_file)[0]
    cached = encoder.encode([negative] * 2)
    assert encoder.live_encodes == 0
    live = teacher.family.encode_prompts(teacher.pipeline, [negative] * 2, config.resolution, torch.device("cpu"))
    for key, value in live.items():
        torch.testing.assert_close(cached[key], value)


def test_the_pipeline_leaves_the_callers_prompt_list_and_z_image_guidance_is_on_above_zero(caplog):
    """ZImagePipeline's encode_prompt rewrites the prompt list it is given (chat template); FewStepDMDRPipeline hands
    it a copy. Z-Image's CFG is on for any guidance_scale > 0, so a negative prompt is used, not ignored, at 0.5."""
    import logging

    from diffusers_dmdr.pipelines import DMDRScheduler, FewStepDMDRPipeline
    from diffusers_dmdr.testing import tiny_pipeline

    scheduler = DMDRScheduler(prediction_type="flow", training_timesteps=[1000.0, 750.0])
    pipeline = FewStepDMDRPipeline.from_pipe(tiny_pipeline("zimage"), scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    prompts = ["a red cat", "a blue dog"]
    pipeline(prompts, generator=torch.Generator().manual_seed(0), output_type="latent", height=32, width=32)
    assert prompts == ["a red cat", "a blue dog"]
    with caplog.at_level(logging.WARNING):
        pipeline("a red cat", negative_prompt="blurry", guidance_scale=0.5, output_type="latent", height=32, width=32)
    assert "is ignored" not in caplog.text
