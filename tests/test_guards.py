"""The divergence guard: its rules on numbers, and an exploding run that stops without a diverged checkpoint."""

import math

import pytest
import torch
from conftest import tiny_config

from diffusers_dmdr.checkpointing import list_checkpoints, resolve_checkpoint
from diffusers_dmdr.guards import DivergenceError, DivergenceGuard, trainable_weight_norm


def test_weight_rule_against_the_start_norm():
    guard = DivergenceGuard(weight_norm_factor=10.0)
    guard.start({"student": 2.0})
    assert guard.check({}, {"student": 19.9}) is None
    assert "student weight norm is 20.2, more than 10x its start value 2" in guard.check({}, {"student": 20.2})
    assert "weight norm is inf" in guard.check({}, {"student": math.inf})
    assert DivergenceGuard(weight_norm_factor=0).check({}, {"student": 1e30}) is None  # rule off


def test_loss_rule_waits_for_its_reference_and_ignores_non_finite_losses():
    guard = DivergenceGuard(loss_factor=100.0, warmup_steps=3)
    assert guard.check({"loss": 5000.0}, {}) is None  # no reference yet: the first values build it
    guard = DivergenceGuard(loss_factor=100.0, warmup_steps=3)
    for value in (1.0, 2.0, 1.0):
        assert guard.check({"loss": value}, {}) is None
    assert guard.check({"loss": math.nan}, {}) is None  # left to the non-finite skip logic
    reference = guard.loss_reference["loss"]
    assert guard.check({"loss": -50.0 * reference}, {}) is None  # |loss| counts; 50x is within the factor
    assert "|loss| is" in guard.check({"loss": 1e6}, {})
    # A loss converged to ~0 does not trip on noise thanks to the floor.
    guard = DivergenceGuard(loss_factor=100.0, warmup_steps=1, loss_floor=1e-3)
    guard.check({"loss": 1e-9}, {})
    assert guard.check({"loss": 0.05}, {}) is None


def test_weight_norm_in_float64():
    huge = [torch.full((4,), 1e20), torch.full((2, 2), 1e20)]
    assert trainable_weight_norm(huge) == pytest.approx(math.sqrt(8) * 1e20)


def make_trainer(teacher_dir, prompt_file, output_dir, **overrides):
    from diffusers_dmdr.families import get_family
    from diffusers_dmdr.trainer import DMDRTrainer

    values = {"cold_start_steps": 3, "max_train_steps": 3, "update_ratio": 1, **overrides}
    config = tiny_config(teacher_dir, prompt_file, output_dir, **values)
    return DMDRTrainer(config, get_family("sdxl").load_teacher(config.pretrained_model_name_or_path), ["a cat"])


def test_exploding_run_aborts_without_a_diverged_checkpoint(tiny_teacher_dirs, prompt_file, tmp_path):
    """Warmup from 0 makes step 1 a healthy (zero-LR) step that is checkpointed; at step 2 the learning rate of 50
    explodes the weights while every loss stays finite."""
    trainer = make_trainer(
        tiny_teacher_dirs["sdxl"],
        prompt_file,
        tmp_path,
        learning_rate=1e2,
        lr_scheduler="constant_with_warmup",
        lr_warmup_steps=2,
        checkpointing_steps=1,
    )
    with pytest.raises(DivergenceError) as error:
        trainer.train()
    message = str(error.value)
    assert "diverged at generator step 2: the student weight norm" in message
    assert f"--resume_from_checkpoint {tmp_path / 'checkpoint-1'}" in message
    assert all(math.isfinite(row["loss"]) for row in trainer.history)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1"]
    assert resolve_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-1"


def test_no_checkpoint_while_steps_are_skipped(tiny_teacher_dirs, prompt_file, tmp_path):
    from diffusers_dmdr.rewards import LoadedReward
    from diffusers_dmdr.trainer import NonFiniteLossError

    def nan_reward(images, prompts):
        return images.mean(dim=(1, 2, 3)) * float("nan")

    trainer = make_trainer(
        tiny_teacher_dirs["sdxl"],
        prompt_file,
        tmp_path,
        cold_start_steps=1,
        max_train_steps=4,
        checkpointing_steps=1,
        max_consecutive_nonfinite_steps=2,
    )
    trainer.rewards = [LoadedReward(name="nan", fn=nan_reward, weight=1.0, hinge=None)]
    with pytest.raises(NonFiniteLossError, match=f"resume with --resume_from_checkpoint {tmp_path / 'checkpoint-1'}"):
        trainer.train()
    # Step 1 (DMD only) was healthy; steps 2 and 3 were skipped and not checkpointed.
    assert [row["step_skipped"] for row in trainer.history] == [0.0, 1.0]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1"]
