"""DMDRTrainer in-process on tiny teachers: shared base, adapters, stages, exact resume, non-finite guards."""

import pytest
import torch
from conftest import tiny_config

from diffusers_dmdr.adapters import FAKE_ADAPTER, STUDENT_ADAPTER
from diffusers_dmdr.checkpointing import list_checkpoints
from diffusers_dmdr.families import get_family
from diffusers_dmdr.rewards import LoadedReward
from diffusers_dmdr.trainer import DMDRTrainer, NonFiniteLossError


PROMPTS = ["a red cat", "a blue dog", "the number seven"]


def make_trainer(teacher_dir, prompt_file, output_dir, family="sdxl", rewards=None, reward_vae=None, **overrides):
    config = tiny_config(teacher_dir, prompt_file, output_dir, **overrides)
    teacher = get_family(family).load_teacher(config.pretrained_model_name_or_path)
    return DMDRTrainer(config, teacher, PROMPTS, rewards=rewards, reward_vae=reward_vae)


def randomise_lora_b(model, adapter_name):
    """LoRA B starts at zero: randomise it so that "the adapter changes the output" cannot pass trivially."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name and f".{adapter_name}." in name:
                parameter.normal_(std=0.5)


def lora_weights(model, adapter_name):
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{adapter_name}." in n}


def base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


class TwoLevelReward(torch.nn.Module):
    """Mean brightness: differentiable, no weights to load."""

    def forward(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


def reward(fn, name="brightness", weight=1.0):
    return LoadedReward(name=name, fn=fn, weight=weight, hinge=None)


@pytest.mark.parametrize("family", ["sdxl", "sd15", "sd3", "flux", "flux2", "zimage", "qwenimage"])
def test_real_score_at_scale_zero_is_the_teacher_bit_for_bit(family, tiny_teacher_dirs, prompt_file, tmp_path):
    trainer = make_trainer(tiny_teacher_dirs[family], prompt_file, tmp_path, family=family)
    randomise_lora_b(trainer.guidance_model, FAKE_ADAPTER)
    randomise_lora_b(trainer.student_model, STUDENT_ADAPTER)
    teacher = get_family(family).load_teacher(tiny_teacher_dirs[family]).backbone.eval()
    condition = trainer.encode(PROMPTS[:2])
    sample, level = torch.randn(2, *trainer.latent_shape), torch.tensor([0.9, 0.3])
    timestep = trainer.scheduler.model_timestep(level)
    with torch.no_grad():
        teacher_output = trainer.family.call_backbone(teacher, sample, timestep, condition)
        fake_output = trainer.guidance_denoiser(2.0).predict(sample, level, condition)
        real_output = trainer.guidance_denoiser(0.0).predict(sample, level, condition)
        scaled_output = trainer.guidance_denoiser(0.3).predict(sample, level, condition)
        student_output = trainer.student_denoiser.predict(sample, level, condition)
        unit_output = trainer.guidance_denoiser(1.0).predict(sample, level, condition)
        fake_again = trainer.guidance_denoiser(2.0).predict(sample, level, condition)
        real_again = trainer.guidance_denoiser(0.0).predict(sample, level, condition)
    # Bit for bit the teacher, also after the adapters were routed to the fake score and the student in between.
    assert torch.equal(real_output, teacher_output) and torch.equal(real_again, teacher_output)
    assert not torch.allclose(fake_output, teacher_output, atol=1e-4)
    assert not torch.allclose(scaled_output, fake_output, atol=1e-4)
    assert not torch.allclose(unit_output, scaled_output, atol=1e-4)
    assert not torch.allclose(student_output, teacher_output, atol=1e-4)
    # Routing scales each adapter from its own alpha / r, never from the previous multiplier.
    torch.testing.assert_close(fake_again, fake_output, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["sdxl", "zimage", "qwenimage"])
def test_one_frozen_base_is_shared_and_never_trained(family, tiny_teacher_dirs, prompt_file, tmp_path):
    trainer = make_trainer(
        tiny_teacher_dirs[family],
        prompt_file,
        tmp_path,
        family=family,
        rewards=[reward(TwoLevelReward())],
        max_train_steps=2,
    )
    # LoRA mode: one backbone object is the student, the fake score and the teacher; its base is frozen.
    assert trainer.student_model is trainer.guidance_model
    for name, parameter in trainer.guidance_model.named_parameters():
        assert parameter.requires_grad == ("lora_" in name), name
    assert all(p.dtype == torch.float32 for p in trainer.student_model.parameters() if p.requires_grad)
    base_before = base_weights(trainer.guidance_model)
    student_before = lora_weights(trainer.student_model, STUDENT_ADAPTER)
    fake_before = lora_weights(trainer.guidance_model, FAKE_ADAPTER)
    history = trainer.train()

    assert [row["step"] for row in history] == [1, 2]
    for name, value in base_weights(trainer.guidance_model).items():
        assert torch.equal(value, base_before[name]), f"frozen base weight {name} changed"
    student_after = lora_weights(trainer.student_model, STUDENT_ADAPTER)
    fake_after = lora_weights(trainer.guidance_model, FAKE_ADAPTER)
    assert any(not torch.equal(student_after[n], student_before[n]) for n in student_before)
    assert any(not torch.equal(fake_after[n], fake_before[n]) for n in fake_before)
    # Stage 1 is DMD only; the reward joins at the cold-start step.
    assert "loss_rl" not in history[0] and history[0]["stage"] == 1.0
    assert "loss_rl" in history[1] and "reward/brightness" in history[1] and history[1]["stage"] == 2.0
    assert (tmp_path / "checkpoint-2" / "student_lora.safetensors").is_file()
    assert (tmp_path / "train_summary.json").is_file()


def test_frozen_base_in_weight_dtype_and_adapters_in_float32():
    from diffusers_dmdr.adapters import build_training_backbones
    from diffusers_dmdr.testing import tiny_sdxl_unet

    lora = {"rank": 4, "alpha": 4, "target_modules": ["to_q", "to_v"]}
    backbone, student_backbone = build_training_backbones(tiny_sdxl_unet(), "lora", torch.bfloat16, lora, lora)
    assert student_backbone is None
    dtypes = {(p.requires_grad, p.dtype) for p in backbone.parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}
    adapters = {name.split(".lora_")[1].split(".")[1] for name, _ in backbone.named_parameters() if "lora_" in name}
    assert adapters == {STUDENT_ADAPTER, FAKE_ADAPTER}


def test_sd15_v_prediction_teacher_trains(tmp_path, prompt_file):
    from diffusers_dmdr.testing import build_tiny_pipeline

    teacher_dir = build_tiny_pipeline("sd15", tmp_path / "sd15-v", prediction_type="v_prediction")
    trainer = make_trainer(str(teacher_dir), prompt_file, tmp_path / "run", family="sd15", max_train_steps=1)
    assert trainer.scheduler.config.prediction_type == "v_prediction"
    assert trainer.scheduler.config.training_timesteps == [999.0, 749.0, 499.0, 249.0]
    student_before = lora_weights(trainer.student_model, STUDENT_ADAPTER)
    history = trainer.train()
    assert history[0]["step_skipped"] == 0.0
    assert any(
        not torch.equal(v, student_before[n]) for n, v in lora_weights(trainer.student_model, STUDENT_ADAPTER).items()
    )


def test_tiny_autoencoder_decodes_for_the_rewards(tiny_teacher_dirs, prompt_file, tmp_path):
    from diffusers_dmdr.testing import tiny_autoencoder_tiny

    seen_sizes = []

    class SizeRecordingReward(TwoLevelReward):
        def forward(self, images, prompts):
            seen_sizes.append(tuple(images.shape[-2:]))
            return super().forward(images, prompts)

    reward_vae = tiny_autoencoder_tiny()
    trainer = make_trainer(
        tiny_teacher_dirs["sdxl"],
        prompt_file,
        tmp_path,
        rewards=[reward(SizeRecordingReward())],
        reward_vae=reward_vae,
        cold_start_steps=0,
    )
    calls = []
    reward_vae.decoder.register_forward_hook(lambda module, args, output: calls.append(output.shape))
    student_before = lora_weights(trainer.student_model, STUDENT_ADAPTER)
    trainer.train()
    assert len(calls) == 2 and seen_sizes == [(64, 64), (64, 64)]
    assert any(
        not torch.equal(v, student_before[n]) for n, v in lora_weights(trainer.student_model, STUDENT_ADAPTER).items()
    )


@pytest.mark.parametrize("family", ["sd3", "zimage"])
def test_full_mode_trains_its_own_copy(family, tiny_teacher_dirs, prompt_file, tmp_path):
    trainer = make_trainer(
        tiny_teacher_dirs[family],
        prompt_file,
        tmp_path,
        family=family,
        training_mode="full",
        max_train_steps=1,
        cold_start_steps=1,
    )
    assert trainer.student_model is not trainer.guidance_model
    teacher_before = base_weights(trainer.guidance_model)
    student_before = {n: p.detach().clone() for n, p in trainer.student_model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(p, student_before[n]) for n, p in trainer.student_model.named_parameters())
    for name, value in base_weights(trainer.guidance_model).items():
        assert torch.equal(value, teacher_before[name])
    assert (tmp_path / "checkpoint-1" / "student.safetensors").is_file()


def test_nonfinite_losses_skip_steps_then_abort_without_checkpoint(tiny_teacher_dirs, prompt_file, tmp_path):
    def nan_reward(images, prompts):
        return images.mean(dim=(1, 2, 3)) * float("nan")

    trainer = make_trainer(
        tiny_teacher_dirs["sdxl"],
        prompt_file,
        tmp_path,
        rewards=[reward(nan_reward, name="nan")],
        cold_start_steps=0,
        max_train_steps=5,
        checkpointing_steps=1,
        max_consecutive_nonfinite_steps=2,
    )
    student_before = lora_weights(trainer.student_model, STUDENT_ADAPTER)
    with pytest.raises(NonFiniteLossError, match="non-finite generator losses in a row"):
        trainer.train()
    assert trainer.state.nonfinite_total == 2 and trainer.state.global_step == 1
    # The first skipped step was counted as a generator step; the checkpoint due after it waits for a healthy step,
    # the second step aborts instead, so no checkpoint was written (and no final one).
    assert list_checkpoints(tmp_path) == [] and trainer.last_checkpoint is None
    for name, value in lora_weights(trainer.student_model, STUDENT_ADAPTER).items():
        assert torch.equal(value, student_before[name])
        assert torch.isfinite(value).all()


def test_reward_only_with_anchor_skips_dmd_and_the_fake_score(tiny_teacher_dirs, prompt_file, tmp_path):
    trainer = make_trainer(
        tiny_teacher_dirs["sdxl"],
        prompt_file,
        tmp_path,
        rewards=[reward(TwoLevelReward())],
        cold_start_steps=0,
        dmd_loss_weight=0.0,
        anchor_loss_weight=1.0,
    )
    randomise_lora_b(trainer.student_model, STUDENT_ADAPTER)
    fake_before = lora_weights(trainer.guidance_model, FAKE_ADAPTER)
    history = trainer.train()
    assert all("loss_dmd" not in row and "loss_rl" in row for row in history)
    # The anchor is the student as the run started: zero at the first step, positive once the student moved.
    assert history[0]["loss_anchor"] == 0.0 and history[1]["loss_anchor"] > 0.0
    for name, value in lora_weights(trainer.guidance_model, FAKE_ADAPTER).items():
        assert torch.equal(value, fake_before[name])


def test_reward_tilt_weights_stage_one_dmd_per_sample(tiny_teacher_dirs, prompt_file, tmp_path, monkeypatch):
    import diffusers_dmdr.method.objective as objective_module

    seen, original = [], objective_module.reward_tilt_weights

    def recording_weights(rewards, temperature):
        seen.append((rewards.clone(), temperature))
        return original(rewards, temperature)

    monkeypatch.setattr(objective_module, "reward_tilt_weights", recording_weights)
    trainer = make_trainer(
        tiny_teacher_dirs["sdxl"],
        prompt_file,
        tmp_path,
        rewards=[reward(TwoLevelReward())],
        reward_tilt=True,
        reward_tilt_temperature=0.5,
        max_train_steps=2,
        cold_start_steps=1,
    )
    trainer.train()
    # Only the stage-1 step is tilted, with one brightness score per sample of the batch.
    assert len(seen) == 1
    scores, temperature = seen[0]
    assert scores.shape == (2,) and temperature == 0.5
    assert ((scores >= 0) & (scores <= 1)).all()


def test_resume_continues_exactly_across_the_stage_two_switch(tiny_teacher_dirs, prompt_file, tmp_path):
    """Stage-2 learning rates and batch size apply at the cold-start step in one run, and a run resumed there
    continues bit for bit (same losses, same weights)."""
    stage2 = dict(stage2_learning_rate=2e-4, stage2_learning_rate_fake=5e-5, stage2_train_batch_size=1)
    common = dict(dynamic_steps=2, cold_start_steps=2, max_train_steps=4, checkpointing_steps=2, **stage2)
    uninterrupted = make_trainer(tiny_teacher_dirs["sdxl"], prompt_file, tmp_path / "a", **common)
    batch_sizes = []
    sampler_batch = uninterrupted.prompt_sampler.batch
    uninterrupted.prompt_sampler.batch = lambda iteration: (
        batch_sizes.append(len(sampler_batch(iteration))) or (sampler_batch(iteration))
    )
    history_a = uninterrupted.train()
    # update_ratio 2: iterations 0-3 are stage 1 (batch 2), 4-7 stage 2 (batch 1); lr logged after each step.
    assert batch_sizes == [2, 2, 2, 2, 1, 1, 1, 1]
    assert [row["lr"] for row in history_a] == [1e-3, 1e-3, 2e-4, 2e-4]
    assert [row["lr_fake"] for row in history_a] == [1e-3, 1e-3, 5e-5, 5e-5]

    first_half = make_trainer(
        tiny_teacher_dirs["sdxl"], prompt_file, tmp_path / "b", **{**common, "max_train_steps": 2}
    )
    first_half.train()
    second_half = make_trainer(
        tiny_teacher_dirs["sdxl"], prompt_file, tmp_path / "b", **common, resume_from_checkpoint="latest"
    )
    history_b = second_half.train()
    assert [row["lr"] for row in history_b] == [2e-4, 2e-4]
    assert [row["lr_fake"] for row in history_b] == [5e-5, 5e-5]
    for row_a, row_b in zip(history_a[2:], history_b, strict=True):
        assert row_a["loss_dmd"] == row_b["loss_dmd"] and row_a["loss_fake"] == row_b["loss_fake"]
    for adapter, model_a, model_b in (
        (STUDENT_ADAPTER, uninterrupted.student_model, second_half.student_model),
        (FAKE_ADAPTER, uninterrupted.guidance_model, second_half.guidance_model),
    ):
        weights_a, weights_b = lora_weights(model_a, adapter), lora_weights(model_b, adapter)
        for name in weights_a:
            assert torch.equal(weights_a[name], weights_b[name]), name


@pytest.mark.parametrize(("init", "expected_std"), [("gaussian", 1 / 16), ("kaiming", None)])
def test_lora_a_initialisation_matches_the_released_std(init, expected_std):
    """Released DMDR: PEFT `init_lora_weights="gaussian"`, i.e. A ~ N(0, 1/r^2); PEFT's Kaiming default is smaller."""
    from diffusers_dmdr.adapters import add_lora_adapter

    wrapper = _AdapterHost(torch.nn.Linear(256, 256))
    add_lora_adapter(wrapper, "fake", rank=16, alpha=16, target_modules=["layer"], init=init)
    lora_a = wrapper.layer.lora_A["fake"].weight
    lora_b = wrapper.layer.lora_B["fake"].weight
    assert torch.count_nonzero(lora_b) == 0
    if expected_std is not None:
        assert lora_a.std().item() == pytest.approx(expected_std, rel=0.02)
    else:
        # Kaiming-uniform with a = sqrt(5): bound 1/sqrt(fan_in), std 1/sqrt(3 fan_in) = 0.036 < 1/16.
        assert lora_a.std().item() == pytest.approx(1 / (3 * 256) ** 0.5, rel=0.02)


