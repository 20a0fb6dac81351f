"""GRPO's KL arm and DPO under accelerate DDP (2 gloo processes on CPU, `accelerate launch` of the training script):
the frozen stage-1 reference is the student as stage 2 began, identical on both processes, and it stays frozen."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_train_script import run_training, tiny_args

from diffusers_dmdr.rewards.scores import score_reward


@score_reward
def brightness(images, prompts):
    """A reward without gradients, loaded by the launched script as `test_rl_ddp.brightness` (tests/ is on its path)."""
    return [float(image.mean()) / 255.0 for image in images]


def student_tensors(checkpoint) -> list[torch.Tensor]:
    """The student's trainable weights in a checkpoint (its LoRA here)."""
    return list(load_file(checkpoint / "student_lora.safetensors").values())


@pytest.mark.parametrize(
    ("rl", "regularizer"),
    [
        ("grpo", "kl"),
        # Slow (a second ~25-45 s 2-process launch): DPO keeps its reference by the same code as the KL arm
        # (`RolloutObjective.before_update`), which the launch above checks in `make test`.
        pytest.param("dpo", "dmd", marks=pytest.mark.slow),
    ],
)
def test_the_stage_one_reference_under_ddp(tiny_teacher_dirs, prompt_file, tmp_path, rl, regularizer):
    output_dir = tmp_path / "run"
    args = tiny_args(tiny_teacher_dirs["sdxl"], prompt_file, output_dir, steps=3, cold_start=1)
    args += ["--rl", rl, "--rl_regularizer", regularizer, "--rl_group_size", "2", "--reward", "test_rl_ddp.brightness"]
    args += ["--checkpointing_steps", "1", "--checkpoints_total_limit", "5"]
    run_training(args, processes=2)
    summary = json.loads((output_dir / "train_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["replicas_identical"], summary["replica_checksums"]
    stage_two = [row for row in summary["history"] if row["stage"] == 2.0]
    assert len(stage_two) == 2 and all("rl/reward_mean" in row for row in stage_two)
    end_of_stage_one = student_tensors(output_dir / "checkpoint-1")
    for step in (2, 3):
        checkpoint = output_dir / f"checkpoint-{step}"
        references = [load_file(checkpoint / f"objective_state_{rank}.safetensors") for rank in (0, 1)]
        # Each process keeps its own copy (DDP replicates the student): the two are the same, tensor for tensor.
        assert references[0].keys() == references[1].keys() and references[0]
        for key in references[0]:
            assert torch.equal(references[0][key], references[1][key]), key
        # Every reference tensor is a student weight as stage 1 left it, and the reference holds all of them.
        reference = list(references[0].values())
        assert len(reference) == len(end_of_stage_one)
        for tensor in reference:
            assert any(tensor.shape == saved.shape and torch.equal(tensor, saved) for saved in end_of_stage_one)
    # The student moved on in stage 2 while the reference did not.
    final = student_tensors(output_dir / "checkpoint-3")
    assert any(not torch.equal(a, b) for a, b in zip(final, end_of_stage_one, strict=True))
