"""`accelerate launch examples/train_dmdr/train.py` end to end on tiny teachers (subprocesses, CPU).

Each launch costs ~15 s of imports and start-up, so the runs are few and each checks several things.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_dmdr" / "train.py"
ACCELERATE = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]


def run_training(args: list[str], processes: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # Rewards given by import path (`reward_fixtures.sum_of_pixels_reward`) live in tests/.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "tests"), env.get("PYTHONPATH")]))
    launcher = ACCELERATE + ["--num_processes", str(processes)]
    if processes > 1:
        # On a CPU machine `--multi_gpu` plus ACCELERATE_USE_CPU gives a real 2-process gloo group (PLATFORM.md).
        env["ACCELERATE_USE_CPU"] = "true"
        launcher.append("--multi_gpu")
    else:
        launcher.append("--cpu")
    result = subprocess.run(launcher + [str(SCRIPT)] + args, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(
            f"training failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )
    return result


def tiny_args(teacher: str, prompts: str, output_dir: Path, steps: int = 3, cold_start: int = 1) -> list[str]:
    return [
        "--pretrained_model_name_or_path", teacher,
        "--train_prompts", prompts,
        "--output_dir", str(output_dir),
        "--resolution", "64",
        "--max_train_steps", str(steps),
        "--cold_start_steps", str(cold_start),
        "--dynamic_steps", "1",
        "--update_ratio", "2",
        "--train_batch_size", "2",
        "--lora_rank", "4", "--lora_alpha", "4", "--fake_lora_rank", "4", "--fake_lora_alpha", "4",
        "--learning_rate", "1e-3", "--learning_rate_fake", "1e-3",
        "--report_to", "none",
    ]  # fmt: skip


def lora_b_norm(path: Path) -> float:
    return sum(value.abs().sum().item() for key, value in load_file(path).items() if "lora_B" in key)


@pytest.fixture(scope="module")
def clip_reward_dir(tmp_path_factory) -> str:
    from reward_fixtures import save_tiny_clip

    return str(save_tiny_clip(tmp_path_factory.mktemp("clip")))


def test_sdxl_lora_with_8bit_adam_two_rewards_and_validation(
    tiny_teacher_dirs, prompt_file, clip_reward_dir, tmp_path
):
    output_dir = tmp_path / "run"
    run_training(
        tiny_args(tiny_teacher_dirs["sdxl"], prompt_file, output_dir)
        + ["--use_8bit_adam", "--reward", f"clip:0.5:model={clip_reward_dir}"]
        + ["--reward", "reward_fixtures.sum_of_pixels_reward:0.1:hinge=none"]
        + ["--eval_reward", "reward_fixtures.detached_reward:0.0", "--checkpointing_steps", "2"]
        + ["--validation_prompts", "a red cat", "a blue dog", "--validation_steps", "2", "--report_to", "tensorboard"]
    )
    summary = json.loads((output_dir / "train_summary.json").read_text())
    assert summary["num_processes"] == 1 and summary["global_step"] == 3 and summary["nonfinite_steps"] == 0
    history = summary["history"]
    assert "loss_rl" not in history[0]
    assert all("reward/clip" in row and "reward/sum_of_pixels_reward" in row for row in history[1:])
    assert "heldout_reward/detached_reward" in history[2] and "monitor/teacher_denoising_loss" in history[2]
    final = output_dir / "checkpoint-3"
    # Both adapters moved away from their zero-initialised B matrices; the teacher on disk is untouched by design.
    assert lora_b_norm(final / "student_lora.safetensors") > 0
    assert lora_b_norm(final / "fake_lora.safetensors") > 0
    assert (output_dir / "checkpoint-2").is_dir()
    assert sorted(p.name for p in (output_dir / "validation").iterdir()) == ["step-000002.png", "step-000003.png"]
    assert list((output_dir / "logs").rglob("events.out.tfevents*")), "tensorboard logs missing"


@pytest.mark.slow
def test_sd3_full_fine_tuning(tiny_teacher_dirs, prompt_file, tmp_path):
    """Slow (a ~25 s subprocess): the launch path is the one the SDXL and FLUX.1 launches run in `make test`, and a
    full SD3 student trains in-process there (tests/test_export.py's `sd3-4step-full` run)."""
    output_dir = tmp_path / "run"
    run_training(
        tiny_args(tiny_teacher_dirs["sd3"], prompt_file, output_dir, steps=2, cold_start=2)
        + ["--training_mode", "full"]
    )
    summary = json.loads((output_dir / "train_summary.json").read_text())
    assert summary["global_step"] == 2
    noise_levels = [t / 1000 for t in summary["student_timesteps"]]
    assert noise_levels == pytest.approx([1.0, 0.9001, 0.7504, 0.5010], abs=1e-4)
    student = load_file(output_dir / "checkpoint-2" / "student.safetensors")
    assert not any("lora" in key for key in student)
    # Trainable weights stay float32 under bf16 mixed precision.
    assert {value.dtype for value in student.values()} == {torch.float32}
    assert lora_b_norm(output_dir / "checkpoint-2" / "fake_lora.safetensors") > 0


def test_two_processes_keep_identical_replicas_in_a_run_without_stage_flags(tiny_teacher_dirs, prompt_file, tmp_path):
    """Two data-parallel processes with gradient accumulation, as a new user's short run: no --cold_start_steps /
    --dynamic_steps (they follow --max_train_steps), stage-2 overrides as flags."""
    output_dir = tmp_path / "run"
    args = tiny_args(tiny_teacher_dirs["sdxl"], prompt_file, output_dir, steps=4)
    for flag in ("--cold_start_steps", "--dynamic_steps", "--train_batch_size"):
        index = args.index(flag)
        del args[index : index + 2]
    overrides = ["--train_batch_size", "1", "--gradient_accumulation_steps", "2"]
    run_training(args + overrides + ["--stage2_learning_rate", "2e-4"], processes=2)
    saved = (output_dir / "dmdr_config.yaml").read_text()
    assert "cold_start_steps: 2\n" in saved and "dynamic_steps: 2\n" in saved
    summary = json.loads((output_dir / "train_summary.json").read_text())
    assert summary["num_processes"] == 2, "the launch fell back to a single process"
    assert summary["gradient_accumulation_steps"] == 2
    assert len(summary["replica_checksums"]) == 2
    assert summary["replicas_identical"], summary["replica_checksums"]
    assert summary["global_step"] == 4 and summary["iterations"] == 8
    assert [row["lr"] for row in summary["history"]] == [1e-3, 1e-3, 2e-4, 2e-4]
    assert [row["stage"] for row in summary["history"]] == [1.0, 1.0, 2.0, 2.0]
    # No --validation_prompts: training prompts are sampled for the grids, samples.png and the card (issue 27).
    from PIL import Image

    prompts = ["a red cat", "a blue dog", "the number seven", "a green house"]
    assert yaml.safe_load(saved)["validation_prompts"] == prompts
    from diffusers_dmdr.utils import CAPTION_HEIGHT

    assert Image.open(output_dir / "samples.png").size[1] == (64 + CAPTION_HEIGHT) * len(prompts)
    assert "![samples](samples.png)" in (output_dir / "README.md").read_text()


def test_default_validation_prompts_spread_over_the_training_prompts():
    from diffusers_dmdr.train import default_validation_prompts

    prompts = [f"prompt {index}" for index in range(10)]
    assert default_validation_prompts(prompts) == ["prompt 0", "prompt 2", "prompt 5", "prompt 7"]
    assert default_validation_prompts(["only one"]) == ["only one"]
    assert default_validation_prompts(["a", "b"], count=4) == ["a", "b"]


@pytest.mark.parametrize(
    ("family", "mode"),
    [
        # Both ~30 s launches run in `make test-slow`: the script path they take is the one
        # tests/test_train_script_flux.py::test_flux_lora_through_accelerate_launch runs in `make test` for a flow
        # transformer family, and the Z-Image / Qwen-Image family code runs in-process in `make test`
        # (tests/test_trainer.py, tests/test_families_zimage_qwenimage.py, tests/test_export.py).
        pytest.param("zimage", "lora", marks=pytest.mark.slow),
        pytest.param("qwenimage", "full", marks=pytest.mark.slow),
    ],
)
def test_new_flow_family_launch(family, mode, tiny_teacher_dirs, prompt_file, tmp_path):
    """`family: auto` detects Z-Image / Qwen-Image from the folder; the default grid is the teacher scheduler's own
    (Qwen-Image: with the resolution's mu, recorded in the exported scheduler); the student and the fake score move.
    (Both launches are ~30 s subprocesses, so they run in `make test-slow`.)"""
    output_dir = tmp_path / "run"
    run_training(
        tiny_args(tiny_teacher_dirs[family], prompt_file, output_dir, steps=2, cold_start=2)
        + ["--training_mode", mode, "--real_guidance_scale", "3.0"]
    )
    summary = json.loads((output_dir / "train_summary.json").read_text())
    assert summary["global_step"] == 2 and summary["nonfinite_steps"] == 0
    scheduler_config = json.loads((output_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler_config["training_timesteps"] == summary["student_timesteps"]
    # The export runs on the family's stock pipeline.
    model_index = json.loads((output_dir / "model_index.json").read_text())
    assert model_index["stock_pipeline"] == {"zimage": "ZImagePipeline", "qwenimage": "QwenImagePipeline"}[family]
    if family == "zimage":
        assert summary["student_timesteps"] == [1000.0, 900.0, 750.0, 500.0]
        assert lora_b_norm(output_dir / "checkpoint-2" / "student_lora.safetensors") > 0
    else:
        # Qwen-Image's grid: the stock sigmas at a static shift 3, no dynamic `mu`, no terminal stretch (issue 25).
        assert scheduler_config["grid_mu"] is None
        assert summary["student_timesteps"] == [1000.0, 900.0, 750.0, 500.0]
        student = load_file(output_dir / "checkpoint-2" / "student.safetensors")
        assert not any("lora" in key for key in student)
    assert lora_b_norm(output_dir / "checkpoint-2" / "fake_lora.safetensors") > 0
