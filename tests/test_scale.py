"""Scale features on tiny teachers: gradient accumulation, the prompt-embedding cache, loading in the training dtype,
an export that reuses the trainer's components, gradient checkpointing through the adapter routing."""

import pytest
import torch
from conftest import tiny_config
from test_trainer import PROMPTS, lora_weights, make_trainer, randomise_lora_b

from diffusers_dmdr.adapters import FAKE_ADAPTER, STUDENT_ADAPTER
from diffusers_dmdr.families import get_family
from diffusers_dmdr.sharding import student_weights_from_module_state
from diffusers_dmdr.trainer import DMDRTrainer
from diffusers_dmdr.training_module import GUIDANCE_ROLE, STUDENT_ROLE


# Large Adam epsilon: updates become proportional to the gradients, so two runs whose gradients agree to float
# rounding also agree in their weights (with eps 1e-8 Adam divides by sqrt(v) and magnifies rounding of tiny grads).
COMPARABLE_ADAM = dict(adam_epsilon=1.0, learning_rate=0.5, learning_rate_fake=0.5)


def test_accumulating_two_micro_batches_equals_one_batch_of_two(tiny_teacher_dirs, prompt_file, tmp_path):
    common = dict(max_train_steps=2, cold_start_steps=2, update_ratio=2, **COMPARABLE_ADAM)
    one_batch = make_trainer(tiny_teacher_dirs["sdxl"], prompt_file, tmp_path / "a", train_batch_size=2, **common)
    accumulated = make_trainer(
        tiny_teacher_dirs["sdxl"],
        prompt_file,
        tmp_path / "b",
        train_batch_size=1,
        gradient_accumulation_steps=2,
        **common,
    )
    history_a, history_b = one_batch.train(), accumulated.train()
    assert [row["step"] for row in history_b] == [1, 2] and accumulated.state.iteration == 4
    for row_a, row_b in zip(history_a, history_b, strict=True):
        for key in ("loss_dmd", "loss_fake", "real_guidance_scale"):
            assert row_b[key] == pytest.approx(row_a[key], rel=1e-4), key
    for adapter in (STUDENT_ADAPTER, FAKE_ADAPTER):
        weights_a = lora_weights(one_batch.student_model, adapter)
        weights_b = lora_weights(accumulated.student_model, adapter)
        moved = [name for name in weights_a if weights_a[name].abs().max() > 0]
        assert moved, adapter
        for name in weights_a:
            torch.testing.assert_close(weights_b[name], weights_a[name], rtol=1e-4, atol=1e-6)


def test_accumulation_is_not_a_silent_no_op(tiny_teacher_dirs, prompt_file, tmp_path):
    """Negative control for the equality above: one micro-batch of 1 is a different run."""
    common = dict(max_train_steps=1, cold_start_steps=1, update_ratio=1, **COMPARABLE_ADAM)
    one_batch = make_trainer(tiny_teacher_dirs["sdxl"], prompt_file, tmp_path / "a", train_batch_size=2, **common)
    half = make_trainer(tiny_teacher_dirs["sdxl"], prompt_file, tmp_path / "b", train_batch_size=1, **common)
    history_a, history_b = one_batch.train(), half.train()
    assert history_b[0]["loss_fake"] != pytest.approx(history_a[0]["loss_fake"], rel=1e-4)


def test_prompt_cache_equals_live_encoding_and_is_reused(tiny_teacher_dirs, prompt_file, tmp_path):
    cache_dir = tmp_path / "cache"
    common = dict(max_train_steps=2, cold_start_steps=2, validation_prompts=["a green house"])
    live = make_trainer(tiny_teacher_dirs["sd3"], prompt_file, tmp_path / "live", family="sd3", **common)
    cached = make_trainer(
        tiny_teacher_dirs["sd3"],
        prompt_file,
        tmp_path / "cached",
        family="sd3",
        cache_prompt_embeds=True,
        prompt_embeds_cache_dir=str(cache_dir),
        **common,
    )
    assert len(list(cache_dir.glob("*.safetensors"))) == 1
    for row_live, row_cached in zip(live.train(), cached.train(), strict=True):
        for key in ("loss_dmd", "loss_fake"):
            assert row_cached[key] == pytest.approx(row_live[key], rel=1e-5), key

    # The next run with the same teacher and prompts reads the file: the text encoders never run.
    config = tiny_config(
        tiny_teacher_dirs["sd3"],
        prompt_file,
        tmp_path / "again",
        cache_prompt_embeds=True,
        prompt_embeds_cache_dir=str(cache_dir),
        **common,
    )
    teacher = get_family("sd3").load_teacher(config.pretrained_model_name_or_path)
    calls = []
    for encoder in teacher.family.text_encoders(teacher.pipeline):
        encoder.register_forward_hook(lambda module, args, output: calls.append(type(module).__name__))
    again = DMDRTrainer(config, teacher, PROMPTS)
    again.train()
    assert calls == [] and again.prompt_encoder.live_encodes == 0
    assert len(list(cache_dir.glob("*.safetensors"))) == 1

    # Another prompt set is another key: a new file, encoded afresh.
    make_trainer(
        tiny_teacher_dirs["sd3"],
        prompt_file,
        tmp_path / "changed",
        family="sd3",
        cache_prompt_embeds=True,
        prompt_embeds_cache_dir=str(cache_dir),
        **{**common, "validation_prompts": ["a purple tree"]},
    )
    assert len(list(cache_dir.glob("*.safetensors"))) == 2


def test_teacher_loads_directly_in_the_training_dtype(tiny_teacher_dirs):
    teacher = get_family("sdxl").load_teacher(tiny_teacher_dirs["sdxl"], dtype=torch.bfloat16)
    for name, component in teacher.pipeline.components.items():
        if isinstance(component, torch.nn.Module):
            assert {p.dtype for p in component.parameters()} == {torch.bfloat16}, name


