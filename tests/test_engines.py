"""Which engines a run may use, and why DeepSpeed is refused: one optimizer holds both networks' parameter groups, and
each network's Adam state must advance on its own updates only (the released DMDR runs had one engine per network).

The trainer's backward fills only the updated role's gradients; the other group keeps `None` and AdamW skips it.
DeepSpeed ZeRO keeps gradients in flat buffers and hands the optimizer it wraps zeros for the idle group instead:
at learning rate 0 its weights stay exact, but its moments and step count advance. The tests below run the project's
own optimizer objects (`make_optimizer`, `step_role`) both ways, and the trainer's loop."""

import pytest
import torch
from test_preflight import load_train_script, prompts, weightless_teacher  # noqa: F401  (fixtures)
from test_trainer import make_trainer

from diffusers_dmdr.optimization import make_optimizer, step_role
from diffusers_dmdr.sharding import DEEPSPEED_REFUSED, check_engine_supported
from diffusers_dmdr.training_module import GUIDANCE_ROLE, STUDENT_ROLE


BETAS = (0.9, 0.999)
# The recipes' TTUR ratio: five fake-score updates per student update.
UPDATE_RATIO = 5
LEARNING_RATE = 1e-3
FLOAT64 = dict(dtype=torch.float64)


def first_student_update(idle_gradients: str) -> tuple[torch.Tensor, int]:
    """The student's first update over its learning rate, per element, after `UPDATE_RATIO` fake-score updates, and
    the student's Adam step count. `idle_gradients`: `"none"` (what the trainer's backward leaves the idle group) or
    `"zero"` (what ZeRO's flat gradient buffers hand the optimizer)."""
    # Float64 weights: the update (1e-3) is read off weights of size 1 without float32 rounding.
    generator, float64 = torch.Generator().manual_seed(0), FLOAT64
    student = torch.nn.Parameter(torch.randn(64, generator=generator, **float64))
    fake = torch.nn.Parameter(torch.randn(64, generator=generator, **float64))
    learning_rates = {STUDENT_ROLE: LEARNING_RATE, GUIDANCE_ROLE: LEARNING_RATE}
    # Epsilon far below the gradients: Adam's update is then learning rate x m_hat / sqrt(v_hat), the quantity compared.
    optimizer = make_optimizer(
        {STUDENT_ROLE: [student], GUIDANCE_ROLE: [fake]},
        learning_rates,
        {STUDENT_ROLE: 0.0, GUIDANCE_ROLE: 0.0},
        betas=BETAS,
        eps=1e-12,
    )
    for _ in range(UPDATE_RATIO):
        fake.grad = torch.randn(64, generator=generator, **float64)
        student.grad = torch.zeros(64, **float64) if idle_gradients == "zero" else None
        before = student.detach().clone()
        step_role(optimizer, GUIDANCE_ROLE, learning_rates)
        # Learning rate 0 for the idle group: its weights stay exact either way; only its Adam state differs.
        assert torch.equal(student.detach(), before)
    before = student.detach().clone()
    student.grad = torch.randn(64, generator=generator, **float64)
    step_role(optimizer, STUDENT_ROLE, learning_rates)
    return (student.detach() - before).abs() / LEARNING_RATE, int(optimizer.state[student]["step"])


def test_zero_gradients_of_the_idle_group_damp_the_student_to_half_its_learning_rate():
    own_state, own_steps = first_student_update("none")
    zeroed_state, zeroed_steps = first_student_update("zero")
    # `None` gradients: the student's first Adam step is its own, of exactly its learning rate per element.
    assert own_steps == 1
    torch.testing.assert_close(own_state, torch.ones(64, **FLOAT64), rtol=1e-6, atol=0)
    # Zero gradients: the first real gradient meets a step count of 6 and zero moments, so the bias corrections no
    # longer match the moments: (1 - b1) / (1 - b1^6) / sqrt((1 - b2) / (1 - b2^6)) = 0.522.
    b1, b2, steps = *BETAS, UPDATE_RATIO + 1
    damped = (1 - b1) / (1 - b1**steps) / ((1 - b2) / (1 - b2**steps)) ** 0.5
    assert zeroed_steps == steps and round(damped, 3) == 0.522
    torch.testing.assert_close(zeroed_state, torch.full((64,), damped, **FLOAT64), rtol=1e-6, atol=0)


def test_the_trainer_steps_each_network_on_its_own_adam_state(tiny_teacher_dirs, prompt_file, tmp_path):
    """The project's path (the trainer's backward and `step_role`, TTUR 5): the student's first update is 1.000x its
    learning rate, and each group's step count counts its own updates only."""
    trainer = make_trainer(
        tiny_teacher_dirs["sdxl"],
        prompt_file,
        tmp_path,
        max_train_steps=1,
        cold_start_steps=1,
        update_ratio=UPDATE_RATIO,
        learning_rate=LEARNING_RATE,
        adam_weight_decay=0.0,
        adam_epsilon=1e-12,
        adam_beta1=BETAS[0],
        adam_beta2=BETAS[1],
    )
    student = trainer.unwrapped.parameters_of(STUDENT_ROLE)
    before = [p.detach().clone() for p in student]
    trainer.train()
    steps = {
        role: {int(trainer.optimizer.state[p]["step"]) for p in trainer.unwrapped.parameters_of(role)}
        for role in (STUDENT_ROLE, GUIDANCE_ROLE)
    }
    assert steps == {STUDENT_ROLE: {1}, GUIDANCE_ROLE: {UPDATE_RATIO}}
    # Each element moved by lr x g / (|g| + eps): exactly lr where the gradient is well above eps (1e-12), which
    # Adam's first moment gives back (m = (1 - b1) g after one step). LoRA B starts at zero, so A mostly has none.
    moved, gradients = [], []
    for parameter, weight_before in zip(student, before, strict=True):
        moved.append((parameter.detach() - weight_before).abs().flatten())
        gradients.append(trainer.optimizer.state[parameter]["exp_avg"].abs().flatten() / (1 - BETAS[0]))
    moved, gradients = torch.cat(moved), torch.cat(gradients)
    clear = gradients > 1e-8
    assert clear.sum() > 1000
    torch.testing.assert_close(moved[clear] / LEARNING_RATE, torch.ones(int(clear.sum())), rtol=1e-4, atol=0)
    # No element moved by more than its learning rate (the damped path gives 0.522x, never more).
    assert moved.max() <= LEARNING_RATE * (1 + 1e-4)


def test_deepspeed_is_refused_in_one_line_before_any_weight_loads(weightless_teacher, prompts, capsys, monkeypatch):  # noqa: F811
    """`accelerate launch --config_file <a DeepSpeed config>` sets ACCELERATE_USE_DEEPSPEED before the script runs;
    the script stops at its input checks (the teacher here has no weights to load) and names FSDP2 instead."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    argv = ["--pretrained_model_name_or_path", str(weightless_teacher), "--train_prompts", str(prompts)]
    with pytest.raises(SystemExit) as exit_info:
        load_train_script().main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and "Traceback" not in error, error
    assert "DeepSpeed is not supported" in error and "fsdp2.yaml" in error
    # A library user who hands the trainer a DeepSpeed accelerator gets the same message.
    from accelerate.utils import DistributedType

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    with pytest.raises(ValueError, match="DeepSpeed is not supported"):
        check_engine_supported(DistributedType.DEEPSPEED)
    for supported in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU, DistributedType.FSDP):
        check_engine_supported(supported)
    assert "multi_gpu_ddp.yaml" in DEEPSPEED_REFUSED
