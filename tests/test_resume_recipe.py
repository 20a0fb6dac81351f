# ruff: noqa: F401, F811  (pytest fixtures imported from test_preflight)
"""Resume with a changed recipe (issue 27.4): the preflight reads the checkpoint's `dmdr_config.yaml` and run facts,
refuses structural changes in one line naming the flag and the checkpoint's value, warns on batch, accumulation,
process-count and schedule changes, and keeps the stage boundaries the run under way derived from its length."""

import logging

import pytest
import torch
from safetensors.torch import save_file
from test_preflight import config_for, load_train_script, prompts, weightless_teacher

from diffusers_dmdr.checkpointing import CONFIG_FILE, atomic_checkpoint_save, save_trainer_state
from diffusers_dmdr.preflight import check_run_inputs


SDXL_GRID = [999.0, 749.0, 499.0, 249.0]


def write_checkpoint(config, step=2, family="sdxl", grid=SDXL_GRID, num_processes=1):
    def write(folder):
        save_file({"w": torch.zeros(4)}, folder / "student_lora.safetensors")
        save_file({"w": torch.zeros(4)}, folder / "fake_lora.safetensors")

    def finalize(folder):
        config.save_yaml(folder / CONFIG_FILE)
        run = {"family": family, "student_timesteps": grid, "num_processes": num_processes}
        save_trainer_state(folder, {"global_step": step, "iteration": step}, [], run)

    return atomic_checkpoint_save(config.output_dir, step, write, finalize)


def run(teacher, prompts, tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "run"), max_train_steps=4, cold_start_steps=None)
    return config_for(teacher, prompts, **{**values, **overrides})


@pytest.mark.parametrize(
    ("flag", "before", "after"),
    [
        ("lora_rank", 4, 8),
        ("training_mode", "lora", "full"),
        ("lora_target_modules", None, "to_q,to_k"),
        ("num_student_steps", 4, 2),
    ],
)
def test_structural_change_is_refused_in_one_line(weightless_teacher, prompts, tmp_path, flag, before, after):
    write_checkpoint(run(weightless_teacher, prompts, tmp_path, **{flag: before}))
    with pytest.raises(ValueError) as error:
        check_run_inputs(run(weightless_teacher, prompts, tmp_path, resume_from_checkpoint="latest", **{flag: after}))
    message = str(error.value)
    assert "\n" not in message
    recorded = "None" if before is None else str(before)
    assert f"differs from the checkpoint's --{flag} {recorded}" in message and "checkpoint-2" in message


def test_changed_family_or_grid_is_refused_before_any_weight(weightless_teacher, prompts, tmp_path):
    write_checkpoint(run(weightless_teacher, prompts, tmp_path), family="sd3")
    with pytest.raises(ValueError, match="trained from a sd3 teacher"):
        check_run_inputs(run(weightless_teacher, prompts, tmp_path, resume_from_checkpoint="latest"))
    write_checkpoint(run(weightless_teacher, prompts, tmp_path), step=3, grid=[999.0, 800.0, 500.0, 200.0])
    with pytest.raises(
        ValueError,
        match="--student_timesteps 999.0 749.0 499.0 249.0 differs from the checkpoint's "
        "--student_timesteps 999.0 800.0 500.0 200.0",
    ):
        check_run_inputs(run(weightless_teacher, prompts, tmp_path, resume_from_checkpoint="latest"))


def test_the_script_reports_a_changed_rank_as_one_line(weightless_teacher, prompts, tmp_path, capsys):
    config = run(weightless_teacher, prompts, tmp_path)
    write_checkpoint(config)
    argv = [
        "--pretrained_model_name_or_path",
        str(weightless_teacher),
        "--train_prompts",
        str(prompts),
        "--resolution",
        "64",
        "--max_train_steps",
        "4",
        "--report_to",
        "none",
        "--output_dir",
        config.output_dir,
        "--resume_from_checkpoint",
        "latest",
        "--lora_rank",
        "16",
    ]
    with pytest.raises(SystemExit) as exit_info:
        load_train_script().parse_and_check(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--lora_rank 16 differs from the checkpoint's --lora_rank 64" in err


def test_batch_accumulation_processes_and_schedule_changes_warn(
    weightless_teacher,
    prompts,
    tmp_path,
    caplog,
    monkeypatch,
):
    write_checkpoint(run(weightless_teacher, prompts, tmp_path), num_processes=2)
    monkeypatch.setenv("WORLD_SIZE", "1")
    resumed = run(
        weightless_teacher,
        prompts,
        tmp_path,
        resume_from_checkpoint="latest",
        train_batch_size=2,
        gradient_accumulation_steps=3,
        lr_scheduler="cosine",
    )
    with caplog.at_level(logging.WARNING):
        check_run_inputs(resumed)
    (warning,) = [r.message for r in caplog.records if "changed recipe" in r.message]
    for text in (
        "--train_batch_size 2 (checkpoint: 1)",
        "--gradient_accumulation_steps 3 (checkpoint: 1)",
        "--lr_scheduler cosine (checkpoint: constant)",
        "1 processes (checkpoint: 2)",
    ):
        assert text in warning


def test_a_longer_run_keeps_the_derived_stage_boundaries(weightless_teacher, prompts, tmp_path, caplog):
    first = run(weightless_teacher, prompts, tmp_path, max_train_steps=4)
    assert (first.cold_start_steps, first.dynamic_steps) == (2, 2)
    write_checkpoint(first, step=1)
    longer = run(weightless_teacher, prompts, tmp_path, max_train_steps=10, resume_from_checkpoint="latest")
    assert longer.cold_start_steps == 5  # what the flag alone would derive
    check_run_inputs(longer)
    assert (longer.cold_start_steps, longer.dynamic_steps) == (2, 2)
    # An explicit value is the user's: kept, with the schedule warning.
    explicit = run(
        weightless_teacher, prompts, tmp_path, max_train_steps=10, cold_start_steps=6, resume_from_checkpoint="latest"
    )
    with caplog.at_level(logging.WARNING):
        check_run_inputs(explicit)
    assert explicit.cold_start_steps == 6 and "--cold_start_steps 6 (checkpoint: 2)" in caplog.text


def test_unchanged_recipe_resumes_silently(weightless_teacher, prompts, tmp_path, caplog):
    write_checkpoint(run(weightless_teacher, prompts, tmp_path))
    with caplog.at_level(logging.WARNING):
        check_run_inputs(run(weightless_teacher, prompts, tmp_path, resume_from_checkpoint="latest"))
    assert "changed recipe" not in caplog.text