class _AdapterHost(torch.nn.Module):
    """The smallest module with diffusers' `add_adapter` (PEFT) API around one linear layer."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def add_adapter(self, config, adapter_name):
        from peft import inject_adapter_in_model

        inject_adapter_in_model(config, self, adapter_name=adapter_name)


def test_student_init_path_initialises_only_the_student(tiny_teacher_dirs, prompt_file, tmp_path):
    """SDXL 1-step recipe: the student starts from other weights (DMD2's ODE UNet), the teacher stays the teacher."""
    from safetensors.torch import save_file

    teacher_unet = get_family("sdxl").load_teacher(tiny_teacher_dirs["sdxl"]).backbone
    init_state = {name: value + 0.05 * torch.randn_like(value) for name, value in teacher_unet.state_dict().items()}
    init_file = tmp_path / "ode_unet.safetensors"
    save_file({name: value.contiguous() for name, value in init_state.items()}, init_file)

    trainer = make_trainer(
        tiny_teacher_dirs["sdxl"], prompt_file, tmp_path, training_mode="full", student_init_path=str(init_file)
    )
    student_state = trainer.student_model.state_dict()
    assert all(torch.equal(student_state[name], init_state[name]) for name in init_state)
    teacher = get_family("sdxl").load_teacher(tiny_teacher_dirs["sdxl"]).backbone.eval()
    randomise_lora_b(trainer.guidance_model, FAKE_ADAPTER)
    condition = trainer.encode(PROMPTS[:2])
    sample, level = torch.randn(2, *trainer.latent_shape), torch.tensor([0.9, 0.3])
    with torch.no_grad():
        teacher_output = trainer.family.call_backbone(
            teacher, sample, trainer.scheduler.model_timestep(level), condition
        )
        real_output = trainer.guidance_denoiser(0.0).predict(sample, level, condition)
        student_output = trainer.student_denoiser.predict(sample, level, condition)
    assert torch.equal(real_output, teacher_output)
    assert not torch.allclose(student_output, teacher_output, atol=1e-3)


def test_student_init_path_loads_a_lora_into_the_student_adapter(tiny_teacher_dirs, prompt_file, tmp_path):
    from safetensors.torch import save_file

    from diffusers_dmdr.adapters import adapter_state_dict

    source = make_trainer(tiny_teacher_dirs["sd3"], prompt_file, tmp_path / "a", family="sd3")
    randomise_lora_b(source.student_model, STUDENT_ADAPTER)
    # Diffusers-style keys (`transformer.` prefix), as `save_lora_weights` writes them.
    lora = {f"transformer.{k}": v for k, v in adapter_state_dict(source.student_model, STUDENT_ADAPTER).items()}
    save_file(lora, tmp_path / "student_lora.safetensors")
    trainer = make_trainer(
        tiny_teacher_dirs["sd3"],
        prompt_file,
        tmp_path / "b",
        family="sd3",
        student_init_path=str(tmp_path / "student_lora.safetensors"),
    )
    loaded = adapter_state_dict(trainer.student_model, STUDENT_ADAPTER)
    expected = adapter_state_dict(source.student_model, STUDENT_ADAPTER)
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)
    # The fake adapter and the shared base are untouched (its B is still zero).
    assert all(
        torch.count_nonzero(v) == 0
        for k, v in adapter_state_dict(trainer.guidance_model, FAKE_ADAPTER).items()
        if "lora_B" in k
    )
