"""`accelerate launch examples/train_dmdr/train.py` end to end on the tiny FLUX teachers (subprocesses, CPU).

One launch costs ~15 s of imports and start-up: FLUX.1 [dev] runs in `make test`, FLUX.2 [klein] (the same script
path, another family) in `make test-slow`.
"""

import json
from pathlib import Path

import pytest
from test_train_script import lora_b_norm, run_training, tiny_args

from diffusers_dmdr.families import get_family


def run_flux_family(family: str, teacher: str, prompt_file: str, tmp_path: Path) -> dict:
    """Two generator steps (DMD, then DMD + a reward), LoRA mode; checks the grid, the adapters and the export."""
    output_dir = tmp_path / "run"
    args = tiny_args(teacher, prompt_file, output_dir, steps=2, cold_start=1)
    run_training(args + ["--update_ratio", "1", "--reward", "reward_fixtures.sum_of_pixels_reward:0.1:hinge=none"])
    summary = json.loads((output_dir / "train_summary.json").read_text())
    assert summary["num_processes"] == 1 and summary["global_step"] == 2 and summary["nonfinite_steps"] == 0
    assert "loss_rl" not in summary["history"][0] and "loss_rl" in summary["history"][1]
    # The grid is the teacher scheduler's own 4-step grid at 64 px (dynamic shift), in the run and in the export.
    scheduler_config = json.loads((Path(teacher) / "scheduler" / "scheduler_config.json").read_text())
    expected = get_family(family).student_grid(4, None, scheduler_config, 64, 8)[0]
    assert summary["student_timesteps"] == expected
    exported = json.loads((output_dir / "scheduler" / "scheduler_config.json").read_text())
    assert exported["training_timesteps"] == expected
    final = output_dir / "checkpoint-2"
    assert lora_b_norm(final / "student_lora.safetensors") > 0
    assert lora_b_norm(final / "fake_lora.safetensors") > 0
    return exported


def test_flux_lora_through_accelerate_launch(tiny_teacher_dirs, prompt_file, tmp_path):
    run_flux_family("flux", tiny_teacher_dirs["flux"], prompt_file, tmp_path)


@pytest.mark.slow
def test_flux2_lora_through_accelerate_launch(tiny_teacher_dirs, prompt_file, tmp_path):
    """Slow: a second ~30 s launch of the script path `test_flux_lora_through_accelerate_launch` covers in
    `make test`; FLUX.2's family code is covered in-process by tests/test_families_flux.py."""
    run_flux_family("flux2", tiny_teacher_dirs["flux2"], prompt_file, tmp_path)
