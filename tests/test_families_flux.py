"""FLUX.1 [dev] and FLUX.2 [klein] families on tiny teachers: the backbone call, the grid and the decode reproduce the
stock pipelines; FLUX.1's real score is one pass at a guidance embedding; training moves only what it should."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from test_trainer import PROMPTS, TwoLevelReward, base_weights, lora_weights, make_trainer, reward

from diffusers_dmdr.adapters import FAKE_ADAPTER, STUDENT_ADAPTER
from diffusers_dmdr.families import detect_family, get_family, read_teacher_config
from diffusers_dmdr.families.flux import (
    _flux2_unpack,
    _stock_flux2_pack,
    _stock_flux_pack,
    _stock_flux_unpack,
    flux_image_seq_len,
)
from diffusers_dmdr.preflight import check_run_inputs
from diffusers_dmdr.rewards import parse_reward_spec


FAMILIES = ("flux", "flux2")


def test_latent_packing_helpers_match_the_stock_pipelines():
    """The isolated private helpers of diffusers' FLUX pipelines: fail loudly if diffusers changes them."""
    from diffusers import Flux2KleinPipeline

    latents = torch.randn(2, 4, 8, 6)
    tokens, image_ids = _stock_flux_pack(latents)
    assert tokens.shape == (2, 12, 16) and image_ids.shape == (12, 3)
    # Row-major 2x2 patches: token 1 is the patch at (row 0, column 1).
    assert torch.equal(image_ids[1], torch.tensor([0.0, 0.0, 1.0]))
    assert torch.equal(tokens[0, 1], latents[0, :, 0:2, 2:4].reshape(-1))
    assert torch.equal(_stock_flux_unpack(tokens, 8, 6), latents)

    patchified = torch.randn(2, 16, 3, 5)
    tokens, image_ids = _stock_flux2_pack(patchified)
    assert tokens.shape == (2, 15, 16) and image_ids.shape == (2, 15, 4)
    stock = Flux2KleinPipeline._unpack_latents_with_ids(tokens, image_ids, 3, 5)
    assert torch.equal(_flux2_unpack(tokens, 3, 5), stock)
    assert torch.equal(_flux2_unpack(tokens, 3, 5), patchified)

    # The sampler's re-noising noise is drawn where the stock pipelines' schedulers step: on the packed tokens.
    flux_noise = get_family("flux").step_noise(latents, torch.Generator().manual_seed(3))
    expected = torch.randn((2, 12, 16), generator=torch.Generator().manual_seed(3))
    assert torch.equal(_stock_flux_pack(flux_noise)[0], expected)
    flux2_noise = get_family("flux2").step_noise(patchified, torch.Generator().manual_seed(3))
    expected = torch.randn((2, 15, 16), generator=torch.Generator().manual_seed(3))
    assert torch.equal(_stock_flux2_pack(flux2_noise)[0], expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_backbone_call_grid_and_decode_reproduce_the_stock_pipeline(family, tiny_teacher_dirs):
    """The stock pipeline's Euler loop, rebuilt from the family's pieces (noise shape, `call_backbone`, the empty
    negative prompt of CFG, the decode), gives the stock pipeline's latents and images for the same generator."""
    family_impl = get_family(family)
    teacher = family_impl.load_teacher(tiny_teacher_dirs[family])
    pipeline, steps, guidance = teacher.pipeline, 3, 3.0
    kwargs = {"height": 64, "width": 64, "num_inference_steps": steps, "guidance_scale": guidance}
    kwargs["max_sequence_length"] = family_impl.max_sequence_length(pipeline)
    stock = pipeline(prompt=PROMPTS[:2], generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs)
    stock_timesteps = pipeline.scheduler.timesteps.clone()
    stock_sigmas = pipeline.scheduler.sigmas.clone()

    shape = family_impl.latent_shape(teacher.backbone, pipeline.vae_scale_factor, 64)
    sample = torch.randn((2, *shape), generator=torch.Generator().manual_seed(0))
    condition = family_impl.with_guidance_embedding(family_impl.encode_prompts(pipeline, PROMPTS[:2], 64, "cpu"), 3.0)
    uncondition = family_impl.encode_prompts(pipeline, ["", ""], 64, "cpu")
    with torch.no_grad():
        for index, timestep in enumerate(stock_timesteps):
            velocity = family_impl.call_backbone(teacher.backbone, sample, timestep.expand(2), condition)
            if family == "flux2":  # true CFG against the empty prompt; FLUX.1 is guidance-distilled (one pass)
                unconditional = family_impl.call_backbone(teacher.backbone, sample, timestep.expand(2), uncondition)
                velocity = unconditional + guidance * (velocity - unconditional)
            sample = sample + (stock_sigmas[index + 1] - stock_sigmas[index]) * velocity
        images = family_impl.decode(teacher.vae, sample)
    torch.testing.assert_close(images, stock.images, atol=1e-5, rtol=0)
    # The default student grid is the stock pipeline's own grid for that resolution and step count.
    grid = family_impl.student_grid(steps, None, pipeline.scheduler.config, 64, pipeline.vae_scale_factor)[0]
    assert grid == [float(t) for t in stock_timesteps]


@pytest.mark.parametrize("family", FAMILIES)
def test_dynamic_shift_grid_follows_resolution_and_is_the_teacher_schedulers(
    family, tiny_teacher_dirs, prompt_file, tmp_path
):
    """The trainer's (and so the export's) grid is the teacher scheduler's sigmas at the training resolution and step
    count, with `mu` as the stock pipeline computes it; another resolution gives another grid."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    trainer = make_trainer(tiny_teacher_dirs[family], prompt_file, tmp_path, family=family, resolution=128)
    stored = list(trainer.scheduler.config.training_timesteps)
    teacher_config = trainer.pipeline.scheduler.config
    assert teacher_config.use_dynamic_shifting
    mu = trainer.family.dynamic_shift_mu(128, 4, teacher_config, 8)
    reference = FlowMatchEulerDiscreteScheduler.from_config(teacher_config)
    reference.set_timesteps(sigmas=np.linspace(1.0, 0.25, 4), mu=mu)
    assert stored == [float(t) for t in reference.timesteps]
    torch.testing.assert_close(trainer.scheduler.noise_levels, reference.sigmas[:-1], atol=1e-7, rtol=0)
    assert flux_image_seq_len(128, 8) == 64
    at_64 = trainer.family.student_grid(4, None, teacher_config, 64, 8)[0]
    assert at_64 != stored and at_64[0] == stored[0] == 1000.0
    # An explicit shift gives the static SD3-style grid instead.
    assert trainer.family.student_grid(4, 3.0, teacher_config, 128, 8)[0][1] == pytest.approx(900.1, abs=0.1)


def test_flux_real_score_is_one_pass_at_the_guidance_embedding(tiny_teacher_dirs, prompt_file, tmp_path):
    trainer = make_trainer(tiny_teacher_dirs["flux"], prompt_file, tmp_path, family="flux", real_guidance_scale=4.0)
    module = trainer.training_module
    calls = []

    def counting_call(backbone, sample, timestep, condition):
        calls.append((sample.shape[0], condition["guidance"].clone()))
        return original(backbone, sample, timestep, condition)

    original, module.call_backbone = module.call_backbone, counting_call
    batch = trainer.rollout(0)[0]
    draws = batch.draws
    calls.clear()
    x0_student = torch.randn(2, *trainer.latent_shape)
    trainer.objective.dmd_loss(x0_student, batch, global_step=0)
    # One pass for the real score (guidance embedding = the drawn, jittered scale) and one for the fake score (the
    # fixed embedding); no unconditional branch, so no doubled batch.
    assert [size for size, _ in calls] == [2, 2]
    assert abs(draws.guidance_scale - 4.0) <= 0.5 and draws.guidance_scale != 4.0
    assert torch.equal(calls[0][1], torch.full((2,), draws.guidance_scale))
    assert torch.equal(calls[1][1], torch.full((2,), trainer.config.guidance_embedding_scale))

    # The real score depends on the embedding it is given.
    sample, level = torch.randn(2, *trainer.latent_shape), torch.tensor([0.8, 0.4])
    denoiser, uncondition = trainer.guidance_denoiser(0.0), trainer.encode(["", ""])
    with torch.no_grad():
        x0_low = trainer.family.real_score_x0(denoiser, sample, level, batch.condition, uncondition, 2.0)
        x0_high = trainer.family.real_score_x0(denoiser, sample, level, batch.condition, uncondition, 5.0)
    assert not torch.allclose(x0_low, x0_high, atol=1e-4)


def test_flux2_real_score_is_two_pass_cfg(tiny_teacher_dirs, prompt_file, tmp_path):
    trainer = make_trainer(tiny_teacher_dirs["flux2"], prompt_file, tmp_path, family="flux2", real_guidance_scale=4.0)
    module, sizes = trainer.training_module, []
    original = module.call_backbone

    def counting_call(backbone, sample, timestep, condition):
        sizes.append(sample.shape[0])
        return original(backbone, sample, timestep, condition)

    module.call_backbone = counting_call
    batch = trainer.rollout(0)[0]
    sizes.clear()
    trainer.objective.dmd_loss(torch.randn(2, *trainer.latent_shape), batch, global_step=0)
    # Conditional and empty-prompt branches in one batched call, then the fake score.
    assert sizes == [4, 2]


def train_and_check_lora_moves(trainer) -> list[dict]:
    """Train; assert that the student and fake adapters moved and the shared frozen base did not."""
    assert trainer.student_model is trainer.guidance_model
    base_before = base_weights(trainer.guidance_model)
    student_before = lora_weights(trainer.student_model, STUDENT_ADAPTER)
    fake_before = lora_weights(trainer.guidance_model, FAKE_ADAPTER)
    history = trainer.train()
    assert all(np.isfinite(row["loss"]) and np.isfinite(row["loss_fake"]) for row in history)
    for name, value in base_weights(trainer.guidance_model).items():
        assert torch.equal(value, base_before[name]), f"frozen base weight {name} changed"
    student_after = lora_weights(trainer.student_model, STUDENT_ADAPTER)
    fake_after = lora_weights(trainer.guidance_model, FAKE_ADAPTER)
    assert any(not torch.equal(student_after[n], student_before[n]) for n in student_before)
    assert any(not torch.equal(fake_after[n], fake_before[n]) for n in fake_before)
    return history


def test_flux2_lora_training_moves_student_and_fake_score_not_the_base(tiny_teacher_dirs, prompt_file, tmp_path):
    """Two generator steps (DMD, then DMD + a reward through the differentiable decode) in LoRA mode (FLUX.1's LoRA
    run is the uninterrupted run of the resume test below)."""
    trainer = make_trainer(
        tiny_teacher_dirs["flux2"], prompt_file, tmp_path, family="flux2", rewards=[reward(TwoLevelReward())]
    )
    history = train_and_check_lora_moves(trainer)
    assert [row["step"] for row in history] == [1, 2]
    assert "loss_rl" in history[1] and "reward/brightness" in history[1]


def test_flux_full_mode_trains_a_copy_and_keeps_the_teacher(tiny_teacher_dirs, prompt_file, tmp_path):
    trainer = make_trainer(tiny_teacher_dirs["flux"], prompt_file, tmp_path, family="flux", training_mode="full")
    assert trainer.student_model is not trainer.guidance_model
    base_before = base_weights(trainer.guidance_model)
    student_before = {n: p.detach().clone() for n, p in trainer.student_model.named_parameters()}
    trainer.train()
    for name, value in base_weights(trainer.guidance_model).items():
        assert torch.equal(value, base_before[name]), f"frozen base weight {name} changed"
    assert any(not torch.equal(p, student_before[n]) for n, p in trainer.student_model.named_parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_family_auto_detection_and_preflight(family, tiny_teacher_dirs, prompt_file, tmp_path):
    source = tiny_teacher_dirs[family]
    assert detect_family(read_teacher_config(source), source) == family
    plan = check_run_inputs(tiny_config(source, prompt_file, tmp_path, resolution=64))
    assert plan.family.name == family and len(plan.student_timesteps) == 4 and plan.memory_plan is not None
    # 2x2 packing: the resolution must be a multiple of 16 (VAE factor 8 times 2).
    with pytest.raises(
        ValueError, match=r"not divisible by 16 \(the VAE's factor 8 x the backbone's 2x2 latent patches\)"
    ):
        check_run_inputs(tiny_config(source, prompt_file, tmp_path, resolution=72))


def test_preflight_refuses_step_distilled_flux_teachers(tiny_teacher_dirs, prompt_file, tmp_path):
    import json
    import shutil

    schnell = tmp_path / "schnell"
    shutil.copytree(tiny_teacher_dirs["flux"], schnell)
    config_file = schnell / "transformer" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "guidance_embeds": False}))
    with pytest.raises(ValueError, match="FLUX.1 \\[schnell\\].*FLUX.1-dev"):
        check_run_inputs(tiny_config(str(schnell), prompt_file, tmp_path / "out"))

    klein = tmp_path / "klein"
    shutil.copytree(tiny_teacher_dirs["flux2"], klein)
    index_file = klein / "model_index.json"
    index_file.write_text(json.dumps({**json.loads(index_file.read_text()), "is_distilled": True}))
    with pytest.raises(ValueError, match="step-distilled FLUX.2 \\[klein\\].*klein-base"):
        check_run_inputs(tiny_config(str(klein), prompt_file, tmp_path / "out"))


RECIPE_DIR = Path(__file__).resolve().parents[1] / "examples" / "train_dmdr" / "configs"
FLUX_RECIPES = {"flux1_dev_4step": "flux", "flux2_klein_4step": "flux2"}
# Where a recipe departs from the released SD3.5-Large recipe on purpose; its header must say so and why.
EXTRAPOLATED = {"flux1_dev_4step": {"shift", "real_guidance_scale"}, "flux2_klein_4step": {"shift"}}


@pytest.mark.parametrize("name", sorted(FLUX_RECIPES))
def test_flux_recipes_are_the_released_sd35_large_recipe_but_for_what_they_state(name):
    import yaml
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffusers_dmdr import DMDRConfig
    from diffusers_dmdr.testing_flux import FLUX_SCHEDULER_CONFIG

    recipe = RECIPE_DIR / f"{name}.yaml"
    config = DMDRConfig.parse_args(["--config", str(recipe), "--train_prompts", "prompts.txt"])
    assert config.family == FLUX_RECIPES[name]
    released = yaml.safe_load((Path(__file__).parent / "data" / "released_recipes.yaml").read_text())
    released = dict(released["sd35_large_4step"])
    stage2, rewards = released.pop("stage2"), released.pop("rewards")
    released.pop("gpus")
    differing = {key for key, value in released.items() if getattr(config, key) != value}
    assert differing == EXTRAPOLATED[name]
    header = "\n".join(line for line in recipe.read_text().splitlines() if line.startswith("#"))
    assert all(f"{key}:" in header for key in differing) and "EXTRAPOLATED" in header and "GPU:" in header
    assert (config.stage2_learning_rate, config.stage2_learning_rate_fake, config.stage2_train_batch_size) == (
        stage2["learning_rate"],
        stage2["learning_rate_fake"],
        stage2["train_batch_size"],
    )
    assert {parse_reward_spec(spec).name: parse_reward_spec(spec).weight for spec in config.reward} == {
        reward_name: options["weight"] for reward_name, options in rewards.items()
    }
    # The grid the header quotes is the family's grid for the teacher's scheduler config at the recipe's resolution.
    scheduler_config = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG).config
    grid = get_family(config.family).student_grid(4, config.shift, scheduler_config, config.resolution, 8)[0]
    assert ", ".join(f"{timestep:.2f}" for timestep in grid[1:]) in header.replace("\n#     ", " ")


@pytest.mark.parametrize("family", FAMILIES)
def test_build_tiny_writes_a_teacher_that_diffusion_pipeline_loads(family, tmp_path, capsys):
    from diffusers import DiffusionPipeline

    from diffusers_dmdr.testing import main

    main(["build-tiny", "--family", family, "--output", str(tmp_path / family)])
    assert f"wrote a tiny {family} pipeline" in capsys.readouterr().out
    pipeline = DiffusionPipeline.from_pretrained(tmp_path / family)
    assert type(pipeline).__name__ == get_family(family).pipeline_class_name
    assert pipeline.scheduler.config.use_dynamic_shifting
    if family == "flux2":
        # The chat template `encode_prompt` applies survives the save.
        text = pipeline.tokenizer.apply_chat_template(
            [{"role": "user", "content": "a cat"}], tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        assert text == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    images = pipeline(
        prompt=["a cat"],
        height=32,
        width=32,
        num_inference_steps=2,
        max_sequence_length=get_family(family).max_sequence_length(pipeline),
        output_type="pt",
    ).images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_flux_resume_with_reward_tilt_and_checkpointing_continues_exactly(tiny_teacher_dirs, prompt_file, tmp_path):
    """RT-DM in stage 1, a reward in stage 2, gradient checkpointing and TTUR: a run resumed at its checkpoint
    continues bit for bit (same losses, same adapters) as the uninterrupted run."""
    common = dict(
        family="flux",
        rewards=[reward(TwoLevelReward())],
        reward_tilt=True,
        gradient_checkpointing=True,
        cold_start_steps=1,
        dynamic_steps=2,
        checkpointing_steps=1,
    )
    source = tiny_teacher_dirs["flux"]
    uninterrupted = make_trainer(source, prompt_file, tmp_path / "a", max_train_steps=2, **common)
    history_a = train_and_check_lora_moves(uninterrupted)
    assert "loss_rl" not in history_a[0] and "reward/brightness" in history_a[1]
    make_trainer(source, prompt_file, tmp_path / "b", max_train_steps=1, **common).train()
    resumed = make_trainer(
        source, prompt_file, tmp_path / "b", max_train_steps=2, resume_from_checkpoint="latest", **common
    )
    history_b = resumed.train()
    assert [row["step"] for row in history_b] == [2] and "loss_rl" in history_b[0]
    assert history_a[1]["loss"] == history_b[0]["loss"] and history_a[1]["loss_fake"] == history_b[0]["loss_fake"]
    for adapter in (STUDENT_ADAPTER, FAKE_ADAPTER):
        weights_a, weights_b = (
            lora_weights(uninterrupted.guidance_model, adapter),
            lora_weights(resumed.guidance_model, adapter),
        )
        assert all(torch.equal(weights_a[name], weights_b[name]) for name in weights_a)
