"""Issue 27 items 7 and 9: every entry point ends the project's errors in one line (exit 1 or 2), the traceback
behind `--debug` / `DMDR_DEBUG=1`; each bad value of the issue is refused before any weight loads; what a user
expects of the command lines (usage lines, named recipes, captioned grids).

The teacher is the weightless folder of tests/test_preflight.py (configs only): a value that passed the checks would
reach the loader and fail with a different message and a traceback.
"""

import importlib
import importlib.util
import math
import sys

import pytest
from test_preflight import prompts, weightless_teacher  # noqa: F401  (fixtures)

from diffusers_dmdr import cli
from diffusers_dmdr.config import LR_SCHEDULERS, TRACKERS


def run_train(argv, capsys):
    """`dmdr-train argv`: (exit status, stderr)."""
    train = importlib.import_module("diffusers_dmdr.train")
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    return exit_info.value.code, capsys.readouterr().err


def assert_one_line(err: str, message: str, program: str = "dmdr-train") -> None:
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"{program}: error: ") and message in err, err


def base_argv(teacher, prompt_file) -> list[str]:
    return ["--pretrained_model_name_or_path", str(teacher), "--train_prompts", str(prompt_file), "--resolution", "64"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lr_scheduler", "bogus"], "--lr_scheduler must be one of"),
        (["--num_validation_images", "0"], "--num_validation_images must be at least 1"),
        (["--report_to", "bogus"], "unknown tracker(s) ['bogus']"),
        (["--report_to", "tensorboard,all"], "give it alone"),
        (["--shift", "-3"], "--shift must be a positive finite number"),
        (["--stage2_learning_rate", "nan"], "--stage2_learning_rate must be positive and finite"),
        (["--stage2_learning_rate", "inf"], "--stage2_learning_rate must be positive and finite"),
        (["--checkpointing_steps", "-1"], "--checkpointing_steps must be 0 (off) or a positive number"),
        (["--validation_steps", "-5"], "--validation_steps must be 0 (off) or a positive number"),
        (["--max_train_samples", "-1"], "--max_train_samples must be at least 1"),
        (["--max_train_samples", "0"], "--max_train_samples must be at least 1"),
        (["--hub_model_id", "not valid!!"], "--hub_model_id 'not valid!!' is not a valid Hub repo id"),
    ],
)
def test_bad_values_are_one_line_before_any_weight_loads(weightless_teacher, prompts, capsys, extra, message):  # noqa: F811
    status, err = run_train(base_argv(weightless_teacher, prompts) + extra, capsys)
    assert status == 2
    assert_one_line(err, message)


def test_tracker_lists_and_missing_trackers(weightless_teacher, prompts, capsys, monkeypatch):  # noqa: F811
    """`tensorboard,wandb` is a list accelerate takes; each tracker must be installed (comet_ml included)."""
    import diffusers_dmdr.preflight as preflight
    from diffusers_dmdr.config import report_to_trackers

    assert report_to_trackers("tensorboard,wandb") == ["tensorboard", "wandb"] and report_to_trackers("none") == []
    real_find_spec = importlib.util.find_spec
    missing = {"comet_ml", "wandb"}
    monkeypatch.setattr(
        preflight.importlib.util, "find_spec", lambda name, *a: None if name in missing else real_find_spec(name, *a)
    )
    for value, tracker in (("comet_ml", "comet_ml"), ("tensorboard,wandb", "wandb")):
        status, err = run_train(base_argv(weightless_teacher, prompts) + ["--report_to", value], capsys)
        assert status == 2
        assert_one_line(err, f"--report_to {value} needs {tracker}: `pip install {tracker}`")


def test_fp16_on_a_cpu_is_refused(weightless_teacher, prompts, capsys, monkeypatch):  # noqa: F811
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    status, err = run_train(base_argv(weightless_teacher, prompts) + ["--mixed_precision", "fp16"], capsys)
    assert status == 2
    assert_one_line(err, "--mixed_precision fp16 needs a GPU")


def test_the_config_lists_agree_with_diffusers_and_accelerate():
    from accelerate.utils import LoggerType
    from diffusers.optimization import SchedulerType

    assert set(LR_SCHEDULERS) == {kind.value for kind in SchedulerType}
    assert set(TRACKERS) | {"all"} == {kind.value for kind in LoggerType}


def test_project_error_classes_are_where_the_handler_looks():
    for module, name in cli.PROJECT_ERRORS:
        assert isinstance(getattr(importlib.import_module(module), name), type), (module, name)


