"""Bad inputs of issue 13 fail before any weight loads, in one message naming the flag or file and the fix."""

import json
import math
import os

import pytest
import yaml
from test_preflight import config_for, prompts, weightless_teacher  # noqa: F401  (fixtures)

from diffusers_dmdr import DMDRConfig
from diffusers_dmdr.checkpointing import CheckpointError, load_weights_file
from diffusers_dmdr.data import load_prompts
from diffusers_dmdr.preflight import check_run_inputs


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"learning_rate": -1e-4}, "--learning_rate must be a positive finite number"),
        ({"learning_rate": math.nan}, "--learning_rate must be a positive finite number"),
        ({"learning_rate_fake": 0.0}, "--learning_rate_fake must be a positive finite number"),
        ({"checkpoints_total_limit": 0}, "--checkpoints_total_limit must be at least 1"),
        ({"checkpoints_total_limit": -1}, "--checkpoints_total_limit must be at least 1"),
        ({"real_guidance_scale": 1.0, "guidance_scale_jitter": 1.5}, "could be negative"),
        ({"learning_rate": "fast"}, r"--learning_rate must be a number, got 'fast' \(str\)"),
        ({"max_train_steps": "many"}, "--max_train_steps must be an integer"),
        ({"reward_tilt": "maybe"}, "--reward_tilt must be true or false"),
        ({"family": "sdxxl"}, "--family must be one of"),
        ({"divergence_weight_norm_factor": 0.5}, "must be 0 \\(off\\) or a finite factor above 1"),
    ],
)
def test_bad_values_are_refused_by_the_config(overrides, message):
    values = {"pretrained_model_name_or_path": "teacher", "train_prompts": "p.txt", **overrides}
    with pytest.raises(ValueError, match=message):
        DMDRConfig(**values)


def test_yaml_values_are_coerced_to_their_types(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    # PyYAML reads `1e-4` (no dot) and quoted numbers as strings.
    recipe.write_text(
        "pretrained_model_name_or_path: t\ntrain_prompts: p.txt\nlearning_rate: 1e-4\nmax_train_steps: '10'\n"
        "cold_start_steps: 5\nreward_tilt: 'false'\nstudent_timesteps: [999, '749', 499, 249]\n",
        encoding="utf-8",
    )
    config = DMDRConfig.from_yaml(recipe)
    assert config.learning_rate == 1e-4 and isinstance(config.learning_rate, float)
    assert config.max_train_steps == 10 and config.reward_tilt is False
    assert config.student_timesteps == [999.0, 749.0, 499.0, 249.0]


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("learning_rate: 1e-6\nreward: [clip:0.3\nseed: 1\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"--config {recipe} is not valid YAML at line \d+, column \d+"):
        DMDRConfig.parse_args(["--config", str(recipe)])


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", r"contains no non-empty prompts \(the file is empty\); write one per line"),
        (b"\n  \n", "the file is empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is a binary file"),
        ("une caf\u00e9 cr\u00e8me\n".encode("latin-1"), r"is not UTF-8 text \(byte 0xe9 on line 1\); re-save"),
    ],
    ids=["empty", "blank", "binary", "latin-1"],
)
def test_unreadable_prompt_files(tmp_path, content, message):
    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_prompts(str(path))


def test_a_folder_given_as_the_prompt_file(tmp_path):
    with pytest.raises(ValueError, match="is a folder; give a prompt file inside it"):
        load_prompts(str(tmp_path))


def test_inpainting_unet_is_refused_before_loading(weightless_teacher, prompts):  # noqa: F811
    (weightless_teacher / "unet" / "config.json").write_text(json.dumps({"in_channels": 9}))
    with pytest.raises(ValueError, match="its unet takes 9 input channels but the VAE's latents have 4"):
        check_run_inputs(config_for(weightless_teacher, prompts))


def test_output_dir_that_is_a_file_or_under_a_file(weightless_teacher, prompts, tmp_path):  # noqa: F811
    file = tmp_path / "not-a-folder"
    file.write_text("x")
    with pytest.raises(ValueError, match=f"--output_dir {file} is a file"):
        check_run_inputs(config_for(weightless_teacher, prompts, output_dir=str(file)))
    with pytest.raises(ValueError, match="is a file, so the folder cannot be created"):
        check_run_inputs(config_for(weightless_teacher, prompts, output_dir=str(file / "run")))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders, so there is nothing to refuse")
def test_read_only_output_dir(weightless_teacher, prompts, tmp_path):  # noqa: F811
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="is not writable"):
            check_run_inputs(config_for(weightless_teacher, prompts, output_dir=str(folder / "run")))
    finally:
        folder.chmod(0o700)


def test_corrupt_checkpoint_file_is_named(tmp_path):
    path = tmp_path / "student_lora.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match=f"{path} is missing or corrupt"):
        load_weights_file(path)


def test_recipe_cannot_carry_the_opt_in_and_saved_configs_reload(tmp_path):
    config = DMDRConfig(pretrained_model_name_or_path="t", train_prompts="p.txt", allow_reward_import_paths=True)
    config.save_yaml(tmp_path / "saved.yaml")
    assert "allow_reward_import_paths" not in yaml.safe_load((tmp_path / "saved.yaml").read_text())
    assert DMDRConfig.from_yaml(tmp_path / "saved.yaml").allow_reward_import_paths is False


def test_published_files_redact_local_paths():
    from diffusers_dmdr.utils import redact_local_paths, redact_local_paths_in

    text = "teacher `/home/me/models/sdxl` (sdxl), reward clip:0.3:model=/data/clip-vit, base stabilityai/sdxl"
    assert redact_local_paths(text) == (
        "teacher `<local>/sdxl` (sdxl), reward clip:0.3:model=<local>/clip-vit, base stabilityai/sdxl"
    )
    assert redact_local_paths("see https://huggingface.co/papers/2511.13649 and ~/runs/a/") == (
        "see https://huggingface.co/papers/2511.13649 and <local>/a"
    )
    assert redact_local_paths_in({"a": ["/x/y.txt", 3], "b": None}) == {"a": ["<local>/y.txt", 3], "b": None}


def test_long_prompt_truncation_is_logged_once(caplog):
    import logging

    from diffusers_dmdr.utils import TRUNCATION_WARNING, log_prompt_truncation_once

    log_prompt_truncation_once("tests.fake_pipeline_module")
    log_prompt_truncation_once("tests.fake_pipeline_module")  # idempotent
    logger = logging.getLogger("tests.fake_pipeline_module")
    with caplog.at_level(logging.WARNING, logger="tests.fake_pipeline_module"):
        for _ in range(4):
            logger.warning(
                f"{TRUNCATION_WARNING} because CLIP can only handle sequences up to 77 tokens: {'x' * 100000}"
            )
        logger.warning("another warning")
    assert len(caplog.records) == 2
    assert len(caplog.records[0].getMessage()) < 400 and "shown once" in caplog.records[0].getMessage()