def test_full_student_is_read_in_float32_beside_a_bf16_base(tiny_teacher_dirs, prompt_file, tmp_path):
    # (The process's accelerate state is fp32; the teacher is loaded in bf16 as a bf16 run would load it.)
    config = tiny_config(tiny_teacher_dirs["sd3"], prompt_file, tmp_path, training_mode="full")
    teacher = get_family("sd3").load_teacher(config.pretrained_model_name_or_path, dtype=torch.bfloat16)
    trainer = DMDRTrainer(config, teacher, PROMPTS)
    reference = get_family("sd3").load_backbone(tiny_teacher_dirs["sd3"], dtype=torch.float32)
    student = dict(trainer.student_model.named_parameters())
    for name, parameter in reference.named_parameters():
        # Exactly the checkpoint's float32 values, not a bf16 round trip.
        assert student[name].dtype == torch.float32 and torch.equal(student[name], parameter), name


def test_export_reuses_the_trainer_components(tiny_teacher_dirs, prompt_file, tmp_path, monkeypatch):
    import diffusers

    from diffusers_dmdr.export import export_from_trainer

    loads = []
    original = diffusers.StableDiffusionXLPipeline.from_pretrained.__func__

    def counting_from_pretrained(cls, *args, **kwargs):
        loads.append(args[0] if args else kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(diffusers.StableDiffusionXLPipeline, "from_pretrained", classmethod(counting_from_pretrained))
    trainer = make_trainer(tiny_teacher_dirs["sdxl"], prompt_file, tmp_path, max_train_steps=1, cold_start_steps=1)
    trainer.train()
    export_dir = export_from_trainer(trainer)
    assert len(loads) == 1, loads
    assert (export_dir / "model_index.json").is_file() and (export_dir / "pytorch_lora_weights.safetensors").is_file()
    # The trainer's own modules are untouched by the fusing of the exported copy.
    assert {STUDENT_ADAPTER, FAKE_ADAPTER} <= set(trainer.guidance_model.peft_config)


def test_module_state_gives_the_same_student_weights_as_peft(tiny_teacher_dirs, prompt_file, tmp_path):
    """What an FSDP/DeepSpeed export gathers equals what an unsharded export reads."""
    trainer = make_trainer(tiny_teacher_dirs["sdxl"], prompt_file, tmp_path)
    randomise_lora_b(trainer.student_model, STUDENT_ADAPTER)
    expected = trainer.student_state_dict()
    gathered = student_weights_from_module_state(trainer.training_module.state_dict(), full=False)
    assert set(gathered) == set(expected) and all(torch.equal(gathered[k], expected[k]) for k in expected)

    full = make_trainer(tiny_teacher_dirs["sd3"], prompt_file, tmp_path / "full", family="sd3", training_mode="full")
    expected = full.student_state_dict()
    gathered = student_weights_from_module_state(full.training_module.state_dict(), full=True)
    assert set(gathered) == set(expected) and all(torch.equal(gathered[k], expected[k]) for k in expected)


@pytest.mark.parametrize("role", [STUDENT_ROLE, GUIDANCE_ROLE])
def test_gradient_checkpointing_keeps_the_gradients_of_each_role(role, tiny_teacher_dirs, prompt_file, tmp_path):
    """Checkpointing recomputes the forward in backward: the adapters must still be routed to the role there."""
    gradients = []
    for checkpointing in (False, True):
        trainer = make_trainer(
            tiny_teacher_dirs["sdxl"], prompt_file, tmp_path / str(checkpointing), gradient_checkpointing=checkpointing
        )
        torch.manual_seed(1)
        randomise_lora_b(trainer.student_model, STUDENT_ADAPTER)
        randomise_lora_b(trainer.student_model, FAKE_ADAPTER)
        condition = trainer.encode(PROMPTS[:2])
        generator = torch.Generator().manual_seed(0)
        sample = torch.randn(2, *trainer.latent_shape, generator=generator)
        level = torch.tensor([0.7, 0.4])
        denoiser = trainer.student_denoiser if role == STUDENT_ROLE else trainer.guidance_denoiser(2.0)
        trainer.model.train()
        output = denoiser.predict(sample, level, condition)
        # Another role's pass between forward and backward, as the DMD step does with the real and fake scores.
        with torch.no_grad():
            trainer.guidance_denoiser(0.5).predict(sample, level, condition)
        assert trainer._backward(output.square().mean(), role, 2.0 if role == GUIDANCE_ROLE else 1.0, last=True)
        gradients.append({i: p.grad.clone() for i, p in enumerate(trainer.unwrapped.parameters_of(role))})
        other = GUIDANCE_ROLE if role == STUDENT_ROLE else STUDENT_ROLE
        assert all(p.grad is None for p in trainer.unwrapped.parameters_of(other))
    plain, checkpointed = gradients
    assert any(g.abs().max() > 0 for g in plain.values())
    for index, gradient in plain.items():
        torch.testing.assert_close(checkpointed[index], gradient, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    "recipe", ["sd3_medium_4step", "sd35_large_4step", "sd3_medium_4step_srpo", "sd35_large_4step_srpo"]
)
def test_sd3_recipes_cache_prompts_and_offload_the_encoders(recipe):
    from pathlib import Path

    from diffusers_dmdr.config import load_yaml_config

    values = load_yaml_config(Path(__file__).parents[1] / "examples" / "train_dmdr" / "configs" / f"{recipe}.yaml")
    assert values["cache_prompt_embeds"] is True and values["offload_text_encoders"] is True