@pytest.mark.parametrize(
    "module, name, status",
    [
        ("diffusers_dmdr.checkpointing", "CheckpointError", 1),
        ("diffusers_dmdr.trainer", "NonFiniteLossError", 1),
        ("diffusers_dmdr.guards", "DivergenceError", 1),
        ("diffusers_dmdr.hub", "HubUploadError", 1),
    ],
)
def test_run_time_errors_are_one_line_and_debug_shows_the_traceback(module, name, status, capsys, monkeypatch):
    error_class = getattr(importlib.import_module(module), name)

    def failing_main(argv):
        assert "--debug" not in argv
        raise error_class("checkpoint-4 is corrupt\n(second line of the message)")

    monkeypatch.delenv(cli.DEBUG_ENVIRONMENT_VARIABLE, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.run_entry_point("dmdr-train", failing_main, ["--x", "1"])
    assert exit_info.value.code == status
    err = capsys.readouterr().err
    assert_one_line(err, "checkpoint-4 is corrupt (second line of the message)")
    assert "--debug or DMDR_DEBUG=1" in err
    with pytest.raises(error_class):
        cli.run_entry_point("dmdr-train", failing_main, ["--debug"])
    monkeypatch.setenv(cli.DEBUG_ENVIRONMENT_VARIABLE, "1")
    with pytest.raises(error_class):
        cli.run_entry_point("dmdr-train", failing_main, [])


def test_a_bug_keeps_its_traceback(monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENVIRONMENT_VARIABLE, raising=False)

    def buggy_main(argv):
        return {}["missing"]

    with pytest.raises(KeyError):
        cli.run_entry_point("dmdr-export", buggy_main, [])
    with pytest.raises(ValueError, match="invalid literal"):
        cli.run_entry_point("dmdr-export", lambda argv: int("x"), [])


def test_export_cli_bad_inputs_are_one_line(weightless_teacher, tmp_path, capsys, monkeypatch):  # noqa: F811
    """dmdr-export: no checkpoint, an incomplete one, an output folder that is a file, a push without a valid id."""
    from diffusers_dmdr import export_cli
    from diffusers_dmdr.checkpointing import COMPLETE_MARKER, CONFIG_FILE, STUDENT_LORA_FILE

    monkeypatch.delenv(cli.DEBUG_ENVIRONMENT_VARIABLE, raising=False)

    def run(argv):
        with pytest.raises(SystemExit) as exit_info:
            export_cli.main(argv)
        return exit_info.value.code, capsys.readouterr().err

    status, err = run(["--checkpoint", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "out")])
    assert status == 2
    assert_one_line(err, "is neither a checkpoint folder", "dmdr-export")

    checkpoint = tmp_path / "run" / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    (checkpoint / CONFIG_FILE).write_text(
        f"pretrained_model_name_or_path: {weightless_teacher}\ntrain_prompts: p.txt\nreport_to: none\n",
        encoding="utf-8",
    )
    (checkpoint / STUDENT_LORA_FILE).write_bytes(b"truncated")
    status, err = run(["--checkpoint", str(checkpoint), "--output_dir", str(tmp_path / "out")])
    assert status == 2
    assert_one_line(err, f"is not a complete checkpoint: no {COMPLETE_MARKER}", "dmdr-export")

    from diffusers_dmdr.checkpointing import write_complete_marker

    write_complete_marker(checkpoint, 4)
    status, err = run(["--checkpoint", str(checkpoint), "--output_dir", str(tmp_path / "out")])
    assert status == 1  # the LoRA file is truncated: a CheckpointError naming it, before the teacher loads
    assert_one_line(err, f"{STUDENT_LORA_FILE} is missing or corrupt", "dmdr-export")

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    status, err = run(["--checkpoint", str(checkpoint), "--output_dir", str(a_file)])
    assert status == 2
    assert_one_line(err, "is a file; give a folder", "dmdr-export")

    status, err = run(["--checkpoint", str(checkpoint), "--output_dir", str(tmp_path / "out"), "--push_to_hub"])
    assert status == 2
    assert_one_line(err, "--push_to_hub needs --hub_model_id", "dmdr-export")
    argv = ["--checkpoint", str(checkpoint), "--output_dir", str(tmp_path / "out"), "--push_to_hub"]
    status, err = run(argv + ["--hub_model_id", "not valid!!"])
    assert status == 2
    assert_one_line(err, "is not a valid Hub repo id", "dmdr-export")


def test_usage_lines_name_the_programs(capsys):
    from diffusers_dmdr import export_cli
    from diffusers_dmdr.train import parse_and_check

    for main, program in ((parse_and_check, "dmdr-train"), (export_cli.main, "dmdr-export")):
        with pytest.raises(SystemExit):
            main(["--help"])
        out = capsys.readouterr().out
        assert out.startswith(f"usage: {program} "), out[:200]
        assert "--debug" in out


def test_stage2_rates_and_max_train_samples_are_still_accepted_when_valid():
    from diffusers_dmdr import DMDRConfig

    config = DMDRConfig(
        pretrained_model_name_or_path="t",
        train_prompts="p.txt",
        stage2_learning_rate=5e-7,
        max_train_samples=1,
        checkpointing_steps=0,
        report_to="tensorboard,wandb",
        hub_model_id="org/name",
        shift=3.0,
    )
    assert math.isfinite(config.stage2_learning_rate) and config.report_to == "tensorboard,wandb"
    assert "diffusers_dmdr.cli" in sys.modules


def test_demo_and_build_tiny_help_and_errors(capsys, tmp_path, monkeypatch):
    """The demo's help shows --max_train_steps; build-tiny's errors are one line like every entry point's."""
    from diffusers_dmdr import demo, testing

    help_text = demo.build_argument_parser().format_help()
    assert "--max_train_steps" in help_text and "--debug" in help_text
    monkeypatch.delenv(cli.DEBUG_ENVIRONMENT_VARIABLE, raising=False)

    def bad_build(*args, **kwargs):
        raise ValueError("the output folder is a file")

    monkeypatch.setattr(testing, "build_tiny_pipeline", bad_build)
    # A ValueError raised by a package `raise` statement is a checked input error.
    monkeypatch.setattr(cli, "is_checked_input_error", lambda error: True)
    with pytest.raises(SystemExit) as exit_info:
        testing.main(["build-tiny", "--family", "sdxl", "--output", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert_one_line(capsys.readouterr().err, "the output folder is a file", "python -m diffusers_dmdr.testing")


def test_shipped_recipes_are_named_by_config(tmp_path):
    """Issue 27 item 9: `--config sdxl_4step` reads the shipped recipe; an unknown name lists the known ones."""
    from diffusers_dmdr import DMDRConfig
    from diffusers_dmdr.config import recipe_folder, recipe_names

    required = ["--pretrained_model_name_or_path", "t", "--train_prompts", "p.txt"]
    assert {"sdxl_4step", "sdxl_1step", "sd3_medium_4step", "flux1_dev_4step"} <= set(recipe_names())
    by_name = DMDRConfig.parse_args(["--config", "sdxl_4step", *required])
    by_path = DMDRConfig.parse_args(["--config", str(recipe_folder() / "sdxl_4step.yaml"), *required])
    assert by_name.to_dict() == by_path.to_dict() and by_name.num_student_steps == 4
    with pytest.raises(FileNotFoundError, match="or a shipped recipe's name: .*sdxl_4step"):
        DMDRConfig.parse_args(["--config", "sdxl_5step", *required])


@pytest.mark.slow
def test_the_wheel_ships_the_recipes(tmp_path):
    """The wheel holds `diffusers_dmdr/recipes/*.yaml`, where an installed package finds them."""
    import subprocess
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
    subprocess.run([*command, str(root)], check=True, timeout=600)
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "diffusers_dmdr/recipes/sdxl_4step.yaml" in names and "diffusers_dmdr/config.py" in names


@pytest.mark.parametrize("flag, advice", [("--dataloader_num_workers", "no data loader")])
def test_diffusers_script_flags_say_what_to_do(weightless_teacher, prompts, capsys, flag, advice):  # noqa: F811
    """The diffusers-script flags DMDR has no use for say why in one line (`--pretrained_vae_model_name_or_path`,
    `--lora_dropout` and `--cache_dir` are implemented: tests/test_diffusers_flags.py)."""
    for form in ([flag, "x"], [f"{flag}=x"]):
        status, err = run_train(base_argv(weightless_teacher, prompts) + form, capsys)
        assert status == 2
        assert_one_line(err, f"{flag} is a flag of diffusers' training scripts that DMDR does not take")
        assert advice in err


def test_grids_carry_row_captions_and_a_header():
    """Issue 27 item 9: which row is which prompt (validation, samples.png) or which pipeline (evaluate), in the
    image itself; uncaptioned grids keep their size."""
    import numpy as np
    import torch

    from diffusers_dmdr.utils import CAPTION_HEIGHT, image_grid

    images = torch.full((4, 3, 64, 64), 0.5)
    assert image_grid(images, rows=2).size == (128, 128)
    captioned = image_grid(images, rows=2, row_captions=["a red cat", "a blue dog"], header="prompts: a | b")
    assert captioned.size == (128, CAPTION_HEIGHT + 2 * (64 + CAPTION_HEIGHT))
    pixels = np.asarray(captioned)
    strips = [pixels[:CAPTION_HEIGHT], pixels[CAPTION_HEIGHT : 2 * CAPTION_HEIGHT]]
    assert all((strip < 128).any() for strip in strips)  # dark text on the white strips
    cell = pixels[2 * CAPTION_HEIGHT : 2 * CAPTION_HEIGHT + 64]
    assert (cell == 128).all()  # the first row's images start right under its caption
    with pytest.raises(ValueError, match="1 row captions for a grid of 2 rows"):
        image_grid(images, rows=2, row_captions=["one"])
    # A caption longer than the strip is cut, not spilled over the images.
    long = image_grid(images[:1], rows=1, row_captions=["word " * 200])
    assert long.size == (64, 64 + CAPTION_HEIGHT)
